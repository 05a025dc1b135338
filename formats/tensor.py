"""The description every reader yields for a tensor (dtype codes and sizes: :mod:`prebake.formats.dtypes`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from prebake.formats.dtypes import DTYPE_SIZES, FLOAT_DTYPES, numel

__all__ = ["DTYPE_SIZES", "FLOAT_DTYPES", "numel", "numpy_dtype", "raw_view", "SkippedLeaf", "SourceFile",
           "StorageRef", "TensorInfo"]


def numpy_dtype(code: str) -> np.dtype:
    """The numpy dtype for a safetensors code (BF16 and FP8 through ml_dtypes)."""
    if code in ("BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0"):
        import ml_dtypes

        return np.dtype({"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
                         "F8_E5M2": ml_dtypes.float8_e5m2, "F8_E8M0": ml_dtypes.float8_e8m0fnu}[code])
    return np.dtype({"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4",
                     "I16": "<i2", "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2",
                     "U8": "u1", "BOOL": "?", "C64": "<c8"}[code])


@dataclass(frozen=True)
class StorageRef:
    """Where a tensor's bytes sit inside a storage that other tensors may share (torch pickles).

    ``key`` names the storage within its file; ``start``/``end`` bound the bytes this tensor
    reads; ``contiguous`` says whether those bytes are exactly the tensor, in order.
    ``strides`` are in elements, as torch records them.
    """

    key: str
    start: int
    end: int
    contiguous: bool
    strides: tuple[int, ...] = ()


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as a source file stores it; nothing is read until ``read()`` is called.

    ``dtype`` is a safetensors code (``"F32"``): the items' type, or for GGML blocks the type
    they decode to. ``qtype`` names the GGML block type (``"Q4_K"``) when the bytes are blocks.
    ``shape`` is the logical shape in PyTorch order. ``read()`` returns a numpy view of the
    stored data: for plain dtypes an array of shape ``shape`` whose items are raw
    ``V{itemsize}`` bytes (strided where the source is strided); for GGML blocks a ``uint8``
    array of shape ``(rows, bytes_per_row)``. It copies nothing.

    Three optional fields describe a tensor that is a rearrangement of stored bytes (a GGUF
    tensor under its Hugging Face name): ``rows``, when set, is the order to take the first
    axis of ``read()`` in (row ``i`` of the tensor is row ``rows[i]`` of ``read()``; for blocks,
    block rows, so no block is re-encoded); ``add`` is a constant added to every value (a
    stored norm offset undone); ``source_name`` is the tensor's name in the source file when
    it differs from ``name``.

    ``offset``, when set, is where in the file at ``path`` the tensor's bytes lie, in order and
    contiguous (``nbytes`` of them): a copy can then read the file (``pread``) instead of
    faulting a map in page by page.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    path: str
    read: Callable[[], np.ndarray] = field(repr=False, compare=False)
    storage: StorageRef | None = None
    qtype: str | None = None
    rows: np.ndarray | None = field(default=None, repr=False, compare=False)
    add: float = 0.0
    source_name: str | None = None
    offset: int | None = None

    @property
    def numel(self) -> int:
        return numel(self.shape)


@dataclass(frozen=True)
class SkippedLeaf:
    """A value in a checkpoint that is not a tensor (an epoch counter, optimizer hyper-parameters)."""

    name: str
    kind: str


@dataclass
class SourceFile:
    """What a reader found in one file: tensors in file order, skipped leaves, metadata."""

    path: str
    format: str
    tensors: list[TensorInfo]
    skipped: list[SkippedLeaf] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)


def raw_view(buf, offset: int, shape: tuple[int, ...], itemsize: int,
             strides: tuple[int, ...] | None = None) -> np.ndarray:
    """A view of ``buf`` as items of ``itemsize`` raw bytes; ``strides`` in items, C order if None.

    Items are ``V{itemsize}`` so bytes move as bytes: no dtype semantics, no alignment needed.
    """
    item = np.dtype(f"V{itemsize}")
    base = np.frombuffer(buf, dtype=np.uint8)
    if strides is None:
        return base[offset:offset + numel(shape) * itemsize].view(item).reshape(shape)
    span = len(base) - offset
    items = base[offset:offset + span - span % itemsize].view(item)
    byte_strides = tuple(s * itemsize for s in strides)
    return np.lib.stride_tricks.as_strided(items, shape=shape, strides=byte_strides, writeable=False)
