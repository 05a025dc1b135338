"""Staged loads: a bake's wanted bytes read into memory the process owns, or onto a GPU.

:func:`load_runs` reads every run (:mod:`prebake.cache.reader`) and returns a
:class:`RunBuffers` whose ``view`` makes tensors exactly as the mapped load's does, so both
loads build their dictionaries the same way:

- on the CPU, each run is read straight into one aligned buffer (no staging, no copy): tensors
  are views of it, and stay valid whatever happens to the files afterwards;
- on a GPU, each run gets one device allocation; blocks are read into a ring of pinned buffers
  (allocated once per process and device, reused by every load) and copied with
  ``non_blocking=True`` on a side stream, so the disk and the PCIe link work at the same time.
  A buffer is read into again only after the copy out of it has finished (an event per buffer).
"""

from __future__ import annotations

import threading
import time

import torch
from prebake.cache.reader import Reader, ReadReport, Run, Verifier, aligned_buffer


class RunBuffers:
    """The runs' bytes, wherever they were put; ``view`` cuts tensors out of them."""

    def __init__(self, runs: list[Run], buffers: list[torch.Tensor], shard_of: dict):
        self.runs, self.buffers = runs, buffers
        self.by_shard: dict[object, list[int]] = {}
        for i, run in enumerate(runs):
            self.by_shard.setdefault(shard_of[run.path], []).append(i)
        self.strides: dict[tuple, tuple] = {}

    def view(self, shard: int, dtype: torch.dtype, offset: int, shape) -> torch.Tensor:
        for i in self.by_shard[shard]:
            run = self.runs[i]
            if run.start <= offset < run.end or (offset == run.end and not shape):
                break
        else:
            raise KeyError(offset)
        start = offset - run.start
        n = dtype.itemsize
        for d in shape:
            n *= d
        return self.buffers[i][start:start + n].view(dtype).view(tuple(shape))

    def values(self):
        return self.buffers


def load_runs(runs: list[Run], shard_of: dict, device: torch.device, scheme: str | None,
              direct: str | bool = "auto") -> tuple[RunBuffers, ReadReport]:
    """Reads ``runs`` onto ``device`` (``scheme``: the manifest's checksum scheme, to verify with)."""
    report = ReadReport("cuda" if device.type == "cuda" else "eager")
    reader = Reader(report, direct)
    verifier = Verifier(scheme) if scheme else None
    start = time.perf_counter()
    if device.type == "cpu":
        buffers = [_read_to_host(reader, run, verifier) for run in runs]
    else:
        buffers = _read_to_device(reader, runs, device, verifier)
    report.seconds = time.perf_counter() - start
    report.verified = verifier.count if verifier else 0
    reader.finish()
    return RunBuffers(runs, buffers, shard_of), report


def _read_to_host(reader: Reader, run: Run, verifier: Verifier | None) -> torch.Tensor:
    buf = aligned_buffer(run.nbytes)
    reader.read_into(run, memoryview(buf.numpy()), verifier)
    return buf


# ---------------------------------------------------------------------------- to a GPU

_rings: dict[tuple, list] = {}
_rings_lock = threading.Lock()


def _ring(device: torch.device, block: int, count: int) -> list:
    """This process's pinned staging buffers for ``device`` (made once: pinned memory does not
    grow load after load), each with the event of the last copy out of it."""
    key = (str(device), block, count)
    with _rings_lock:
        ring = _rings.get(key)
        if ring is None:
            ring = _rings[key] = []
            for _ in range(count):
                raw = torch.empty(block + 4096, dtype=torch.uint8, pin_memory=True)
                skip = -raw.data_ptr() % 4096
                ring.append([raw[skip:skip + block], None])
    return ring


def _read_to_device(reader: Reader, runs: list[Run], device: torch.device, verifier: Verifier | None):
    stream = torch.cuda.Stream(device)
    ring = _ring(device, reader.block, reader.inflight + 1)
    out = []
    for run in runs:
        dev = torch.empty(run.nbytes, dtype=torch.uint8, device=device)
        out.append(dev)
        stream_check = _Stream(verifier, run) if verifier is not None else None

        def target(i: int, offset: int, n: int, run=run) -> memoryview:
            slot = ring[i % len(ring)]
            if slot[1] is not None:
                slot[1].synchronize()  # the last copy out of this buffer has finished
            return memoryview(slot[0].numpy())[:n]

        for offset, n in reader.blocks(run, target):
            slot = ring[((offset - run.start) // reader.block) % len(ring)]
            host = slot[0][:n]
            if stream_check is not None:  # checked from the host copy, before it goes over
                stream_check.feed(offset, memoryview(host.numpy()))
            with torch.cuda.stream(stream):
                dev[offset - run.start:offset - run.start + n].copy_(host, non_blocking=True)
                slot[1] = torch.cuda.Event()
                slot[1].record(stream)
    stream.synchronize()
    return out


class _Stream:
    """Checks a run's spans from blocks that arrive in order (a span may straddle blocks: its
    bytes are gathered until complete; a span inside one block is checked in place)."""

    def __init__(self, verifier: Verifier, run: Run):
        self.verifier, self.run, self.next, self.part = verifier, run, 0, bytearray()

    def feed(self, offset: int, data: memoryview) -> None:
        end = offset + len(data)
        spans = self.run.spans
        while self.next < len(spans):
            key, start, nbytes, digest = spans[self.next]
            if start >= end:
                return
            lo, hi = max(start, offset), min(start + nbytes, end)
            whole = data[lo - offset:hi - offset]
            if self.part or hi < start + nbytes:
                self.part += whole
                if hi < start + nbytes:
                    return
                whole, self.part = memoryview(self.part), bytearray()
            if digest is not None:
                one = Run(self.run.path, self.run.size, start, start + nbytes, [spans[self.next]])
                self.verifier.check(one, whole, start + nbytes, 0)
            self.next += 1

