"""``verify``: recompute every checksum of a bake and name the first thing that does not match.

It reads the manifest through the same checks as ``load_from_manifest``, so a bake that
verifies also loads.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass

from prebake.formats.errors import VerifyError
from prebake.formats.manifest import Manifest, checksum, file_checksum, read_component, read_manifest


@dataclass
class VerifyReport:
    tensors: int
    files: int
    bytes: int


def verify(path: str | os.PathLike | Manifest, progress: Callable[[int], None] = lambda n: None) -> VerifyReport:
    """Re-hashes every stored tensor (all its forms) and copied file; raises :class:`VerifyError` at
    the first mismatch, naming it."""
    m = path if isinstance(path, Manifest) else read_manifest(path)
    subs = [verify(read_component(m, c), progress) for c in m.components]
    by_shard: dict[int, list] = {}
    for name, b in m.blobs():
        by_shard.setdefault(b.shard, []).append((name, b))
    total = 0
    for index, blobs in sorted(by_shard.items()):
        total += _verify_shard(m, index, blobs, progress)
    for f in m.files:
        p = m.root / f.path
        try:
            digest = file_checksum(p)
        except OSError as e:
            raise VerifyError(f"copied file is unreadable ({e.strerror})", p) from None
        if digest != f.checksum:
            raise VerifyError("copied file does not match its checksum", p)
    return VerifyReport(len(m.tensors) + sum(r.tensors for r in subs), len(m.files) + sum(r.files for r in subs),
                        total + sum(r.bytes for r in subs))


def _verify_shard(m: Manifest, index: int, blobs: list, progress) -> int:
    shard = m.shard_path(index)
    try:
        size = os.path.getsize(shard)
    except OSError as e:
        raise VerifyError(f"shard is missing ({e.strerror})", shard) from None
    if size != m.shards[index].size:
        raise VerifyError(f"shard is {size} bytes, the manifest says {m.shards[index].size}", shard)
    done = 0
    with open(shard, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        mm.madvise(mmap.MADV_SEQUENTIAL)
        view = memoryview(mm)
        try:
            for name, b in sorted(blobs, key=lambda nb: nb[1].offset):
                if checksum(view[b.offset:b.offset + b.nbytes], m.checksum, progress) != b.checksum:
                    form = f"{b.qtype} blocks of " if b.qtype else ""
                    raise VerifyError(f"{form}tensor {name!r} does not match its checksum (corrupted)", shard)
                done += b.nbytes
        finally:
            view.release()
    return done
