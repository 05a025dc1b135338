"""GGML block quantization: one codec per block type, bit-exact with the references.

Each codec turns float32 rows into GGUF's block bytes and back. Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1
match gguf-py's numpy quantizer (``gguf.quants``) byte for byte, which itself follows
``quantize_row_*_ref`` in llama.cpp's ``ggml-quants.c``; the codecs live in
:mod:`~prebake.formats.quants_legacy` (32-value blocks) and :mod:`~prebake.formats.quants_k`
(Q4_K, Q6_K), which match llama.cpp's ``quantize_row_q*_K_ref``. Every
dequantizer matches ``gguf.quants.dequantize`` bit for bit.

Bit-exactness means doing the references' float32 operations in the references' order: no
float64, no fused multiply-add, no reassociated sums. Each codec works on all blocks of a chunk
at once with numpy; no Python loop runs per block.

>>> import numpy as np
>>> x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32)
>>> q = quantize(x, "Q8_0")
>>> q.shape, q.dtype
((2, 34), dtype('uint8'))
>>> float(abs(dequantize(q, "Q8_0") - x).max()) < 0.01
True
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterator

import numpy as np

from .errors import UnsupportedError

# elements per block, bytes per block (ggml-common.h)
BLOCK_SIZES: dict[str, tuple[int, int]] = {
    "Q8_0": (32, 34),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q4_K": (256, 144),
    "Q6_K": (256, 210),
}
QTYPES: tuple[str, ...] = tuple(BLOCK_SIZES)

_F32 = np.float32

_CODECS: dict[str, type[BlockCodec]] = {}


class _NonFinite(Exception):
    """Raised inside a codec when a block holds NaN or infinity; the driver reports where."""


class BlockCodec:
    """One GGML block format, registered by ``qtype`` (the shape of gguf-py's ``__Quant``).

    Subclasses implement ``quantize_blocks`` and ``dequantize_blocks`` over a whole chunk of
    blocks with numpy and write into a preallocated output, so the driver never concatenates.
    """

    qtype: str
    block_size: int
    type_size: int
    # blocks per codec call: bounds memory (~1 MiB of float32 input at a time) while keeping
    # numpy's per-call overhead small next to the work
    chunk_blocks: int = 8192

    def __init_subclass__(cls, qtype: str, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.qtype = qtype
        cls.block_size, cls.type_size = BLOCK_SIZES[qtype]
        _CODECS[qtype] = cls

    @classmethod
    def quantize_blocks(cls, x: np.ndarray, out: np.ndarray, ws: Scratch) -> None:
        """Write blocks ``x`` (n, block_size) float32 into ``out`` (n, type_size) uint8."""
        raise NotImplementedError(f"{cls.qtype} cannot quantize")

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray, out: np.ndarray) -> None:
        """Write blocks ``blocks`` (n, type_size) uint8 into ``out`` (n, block_size) float32."""
        raise NotImplementedError(f"{cls.qtype} cannot dequantize")


class Scratch:
    """Named work arrays, reused across the chunks of one call.

    A fresh multi-MiB temporary per chunk goes back to the OS when freed and faults its pages in
    again on the next chunk, which costs more than the arithmetic on it. The arrays are
    page-aligned: arrays at arbitrary offsets from each other modulo 4 KiB can hit 4K-aliasing
    stalls that make one pass several times slower.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, np.ndarray] = {}
        self._views: dict[tuple[str, tuple[int, ...], type], np.ndarray] = {}

    def __call__(self, name: str, shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
        key = (name, shape, dtype)
        view = self._views.get(key)
        if view is None:
            nbytes = math.prod(shape) * np.dtype(dtype).itemsize
            buf = self._buffers.get(name)
            if buf is None or buf.size < nbytes:
                raw = np.empty(nbytes + 4096, np.uint8)
                start = -raw.ctypes.data % 4096
                buf = self._buffers[name] = raw[start : start + nbytes]
                self._views = {k: v for k, v in self._views.items() if k[0] != name}
            view = self._views[key] = buf[:nbytes].view(dtype).reshape(shape)
        return view

    def copy(self, name: str, values: np.ndarray) -> np.ndarray:
        """``values`` copied to a page-aligned work array, ready to broadcast against others."""
        out = self(name, values.shape, values.dtype.type)
        np.copyto(out, values)
        return out


# ---------------------------------------------------------------------------- public API


def quantize(data: np.ndarray, qtype: str) -> np.ndarray:
    """Quantize ``data`` (..., n) to GGUF block bytes (..., n // block_size * type_size).

    ``n`` must be a multiple of the block size; NaN or infinity raise
    :class:`~prebake.formats.errors.UnsupportedError`. Rows are processed a chunk at a time,
    so memory beyond input and output stays bounded; a contiguous input is never copied whole.
    """
    codec = _codec(qtype)
    jit = jit_quantizer(codec.qtype)
    data = np.asarray(data)
    rows = _as_rows(data, codec.block_size, codec.qtype, "row length")
    bs, ts = codec.block_size, codec.type_size
    out = np.empty((rows.shape[0], rows.shape[1] // bs * ts), np.uint8)
    ws = Scratch()
    # overflow and invalid operations inside a block are the reference's own arithmetic
    with np.errstate(all="ignore"):
        for r, b0, b1 in _windows(rows.shape[0], rows.shape[1] // bs, codec.chunk_blocks):
            x = np.ascontiguousarray(rows[r, b0 * bs : b1 * bs], dtype=_F32).reshape(-1, bs)
            dst = out[r, b0 * ts : b1 * ts].reshape(-1, ts)
            try:
                if jit is not None:
                    jit(x, dst)
                else:
                    codec.quantize_blocks(x, dst, ws)
            except _NonFinite:
                raise _non_finite_error(x, codec.qtype, r.start, b0 * bs, (b1 - b0) * bs) from None
    return out.reshape(*data.shape[:-1], out.shape[-1])


def dequantize(blocks: np.ndarray, qtype: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Decode GGUF block bytes (..., k * type_size) to float32 (..., k * block_size).

    With ``shape`` (the tensor's element shape), ``blocks`` may be flat bytes of any layout and
    the result takes that shape.
    """
    codec = _codec(qtype)
    bs, ts = codec.block_size, codec.type_size
    raw = np.frombuffer(blocks, np.uint8) if isinstance(blocks, (bytes, bytearray, memoryview)) else blocks
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        raw = raw.view(np.uint8)
    if shape is not None:
        shape = tuple(int(s) for s in shape)
        if not shape or shape[-1] % bs:
            raise UnsupportedError(f"{codec.qtype} tensor shape {shape} must end in a multiple of {bs}")
        row_bytes = shape[-1] // bs * ts
        if raw.size != int(np.prod(shape[:-1], dtype=np.int64)) * row_bytes:
            raise UnsupportedError(f"{raw.size} bytes of {codec.qtype} cannot hold a tensor of shape {shape}")
        raw = raw.reshape(-1, row_bytes)
    rows = _as_rows(raw, ts, codec.qtype, "bytes per row")
    out = np.empty((rows.shape[0], rows.shape[1] // ts * bs), _F32)
    with np.errstate(all="ignore"):
        for r, b0, b1 in _windows(rows.shape[0], rows.shape[1] // ts, codec.chunk_blocks):
            src = np.ascontiguousarray(rows[r, b0 * ts : b1 * ts]).reshape(-1, ts)
            codec.dequantize_blocks(src, out[r, b0 * bs : b1 * bs].reshape(-1, bs))
    return out.reshape(shape) if shape is not None else out.reshape(*raw.shape[:-1], out.shape[-1])


# ---------------------------------------------------------------------------- driver


_jit_kernels: dict[str, Callable[[np.ndarray, np.ndarray], None]] | None = None


def jit_quantizer(qtype: str) -> Callable[[np.ndarray, np.ndarray], None] | None:
    """The numba kernel for ``qtype`` (:mod:`~prebake.formats.quants_jit`), or None.

    None where numba is not installed, the type has no kernel, or ``PREBAKE_NO_JIT`` is set to
    anything but ``0``. numba is imported on first use only; kernels compile (or load from
    numba's cache) on their first call.
    """
    global _jit_kernels
    if os.environ.get("PREBAKE_NO_JIT", "0") not in ("", "0"):
        return None
    if _jit_kernels is None:
        try:
            from .quants_jit import KERNELS
        except ImportError:
            KERNELS = {}
        _jit_kernels = KERNELS
    return _jit_kernels.get(qtype)


def _codec(qtype: object) -> type[BlockCodec]:
    name = str(getattr(qtype, "name", qtype)).upper()
    codec = _CODECS.get(name)
    if codec is None:
        raise UnsupportedError(f"unknown GGML quantization type {qtype!r}; known: {', '.join(QTYPES)}")
    return codec


def _as_rows(data: np.ndarray, unit: int, qtype: str, what: str) -> np.ndarray:
    if data.ndim == 0:
        raise UnsupportedError(f"cannot {qtype}-code a 0-d array")
    if data.shape[-1] % unit:
        raise UnsupportedError(f"{what} {data.shape[-1]} is not a multiple of the {qtype} block ({unit})")
    return data.reshape(-1, data.shape[-1])


def _windows(n_rows: int, blocks_per_row: int, max_blocks: int) -> Iterator[tuple[slice, int, int]]:
    """Yield (row slice, first block, end block) windows of at most ``max_blocks`` blocks.

    Whole rows are grouped while a row fits; a longer row is cut on block boundaries, so every
    window is one contiguous stretch of the output.
    """
    if blocks_per_row == 0:
        return
    if blocks_per_row <= max_blocks:
        step = max_blocks // blocks_per_row
        for r in range(0, n_rows, step):
            yield slice(r, r + step), 0, blocks_per_row
        return
    for r in range(n_rows):
        for b in range(0, blocks_per_row, max_blocks):
            yield slice(r, r + 1), b, min(b + max_blocks, blocks_per_row)


def _non_finite_error(x: np.ndarray, qtype: str, row0: int, col0: int, width: int) -> UnsupportedError:
    flat = int(np.flatnonzero(~np.isfinite(x))[0])
    row, col = row0 + flat // width, col0 + flat % width
    return UnsupportedError(
        f"cannot quantize to {qtype}: value {x.flat[flat]} at row {row}, column {col}; "
        "GGML blocks hold only finite numbers"
    )


# ---------------------------------------------------------------------------- shared pieces


def require_finite(*stats: np.ndarray) -> None:
    """Per-block maxima/minima carry any NaN or infinity of their block; refuse those."""
    for s in stats:
        if not np.isfinite(s).all():
            raise _NonFinite


def half_at(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The fp16 field at byte ``offset`` of each block, as float32 (n, 1)."""
    return np.ascontiguousarray(blocks[:, offset : offset + 2]).view(np.float16).astype(_F32)


def inverse(d: np.ndarray) -> np.ndarray:
    """``d ? 1.0f/d : 0.0f`` per block."""
    return np.where(d == 0, _F32(0), _F32(1) / d)


def full(shape: tuple[int, ...], value: float, dtype: type) -> np.ndarray:
    """A cached constant array: np.minimum/np.maximum against a scalar are ~5x slower."""
    return _full(tuple(shape), value, np.dtype(dtype).str)


@functools.lru_cache(maxsize=32)
def _full(shape: tuple[int, ...], value: float, dtype: str) -> np.ndarray:
    a = np.full(shape, value, dtype)
    a.flags.writeable = False
    return a


def store_half(out: np.ndarray, offset: int, v: np.ndarray) -> None:
    """Write float32 ``v`` as the fp16 field at byte ``offset`` of each block (round to even)."""
    out.view(np.uint16)[:, offset // 2] = v.astype(np.float16).view(np.uint16)


def signed_peak(x: np.ndarray, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Per block, the first value of largest magnitude (ggml's ``amax``/``max`` loop)."""
    peak = np.where(hi > -lo, hi, lo)
    tie = hi == -lo  # +a and -a both present, or an all-zero block: the first one wins
    if tie.any():
        t = x[tie]
        peak[tie] = t[np.arange(t.shape[0]), np.abs(t).argmax(axis=1)]
    return peak


from . import quants_k, quants_legacy  # noqa: E402,F401  (register the codecs)
