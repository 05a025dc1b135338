"""Bytes of a planned tensor, produced in bounded chunks.

A copy hands out slices of the source's memory map (no copy at all when the source is
contiguous). A cast, a dequantization, an offset, a strided source or rows taken in another
order (``TensorInfo.rows``) are materialized a few rows at a time, so memory stays within a
chunk whatever the tensor's size.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from prebake.convert.plan import Planned
from prebake.formats.tensor import numpy_dtype

CHUNK = 64 << 20


def chunks(p: Planned, chunk: int = CHUNK) -> Iterator[memoryview]:
    """Yields the bytes of ``p`` as stored in the bake, in order, each at most about ``chunk``."""
    data, order = p.source.read(), p.source.rows
    if p.transform in ("copy", "blocks"):
        yield from _copy_chunks(data, chunk) if order is None else _gathered(data, chunk, order)
    elif p.transform == "quantize":
        yield from _quantize(p, data, chunk)
    elif p.transform == "cast":
        src, dst = numpy_dtype(p.source.dtype), numpy_dtype(p.dtype)
        for rows in _row_blocks(data, chunk // max(src.itemsize, dst.itemsize), order):
            yield _bytes(np.ascontiguousarray(rows).view(src).astype(dst))
    elif p.transform in ("dequantize", "offset"):
        dst = numpy_dtype(p.dtype)
        row_elems = p.source.shape[-1] if p.source.qtype and p.source.shape else 1
        per_row = data[0].size if data.ndim > 1 and data.shape[0] else 1  # a row's items, or its blocks' bytes
        for rows in _row_blocks(data, chunk // (4 * row_elems) * per_row, order):  # about `chunk` of float32
            yield _bytes(_float_rows(p.source, rows).astype(dst, copy=False))
    else:
        raise ValueError(f"unknown transform {p.transform!r}")


def _copy_chunks(data: np.ndarray, chunk: int) -> Iterator[memoryview]:
    if data.flags.c_contiguous:
        flat = _bytes(data)
        for i in range(0, len(flat), chunk):
            yield flat[i:i + chunk]
        return
    yield from _gathered(data, chunk)


def _gathered(data: np.ndarray, chunk: int, order: np.ndarray | None = None) -> Iterator[memoryview]:
    """The bytes of ``data``'s rows (in ``order``), copied a block of rows at a time."""
    for rows in _row_blocks(data, chunk // data.dtype.itemsize, order):
        yield _bytes(np.ascontiguousarray(rows))


def _row_blocks(data: np.ndarray, items: int, order: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """Slices along the first axis holding about ``items`` elements each (the whole of a 0-d array);
    with ``order``, the first axis's rows gathered in that order, a block of them at a time."""
    if data.ndim == 0:
        yield data.reshape(1)
        return
    per_row = max(1, data[0].size if data.shape[0] else 1)
    step = max(1, items // per_row)
    for i in range(0, data.shape[0], step):
        yield data[i:i + step] if order is None else data[order[i:i + step]]


def _quantize(p: Planned, data: np.ndarray, chunk: int) -> Iterator[memoryview]:
    from prebake.formats.quants import quantize

    rows_per = max(1, chunk // (4 * p.source.shape[-1]))  # about `chunk` bytes of float32 at a time
    for rows in _row_blocks(data, rows_per * data[0].size, p.source.rows):  # source rows: items, or a row's blocks
        yield _bytes(quantize(_float_rows(p.source, rows), p.qtype))


def _float_rows(t, rows: np.ndarray) -> np.ndarray:
    """float32 values of some rows: a cast of plain items, or GGML blocks dequantized (as gguf-py
    does), plus the tensor's ``add`` (in float32, as transformers' GGUF loader subtracts Gemma's 1)."""
    if t.qtype is None:
        values = np.ascontiguousarray(rows).view(numpy_dtype(t.dtype)).astype(np.float32, copy=False)
    else:
        from prebake.formats.quants import dequantize

        values = dequantize(rows, t.qtype)
    if t.add:
        values = values + np.float32(t.add)
    return values


def _bytes(a: np.ndarray) -> memoryview:
    return memoryview(a.reshape(-1).view(np.uint8))
