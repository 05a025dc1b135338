"""Applies a :class:`~prebake.convert.plan.BakePlan`: streams every tensor into its shard.

One tensor at a time, one chunk at a time: each chunk is hashed and written, so resident
memory stays within a chunk (plus one transformed tensor's rows) whatever the model's size.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from prebake.convert.output import guard, writing_file
from prebake.convert.plan import BakePlan, Planned, ShardPlan
from prebake.convert.transforms import chunks
from prebake.formats.errors import FormatError, PrebakeError
from prebake.formats.manifest import FileEntry, PackedForm, ShardEntry, TensorEntry, file_checksum, hasher
from prebake.formats.safetensors_writer import ShardWriter

Progress = Callable[[int], None]


def write_shards(plan: BakePlan, folder: Path, progress: Progress = lambda n: None
                 ) -> tuple[list[ShardEntry], dict[str, TensorEntry]]:
    """Writes every shard of ``plan`` into ``folder``; returns the shards' and tensors' manifest
    records, the tensors in execution order."""
    shards, written = [], {}
    for index, shard in enumerate(plan.shards):
        shards.append(ShardEntry(shard.file, shard.size, len(shard.header)))
        written.update(_write_shard(index, shard, folder / shard.file, progress))
    return shards, tensor_entries(plan, written)


def tensor_entries(plan: BakePlan, written: dict[tuple[str, bool], tuple]) -> dict[str, TensorEntry]:
    """One record per tensor from where each planned form was written ((name, packed) -> place)."""
    planned = {(p.name, p.packed): p for s in plan.shards for p in s.tensors.values()}
    out = {}
    for name in plan.order:
        p = planned[(name, False)]
        shard, offset, nbytes, checksum = written[(name, False)]
        extra = planned.get((name, True))
        packed = PackedForm(extra.qtype, *written[(name, True)]) if extra else None
        source_dtype = None if p.transform in ("copy", "blocks") else p.source.qtype or p.source.dtype
        out[name] = TensorEntry(p.dtype, list(p.source.shape), shard, offset, nbytes, checksum, p.qtype,
                                source_dtype, packed, p.source.source_name)
    return out


def _write_shard(index: int, shard: ShardPlan, path: Path, progress: Progress) -> dict[tuple[str, bool], tuple]:
    written = {}
    with guard(path):
        writer = ShardWriter(str(path), shard.header, shard.data_size)
    try:
        for slot in shard.slots:
            if slot.is_padding:
                with guard(path):
                    writer.write_zeros(slot.nbytes)
                continue
            p = shard.tensors[slot.name]
            h = hasher()
            for piece in _source_chunks(p):
                h.update(piece)
                with guard(path):
                    writer.write(piece)
                progress(len(piece))
            written[(p.name, p.packed)] = (index, len(shard.header) + slot.offset, slot.nbytes, h.hexdigest())
        with guard(path):
            writer.close()
    finally:
        writer.abort()
    return written


def _source_chunks(p: Planned) -> Iterator[memoryview]:
    """The chunks of ``p``; a source that turns out unreadable mid-way is named as the culprit."""
    try:
        yield from chunks(p)
    except OSError as e:
        raise FormatError(f"cannot read tensor {p.name!r} ({e.strerror or e})", p.source.path) from None
    except PrebakeError as e:
        if e.path is None:  # a codec's complaint about the values: say which file and tensor
            raise type(e)(f"tensor {p.name!r}: {e.message}", p.source.path) from None
        raise


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
