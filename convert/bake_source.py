"""A finished bake read back as a source: one :class:`TensorInfo` per stored tensor, views of its shards.

What the converter's readers yield for a checkpoint, this yields for a bake, so the pipeline's
pieces (the quantization policy, the row transforms) work on a bake unchanged. Each shard is
mapped once, read-only; ``read()`` hands out a view of the map, nothing is copied.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
from prebake.formats.dtypes import DTYPE_SIZES
from prebake.formats.errors import ManifestError
from prebake.formats.ggml_types import blocks_shape
from prebake.formats.manifest import Manifest
from prebake.formats.tensor import StorageRef, TensorInfo, raw_view


def bake_tensors(m: Manifest, blocks_first: bool = True) -> dict[str, TensorInfo]:
    """Every stored tensor of the bake ``m``, in its execution order.

    A tensor stored as GGML blocks comes back as blocks (``qtype`` set). One baked with
    ``--keep-float`` has both forms: ``blocks_first`` picks its blocks, else its float bytes.
    """
    maps = _ShardMaps(m)
    out = {}
    for name, e in m.tensors.items():
        if e.qtype is not None:
            out[name] = _blocks(name, e.dtype, e.shape, e.qtype, e.shard, e.offset, e.nbytes, maps)
        elif e.packed is not None and blocks_first:
            p = e.packed
            out[name] = _blocks(name, e.dtype, e.shape, p.qtype, p.shard, p.offset, p.nbytes, maps)
        else:
            out[name] = _items(name, e.dtype, e.shape, e.shard, e.offset, e.nbytes, maps)
        if e.tp and e.tp.startswith("row:") and (e.qtype is not None or e.packed is None or not blocks_first):
            out[name] = _untiled(out[name], int(e.tp.partition(":")[2]))
    return out


def _untiled(t: TensorInfo, n: int) -> TensorInfo:
    """A tensor stored as n column blocks (``--tp-layout``), read back in its logical order (a copy:
    no single strided view puts the blocks side by side)."""
    def read():
        tiles = t.read().reshape(n, -1, t.read().shape[-1] // n) if t.qtype else \
            t.read().reshape(n, t.shape[0], t.shape[1] // n)
        return np.ascontiguousarray(tiles.transpose(1, 0, 2)).reshape(tiles.shape[1], -1)

    return replace(t, read=read, offset=None)  # its bytes are not the file's, in order


def full_aliases(m: Manifest) -> dict[str, str]:
    """Aliases that are their whole target (tied weights): alias name -> stored name.

    Slices and transposes are left out: they are not the same tensor.
    """
    out = {}
    for name, a in m.aliases.items():
        target = m.tensors[a.target]
        strides = [1] * len(a.shape)
        for i in range(len(a.shape) - 2, -1, -1):
            strides[i] = strides[i + 1] * a.shape[i + 1]
        if a.storage_offset == 0 and list(a.shape) == list(target.shape) and list(a.strides) == strides:
            out[name] = a.target
    return out


def _items(name, dtype, shape, shard, offset, nbytes, maps) -> TensorInfo:
    shape = tuple(shape)

    def read():
        return raw_view(maps[shard], offset, shape, DTYPE_SIZES[dtype])

    return TensorInfo(name, dtype, shape, nbytes, str(maps.path(shard)), read,
                      StorageRef(name, offset, offset + nbytes, True), offset=offset)


def _blocks(name, dtype, shape, qtype, shard, offset, nbytes, maps) -> TensorInfo:
    shape = tuple(shape)
    rows, row_bytes = blocks_shape(qtype, shape)

    def read():
        return maps[shard][offset:offset + nbytes].reshape(rows, row_bytes)

    return TensorInfo(name, dtype, shape, nbytes, str(maps.path(shard)), read,
                      StorageRef(name, offset, offset + nbytes, True), qtype, offset=offset)


class _ShardMaps(dict):
    """Shard index -> a read-only ``uint8`` map of the whole file, made on first use."""

    def __init__(self, m: Manifest):
        super().__init__()
        self.m = m

    def path(self, index: int) -> Path:
        return self.m.shard_path(index)

    def __missing__(self, index: int) -> np.ndarray:
        path, size = self.path(index), self.m.shards[index].size
        try:
            actual = os.path.getsize(path)
        except OSError as e:
            raise ManifestError(f"shard is missing or unreadable ({e.strerror}): the bake is damaged", path) from None
        if actual != size:
            raise ManifestError(f"shard is {actual} bytes, the manifest says {size}: the bake is damaged or was "
                                "changed; run 'prebake verify'", path)
        mapped = self[index] = np.memmap(path, np.uint8, mode="r", shape=(size,)) if size else np.zeros(0, np.uint8)
        return mapped
