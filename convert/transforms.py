"""The bytes of a planned tensor as stored in the bake, produced a range of rows at a time.

Every planned tensor's output is ``rows`` rows of ``row_bytes`` bytes (:func:`geometry`), and
:func:`produce` makes any range of them on its own: a copy hands out a slice of the source's
memory map (no copy at all when the source is contiguous); a cast, a dequantization or a
quantization computes only those rows. So work can be cut anywhere along the rows and done in
any order, by any worker, with the same bytes as a whole-tensor pass.

A row is a slice along the first dimension, except where GGML blocks are involved
(``quantize``, ``dequantize``, ``blocks``): there a row is one row of blocks, all dimensions
but the last. A source may ask for its rows in another order (``TensorInfo.rows``: a GGUF's
Q/K rows unpermuted; block rows for blocks, so no block is re-encoded) and for a constant added
to every value (``TensorInfo.add``: the ``offset`` transform, or a dequantization's).
"""

from __future__ import annotations

import math

import numpy as np
from prebake.convert.plan import Planned
from prebake.formats.tensor import numpy_dtype


def geometry(p: Planned) -> tuple[int, int]:
    """(rows, bytes per row) of ``p``'s output; their product is ``p.nbytes``. A tiled tensor's
    output rows are its tiles' rows, tile after tile."""
    rows, row_bytes = _untiled_geometry(p)
    return (rows * p.tiles, row_bytes // p.tiles) if p.tiles > 1 else (rows, row_bytes)


def _untiled_geometry(p: Planned) -> tuple[int, int]:
    shape = p.source.shape
    if not shape:
        return (1, p.nbytes) if p.nbytes else (0, 0)
    blocks = p.qtype is not None or p.source.qtype is not None
    rows = math.prod(shape[:-1]) if blocks else shape[0]  # block rows: all dims but the last
    return (rows, p.nbytes // rows) if rows else (0, 0)


def produce(p: Planned, lo: int, hi: int) -> memoryview:
    """The output bytes of rows ``lo:hi`` of ``p``."""
    if p.tiles > 1:
        return _tiled(p, lo, hi)
    return _produce(p, lo, hi)


def _tiled(p: Planned, lo: int, hi: int) -> memoryview:
    """Rows ``lo:hi`` of the tiles: for each tile they cross, its column block of the rows it holds."""
    rows, row_bytes = _untiled_geometry(p)
    width = row_bytes // p.tiles
    parts = []
    for tile in range(lo // rows, -(-hi // rows)):
        a, b = max(lo, tile * rows) - tile * rows, min(hi, (tile + 1) * rows) - tile * rows
        full = np.frombuffer(_produce(p, a, b), np.uint8).reshape(b - a, row_bytes)
        parts.append(full[:, tile * width:(tile + 1) * width])
    return _bytes(np.concatenate(parts) if len(parts) > 1 else np.ascontiguousarray(parts[0]))


def _produce(p: Planned, lo: int, hi: int) -> memoryview:
    order = p.source.rows  # rows taken in another order (a GGUF's Q/K rows unpermuted): gathered
    data = _rows_view(p)[lo:hi] if order is None else _rows_view(p)[order[lo:hi]]
    if p.transform in ("copy", "blocks"):
        return _bytes(data if data.flags.c_contiguous else np.ascontiguousarray(data))
    if p.transform == "cast":
        src, dst = numpy_dtype(p.source.dtype), numpy_dtype(p.dtype)
        return _bytes(np.ascontiguousarray(data).view(src).astype(dst))
    if p.transform in ("dequantize", "offset"):
        return _bytes(_float_rows(p, data).astype(numpy_dtype(p.dtype), copy=False))
    if p.transform == "quantize":
        from prebake.formats.quants import quantize

        return _bytes(quantize(_float_rows(p, data), p.qtype))
    raise ValueError(f"unknown transform {p.transform!r}")


def _rows_view(p: Planned) -> np.ndarray:
    """The source as rows (see the module docstring), a view: 0-d becomes one row."""
    data = p.source.read()
    if data.ndim == 0:
        return data.reshape(1)
    if p.source.qtype is None and p.qtype is not None and data.ndim > 2:
        return data.reshape(-1, data.shape[-1])  # quantize: rows of the last dim (a view if it can be)
    return data


def _float_rows(p: Planned, rows: np.ndarray) -> np.ndarray:
    """float32 values of some rows: a cast of plain items, or GGML blocks dequantized (as gguf-py
    does), plus the source's ``add`` (in float32, as transformers' GGUF loader takes Gemma's 1 off)."""
    if p.source.qtype is None:
        values = np.ascontiguousarray(rows).view(numpy_dtype(p.source.dtype)).astype(np.float32, copy=False)
    else:
        from prebake.formats.quants import dequantize

        values = dequantize(rows, p.source.qtype)
    if p.source.add:
        values = values + np.float32(p.source.add)
    return values


def _bytes(a: np.ndarray) -> memoryview:
    return memoryview(a.reshape(-1).view(np.uint8))
