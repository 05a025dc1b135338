"""A tensor-parallel rank's slice of each tensor: which bytes, and how they become its tensor.

For rank ``r`` of ``k`` (:mod:`prebake.formats.tp_layout` says who splits what):

- column- and vocab-parallel tensors: rows ``r*n/k : (r+1)*n/k``, one byte range and a
  zero-copy view (blocks too: a row of blocks is a row);
- row-parallel tensors of a ``--tp-layout N`` bake (``row:N``, stored as N column blocks):
  tiles ``r*N/k : (r+1)*N/k``, one byte range; a zero-copy view when ``k == N``, a copy of the
  rank's own bytes into ``(rows, columns / k)`` order when ``k < N``;
- row-parallel tensors of any other bake: a strided view of the whole tensor (every rank maps
  all of it: the load's report says so);
- everything else: the whole tensor, replicated.

:func:`rank_slice` gives the byte range to read and a function that turns the view of those
bytes into the rank's tensor; the loaders do the rest, the mapped one and the staged one alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from prebake.formats.errors import UsageError
from prebake.formats.ggml_types import BLOCK_SIZES, blocks_shape
from prebake.formats.manifest import TensorEntry
from prebake.formats.tp_layout import ROW, split_dim, split_kind


@dataclass(frozen=True)
class Slice:
    """Bytes ``[start, start + nbytes)`` of a tensor's stored form, viewed as ``view_shape``,
    turned into the rank's tensor (logical ``shape``) by ``finish``."""

    start: int
    nbytes: int
    view_shape: tuple
    shape: tuple
    finish: Callable[[torch.Tensor], torch.Tensor]
    whole: bool = False  # the rank maps the whole tensor (a row split of an untiled bake)


def kind_of(name: str, e: TensorEntry, model_type: str | None) -> str | None:
    """The tensor's split kind: the manifest's record, else the table's (bakes made without it)."""
    return e.tp.partition(":")[0] if e.tp else split_kind(name, model_type)


def whole(shape: tuple, nbytes: int, stored: tuple, tiled: bool) -> Slice:
    """The whole tensor (untiled back into its logical order where it is stored tiled)."""
    return Slice(0, nbytes, stored, shape, untile if tiled else _same)


def rank_slice(name: str, shape: tuple, nbytes: int, stored: tuple, kind: str | None, rank: int, size: int,
               qtype: str | None, tiled: bool) -> Slice:
    """Rank ``rank`` of ``size``'s slice of a tensor of logical ``shape`` whose ``nbytes`` are
    stored as ``stored`` (its items' or blocks' shape; ``tiled``: ``(N, rows, width)`` for ``row:N``)."""
    dim = split_dim(kind)
    if dim is None or size == 1 or len(shape) < 1 + dim:
        return whole(shape, nbytes, stored, tiled)
    unit = BLOCK_SIZES[qtype][0] if qtype and dim == len(shape) - 1 else 1
    if shape[dim] % (size * unit):
        raise UsageError(f"tensor {name!r} ({kind}-parallel) has {shape[dim]} along dimension {dim}, which {size} "
                         f"ranks cannot split{f' in whole {qtype} blocks' if unit > 1 else ''}")
    sliced = tuple(d // size if i == dim else d for i, d in enumerate(shape))
    if dim == 0:
        rows = stored[0] // size
        row_bytes = nbytes // stored[0]
        return Slice(rank * rows * row_bytes, rows * row_bytes, (rows, *stored[1:]), sliced, _same)
    if tiled:
        return _tiled(nbytes, stored, rank, size, sliced)
    return _strided(nbytes, stored, rank, size, sliced)


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _tiled(nbytes: int, stored: tuple, rank: int, size: int, sliced: tuple) -> Slice:
    tiles = stored[0]
    if tiles % size:
        raise UsageError(f"the bake's tensor-parallel layout serves degrees dividing {tiles}, not {size}")
    per = tiles // size  # tiles of this rank, one after another
    tile_bytes = nbytes // tiles
    rows, width = stored[-2], stored[-1]
    if per == 1:
        return Slice(rank * tile_bytes, tile_bytes, (rows, width), sliced, _same)
    return Slice(rank * per * tile_bytes, per * tile_bytes, (per, rows, width), sliced,
                 lambda t: t.permute(1, 0, 2).reshape(rows, per * width))


def _strided(nbytes: int, stored: tuple, rank: int, size: int, sliced: tuple) -> Slice:
    width = stored[-1] // size
    return Slice(0, nbytes, stored, sliced, lambda t: t.narrow(-1, rank * width, width), whole=True)


def untile(tiles: torch.Tensor) -> torch.Tensor:
    """A tiled tensor ``(N, rows, columns / N)`` back in its logical ``(rows, columns)`` order (a copy)."""
    n, rows, width = tiles.shape
    return tiles.permute(1, 0, 2).reshape(rows, n * width)


def stored_shape(shape: tuple, qtype: str | None, tp: str | None) -> tuple:
    """The shape of a tensor's bytes as stored: items or blocks, tiled for ``row:N``."""
    base = tuple(shape) if qtype is None else blocks_shape(qtype, tuple(shape))
    if tp and tp.startswith(f"{ROW}:"):
        n = int(tp.partition(":")[2])
        return (n, base[0], base[1] // n)
    return base
