"""Applies a :class:`~prebake.convert.plan.BakePlan`: streams every tensor into its shard.

One tensor at a time, one chunk at a time: each chunk is hashed and written, so resident
memory stays within a chunk (plus one transformed tensor's rows) whatever the model's size.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import xxhash
from prebake.cache.integrity import file_checksum
from prebake.cache.manifest import FileEntry, QuantEntry, ShardEntry, TensorEntry
from prebake.convert.plan import BakePlan, ShardPlan
from prebake.convert.transforms import chunks
from prebake.formats.errors import FormatError, OutputError
from prebake.formats.safetensors_writer import ShardWriter

Progress = Callable[[int], None]


def write_shards(plan: BakePlan, folder: Path, progress: Progress = lambda n: None
                 ) -> tuple[list[ShardEntry], dict[str, TensorEntry], dict[str, QuantEntry]]:
    """Writes every shard of ``plan`` into ``folder``; returns their manifest entries."""
    shards, tensors, quantized = [], {}, {}
    for index, shard in enumerate(plan.shards):
        shards.append(ShardEntry(shard.file, shard.size, len(shard.header)))
        for name, entry in _write_shard(index, shard, folder / shard.file, progress).items():
            (quantized if isinstance(entry, QuantEntry) else tensors)[name] = entry
    return shards, tensors, quantized


def _write_shard(index: int, shard: ShardPlan, path: Path, progress: Progress) -> dict[str, TensorEntry]:
    entries = {}
    writer = _guard(lambda: ShardWriter(str(path), shard.header, shard.data_size), path)
    try:
        for slot in shard.slots:
            if slot.is_padding:
                _guard(lambda n=slot.nbytes: writer.write_zeros(n), path)
                continue
            p = shard.tensors[slot.name]
            h = xxhash.xxh3_128()
            for piece in _read_guard(p, path):
                h.update(piece)
                _guard(lambda b=piece: writer.write(b), path)
                progress(len(piece))
            offset = len(shard.header) + slot.offset
            if p.qtype is not None:
                entries[p.name] = QuantEntry(p.qtype, list(p.source.shape), p.logical, index, offset, slot.nbytes,
                                             h.hexdigest())
            else:
                entries[p.name] = TensorEntry(p.dtype, list(p.source.shape), index, offset, slot.nbytes,
                                              h.hexdigest(), None if p.transform == "copy" else p.source.qtype or p.source.dtype)
        _guard(writer.close, path)
    except BaseException:
        writer.abort() if writer.fd >= 0 else None
        raise
    return entries


def _read_guard(p, out: Path):
    """The chunks of ``p``; a source that turns out unreadable mid-way is named as the culprit."""
    try:
        yield from chunks(p)
    except (ValueError, OSError) as e:
        raise FormatError(f"cannot read tensor {p.name!r} ({type(e).__name__}: {e})", p.source.path) from None


def _guard(fn, path: Path):
    try:
        return fn()
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise OutputError(f"disk full while writing ({e.strerror}); free space and convert again",
                              path) from None
        raise OutputError(f"cannot write ({e.strerror})", path) from None


def copy_files(paths: list[Path], folder: Path) -> list[FileEntry]:
    """Copies the model folder's small files (config, tokenizer) and records their checksums."""
    entries = []
    for p in paths:
        dst = folder / p.name
        _guard(lambda p=p, dst=dst: _copy_durably(p, dst), dst)
        entries.append(file_entry(dst))
    return entries


def _copy_durably(src: Path, dst: Path) -> None:
    """A copy that is on disk before the bake's folder is renamed into place."""
    shutil.copyfile(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_tree(src: Path, folder: Path) -> list[FileEntry]:
    """Copies a sub-folder of small files (a diffusers ``scheduler/`` or ``tokenizer/``)."""
    entries = []
    for p in sorted(src.rglob("*")):
        if p.is_file():
            dst = folder / src.name / p.relative_to(src)
            dst.parent.mkdir(parents=True, exist_ok=True)
            _guard(lambda p=p, dst=dst: _copy_durably(p, dst), dst)
            entries.append(file_entry(dst, folder))
    return entries


def file_entry(path: Path, folder: Path | None = None) -> FileEntry:
    """The manifest record of a file in the bake folder (``folder``: what its path is relative to)."""
    name = str(path.relative_to(folder)) if folder else path.name
    return FileEntry(name, path.stat().st_size, file_checksum(path))


def write_json(path: Path, obj_or_text) -> None:
    """Writes JSON through a temporary name and a rename, durable before the rename."""
    text = obj_or_text if isinstance(obj_or_text, str) else json.dumps(obj_or_text, indent=1)
    tmp = path.with_name(path.name + ".tmp")

    def write():
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    _guard(write, path)
