"""numba kernels for Q4_K and Q6_K, byte-identical to :mod:`~prebake.formats.quants_k`.

They follow llama.cpp's ``quantize_row_q4_K_ref`` and ``quantize_row_q6_K_ref``; the
exactness conventions are those of :mod:`~prebake.formats.jit_bits`.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .ggml_codec import F32
from .jit_bits import (
    FLT_MAX,
    JIT,
    OK,
    ONE,
    ZERO,
    half_bits,
    half_value,
    nearest_int,
    store_half,
    store_half_at,
)
from .quants_k import GROUP_MAX_EPS, QKX2_STEPS, QX_NUMS


@njit(inline="always")
def _clamp(v, lo, hi):
    return max(lo, min(hi, v))


# Q4_K: ``make_qkx2_quants`` searches each 32-value sub-block on its own, with float sums that
# must run in order. The kernel runs the searches of GROUP super-blocks side by side instead:
# every array is (32 elements, lanes), one lane per sub-block, and every loop over lanes is a
# SIMD loop. Each lane does exactly the scalar search's operations in its order, so its bytes
# are the reference's; branches become per-lane selects. 2.5x the scalar kernel.
GROUP = 16


@njit(inline="always")
def _search_start(xt, w, g, n, lo, hi, sw, sx, span, isc, scale, best, L, live):
    """The search's first pass: range, weight sums and the levels at the plain 15/(max-min)."""
    for k in range(g):
        lo[k] = hi[k] = xt[0, k]
        sw[k] = w[0, k]
        sx[k] = w[0, k] * xt[0, k]
    for i in range(1, n):
        for k in range(g):
            v = xt[i, k]
            lo[k] = v if v < lo[k] else lo[k]
            hi[k] = v if v > hi[k] else hi[k]
            sw[k] += w[i, k]
            sx[k] += w[i, k] * v
    for k in range(g):
        lo[k] = ZERO if lo[k] > ZERO else lo[k]
        live[k] = hi[k] != lo[k]  # a constant sub-block returns scale 0 and keeps -min
        span[k] = hi[k] - lo[k]
        isc[k] = F32(15) / span[k]
        scale[k] = ONE / isc[k]
        best[k] = ZERO
    for i in range(n):
        for k in range(g):
            lv = F32(_clamp(nearest_int(isc[k] * (xt[i, k] - lo[k])), 0, 15))
            L[i, k] = lv
            diff = scale[k] * lv + lo[k] - xt[i, k]
            best[k] += w[i, k] * (diff * diff)


@njit(inline="always")
def _search_step(step, xt, w, g, n, lo, hi, sw, sx, span, scale, best, L, La, live, t):
    """One of the 21 steps: levels at ``step/(max-min)``, least-squares scale and min, keep if better."""
    isc, s_l, s_l2, s_xl, ts, tm, cur, take = t
    for k in range(g):
        isc[k] = step / span[k]
        s_l[k] = s_l2[k] = s_xl[k] = ZERO
    for i in range(n):
        for k in range(g):
            lf = F32(_clamp(nearest_int(isc[k] * (xt[i, k] - lo[k])), 0, 15))
            La[i, k] = lf
            wl = w[i, k] * lf
            s_l[k] += wl
            s_l2[k] += wl * lf
            s_xl[k] += wl * xt[i, k]
    for k in range(g):
        D = sw[k] * s_l2[k] - s_l[k] * s_l[k]
        a = (sw[k] * s_xl[k] - sx[k] * s_l[k]) / D
        m = (s_l2[k] * sx[k] - s_l[k] * s_xl[k]) / D
        ts[k] = s_xl[k] / s_l2[k] if m > ZERO else a
        tm[k] = ZERO if m > ZERO else m
        take[k] = live[k] and D > ZERO
        cur[k] = ZERO
    for i in range(n):
        for k in range(g):
            diff = ts[k] * La[i, k] + tm[k] - xt[i, k]
            cur[k] += w[i, k] * (diff * diff)
    for k in range(g):
        better = take[k] and cur[k] < best[k]
        take[k] = better
        best[k] = cur[k] if better else best[k]
        scale[k] = ts[k] if better else scale[k]
        lo[k] = tm[k] if better else lo[k]
        span[k] = hi[k] - lo[k]
    for i in range(n):
        for k in range(g):
            L[i, k] = La[i, k] if take[k] else L[i, k]


@njit(inline="always")
def _pack_q4_k(x, out, b, q, n, scale, lo, L, live, Lf):
    """Super-block ``b`` (lanes 8q..8q+7): 6-bit scales and mins, fp16 d/dmin, final levels."""
    max_scale = max_min = ZERO
    for j in range(8):
        k = 8 * q + j
        scale[k] = scale[k] if live[k] else ZERO
        lo[k] = -lo[k]  # the_min
        if scale[k] > max_scale:
            max_scale = scale[k]
        if lo[k] > max_min:
            max_min = lo[k]
    inv_scale = F32(63) / max_scale if max_scale > ZERO else ZERO
    inv_min = F32(63) / max_min if max_min > ZERO else ZERO
    hd = half_bits(max_scale / F32(63))
    hm = half_bits(max_min / F32(63))
    store_half_at(out, b, 0, hd)
    store_half_at(out, b, 2, hm)
    dv, mv = half_value(hd), half_value(hm)
    for j in range(8):
        k = 8 * q + j
        ls = min(63, nearest_int(inv_scale * scale[k]) & 0xFF)
        lm = min(63, nearest_int(inv_min * lo[k]) & 0xFF)
        if j < 4:
            out[b, 4 + j] = ls
            out[b, 8 + j] = lm
        else:
            out[b, j] |= (ls >> 4) << 6
            out[b, 4 + j] |= (lm >> 4) << 6
            out[b, 8 + j] = (ls & 0x0F) | ((lm & 0x0F) << 4)
        d = dv * F32(ls)
        if d == ZERO:  # keeps the search's levels
            for i in range(n):
                Lf[n * j + i] = np.int64(L[i, k]) if live[k] else 0
            continue
        dm = mv * F32(lm)
        for i in range(n):
            Lf[n * j + i] = _clamp(nearest_int((x[b, n * j + i] + dm) / d), 0, 15)
    for g in range(4):
        for i in range(32):
            out[b, 16 + 32 * g + i] = Lf[64 * g + i] | (Lf[64 * g + 32 + i] << 4)


@njit(**JIT)
def q4_k(x, out):
    nb, n = x.shape[0], x.shape[1] // 8  # n = 32, read at run time so lane loops vectorize
    G = 8 * GROUP
    xt, w, L, La = np.empty((n, G), F32), np.empty((n, G), F32), np.empty((n, G), F32), np.empty((n, G), F32)
    lanes = np.empty((14, G), F32)  # per-lane state: rows below, then step work space
    lo, hi, sw, sx, span, isc, scale, best = lanes[0], lanes[1], lanes[2], lanes[3], lanes[4], lanes[5], \
        lanes[6], lanes[7]
    t = (lanes[8], lanes[9], lanes[10], lanes[11], lanes[12], lanes[13], np.empty(G, F32), np.empty(G, np.bool_))
    live = np.empty(G, np.bool_)
    Lf = np.empty(256, np.int64)
    for b0 in range(0, nb, GROUP):
        g = 8 * min(GROUP, nb - b0)
        for b in range(b0, b0 + g // 8):
            for i in range(8 * n):
                if not abs(x[b, i]) <= FLT_MAX:
                    return b
        for k in range(g):  # lane k: sub-block k % 8 of super-block b0 + k // 8
            for i in range(n):
                xt[i, k] = x[b0 + k // 8, n * (k % 8) + i]
        for k in range(g):  # weights av_x + |x|, av_x = sqrt(sum x^2 / 32) summed in order
            sw[k] = ZERO
        for i in range(n):
            for k in range(g):
                sw[k] += xt[i, k] * xt[i, k]
        for k in range(g):
            sw[k] = np.sqrt(sw[k] / F32(32))
        for i in range(n):
            for k in range(g):
                w[i, k] = sw[k] + abs(xt[i, k])
        _search_start(xt, w, g, n, lo, hi, sw, sx, span, isc, scale, best, L, live)
        for s in range(21):
            _search_step(QKX2_STEPS[s], xt, w, g, n, lo, hi, sw, sx, span, scale, best, L, La, live, t)
        for q in range(g // 8):
            _pack_q4_k(x, out, b0 + q, q, n, scale, lo, L, live, Lf)
    return OK


# ---------------------------------------------------------------------------- Q6_K


@njit(**JIT)
def q6_k(x, out):
    L = np.empty(256, np.int64)
    scales = np.empty(16, F32)
    iscales = np.empty(16, F32)
    zero = np.empty(16, np.bool_)
    isc = np.empty(19, F32)
    sumlx = np.empty(19, F32)
    suml2 = np.empty(19, F32)
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
                    lf = F32(_clamp(nearest_int(isc[c] * v), -32, 31))
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
        iscale = F32(-128) / max_scale
        hd = half_bits(ONE / iscale)
        store_half(ob, 208, hd)
        dv = half_value(hd)
        for ib in range(16):
            byte = min(127, nearest_int(iscale * scales[ib])) & 0xFF
            ob[192 + ib] = byte
            d = dv * F32(byte - 256 if byte >= 128 else byte)
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
