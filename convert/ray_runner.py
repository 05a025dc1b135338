"""A bake's work as Ray tasks: the same items as on one machine, the same bytes, many machines.

``prebake convert SRC OUT --ray [ADDRESS]`` runs the items of :mod:`prebake.convert.work` as
Ray tasks. What it needs: ``SRC`` and ``OUT``'s parent folder on storage every node sees at the
same path (NFS, Lustre, a shared disk; object stores through a FUSE mount that supports
``pwrite`` at offsets), and prebake installed on every node. What it does not support: sources
or outputs that only the driver can see, object-store URLs.

Each task opens the source and plans the bake once per worker process (planning is pure and
deterministic: every node computes the same plan), opens the shard files of the temporary
output folder the driver created at their final size, does its items (``pwrite`` at the
planned offsets) and returns their digests. The driver writes the manifest and swaps the
output into place only when every task has succeeded, so a bake is complete or absent. A task
whose worker dies (killed, out of memory, a lost node) is retried by Ray; a task that raises
(a corrupt source, a full disk) fails the bake with that error, and nothing is left.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from pathlib import Path

from prebake.convert.plan import BakePlan, Options
from prebake.convert.work import Item, do_item, planned

ITEMS_PER_TASK = 4  # about 64 MiB of output a task: Ray's per-task cost disappears next to it
RETRIES = 3
_plans: dict = {}  # per worker process: (src, options, component) -> (plan, tensors)


def ray_runner(src: Path, options: Options, component: str, address: str | bool | None):
    """A runner for :func:`~prebake.convert.execute.write_shards` that does the items on Ray."""
    def run(plan: BakePlan, folder: Path, fds: dict, work: list[Item]) -> Iterator[list[tuple]]:
        ray = _connect(address)
        task = ray.remote(max_retries=RETRIES, retry_exceptions=False)(do_items)
        batches = [work[i:i + ITEMS_PER_TASK] for i in range(0, len(work), ITEMS_PER_TASK)]
        window = 4 * max(1, int(ray.cluster_resources().get("CPU", 1)))
        pending: deque = deque()
        try:
            for batch in batches:
                pending.append(task.remote(str(Path(src).resolve()), options, component, str(folder), batch))
                if len(pending) >= window:
                    yield from _get(ray, pending.popleft(), folder)
            while pending:
                yield from _get(ray, pending.popleft(), folder)
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)

    return run


def _get(ray, ref, folder: Path) -> list[list[tuple]]:
    """A task's result; its PrebakeError as itself, a worker lost for good as one OutputError."""
    from prebake.formats.errors import OutputError, PrebakeError

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, PrebakeError):
            raise e.cause from None
        raise
    except ray.exceptions.RayError as e:
        raise OutputError(f"a Ray task failed {RETRIES + 1} times ({type(e).__name__}); nothing was kept",
                          folder) from None


def _connect(address):
    try:
        import ray
    except ImportError:
        from prebake.formats.errors import UsageError

        raise UsageError("--ray needs Ray: pip install 'prebake[ray]'") from None
    if not ray.is_initialized():
        import logging

        quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
        if address not in (True, "auto", ""):
            ray.init(address=address, **quiet)
        else:  # the cluster this machine belongs to (`ray start`), else a local Ray of our own
            try:
                ray.init(address="auto", **quiet)
            except ConnectionError:
                ray.init(include_dashboard=False, **quiet)
    return ray


def do_items(src: str, options: Options, component: str, folder: str, items: list[Item]) -> list[list[tuple]]:
    """A task: the items' pieces written into the shard files in ``folder``; their digests."""
    key = (src, options, component)
    if key not in _plans:
        from prebake.convert.prepare import prepare

        plan = prepare(src, options).plans[component]
        _plans.clear()  # one bake at a time per worker: keep its plan, drop the last one's
        _plans[key] = (plan, planned(plan))
    plan, tensors = _plans[key]
    _fault_point(plan, items)
    shards = {p.shard for item in items for p in item.pieces}
    fds = {i: os.open(Path(folder) / plan.shards[i].file, os.O_WRONLY) for i in shards}
    try:
        return [do_item(item, tensors, fds) for item in items]
    finally:
        for fd in fds.values():
            os.close(fd)


def _fault_point(plan: BakePlan, items: list[Item]) -> None:
    """The tests' fault injection: ``PREBAKE_RAY_KILL_ONCE=FILE`` kills the worker doing the bake's
    first item, once (FILE marks that it happened); ``PREBAKE_RAY_KILL_WHILE=FILE`` kills every
    worker while FILE exists."""
    first = items[0].pieces[0]
    while_file = os.environ.get("PREBAKE_RAY_KILL_WHILE")
    if while_file and os.path.exists(while_file):
        os._exit(1)
    marker = os.environ.get("PREBAKE_RAY_KILL_ONCE")
    if marker and first.shard == 0 and first.at == len(plan.shards[0].header) and not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)
