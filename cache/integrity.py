"""``verify``: recompute every checksum of a bake and name the first thing that does not match."""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass

import xxhash
from prebake.cache.manifest import Manifest, read_manifest
from prebake.formats.errors import VerifyError

BLOCK = 16 << 20


@dataclass
class VerifyReport:
    tensors: int
    files: int
    bytes: int


def verify(path: str | os.PathLike | Manifest, progress: Callable[[int], None] = lambda n: None) -> VerifyReport:
    """Re-hashes every tensor and copied file; raises :class:`VerifyError` at the first mismatch."""
    m = path if isinstance(path, Manifest) else read_manifest(path)
    total = 0
    sub = [verify(m.root / c["path"], progress) for c in m.components.values()]
    by_shard: dict[int, list] = {}
    for name, e in [*m.tensors.items(), *m.quantized.items()]:
        by_shard.setdefault(e.shard, []).append((name, e))
    for index, entries in by_shard.items():
        shard = m.shard_path(index)
        try:
            size = os.path.getsize(shard)
        except OSError as e:
            raise VerifyError(f"shard is missing ({e.strerror})", shard) from None
        if size != m.shards[index].size:
            raise VerifyError(f"shard is {size} bytes, the manifest says {m.shards[index].size}", shard)
        with open(shard, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            mm.madvise(mmap.MADV_SEQUENTIAL)
            view = memoryview(mm)
            try:
                for name, e in entries:
                    if _hash(view[e.offset:e.offset + e.nbytes], progress) != e.checksum:
                        raise VerifyError(f"tensor {name!r} does not match its checksum (corrupted)", shard)
                    total += e.nbytes
            finally:
                view.release()
    for f in m.files:
        p = m.root / f.path
        try:
            digest = file_checksum(p)
        except OSError as e:
            raise VerifyError(f"copied file is unreadable ({e.strerror})", p) from None
        if digest != f.checksum:
            raise VerifyError("copied file does not match its checksum", p)
    return VerifyReport(len(m.tensors) + len(m.quantized) + sum(r.tensors for r in sub), len(m.files) + sum(r.files for r in sub),
                        total + sum(r.bytes for r in sub))


def _hash(view: memoryview, progress) -> str:
    h = xxhash.xxh3_128()
    for i in range(0, len(view), BLOCK):
        piece = view[i:i + BLOCK]
        h.update(piece)
        progress(len(piece))
    return h.hexdigest()


def file_checksum(path) -> str:
    """The manifest's checksum (xxh3-128, hex) of a whole file."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            h.update(block)
    return h.hexdigest()
