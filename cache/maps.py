"""A bake's shards as private memory maps, and tensors as views of them (one at a time or in bulk).

Each shard is mapped once, on first use (``MAP_PRIVATE``: pages come from the page cache and are
shared by every process that maps the bake; a write to a tensor stays private to the process
and never reaches the file), so shards holding none of the wanted tensors are never mapped.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from prebake.formats.errors import ManifestError
from prebake.formats.manifest import Manifest


class Shards(dict):
    """Shard index -> its mapping, made on first use (so unneeded shards are never mapped)."""

    def __init__(self, m: Manifest):
        super().__init__()
        self.m = m
        self.bases: dict[tuple[int, str], torch.Tensor] = {}
        self.strides: dict[tuple, tuple] = {}

    def __missing__(self, index: int) -> torch.UntypedStorage:
        storage = self[index] = map_shard(self.m.shard_path(index), self.m.shards[index].size)
        return storage

    def view(self, index: int, dtype: torch.dtype, offset: int, shape: list) -> torch.Tensor:
        """A tensor of ``dtype`` and ``shape`` at byte ``offset`` of shard ``index``: one
        ``as_strided`` of a base tensor per shard and dtype, the cheapest view torch makes (a load
        of 7,720 expert tensors makes 7,720 of them)."""
        base = self.bases.get((index, dtype))
        if base is None:
            storage = self[index]
            base = self.bases[(index, dtype)] = torch.empty(0, dtype=dtype).set_(storage, 0,
                                                                                 (storage.nbytes() // dtype.itemsize,))
        key = tuple(shape)
        strides = self.strides.get(key)
        if strides is None:
            strides = self.strides[key] = _contiguous_strides(key)
        return base.as_strided(key, strides, offset // base.itemsize)

    def views(self, items: list[tuple]) -> dict[str, torch.Tensor]:
        """Views of many tensors ``(name, shard, dtype, offset, shape)`` at once.

        Tensors of one shard, dtype and shape whose offsets step evenly (a MoE's experts: each
        projection's copies follow each other one expert apart) become one ``as_strided`` over
        all of them and an ``unbind``: two calls into torch per run instead of one per tensor,
        which is most of a load of 10,000 small tensors.
        """
        groups: dict[tuple, list] = {}
        for name, shard, dtype, offset, shape in items:
            groups.setdefault((shard, dtype, tuple(shape)), []).append((offset, name))
        out = {}
        for (shard, dtype, shape), members in groups.items():
            members.sort()
            i = 0
            while i < len(members):
                j = _run_end(members, i)
                if j - i < 4:  # too short for the run to pay: one view each
                    for offset, name in members[i:j]:
                        out[name] = self.view(shard, dtype, offset, shape)
                else:
                    first = self.view(shard, dtype, members[i][0], shape)
                    step = (members[i + 1][0] - members[i][0]) // dtype.itemsize
                    stacked = first.as_strided((j - i, *shape), (step, *first.stride()), first.storage_offset())
                    out.update(zip((name for _, name in members[i:j]), stacked.unbind(0), strict=True))
                i = j
        return out


def _run_end(members: list[tuple[int, str]], i: int) -> int:
    """The end of the run of ``members`` from ``i`` whose offsets step evenly (and not by 0)."""
    if i + 1 >= len(members) or members[i + 1][0] == members[i][0]:
        return i + 1
    step, j = members[i + 1][0] - members[i][0], i + 2
    while j < len(members) and members[j][0] - members[j - 1][0] == step:
        j += 1
    return j


def _contiguous_strides(shape: tuple) -> tuple:
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= max(d, 1)
    return tuple(reversed(strides))


def map_shard(path: Path, size: int) -> torch.UntypedStorage:
    """One private, read-through memory map of a whole shard file."""
    try:
        actual = os.path.getsize(path)
    except OSError as e:
        raise ManifestError(f"shard is missing or unreadable ({e.strerror}): the bake is damaged; convert again",
                            path) from None
    if actual != size:
        raise ManifestError(f"shard is {actual} bytes, the manifest says {size}: the bake is damaged "
                            "or was changed; run 'prebake verify' or convert again", path)
    return torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
