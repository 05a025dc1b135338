"""Optional numba kernels for the block quantizers, byte-identical to the numpy codecs.

:func:`prebake.formats.quants.quantize` uses these when numba imports and ``PREBAKE_NO_JIT`` is
unset; otherwise the numpy codecs in :mod:`~prebake.formats.quants_legacy` and
:mod:`~prebake.formats.quants_k` run. This module holds the 32-value types and the registry;
Q4_K/Q6_K live in :mod:`~prebake.formats.quants_k_jit` and the exactness conventions in
:mod:`~prebake.formats.jit_bits`.

A kernel returns ``-1`` when its chunk is done, the index of a block holding NaN or infinity
(the driver then reports the value, as for the numpy codecs), or ``-2`` when a block needs a
choice only numpy's own reduction can make: Q4_1/Q5_1 store the block minimum, and numpy's
``min`` picks the sign of a zero minimum among blocks holding both +0.0 and -0.0 by its SIMD
reduction order. Such chunks are handed back to the driver, which gives them to the numpy codec.

Speed: the loops inside a block run to ``n = x.shape[1]`` (32) read at run time. With a
constant bound LLVM unrolls them fully and leaves the reductions scalar; with an unknown one
its loop vectorizer turns them into a few AVX2 instructions (Q4_0: 2.7 -> 5 GB/s).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numba import njit

from .ggml_codec import F32, HALF_BELOW, NonFinite
from .jit_bits import (
    AMBIGUOUS,
    INF_BITS,
    JIT,
    NONE32,
    OK,
    ZERO,
    ZERO32,
    abs32,
    bits,
    from_bits,
    half_bits,
    high_bit32,
    inverse,
    key32,
    low_byte,
    store_half_at,
    unkey,
)
from .quants_k_jit import q4_k, q6_k


@njit(inline="always")
def _top(x, b, n):
    """The largest magnitude of block ``b``, as bits (non-finite from ``INF_BITS`` up)."""
    top = ZERO32
    for i in range(n):
        top = max(top, abs32(x[b, i]))
    return top


@njit(inline="always")
def _first_peak(x, b, n):
    """(first value of largest magnitude (numpy's argmax of abs), finite)."""
    top = _top(x, b, n)
    last = NONE32  # the first index i with |x| == top is the largest n-1-i: one vector max
    for i in range(n):
        last = max(last, np.int32(n - 1 - i) if abs32(x[b, i]) == top else NONE32)
    return x[b, n - 1 - last], top < INF_BITS


@njit(inline="always")
def _range(x, b, n):
    """(max, min, finite, ambiguous): ambiguous where a zero minimum could take either sign."""
    hi = lo = key32(x[b, 0])
    top = ZERO32
    for i in range(n):
        k = key32(x[b, i])
        hi = max(hi, k)
        lo = min(lo, k)
        top = max(top, abs32(x[b, i]))
    ambiguous = False
    if lo == 0 or lo == -1:  # +0.0 or -0.0: does the block hold the other zero as well?
        pos = neg = False
        for i in range(n):
            if x[b, i] == ZERO:
                if bits(x[b, i]) < 0:
                    neg = True
                else:
                    pos = True
        ambiguous = pos and neg
    return unkey(hi), unkey(lo), top < INF_BITS, ambiguous


# Levels are ``MIN(top, (uint8)((x - shift)*iscale + bias))``. Where the scale is finite they
# lie in [0, 2*bias] and a plain int32 cast is numpy's cast; otherwise (a subnormal scale whose
# inverse overflows, a range that overflows) low_byte reproduces its int32-overflow bytes.
# The 4- and 5-bit packers are separate: carrying the unused high-bit word through the 4-bit
# loop, even when dead, costs Q4_0 a fifth of its speed.


@njit(inline="always")
def _nibbles(x, b, out, shift, iscale, bias, at, half, bounded):
    """Q4_0/Q4_1 levels, two per byte from offset ``at`` (first half in the low nibbles)."""
    if bounded:
        for i in range(half):
            q0 = min(np.int32((x[b, i] - shift) * iscale + bias), 15)
            q1 = min(np.int32((x[b, i + half] - shift) * iscale + bias), 15)
            out[b, at + i] = (q0 & 0x0F) | ((q1 & 0x0F) << 4)
    else:
        for i in range(half):
            q0 = min(low_byte((x[b, i] - shift) * iscale + bias), 15)
            q1 = min(low_byte((x[b, i + half] - shift) * iscale + bias), 15)
            out[b, at + i] = (q0 & 0x0F) | ((q1 << 4) & 0xFF)


@njit(inline="always")
def _nibbles5(x, b, out, shift, iscale, bias, qh_at, half, bounded):
    """Q5_0/Q5_1 levels: low nibbles after the 4 bytes of fifth bits at ``qh_at``."""
    qh = ZERO32
    if bounded:
        for i in range(half):
            q0 = min(np.int32((x[b, i] - shift) * iscale + bias), np.int32(31))
            q1 = min(np.int32((x[b, i + half] - shift) * iscale + bias), np.int32(31))
            out[b, qh_at + 4 + i] = (q0 & 0x0F) | ((q1 & 0x0F) << 4)
            qh = high_bit32(high_bit32(qh, q0, i), q1, i + half)
    else:
        for i in range(half):
            q0 = np.int32(min(low_byte((x[b, i] - shift) * iscale + bias), 31))
            q1 = np.int32(min(low_byte((x[b, i + half] - shift) * iscale + bias), 31))
            out[b, qh_at + 4 + i] = (q0 & 0x0F) | ((q1 << 4) & 0xFF)
            qh = high_bit32(high_bit32(qh, q0, i), q1, i + half)
    for k in range(4):
        out[b, qh_at + k] = (qh >> (8 * k)) & 0xFF


@njit(**JIT)
def _q8_0(x, out):
    n = x.shape[1]
    for b in range(x.shape[0]):
        top = _top(x, b, n)
        if top >= INF_BITS:
            return b
        d = from_bits(top) / F32(127)
        iscale = inverse(d)  # inf gives inf/NaN below: byte 0, as gguf-py's NaN
        for i in range(n):
            t = x[b, i] * iscale
            t = t + (HALF_BELOW if t >= ZERO else -HALF_BELOW)
            out[b, 2 + i] = low_byte(t)
        store_half_at(out, b, 0, half_bits(d))
    return OK


@njit(inline="always")
def _symmetric(x, out, div, bias, five):
    """Q4_0/Q5_0: ``d = peak/div``, levels of ``x*id + bias``."""
    n = x.shape[1]
    for b in range(x.shape[0]):
        peak, finite = _first_peak(x, b, n)
        if not finite:
            return b
        d = peak / div
        iscale = inverse(d)
        bounded = iscale - iscale == ZERO
        if five:
            _nibbles5(x, b, out, ZERO, iscale, bias, 2, n // 2, bounded)  # x - 0.0 is x
        else:
            _nibbles(x, b, out, ZERO, iscale, bias, 2, n // 2, bounded)
        store_half_at(out, b, 0, half_bits(d))
    return OK


@njit(inline="always")
def _affine(x, out, div, five):
    """Q4_1/Q5_1: ``d = (max - min)/div``, levels of ``(x - min)*id + 0.5``."""
    n = x.shape[1]
    status = OK
    for b in range(x.shape[0]):
        hi, lo, finite, ambiguous = _range(x, b, n)
        if not finite:
            return b
        if ambiguous:
            status = AMBIGUOUS
        span = hi - lo
        d = span / div
        iscale = inverse(d)
        bounded = span - span == ZERO and iscale - iscale == ZERO
        if five:
            _nibbles5(x, b, out, lo, iscale, F32(0.5), 4, n // 2, bounded)
        else:
            _nibbles(x, b, out, lo, iscale, F32(0.5), 4, n // 2, bounded)
        store_half_at(out, b, 0, half_bits(d))
        store_half_at(out, b, 2, half_bits(lo))
    return status


@njit(**JIT)
def _q4_0(x, out):
    return _symmetric(x, out, F32(-8), F32(8.5), False)


@njit(**JIT)
def _q5_0(x, out):
    return _symmetric(x, out, F32(-16), F32(16.5), True)


@njit(**JIT)
def _q4_1(x, out):
    return _affine(x, out, F32(15), False)


@njit(**JIT)
def _q5_1(x, out):
    return _affine(x, out, F32(31), True)


# ---------------------------------------------------------------------------- driver glue

_KERNELS = {
    "Q8_0": _q8_0,
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q4_K": q4_k,
    "Q6_K": q6_k,
}


def _wrap(qtype: str, kernel) -> Callable[[np.ndarray, np.ndarray], bool]:
    def quantize_blocks(x: np.ndarray, out: np.ndarray) -> bool:
        """Blocks ``x`` (n, block_size) float32 into ``out`` (n, type_size) uint8, in place.

        False where the numpy codec has to do this chunk instead (see this module's docstring);
        :class:`~prebake.formats.ggml_types.NonFinite` where a block holds NaN or infinity.
        """
        status = kernel(x, out)
        if status >= 0:
            raise NonFinite
        return status == OK

    quantize_blocks.__qualname__ = quantize_blocks.__name__ = f"jit_{qtype}"
    return quantize_blocks


KERNELS: dict[str, Callable[[np.ndarray, np.ndarray], bool]] = {q: _wrap(q, k) for q, k in _KERNELS.items()}
