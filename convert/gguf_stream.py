"""Bytes of an exported GGUF tensor, produced a bounded window of rows at a time.

Each :class:`~prebake.convert.gguf_tensors.Part` is a baked tensor seen as rows of bytes (GGML
block rows, or rows of items along the last axis; a 1-D tensor's items one per row), read from
the bake's memory map. A window of rows is copied out as it is when the types agree (reordered
rows are gathered, never decoded), else decoded to float32, shifted, and cast or quantized with
prebake's own codecs. Memory stays within a window (:data:`CHUNK`) whatever the tensor's size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
from prebake.convert.gguf_tensors import ExportTensor, Part
from prebake.formats.dtypes import DTYPE_SIZES
from prebake.formats.tensor import numpy_dtype

CHUNK = 16 << 20  # float32 bytes of one window: a cast or quantization holds about three


def source_rows(part: Part) -> np.ndarray:
    """The part's source as a ``uint8`` (rows, bytes per row) view of the bake (no copy)."""
    t = part.source
    data = t.read()
    if t.qtype is not None:
        return data
    itemsize = DTYPE_SIZES[t.dtype]
    flat = data.reshape(-1).view(np.uint8)
    row = itemsize if len(t.shape) <= 1 else t.shape[-1] * itemsize
    return flat.reshape(-1, row)


def tensor_chunks(t: ExportTensor, chunk: int | None = None) -> Iterator[np.ndarray]:
    """Yields the bytes of ``t`` as the GGUF stores them, in order, as flat ``uint8`` arrays
    (windows of about ``chunk`` bytes of float32, :data:`CHUNK` by default)."""
    chunk = chunk or CHUNK
    for part in t.parts:
        rows = source_rows(part)
        src = part.source
        elements = rows.shape[1] // DTYPE_SIZES[src.dtype] if src.qtype is None else \
            (src.shape[-1] if src.shape else 1)
        step = max(1, chunk // (4 * max(1, elements)))
        order = part.rows
        for i in range(0, part.n_rows, step):
            window = rows[i:i + step] if order is None else rows[order[i:i + step]]
            yield convert_rows(window, src.qtype or src.dtype, t.qtype, t.shift).reshape(-1)


def convert_rows(rows: np.ndarray, src: str, dst: str, shift: float = 0.0) -> np.ndarray:
    """Rows of ``src`` bytes (a GGML block type or a safetensors dtype code) as ``dst`` bytes."""
    from prebake.formats.quants import QTYPES, dequantize, quantize

    if src == dst and not shift:
        return rows
    if src in QTYPES or src not in DTYPE_SIZES:
        x = dequantize(rows, src)
    else:
        x = np.ascontiguousarray(rows).view(numpy_dtype(src)).astype(np.float32)
    if shift:
        x = x + np.float32(shift)
    if dst in QTYPES:
        return quantize(x, dst)
    return x.astype(numpy_dtype(dst)).view(np.uint8)


class TensorStream:
    """What gguf-py's ``GGUFWriter.write_tensor_data`` takes in place of an array: ``nbytes`` and a
    ``tofile`` that writes the tensor window by window (the writer pads around it)."""

    def __init__(self, t: ExportTensor, update: Callable[[int], object] = lambda n: None):
        self.t, self.nbytes, self.update = t, t.nbytes, update

    def tofile(self, f) -> None:
        written = 0
        for piece in tensor_chunks(self.t):
            f.write(memoryview(piece))
            written += piece.nbytes
            self.update(piece.nbytes)
        if written != self.nbytes:  # a plan that disagrees with its sources is a bug, not bad input
            raise AssertionError(f"{self.t.name}: wrote {written} bytes, planned {self.nbytes}")
