"""Background readahead: turns a cold start's page faults into one sequential read.

Touching a freshly mapped tensor faults its pages in a few at a time, in whatever order the
program goes; on a slow disk that is the cold-start cost. A :class:`Prefetcher` reads the
loaded tensors' bytes in execution order in large blocks on a thread, so the page cache is
filled at the disk's sequential speed just ahead of the program.

The thread holds the GIL only between reads (``os.preadv`` releases it), reads into one reused
buffer (no memory grows), and stops when it has read everything or when every tensor it was
prefetching for has been garbage-collected.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path

BLOCK = 8 << 20
GAP = 1 << 20  # tensors closer than this in one shard are read as one range (a seek costs more)


class Prefetcher:
    """Reads ``ranges`` (file, start, end), in order, on a daemon thread."""

    def __init__(self, ranges: Iterable[tuple[Path, int, int]], owners: Iterable[object] = (),
                 block: int = BLOCK):
        self.ranges = list(ranges)
        self.block = block
        self.done_bytes = 0
        self._owners = [weakref.ref(o) for o in owners]
        self._thread = threading.Thread(target=self._run, name="prebake-prefetch", daemon=True)
        self._thread.start()

    def join(self, timeout: float | None = None) -> bool:
        """Waits for the read to finish; True if it did."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _wanted(self) -> bool:
        return not self._owners or any(r() is not None for r in self._owners)

    def _run(self) -> None:
        view = memoryview(bytearray(self.block))
        for path, start, end in self.ranges:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_SEQUENTIAL)
                pos = start
                while pos < end and self._wanted():
                    n = os.preadv(fd, [view[:min(self.block, end - pos)]], pos)
                    if n <= 0:
                        break
                    pos += n
                    self.done_bytes += n
            except OSError:
                pass
            finally:
                os.close(fd)
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
