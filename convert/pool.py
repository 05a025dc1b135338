"""Running work on the usable cores: a bounded window of items in flight, results in order.

Threads, not processes: the work that computes (numba kernels compiled ``nogil``, numpy, torch,
zstandard, xxhash, ``pread``/``pwrite``) releases the GIL, so threads scale over the cores while
sharing the source's memory maps and the open output files, with nothing to copy between them.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor


def cores() -> int:
    """The cores this process may run on (its affinity mask, as taskset and cgroups set it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def ordered(pool: ThreadPoolExecutor, fn: Callable, items: Iterable, window: int) -> Iterator:
    """``fn`` of each item, run in ``pool`` with at most ``window`` in flight, yielded in order.

    Items are drawn in the calling thread (so a reader there keeps reading while the pool works);
    the window bounds memory. On an error, the items not yet started are cancelled.
    """
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()
