"""Background readahead: turns a cold start's page faults into one sequential read.

Touching a freshly mapped tensor faults its pages in a few at a time, in whatever order the
program goes; on a slow disk that is the cold-start cost. A :class:`Prefetcher` reads the
bake's shards front to back (layout order is execution order) in large blocks on a thread,
so the page cache is filled at the disk's sequential speed just ahead of the program.

The thread holds the GIL only between reads (``os.preadv`` releases it), reads into one reused
buffer (no memory grows), and stops when it has read everything, when :meth:`stop` is called,
or when every tensor it was prefetching for has been garbage-collected.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path

BLOCK = 8 << 20


class Prefetcher:
    """Reads ``ranges`` (file, start, end), in order, on a daemon thread."""

    def __init__(self, ranges: Iterable[tuple[Path, int, int]], owners: Iterable[object] = (),
                 block: int = BLOCK, on_done: Callable[[int], None] | None = None):
        self.ranges = list(ranges)
        self.block = block
        self.done_bytes = 0
        self._stop = threading.Event()
        self._owners = [weakref.ref(o) for o in owners]
        self._on_done = on_done
        self._thread = threading.Thread(target=self._run, name="prebake-prefetch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        """Waits for the read to finish; True if it did."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _wanted(self) -> bool:
        if self._stop.is_set():
            return False
        return not self._owners or any(r() is not None for r in self._owners)

    def _run(self) -> None:
        buf = bytearray(self.block)
        view = memoryview(buf)
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
        if self._on_done:
            self._on_done(self.done_bytes)


def shard_ranges(manifest, names: Iterable[str] | None = None) -> list[tuple[Path, int, int]]:
    """The byte ranges to prefetch, in layout order: each shard's span of the wanted tensors."""
    spans: dict[int, list[int]] = {}
    wanted = None if names is None else set(names)
    for name, t in [*manifest.tensors.items(), *manifest.quantized.items()]:
        if wanted is None or name in wanted:
            lo, hi = spans.setdefault(t.shard, [t.offset, t.offset + t.nbytes])
            spans[t.shard] = [min(lo, t.offset), max(hi, t.offset + t.nbytes)]
    return [(manifest.shard_path(i), lo, hi) for i, (lo, hi) in sorted(spans.items())]
