"""The staged reader: a bake's bytes read in large aligned blocks, several in flight.

Mapped loads let the kernel fault pages in a few at a time; that is right for the page cache
and wrong for a GPU, a network filesystem, or a load that must not depend on the file after it
returns. This reader reads the wanted byte ranges of a bake (:class:`Run`: one shard's span of
wanted tensors, coalesced in layout order) in blocks of :data:`BLOCK` bytes, :data:`INFLIGHT`
at a time on a thread pool (``preadv`` releases the GIL), with ``O_DIRECT`` where the
filesystem allows it and the bytes are not already cached (then the page cache is neither read
twice nor filled with a copy nobody maps), else buffered. Each block lands either straight in
memory the caller owns (an eager load: no copy at all) or in a ring of reusable staging
buffers (pinned, for a GPU) that the caller drains as blocks arrive, in order.

With a :class:`Verifier`, every tensor's checksum is checked as its bytes pass: integrity at no
extra read.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from prebake.formats.errors import ManifestError, VerifyError
from prebake.formats.manifest import checksum

BLOCK = 8 << 20
INFLIGHT = 4
ALIGN = 4096  # O_DIRECT wants offsets, lengths and buffer addresses aligned to the logical block
GAP = 1 << 20  # wanted ranges closer than this in one shard are read as one run


@dataclass
class Run:
    """Bytes ``[start, end)`` of one shard (``start``, ``end`` aligned) and the tensors inside."""

    path: Path
    size: int  # the shard file's size
    start: int
    end: int
    spans: list = field(default_factory=list)  # (key, offset, nbytes, checksum) in offset order

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class ReadReport:
    """What a staged load did: how much it read, how, and how fast."""

    mode: str
    bytes: int = 0
    seconds: float = 0.0
    direct: bool = False  # every byte read with O_DIRECT
    verified: int = 0  # tensors whose checksum was checked as they passed
    notes: list[str] = field(default_factory=list)

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds else 0.0


def plan_runs(spans: list[tuple], shard_path: Callable[[int], Path], shard_size: Callable[[int], int],
              gap: int = GAP) -> list[Run]:
    """Runs of ``spans`` ``(key, shard, offset, nbytes, checksum)``: per shard, in offset order,
    neighbours closer than ``gap`` joined, each widened to ``ALIGN`` boundaries (within the file)."""
    by_shard: dict[int, list] = {}
    for key, shard, offset, nbytes, digest in spans:
        by_shard.setdefault(shard, []).append((key, offset, nbytes, digest))
    runs = []
    for shard, items in sorted(by_shard.items()):
        items.sort(key=lambda s: s[1])
        size = shard_size(shard)
        for key, offset, nbytes, digest in items:
            if runs and runs[-1].path == shard_path(shard) and offset - runs[-1].end < gap:
                runs[-1].end = max(runs[-1].end, _up(offset + nbytes, size))
            else:
                runs.append(Run(shard_path(shard), size, offset - offset % ALIGN, _up(offset + nbytes, size)))
            runs[-1].spans.append((key, offset, nbytes, digest))
    return runs


def _up(n: int, size: int) -> int:
    """``n`` rounded up to ``ALIGN``, but never past the file's aligned end."""
    return min(-(-n // ALIGN) * ALIGN, -(-size // ALIGN) * ALIGN)


class Verifier:
    """Checks each tensor's checksum once all its bytes have arrived (``scheme``: the manifest's)."""

    def __init__(self, scheme: str):
        self.scheme = scheme
        self.count = 0

    def check(self, run: Run, buffer: memoryview, done: int, next_span: int) -> int:
        """Checks the spans of ``run`` from ``next_span`` whose bytes lie below file offset
        ``done`` (``buffer`` holds the run from ``run.start``); returns the next span to check."""
        while next_span < len(run.spans):
            key, offset, nbytes, digest = run.spans[next_span]
            if offset + nbytes > done:
                break
            if digest is None:  # a part of a tensor (a tensor-parallel slice): its checksum is the whole's
                next_span += 1
                continue
            if checksum(buffer[offset - run.start:offset - run.start + nbytes], self.scheme) != digest:
                raise VerifyError(f"tensor {key!r} does not match its checksum (corrupted)", run.path)
            self.count += 1
            next_span += 1
        return next_span


class Reader:
    """Reads runs in blocks, ``inflight`` at a time; ``direct``: "auto", True or False."""

    def __init__(self, report: ReadReport, direct: str | bool = "auto", block: int = BLOCK,
                 inflight: int = INFLIGHT):
        self.report, self.direct, self.block, self.inflight = report, direct, block, inflight
        self._lock = threading.Lock()
        self._ways: set[str] = set()  # how runs were read: "direct", "buffered"

    def finish(self) -> ReadReport:
        """The report, ``direct`` true when every byte went through O_DIRECT."""
        self.report.direct = self._ways == {"direct"}
        return self.report

    def read_into(self, run: Run, buffer: memoryview, verifier: Verifier | None = None) -> None:
        """Reads ``run`` into ``buffer`` (``run.nbytes`` long, ``ALIGN``-aligned for O_DIRECT)."""
        next_span = 0
        for offset, n in self.blocks(run, lambda i, off, n: buffer[off - run.start:off - run.start + n]):
            if verifier is not None:
                next_span = verifier.check(run, buffer, offset + n, next_span)

    def blocks(self, run: Run, target: Callable[[int, int, int], memoryview]) -> Iterator[tuple[int, int]]:
        """Reads ``run`` block by block; block ``i`` at file offset ``off`` of ``n`` bytes goes into
        ``target(i, off, n)``. Yields ``(off, n)`` of each block once it and all before it are in."""
        fd, direct = self._open(run)
        try:
            starts = list(range(run.start, run.end, self.block))
            with ThreadPoolExecutor(self.inflight, thread_name_prefix="prebake-read") as pool:
                futures = {}
                for i, off in enumerate(starts):
                    if i >= self.inflight:  # bounded: block i waits for block i - inflight's consumer
                        done_off = starts[i - self.inflight]
                        yield done_off, futures.pop(i - self.inflight).result()
                    n = min(self.block, run.end - off)
                    futures[i] = pool.submit(self._pread, fd, direct, run, target(i, off, n), off)
                for i in sorted(futures):
                    yield starts[i], futures[i].result()
        finally:
            os.close(fd)

    def _open(self, run: Run) -> tuple[int, bool]:
        direct = self.direct is True or (self.direct == "auto" and not _cached(run))
        if direct and hasattr(os, "O_DIRECT"):
            try:
                fd = os.open(run.path, os.O_RDONLY | os.O_DIRECT)
                self._ways.add("direct")
                return fd, True
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise ManifestError(f"cannot read shard ({e.strerror})", run.path) from None
                self._note(f"{run.path.parent}: the filesystem refuses O_DIRECT; buffered reads")
        self._ways.add("buffered")
        try:
            fd = os.open(run.path, os.O_RDONLY)
        except OSError as e:
            raise ManifestError(f"cannot read shard ({e.strerror})", run.path) from None
        os.posix_fadvise(fd, run.start, run.nbytes, os.POSIX_FADV_SEQUENTIAL)
        return fd, False

    def _pread(self, fd: int, direct: bool, run: Run, into: memoryview, offset: int) -> int:
        want = min(len(into), run.size - offset)  # the aligned tail past the file's end stays unread
        got = 0
        while got < want:
            try:
                n = os.preadv(fd, [into[got:]], offset + got)
            except OSError as e:
                if direct and e.errno == errno.EINVAL:  # an unaligned buffer or a filesystem quirk
                    self._note(f"{run.path}: O_DIRECT read refused; buffered read")
                    plain = os.open(run.path, os.O_RDONLY)
                    try:
                        return self._pread(plain, False, run, into, offset)
                    finally:
                        os.close(plain)
                raise ManifestError(f"cannot read shard ({e.strerror})", run.path) from None
            if n == 0:
                raise ManifestError(f"shard ends at byte {offset + got}, before the manifest's {want + offset}: "
                                    "the bake is damaged; run 'prebake verify'", run.path)
            got += n
        with self._lock:
            self.report.bytes += got
        return got

    def _note(self, text: str) -> None:
        with self._lock:
            self._ways.add("buffered")
            if text not in self.report.notes:
                self.report.notes.append(text)


def _cached(run: Run) -> bool:
    """Whether most of ``run`` is in the page cache already, where a buffered read is a memory
    copy and O_DIRECT would read the disk again."""
    return _mincore_fraction(run) > 0.5


def _mincore_fraction(run: Run) -> float:
    """The fraction of ``run``'s pages in the page cache (0.0 where mincore is unavailable)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    length = min(run.end, run.size) - run.start
    if length <= 0:
        return 1.0
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    fd = os.open(run.path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, run.start)
        if addr in (None, ctypes.c_void_p(-1).value):
            return 0.0
        try:
            pages = -(-length // mmap.PAGESIZE)
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(length), vec) != 0:
                return 0.0
            return 1 - bytes(vec).count(0) / pages
        finally:
            libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(length))
    finally:
        os.close(fd)


def aligned_buffer(nbytes: int):
    """A ``uint8`` torch tensor of ``nbytes`` whose first byte is ``ALIGN``-aligned (O_DIRECT reads
    into it); memory the process owns, not a map of the file."""
    import torch

    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8)
    skip = -raw.data_ptr() % ALIGN
    return raw[skip:skip + nbytes]
