"""Background readahead: turns a cold start's page faults into one sequential read.

Touching a freshly mapped tensor faults its pages in a few at a time, in whatever order the
program goes; on a slow disk that is the cold-start cost. A :class:`Prefetcher` reads the
loaded tensors' bytes in execution order in large blocks on a thread, so the page cache is
filled at the disk's sequential speed just ahead of the program.

The reads release the GIL, reuse a small ring of buffers (no memory grows), and stop when
everything is read or when every tensor they were prefetching for has been garbage-collected.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path

BLOCK = 8 << 20  # the staged reader's block
GAP = 1 << 20  # tensors closer than this in one shard are read as one range (a seek costs more)


class Prefetcher:
    """Reads ``ranges`` (file, start, end), in order, on a daemon thread, through the staged
    reader (:mod:`prebake.cache.reader`: large buffered reads, several in flight, into a small
    ring of reused buffers: the page cache keeps the bytes, nothing else does)."""

    def __init__(self, ranges: Iterable[tuple[Path, int, int]], owners: Iterable[object] = (),
                 block: int = BLOCK):
        self.ranges = list(ranges)
        self.block = block
        self._owners = [weakref.ref(o) for o in owners]
        self._report = None
        self._thread = threading.Thread(target=self._run, name="prebake-prefetch", daemon=True)
        self._thread.start()

    @property
    def done_bytes(self) -> int:
        return self._report.bytes if self._report else 0

    def join(self, timeout: float | None = None) -> bool:
        """Waits for the read to finish; True if it did."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _wanted(self) -> bool:
        return not self._owners or any(r() is not None for r in self._owners)

    def _run(self) -> None:
        from prebake.cache.reader import ALIGN, Reader, ReadReport, Run
        from prebake.formats.errors import PrebakeError

        self._report = ReadReport("prefetch")
        reader = Reader(self._report, direct=False, block=self.block)
        ring = [memoryview(bytearray(self.block)) for _ in range(reader.inflight + 1)]
        for path, start, end in self.ranges:
            try:
                run = Run(Path(path), os.path.getsize(path), start - start % ALIGN, end)
                for _ in reader.blocks(run, lambda i, off, n: ring[i % len(ring)][:n]):
                    if not self._wanted():
                        break
            except (OSError, PrebakeError):
                continue  # a prefetch is a hint: a file that went away is not its business
            if not self._wanted():
                break


def coalesce(spans: Iterable[tuple[int, int, int]], shard_path: Callable[[int], Path],
             gap: int = GAP) -> list[tuple[Path, int, int]]:
    """Byte ranges to read, in the order of ``spans`` (shard, offset, nbytes): neighbours in one
    shard less than ``gap`` apart join one range."""
    out: list[list] = []
    for shard, offset, nbytes in spans:
        if out and out[-1][0] == shard and 0 <= offset - out[-1][2] < gap:
            out[-1][2] = max(out[-1][2], offset + nbytes)
        else:
            out.append([shard, offset, offset + nbytes])
    return [(shard_path(s), lo, hi) for s, lo, hi in out if hi > lo]


def bake_ranges(manifest) -> list[tuple[Path, int, int]]:
    """Every stored byte range of a bake, in execution order (what ``prebake warm`` reads)."""
    return coalesce(((b.shard, b.offset, b.nbytes) for _, b in manifest.blobs()), manifest.shard_path)
