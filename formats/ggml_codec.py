"""The base every GGML block codec builds on: the codec class and its registry, work arrays,
the float32 helpers, the non-finite signal.

:class:`BlockCodec` is the base of the numpy quantizers (:mod:`~prebake.formats.quants_legacy`,
:mod:`~prebake.formats.quants_k`), which register themselves in :data:`CODECS` by type; the
work arrays (:class:`Scratch`), the float32 helpers and the :class:`NonFinite` signal below are
what they share with each other and with the numba kernels. This module imports no codec: the
driver, :mod:`~prebake.formats.quants`, imports them.

Bit-exactness means doing the references' float32 operations in the references' order: no
float64, no fused multiply-add, no reassociated sums.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from .ggml_types import BLOCK_SIZES

F32 = np.float32
MAGIC = F32(12582912)  # 1.5 * 2**23: llama.cpp's nearest_int adds it and reads the low bits
HALF_BELOW = np.nextafter(F32(0.5), F32(0))  # trunc(v + copysign(this, v)) is roundf(v), exactly


class NonFinite(Exception):
    """Raised inside a quantizer when a block holds NaN or infinity; the driver reports where."""


CODECS: dict[str, type[BlockCodec]] = {}


class BlockCodec:
    """One GGML block format's quantizer, registered by ``qtype`` (gguf-py's ``__Quant`` shape).

    A subclass implements ``quantize_blocks`` over a whole chunk of blocks with numpy and writes
    into a preallocated output, so the driver never concatenates. Decoding is one function for
    every type, :func:`prebake.formats.quants.dequantize`.
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
        CODECS[qtype] = cls

    @classmethod
    def quantize_blocks(cls, x: np.ndarray, out: np.ndarray, ws: Scratch) -> None:
        """Write blocks ``x`` (n, block_size) float32 into ``out`` (n, type_size) uint8."""
        raise NotImplementedError(f"{cls.qtype} cannot quantize")


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


# ---------------------------------------------------------------------------- float32 helpers


def require_finite(*stats: np.ndarray) -> None:
    """Per-block maxima/minima carry any NaN or infinity of their block; refuse those."""
    for s in stats:
        if not np.isfinite(s).all():
            raise NonFinite


def half_at(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The fp16 field at byte ``offset`` of each block, as float32 (n, 1)."""
    return np.ascontiguousarray(blocks[:, offset : offset + 2]).view(np.float16).astype(F32)


def store_half(out: np.ndarray, offset: int, v: np.ndarray) -> None:
    """Write float32 ``v`` as the fp16 field at byte ``offset`` of each block (round to even)."""
    out.view(np.uint16)[:, offset // 2] = v.astype(np.float16).view(np.uint16)


def inverse(d: np.ndarray) -> np.ndarray:
    """``d ? 1.0f/d : 0.0f`` per block."""
    return np.where(d == 0, F32(0), F32(1) / d)


def full(shape: tuple[int, ...], value: float, dtype: type) -> np.ndarray:
    """A cached constant array: np.minimum/np.maximum against a scalar are ~5x slower."""
    return _full(tuple(shape), value, np.dtype(dtype).str)


@functools.lru_cache(maxsize=32)
def _full(shape: tuple[int, ...], value: float, dtype: str) -> np.ndarray:
    a = np.full(shape, value, dtype)
    a.flags.writeable = False
    return a


def signed_peak(x: np.ndarray, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Per block, the first value of largest magnitude (ggml's ``amax``/``max`` loop)."""
    peak = np.where(hi > -lo, hi, lo)
    tie = hi == -lo  # +a and -a both present, or an all-zero block: the first one wins
    if tie.any():
        t = x[tie]
        peak[tie] = t[np.arange(t.shape[0]), np.abs(t).argmax(axis=1)]
    return peak
