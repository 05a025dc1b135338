"""Applies a :class:`~prebake.convert.plan.BakePlan`: every tensor into its place in its shard.

The work is cut into items (:mod:`prebake.convert.work`) done by ``workers`` threads, each
writing its pieces at their planned offsets in the preallocated shard files, so the bytes do not
depend on how many workers there are. At most ``2 * workers`` items are in flight, each about
one checksum piece (16 MiB) of output: memory stays bounded whatever the model's size. A
runner other than the local pool (a Ray cluster, :mod:`prebake.convert.ray_runner`) does the
same items elsewhere and hands back the same digests.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from prebake.convert.output import guard, writing_file
from prebake.convert.plan import BakePlan
from prebake.convert.pool import cores, ordered
from prebake.convert.work import Item, do_item, items, open_shards, planned, start_writeback
from prebake.formats.manifest import FileEntry, PackedForm, ShardEntry, TensorEntry, combine, file_checksum

Progress = Callable[[int], None]
# runner(plan, folder, fds, items) -> the digests of every item, as each finishes
Runner = Callable[[BakePlan, Path, dict, list[Item]], Iterable[list[tuple]]]


def write_shards(plan: BakePlan, folder: Path, progress: Progress = lambda n: None, workers: int | None = None,
                 runner: Runner | None = None) -> tuple[list[ShardEntry], dict[str, TensorEntry]]:
    """Writes every shard of ``plan`` into ``folder``; returns the shards' and tensors' manifest
    records, the tensors in execution order."""
    with guard(folder / (plan.shards[0].file if plan.shards else "")):
        fds = open_shards(plan, folder)
    digests: dict[tuple[str, bool], dict[int, bytes]] = {}
    try:
        work = list(items(plan))
        run = runner or local_runner(workers or cores())
        for item, done in zip(work, run(plan, folder, fds, work), strict=True):
            for key, index, digest in done:
                digests.setdefault(key, {})[index] = digest
            first = item.pieces[0]
            start_writeback(fds[first.shard], first.at, item.pieces[-1].at + item.pieces[-1].end
                            - item.pieces[-1].start - first.at)
            progress(item.nbytes)
        for index, fd in fds.items():
            with guard(folder / plan.shards[index].file):
                os.fsync(fd)
    finally:
        for fd in fds.values():
            os.close(fd)
    shards = [ShardEntry(s.file, s.size, len(s.header)) for s in plan.shards]
    return shards, tensor_entries(plan, shards, digests)


def local_runner(workers: int) -> Runner:
    """Items done by ``workers`` threads of this process, results yielded in the items' order."""
    def run(plan: BakePlan, folder: Path, fds: dict, work: list[Item]) -> Iterator[list[tuple]]:
        tensors = planned(plan)

        def one(item: Item) -> list[tuple]:
            with guard(folder / plan.shards[item.pieces[0].shard].file):
                return do_item(item, tensors, fds)

        with ThreadPoolExecutor(workers, thread_name_prefix="prebake-convert") as pool:
            yield from ordered(pool, one, work, 2 * workers)

    return run


def tensor_entries(plan: BakePlan, shards: list[ShardEntry], digests: dict) -> dict[str, TensorEntry]:
    """One record per tensor, in execution order, from where each planned form was placed and
    the digests of its pieces."""
    places = {}
    for index, shard in enumerate(plan.shards):
        for slot in shard.slots:
            if not slot.is_padding:
                p = shard.tensors[slot.name]
                pieces = digests.get((p.name, p.packed), {})
                checksum = combine([pieces[k] for k in sorted(pieces)])
                places[(p.name, p.packed)] = (p, (index, len(shard.header) + slot.offset, slot.nbytes, checksum))
    out = {}
    for name in plan.order:
        p, place = places[(name, False)]
        extra = places.get((name, True))
        packed = PackedForm(extra[0].qtype, *extra[1]) if extra else None
        source_dtype = None if p.transform in ("copy", "blocks") else p.source.qtype or p.source.dtype
        out[name] = TensorEntry(p.dtype, list(p.source.shape), *place, p.qtype, source_dtype, packed, p.tp,
                                p.source.source_name)
    return out


def copy_files(paths: list[Path], folder: Path) -> list[FileEntry]:
    """Copies the model folder's small files (config, tokenizer) and records their checksums."""
    entries = []
    for p in paths:
        dst = folder / p.name
        _copy_durably(p, dst)
        entries.append(file_entry(dst))
    return entries


def _copy_durably(src: Path, dst: Path) -> None:
    """A copy that is on disk before the bake's folder is renamed into place."""
    with guard(dst):
        shutil.copyfile(src, dst)
        with open(dst, "rb") as f:
            os.fsync(f.fileno())


def copy_tree(src: Path, folder: Path) -> list[FileEntry]:
    """Copies a sub-folder of small files (a diffusers ``scheduler/`` or ``tokenizer/``)."""
    entries = []
    for p in sorted(src.rglob("*")):
        if p.is_file():
            dst = folder / src.name / p.relative_to(src)
            with guard(dst):
                dst.parent.mkdir(parents=True, exist_ok=True)
            _copy_durably(p, dst)
            entries.append(file_entry(dst, folder))
    return entries


def file_entry(path: Path, folder: Path | None = None) -> FileEntry:
    """The manifest record of a file in the bake folder (``folder``: what its path is relative to)."""
    name = path.relative_to(folder).as_posix() if folder else path.name
    return FileEntry(name, path.stat().st_size, file_checksum(path))


def write_json(path: Path, obj_or_text) -> None:
    """Writes JSON through a temporary name and a rename, durable before the rename."""
    text = obj_or_text if isinstance(obj_or_text, str) else json.dumps(obj_or_text, indent=1)
    with writing_file(path) as tmp, guard(path), open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
