"""Bytes of a planned tensor, produced in bounded chunks.

A copy hands out slices of the source's memory map (no copy at all when the source is
contiguous). A cast, a dequantization or a strided source is materialized a few rows at a
time, so memory stays within a chunk whatever the tensor's size.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from prebake.convert.plan import Planned
from prebake.formats.tensor import numpy_dtype

CHUNK = 64 << 20


def chunks(p: Planned, chunk: int = CHUNK) -> Iterator[memoryview]:
    """Yields the bytes of ``p`` as stored in the bake, in order, each at most about ``chunk``."""
    data = p.source.read()
    if p.transform in ("copy", "blocks"):
        yield from _copy_chunks(data, chunk)
    elif p.transform == "quantize":
        yield from _quantize(p, data, chunk)
    elif p.transform == "cast":
        src, dst = numpy_dtype(p.source.dtype), numpy_dtype(p.dtype)
        for rows in _row_blocks(data, chunk // max(src.itemsize, dst.itemsize)):
            yield _bytes(np.ascontiguousarray(rows).view(src).astype(dst))
    elif p.transform == "dequantize":
        yield from _dequantize(p, data, chunk)
    else:
        raise ValueError(f"unknown transform {p.transform!r}")


def _copy_chunks(data: np.ndarray, chunk: int) -> Iterator[memoryview]:
    if data.flags.c_contiguous:
        flat = _bytes(data)
        for i in range(0, len(flat), chunk):
            yield flat[i:i + chunk]
        return
    for rows in _row_blocks(data, chunk // data.dtype.itemsize):
        yield _bytes(np.ascontiguousarray(rows))


def _row_blocks(data: np.ndarray, items: int) -> Iterator[np.ndarray]:
    """Slices along the first axis holding about ``items`` elements each (the whole of a 0-d array)."""
    if data.ndim == 0:
        yield data.reshape(1)
        return
    per_row = max(1, data[0].size if data.shape[0] else 1)
    step = max(1, items // per_row)
    for i in range(0, data.shape[0], step):
        yield data[i:i + step]


def _dequantize(p: Planned, blocks: np.ndarray, chunk: int) -> Iterator[memoryview]:
    from prebake.formats.quants import dequantize

    dst = numpy_dtype(p.dtype)
    row_elems = p.source.shape[-1] if p.source.shape else 1
    rows_per = max(1, chunk // (4 * row_elems))
    for i in range(0, blocks.shape[0], rows_per):
        yield _bytes(dequantize(blocks[i:i + rows_per], p.source.qtype).astype(dst, copy=False))


def _quantize(p: Planned, data: np.ndarray, chunk: int) -> Iterator[memoryview]:
    from prebake.formats.quants import quantize

    rows_per = max(1, chunk // (4 * p.source.shape[-1]))  # about `chunk` bytes of float32 at a time
    for rows in _row_blocks(data, rows_per * data[0].size):  # source rows: items, or a row's blocks
        yield _bytes(quantize(_float_rows(p.source, rows), p.qtype))


def _float_rows(t, rows: np.ndarray) -> np.ndarray:
    """float32 values of some rows: a cast of plain items, or GGML blocks dequantized (as gguf-py does)."""
    if t.qtype is None:
        return np.ascontiguousarray(rows).view(numpy_dtype(t.dtype)).astype(np.float32, copy=False)
    from prebake.formats.quants import dequantize

    return dequantize(rows, t.qtype)


def _bytes(a: np.ndarray) -> memoryview:
    return memoryview(a.reshape(-1).view(np.uint8))
