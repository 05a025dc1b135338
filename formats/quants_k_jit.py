"""numba kernels for Q4_K and Q6_K, byte-identical to :mod:`~prebake.formats.quants_k`.

Each loops over 256-value super-blocks the way llama.cpp's ``quantize_row_q4_K_ref`` and
``quantize_row_q6_K_ref`` do; the exactness conventions are those of
:mod:`~prebake.formats.jit_bits`.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .jit_bits import (
    _F32,
    FLT_MAX,
    GROUP_MAX_EPS,
    JIT,
    OK,
    ONE,
    ZERO,
    half_bits,
    half_value,
    nearest_int,
    store_half,
)

QKX2_STEPS = np.array([(_F32(-1) + _F32(0.1) * _F32(i)) + _F32(15) for i in range(21)], _F32)
QX_NUMS = np.array([_F32(-32)] + [-(_F32(32) + _F32(0.1) * _F32(i)) for i in range(-9, 10) if i], _F32)


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


@njit(**JIT)
def q4_k(x, out):
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
        store_half(ob, 0, hd)
        store_half(ob, 2, hm)
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


@njit(**JIT)
def q6_k(x, out):
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
        store_half(ob, 208, hd)
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
