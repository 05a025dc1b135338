"""Optional numba kernels for the block quantizers, byte-identical to the numpy codecs.

:func:`prebake.formats.quants.quantize` uses these when numba imports and ``PREBAKE_NO_JIT`` is
unset; otherwise the numpy codecs in :mod:`~prebake.formats.quants` and
:mod:`~prebake.formats.quants_k` run. Each kernel loops over blocks the way llama.cpp's
``quantize_row_*_ref`` does and follows the numpy codec it replaces operation for operation:

* every float is a float32 (literals are ``np.float32`` constants, so nothing is promoted to
  float64), there is no fastmath and numba never contracts into fused multiply-adds;
* float-to-integer casts reproduce numpy's ``astype(np.uint8/np.int8)`` on x86-64: truncate to
  int32 (NaN, infinities and values outside int32 give INT32_MIN) and keep the low byte;
* ``nearest_int`` is llama.cpp's bit trick, done on the float's bits;
* fp16 fields are converted in the kernel with numpy's float32->float16 algorithm (round to
  nearest even, subnormals, overflow to infinity) and read back exactly.

A kernel returns ``-1`` when its chunk is done, the index of a block holding NaN or infinity
(the driver then reports the value, as for the numpy codecs), or ``-2`` when a block needs a
choice only numpy's own reduction can make: Q4_1/Q5_1 store the block minimum, and numpy's
``min`` picks the sign of a zero minimum among blocks holding both +0.0 and -0.0 by its SIMD
reduction order. Such chunks are handed to the numpy codec as a whole.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .quants import _CODECS, Scratch, _NonFinite

_F32 = np.float32
ZERO = _F32(0)
ONE = _F32(1)
HALF_BELOW = np.nextafter(_F32(0.5), _F32(0))  # roundf(v) == trunc(v + copysign(this, v))
FLT_MAX = _F32(np.finfo(np.float32).max)
MAGIC = _F32(12582912)  # 1.5 * 2**23, nearest_int's rounding constant
GROUP_MAX_EPS = _F32(1e-15)
SUBNORMAL_UNIT = _F32(2.0**-24)  # value of the lowest fp16 mantissa bit below the normals
INT32_LO, INT32_HI = -2147483649.0, 2147483648.0  # open range that converts to int32

QKX2_STEPS = np.array([(_F32(-1) + _F32(0.1) * _F32(i)) + _F32(15) for i in range(21)], _F32)
QX_NUMS = np.array([_F32(-32)] + [-(_F32(32) + _F32(0.1) * _F32(i)) for i in range(-9, 10) if i], _F32)

OK, AMBIGUOUS = -1, -2
_JIT = {"cache": True, "error_model": "numpy"}  # numpy: x/0 is inf/NaN, as in C, not an exception


# ---------------------------------------------------------------------------- bit-level helpers


@intrinsic
def _bits(typingctx, v):
    """The bits of a float32 as an int32 (C's memcpy)."""
    if v != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def _from_bits(typingctx, i):
    """The float32 whose bits are the low 32 bits of integer ``i``."""
    if not isinstance(i, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        width = signature.args[0].bitwidth
        if width > 32:
            v = builder.trunc(v, ir.IntType(32))
        elif width < 32:
            v = builder.zext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(i), codegen


@njit(inline="always")
def nearest_int(f):
    """llama.cpp's ``nearest_int``: round half to even via the bits of ``f + 1.5*2**23``."""
    return (np.int64(_bits(f + MAGIC)) & 0x7FFFFF) - 0x400000


@njit(inline="always")
def _low_byte(v):
    """numpy's float32 -> uint8/int8 cast on x86-64, as an unsigned byte value."""
    if v > INT32_LO and v < INT32_HI:
        return np.int64(np.int32(v)) & 0xFF
    return 0  # INT32_MIN: NaN, infinities and out-of-range values


@njit(inline="always")
def half_bits(v):
    """numpy's float32 -> float16 conversion (``npy_floatbits_to_halfbits``), as an int."""
    f = np.int64(_bits(v)) & 0xFFFFFFFF
    h_sgn = (f & 0x80000000) >> 16
    f_exp = f & 0x7F800000
    if f_exp >= 0x47800000:  # overflow, infinity or NaN
        f_sig = f & 0x007FFFFF
        if f_exp == 0x7F800000 and f_sig != 0:
            ret = 0x7C00 + (f_sig >> 13)
            if ret == 0x7C00:
                ret += 1
            return h_sgn + ret
        return h_sgn + 0x7C00
    if f_exp <= 0x38000000:  # fp16 subnormal or zero
        if f_exp < 0x33000000:
            return h_sgn
        e = f_exp >> 23
        sig = (0x00800000 + (f & 0x007FFFFF)) >> (113 - e)
        if (sig & 0x3FFF) != 0x1000 or (f & 0x7FF) != 0:
            sig += 0x1000
        return h_sgn + (sig >> 13)
    h_exp = (f_exp - 0x38000000) >> 13
    sig = f & 0x007FFFFF
    if (sig & 0x3FFF) != 0x1000:
        sig += 0x1000
    return h_sgn + h_exp + (sig >> 13)  # a carry out of the mantissa bumps the exponent


@njit(inline="always")
def half_value(h):
    """The float32 value of fp16 bits ``h``, exactly."""
    sgn = (h & 0x8000) << 16
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:
        v = _F32(m) * SUBNORMAL_UNIT
        return -v if sgn else v
    if e == 31:
        return _from_bits(sgn | 0x7F800000 | (m << 13))
    return _from_bits(sgn | ((e + 112) << 23) | (m << 13))


@njit(inline="always")
def _store_half(row, offset, h):
    row[offset] = h & 0xFF
    row[offset + 1] = (h >> 8) & 0xFF


@njit(inline="always")
def _inverse(d):
    return ZERO if d == ZERO else ONE / d


@njit(inline="always")
def _abs_bits(v):
    return np.int64(_bits(v)) & 0x7FFFFFFF


@njit(inline="always")
def _order_key(v):
    """An integer ordered as the floats are (-0.0 just below +0.0); its own inverse on bits."""
    b = np.int64(_bits(v))
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@njit(inline="always")
def _first_peak(xb):
    """(first value of largest magnitude (numpy's argmax of abs), finite)."""
    peak = xb[0]
    amax = abs(peak)
    if not amax <= FLT_MAX:
        return peak, False
    for i in range(1, 32):
        a = abs(xb[i])
        if not a <= FLT_MAX:
            return peak, False
        if a > amax:
            amax = a
            peak = xb[i]
    return peak, True


@njit(inline="always")
def _range(xb):
    """(max, min, finite, ambiguous): ambiguous where a zero minimum could take either sign."""
    hi = lo = _order_key(xb[0])
    top = 0
    for i in range(32):
        k = _order_key(xb[i])
        hi = max(hi, k)
        lo = min(lo, k)
        top = max(top, _abs_bits(xb[i]))
    ambiguous = False
    if lo == 0 or lo == -1:  # +0.0 or -0.0: does the block hold the other zero as well?
        pos = neg = False
        for i in range(32):
            if xb[i] == ZERO:
                if _bits(xb[i]) < 0:
                    neg = True
                else:
                    pos = True
        ambiguous = pos and neg
    hi_v = _from_bits(hi ^ ((hi >> 31) & 0x7FFFFFFF))
    lo_v = _from_bits(lo ^ ((lo >> 31) & 0x7FFFFFFF))
    return hi_v, lo_v, top < 0x7F800000, ambiguous


# ---------------------------------------------------------------------------- legacy types


@njit(**_JIT)
def _q8_0(x, out):
    for b in range(x.shape[0]):
        xb, ob = x[b], out[b]
        top = 0
        for i in range(32):
            top = max(top, _abs_bits(xb[i]))
        if top >= 0x7F800000:
            return b
        d = _from_bits(top) / _F32(127)
        iscale = _inverse(d)  # inf gives inf/NaN below: byte 0, as gguf-py's NaN
        for i in range(32):
            t = xb[i] * iscale
            t = t + (HALF_BELOW if t >= ZERO else -HALF_BELOW)
            ob[2 + i] = _low_byte(t)
        _store_half(ob, 0, half_bits(d))
    return OK


@njit(inline="always")
def _pack(xb, ob, shift, iscale, bias, top, qs_at, qh_at):
    """Levels ``MIN(top, (uint8)((x - shift)*iscale + bias))``, nibble-packed, fifth bits at qh_at."""
    qh = 0
    for i in range(16):
        q0 = min(_low_byte((xb[i] - shift) * iscale + bias), top)
        q1 = min(_low_byte((xb[i + 16] - shift) * iscale + bias), top)
        ob[qs_at + i] = (q0 & 0x0F) | ((q1 << 4) & 0xFF)
        qh |= ((q0 >> 4) << i) | ((q1 >> 4) << (i + 16))
    if qh_at >= 0:
        for k in range(4):
            ob[qh_at + k] = (qh >> (8 * k)) & 0xFF


@njit(inline="always")
def _symmetric(x, out, div, bias, top, qs_at, qh_at):
    """Q4_0/Q5_0: ``d = peak/div``, levels of ``x*id + bias``."""
    for b in range(x.shape[0]):
        xb, ob = x[b], out[b]
        peak, finite = _first_peak(xb)
        if not finite:
            return b
        d = peak / div
        _pack(xb, ob, ZERO, _inverse(d), bias, top, qs_at, qh_at)  # x - 0.0 is x
        _store_half(ob, 0, half_bits(d))
    return OK


@njit(inline="always")
def _affine(x, out, div, top, qs_at, qh_at):
    """Q4_1/Q5_1: ``d = (max - min)/div``, levels of ``(x - min)*id + 0.5``."""
    status = OK
    for b in range(x.shape[0]):
        xb, ob = x[b], out[b]
        hi, lo, finite, ambiguous = _range(xb)
        if not finite:
            return b
        if ambiguous:
            status = AMBIGUOUS
        span = hi - lo
        d = span / div
        _pack(xb, ob, lo, _inverse(d), _F32(0.5), top, qs_at, qh_at)
        _store_half(ob, 0, half_bits(d))
        _store_half(ob, 2, half_bits(lo))
    return status


@njit(**_JIT)
def _q4_0(x, out):
    return _symmetric(x, out, _F32(-8), _F32(8.5), 15, 2, -1)


@njit(**_JIT)
def _q5_0(x, out):
    return _symmetric(x, out, _F32(-16), _F32(16.5), 31, 6, 2)


@njit(**_JIT)
def _q4_1(x, out):
    return _affine(x, out, _F32(15), 15, 4, -1)


@njit(**_JIT)
def _q5_1(x, out):
    return _affine(x, out, _F32(31), 31, 8, 4)


# ---------------------------------------------------------------------------- Q4_K


@njit(inline="always")
def _clamp(v, lo, hi):
    return max(lo, min(hi, v))


@njit(inline="always")
def _qkx2(xs, w, L, Laux):
    """``make_qkx2_quants(32, 15, xs, w, L, &the_min, Laux, -1, 0.1, 20, false)``."""
    lo = xs[0]
    hi = xs[0]
    sum_w = w[0]
    sum_x = sum_w * xs[0]
    for i in range(1, 32):
        v = xs[i]
        if v < lo:
            lo = v
        if v > hi:
            hi = v
        sum_w += w[i]
        sum_x += w[i] * v
    if lo > ZERO:
        lo = ZERO
    if hi == lo:
        for i in range(32):
            L[i] = 0
        return ZERO, -lo
    span = hi - lo
    iscale = _F32(15) / span
    scale = ONE / iscale
    best_error = ZERO
    for i in range(32):
        lv = _clamp(nearest_int(iscale * (xs[i] - lo)), 0, 15)
        L[i] = lv
        diff = scale * _F32(lv) + lo - xs[i]
        best_error += w[i] * (diff * diff)
    for s in range(21):
        iscale = QKX2_STEPS[s] / span
        sum_l = ZERO
        sum_l2 = ZERO
        sum_xl = ZERO
        for i in range(32):
            lv = _clamp(nearest_int(iscale * (xs[i] - lo)), 0, 15)
            Laux[i] = lv
            lf = _F32(lv)
            wl = w[i] * lf
            sum_l += wl
            sum_l2 += wl * lf
            sum_xl += wl * xs[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > ZERO:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > ZERO:
                this_min = ZERO
                this_scale = sum_xl / sum_l2
            cur_error = ZERO
            for i in range(32):
                diff = this_scale * _F32(Laux[i]) + this_min - xs[i]
                cur_error += w[i] * (diff * diff)
            if cur_error < best_error:
                for i in range(32):
                    L[i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                lo = this_min
                span = hi - lo
    return scale, -lo


@njit(**_JIT)
def _q4_k(x, out):
    w = np.empty(32, _F32)
    L = np.empty(256, np.int64)
    Laux = np.empty(32, np.int64)
    scales = np.empty(8, _F32)
    mins = np.empty(8, _F32)
    ls = np.empty(8, np.int64)
    lm = np.empty(8, np.int64)
    for b in range(x.shape[0]):
        xb, ob = x[b], out[b]
        for i in range(256):
            if not abs(xb[i]) <= FLT_MAX:
                return b
        max_scale = ZERO
        max_min = ZERO
        for j in range(8):
            xs = xb[32 * j : 32 * j + 32]
            sum_x2 = ZERO
            for i in range(32):
                sum_x2 += xs[i] * xs[i]
            av_x = np.sqrt(sum_x2 / _F32(32))
            for i in range(32):
                w[i] = av_x + abs(xs[i])
            scale, the_min = _qkx2(xs, w, L[32 * j : 32 * j + 32], Laux)
            scales[j] = scale
            mins[j] = the_min
            if scale > max_scale:
                max_scale = scale
            if the_min > max_min:
                max_min = the_min
        inv_scale = _F32(63) / max_scale if max_scale > ZERO else ZERO
        inv_min = _F32(63) / max_min if max_min > ZERO else ZERO
        for j in range(8):
            ls[j] = min(63, nearest_int(inv_scale * scales[j]) & 0xFF)
            lm[j] = min(63, nearest_int(inv_min * mins[j]) & 0xFF)
        for j in range(4):
            ob[4 + j] = ls[j] | ((ls[j + 4] >> 4) << 6)
            ob[8 + j] = lm[j] | ((lm[j + 4] >> 4) << 6)
            ob[12 + j] = (ls[j + 4] & 0x0F) | ((lm[j + 4] & 0x0F) << 4)
        hd = half_bits(max_scale / _F32(63))
        hm = half_bits(max_min / _F32(63))
        _store_half(ob, 0, hd)
        _store_half(ob, 2, hm)
        dv = half_value(hd)
        mv = half_value(hm)
        for j in range(8):
            d = dv * _F32(ls[j])
            if d == ZERO:
                continue  # keeps the search's levels
            dm = mv * _F32(lm[j])
            for i in range(32):
                L[32 * j + i] = _clamp(nearest_int((xb[32 * j + i] + dm) / d), 0, 15)
        for g in range(4):
            for i in range(32):
                ob[16 + 32 * g + i] = L[64 * g + i] | (L[64 * g + 32 + i] << 4)
    return OK


# ---------------------------------------------------------------------------- Q6_K


@njit(**_JIT)
def _q6_k(x, out):
    L = np.empty(256, np.int64)
    scales = np.empty(16, _F32)
    iscales = np.empty(16, _F32)
    zero = np.empty(16, np.bool_)
    isc = np.empty(19, _F32)
    sumlx = np.empty(19, _F32)
    suml2 = np.empty(19, _F32)
    for b in range(x.shape[0]):
        xb, ob = x[b], out[b]
        # make_qx_quants(16, 32, x, L, 1, NULL) per sub-block; all 19 candidate scales are
        # summed side by side (each sum still in element order), then chosen in the C order
        for ib in range(16):
            xs = xb[16 * ib : 16 * ib + 16]
            peak = ZERO
            amax = ZERO
            for i in range(16):
                a = abs(xs[i])
                if not a <= FLT_MAX:
                    return b
                if a > amax:
                    amax = a
                    peak = xs[i]
            if amax < GROUP_MAX_EPS:
                zero[ib] = True
                scales[ib] = ZERO
                continue
            zero[ib] = False
            for c in range(19):
                isc[c] = QX_NUMS[c] / peak
                sumlx[c] = ZERO
                suml2[c] = ZERO
            for i in range(16):
                v = xs[i]
                wv = v * v
                wx = wv * v
                for c in range(19):
                    lf = _F32(_clamp(nearest_int(isc[c] * v), -32, 31))
                    sumlx[c] += wx * lf
                    suml2[c] += (wv * lf) * lf
            scale = sumlx[0] / suml2[0] if suml2[0] != ZERO else ZERO
            best = scale * sumlx[0]
            choice = 0
            for c in range(1, 19):
                if suml2[c] > ZERO and sumlx[c] * sumlx[c] > best * suml2[c]:
                    scale = sumlx[c] / suml2[c]
                    best = scale * sumlx[c]
                    choice = c
            scales[ib] = scale
            iscales[ib] = isc[choice]

        max_scale = ZERO
        max_abs = ZERO
        for ib in range(16):
            a = abs(scales[ib])
            if a > max_abs:
                max_abs = a
                max_scale = scales[ib]
        if max_abs < GROUP_MAX_EPS:
            for k in range(210):
                ob[k] = 0
            continue
        iscale = _F32(-128) / max_scale
        hd = half_bits(ONE / iscale)
        _store_half(ob, 208, hd)
        dv = half_value(hd)
        for ib in range(16):
            byte = min(127, nearest_int(iscale * scales[ib])) & 0xFF
            ob[192 + ib] = byte
            d = dv * _F32(byte - 256 if byte >= 128 else byte)
            if d != ZERO:
                for i in range(16):
                    L[16 * ib + i] = _clamp(nearest_int(xb[16 * ib + i] / d), -32, 31) + 32
            elif zero[ib]:
                for i in range(16):
                    L[16 * ib + i] = 0
            else:  # `if (!d) continue;`: the search's levels
                for i in range(16):
                    L[16 * ib + i] = _clamp(nearest_int(iscales[ib] * xb[16 * ib + i]), -32, 31) + 32
        for h in range(2):
            j = 128 * h
            for i in range(32):
                l0, l1, l2, l3 = L[j + i], L[j + i + 32], L[j + i + 64], L[j + i + 96]
                ob[64 * h + i] = (l0 & 0x0F) | ((l2 & 0x0F) << 4)
                ob[64 * h + i + 32] = (l1 & 0x0F) | ((l3 & 0x0F) << 4)
                ob[128 + 32 * h + i] = (l0 >> 4) | ((l1 >> 4) << 2) | ((l2 >> 4) << 4) | ((l3 >> 4) << 6)
    return OK


# ---------------------------------------------------------------------------- driver glue

_KERNELS = {
    "Q8_0": _q8_0,
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q4_K": _q4_k,
    "Q6_K": _q6_k,
}


def _wrap(qtype: str, kernel) -> Callable[[np.ndarray, np.ndarray], None]:
    codec = _CODECS[qtype]

    def quantize_blocks(x: np.ndarray, out: np.ndarray) -> None:
        """Blocks ``x`` (n, block_size) float32 into ``out`` (n, type_size) uint8, in place."""
        status = kernel(x, out)
        if status == AMBIGUOUS:
            codec.quantize_blocks(x, out, Scratch())
        elif status != OK:
            raise _NonFinite

    quantize_blocks.__qualname__ = quantize_blocks.__name__ = f"jit_{qtype}"
    return quantize_blocks


KERNELS: dict[str, Callable[[np.ndarray, np.ndarray], None]] = {q: _wrap(q, k) for q, k in _KERNELS.items()}
