"""K-quant codecs (Q4_K, Q6_K): super-blocks of 256 values, bit-exact with llama.cpp.

``quantize_row_q4_K_ref`` fits each 32-value sub-block with ``make_qkx2_quants`` (a scale and a
min, the best of 21 candidate scales); ``quantize_row_q6_K_ref`` fits each 16-value sub-block
with ``make_qx_quants`` (a signed scale, the best of 19 candidates). Both then quantize the
sub-block scales under one fp16 super-block scale and requantize the values against them.

The search runs on a transposed chunk ``X``: one column per sub-block, one row per position in
it. Every ``s += term`` of the C code becomes ``np.add.reduce`` over the rows, which adds them
strictly in order (0 + row 0 + row 1 + ...) as the C loop does, and every other step is one
contiguous float32 vector operation over all sub-blocks. The only Python loops run over the
fixed candidate steps. Rather than carry the levels of the best candidate along, a search keeps
that candidate's ``iscale`` (and min) and the levels are recomputed once, where needed.
"""

from __future__ import annotations

import numpy as np

from .ggml_codec import (
    F32,
    MAGIC,
    BlockCodec,
    Scratch,
    full,
    half_at,
    require_finite,
    signed_peak,
    store_half,
)

# The K-quant constants, shared with the numba kernels (:mod:`~prebake.formats.quants_k_jit`).
GROUP_MAX_EPS = F32(1e-15)  # a sub-block or super-block whose peak is below this stays zero
# candidate inverse-scale numerators, in float32 as the C expressions compute them
# (rmin + rdelta*is) + nmax
QKX2_STEPS = np.array([(F32(-1) + F32(0.1) * F32(i)) + F32(15) for i in range(21)], F32)
# -nmax, then -(nmax + 0.1f*is) for is = -9..9 except 0 (the C loop's order)
QX_NUMS = np.array([F32(-32)] + [-(F32(32) + F32(0.1) * F32(i)) for i in range(-9, 10) if i], F32)
# |x| <= |peak| bounds |rint(iscale*x)| by |num| rounded: candidates up to 31.4 need no clamp
# to [-32, 31], those below 32.5 only the clamp at 31 (rounded in this order, then put back)
_QX_GROUPS = [(None, None, [1, 2, 3, 4]), (None, 31, [0, *range(5, 14)]), (-32, 31, list(range(14, 19)))]


def nearest_int(t: np.ndarray) -> np.ndarray:
    """llama.cpp's ``nearest_int`` bit for bit (round half to even; odd values for |t| >= 2**22)."""
    return ((t + MAGIC).view(np.int32) & 0x7FFFFF) - 0x400000


def _clamp(L: np.ndarray, lo: float, hi: float) -> None:
    np.maximum(L, full(L.shape[-2:], lo, F32), out=L)
    np.minimum(L, full(L.shape[-2:], hi, F32), out=L)


# ---------------------------------------------------------------------------- Q4_K


class _Bounds:
    """What rounding ``iscale*(x - min)`` needs for every column, for the current mins.

    With ``min <= x`` everywhere, ``0 <= iscale*(x - min) <= num*(1 + 2 eps)``: np.rint is
    nearest_int and only candidates above 15.4 need the clamp at 15. A min above some values
    adds the clamp at 0; a degenerate min or range falls back to nearest_int's bit trick.
    """

    def __init__(self, shift: np.ndarray, span: np.ndarray, x_lo: np.ndarray) -> None:
        below = shift - x_lo  # > 0 where the min is above the column's smallest value
        self.clamp_low = bool((below > 0).any())
        ok = (span > F32(1e-30)) & (span < F32(3e38)) & (below < span * F32(2**16))
        self.exact = not bool(ok.all())


def _qkx2_levels(L, X, shift, iscale, bounds: _Bounds, num: float, ws: Scratch) -> None:
    """``L = MAX(0, MIN(15, nearest_int(iscale*(x - min))))`` in place, the cheapest exact way."""
    np.subtract(X, ws.copy("shift", shift), out=L)
    L *= ws.copy("iscale", iscale)
    if bounds.exact:
        L[...] = np.clip(nearest_int(L), 0, 15)
        return
    np.rint(L, out=L)
    if bounds.clamp_low:
        np.maximum(L, full(L.shape, 0, F32), out=L)
    if num > 15.4:
        np.minimum(L, full(L.shape, 15, F32), out=L)


def _weighted_sq_error(scale, L, shift, X, W, P, ws: Scratch) -> np.ndarray:
    """sum_i w * (scale*L + min - x)**2, in the C order, using scratch ``P``."""
    np.multiply(L, ws.copy("scale", scale), out=P)
    P += ws.copy("shift", shift)
    P -= X
    np.multiply(P, P, out=P)
    P *= W
    return _sum_rows(P, ws, "err")


def _sum_rows(P: np.ndarray, ws: Scratch, name: str) -> np.ndarray:
    """``s = 0; s += P[0]; s += P[1]; ...``: numpy adds the rows of axis 0 in order."""
    return np.add.reduce(P, axis=0, out=ws(name, P.shape[1:]))


def _qkx2_search(X, W, x_lo, x_hi, ws: Scratch):
    """``make_qkx2_quants(32, 15, x, w, L, &min, Laux, -1, 0.1, 20, false)`` for every column.

    Returns (scale, the_min, iscale, shift): the chosen levels are
    ``MAX(0, MIN(15, nearest_int(iscale*(x - shift))))``.
    """
    m = X.shape[1]
    lo = np.minimum(x_lo, F32(0))
    flat = x_hi == lo  # the C code returns early: scale 0, levels 0
    hi = np.where(flat, F32(1), x_hi)  # flat columns: x - min == 0, so levels stay 0
    L, WL, P = ws("qkx2_L", X.shape), ws("qkx2_WL", X.shape), ws("qkx2_P", X.shape)
    sum_w = np.add.reduce(W, axis=0)
    np.multiply(W, X, out=P)
    sum_x = np.add.reduce(P, axis=0)

    # candidate 0 is the initial guess; the C loop's candidates follow. Their iscale, min and
    # scale are kept per column so that only the choice has to be tracked.
    n = len(QKX2_STEPS) + 1
    iscales, shifts, scales = np.empty((n, m), F32), np.empty((n, m), F32), np.empty((n, m), F32)
    cur = shifts[0] = lo
    span = hi - cur
    bounds = _Bounds(cur, span, x_lo)
    np.divide(F32(15), span, out=iscales[0])
    np.divide(F32(1), iscales[0], out=scales[0])
    _qkx2_levels(L, X, cur, iscales[0], bounds, 15.0, ws)
    best = _weighted_sq_error(scales[0], L, cur, X, W, P, ws).copy()
    choice = np.zeros(m, np.intp)
    for s, num in enumerate(QKX2_STEPS, start=1):
        shifts[s] = cur
        iscale = np.divide(num, span, out=iscales[s])
        _qkx2_levels(L, X, cur, iscale, bounds, num, ws)
        np.multiply(W, L, out=WL)
        sum_l = _sum_rows(WL, ws, "sum_l")
        np.multiply(WL, L, out=P)
        sum_l2 = _sum_rows(P, ws, "sum_l2")
        np.multiply(WL, X, out=P)
        sum_xl = _sum_rows(P, ws, "sum_xl")
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = np.divide(sum_w * sum_xl - sum_x * sum_l, D, out=scales[s])
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        if pos.any():
            np.copyto(this_scale, sum_xl / sum_l2, where=pos)
            this_min[pos] = 0
        err = _weighted_sq_error(this_scale, L, this_min, X, W, P, ws)
        better = (D > 0) & (err < best)
        if better.any():
            np.copyto(best, err, where=better)
            np.copyto(choice, s, where=better)
            cur = np.where(better, this_min, cur)
            span = hi - cur
            bounds = _Bounds(cur, span, x_lo)
    cols = np.arange(m)
    scale = np.where(flat, F32(0), scales[choice, cols])
    return scale, -cur, iscales[choice, cols], shifts[choice, cols]


def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins into the 12 bytes ``get_scale_min_k4`` reads."""
    return np.concatenate(
        [
            ls[:, :4] | ((ls[:, 4:] >> 4) << 6),
            lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
            (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4),
        ],
        axis=1,
    )


def _six_bits(values: np.ndarray, peak: np.ndarray) -> np.ndarray:
    """``MIN(63, (uint8_t)nearest_int(inv * v))`` with ``inv = peak > 0 ? 63.f/peak : 0.f``."""
    inv = np.where(peak > 0, F32(63) / peak, F32(0))
    return np.minimum(nearest_int(inv[:, None] * values) & 0xFF, 63).astype(np.uint8)


class Q4_K(BlockCodec, qtype="Q4_K"):
    chunk_blocks = 1024

    @classmethod
    def quantize_blocks(cls, x: np.ndarray, out: np.ndarray, ws: Scratch) -> None:
        n = x.shape[0]
        X = ws("X", (32, 8 * n))
        np.copyto(X, x.reshape(-1, 32).T)
        x_lo, x_hi = X.min(axis=0), X.max(axis=0)
        require_finite(x_lo, x_hi)
        W = ws("W", X.shape)
        np.multiply(X, X, out=W)
        av_x = np.sqrt(np.add.reduce(W, axis=0) / F32(32))
        np.abs(X, out=W)
        W += av_x
        scale, the_min, iscale, shift = _qkx2_search(X, W, x_lo, x_hi, ws)
        scales, mins = scale.reshape(n, 8), the_min.reshape(n, 8)

        # `if (scale > max_scale)` from 0: NaN and negatives never win
        max_scale = np.where(scales > 0, scales, F32(0)).max(axis=1)
        max_min = np.where(mins > 0, mins, F32(0)).max(axis=1)
        ls, lm = _six_bits(scales, max_scale), _six_bits(mins, max_min)
        store_half(out, 0, max_scale / F32(63))
        store_half(out, 2, max_min / F32(63))
        out[:, 4:16] = _pack_scales_k4(ls, lm)

        d = (half_at(out, 0) * ls.astype(F32)).reshape(-1)
        dm = (half_at(out, 2) * lm.astype(F32)).reshape(-1)
        T = X + dm
        T /= d
        L = np.clip(nearest_int(T), 0, 15).astype(np.uint8)
        keep = np.flatnonzero(d == 0)  # `if (!d) continue;`: these keep the search's levels
        if keep.size:
            t = (X[:, keep] - shift[keep]) * iscale[keep]
            L[:, keep] = np.clip(nearest_int(t), 0, 15)
        q = L.T.reshape(n, 4, 2, 32)
        out[:, 16:] = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)



# ---------------------------------------------------------------------------- Q6_K


def _qx_search(X: np.ndarray, x_hi: np.ndarray, x_lo: np.ndarray, ws: Scratch):
    """``make_qx_quants(16, 32, x, L, 1, NULL)`` for every column of ``X`` (16, M).

    The 19 candidate scales are rounded and summed a group at a time, all columns at once; only
    the C loop's running choice ``sumlx*sumlx > best*suml2`` is a (per-column) scan over them.
    Returns (scale, iscale, zero): levels are clamp(rint(iscale * x)) + 32, or 0 where ``zero``.
    """
    rows, m = X.shape
    cols = np.arange(m)
    peak = signed_peak(X.T, x_hi, x_lo)  # first value of largest magnitude
    zero = np.abs(peak) < GROUP_MAX_EPS
    peak = np.where(zero, F32(1), peak)  # dead columns: any finite stand-in
    n = len(QX_NUMS)
    iscales = np.divide(QX_NUMS[:, None], peak, out=ws("qx_iscales", (n, m)))
    X2 = np.multiply(X, X, out=ws("qx_X2", X.shape))
    WX = np.multiply(X2, X, out=ws("qx_WX", X.shape))  # w*x[i] with w = x*x
    sumlx, suml2 = ws("qx_sumlx", (n, m)), ws("qx_suml2", (n, m))
    for low, high, members in _QX_GROUPS:
        for g in range(0, len(members), Q6_K.group):
            part = members[g : g + Q6_K.group]
            shape = (len(part), rows, m)
            L, P = ws("qx_L", shape), ws("qx_P", shape)
            np.multiply(X, ws.copy("qx_part", iscales[part])[:, None, :], out=L)
            np.rint(L, out=L)  # |iscale * x| <= 32.9: np.rint is nearest_int
            if low is not None:
                np.maximum(L, full(L.shape[1:], low, F32), out=L)
            if high is not None:
                np.minimum(L, full(L.shape[1:], high, F32), out=L)
            np.multiply(WX, L, out=P)
            sumlx[part] = np.add.reduce(P, axis=1, out=ws("qx_sum", shape[::2]))
            np.multiply(X2, L, out=P)
            P *= L  # w*l*l
            suml2[part] = np.add.reduce(P, axis=1, out=ws("qx_sum", shape[::2]))

    ratio = sumlx / suml2
    first = np.where(suml2[0] != 0, ratio[0], F32(0))  # `suml2 ? sumlx/suml2 : 0.0f`
    gain = ratio * sumlx  # `best = scale*sumlx` once a candidate is taken
    wins = sumlx * sumlx
    wins[~(suml2 > 0)] = -np.inf  # `suml2 > 0 &&`
    best = first * sumlx[0]
    choice = np.zeros(m, np.int8)
    taken, bar = np.empty(m, bool), np.empty(m, F32)
    for s in range(1, n):
        np.multiply(best, suml2[s], out=bar)
        np.greater(wins[s], bar, out=taken)
        best = np.where(taken, gain[s], best)
        choice = np.where(taken, np.int8(s), choice)
    scale = np.where(choice == 0, first, ratio[choice, cols])
    return np.where(zero, F32(0), scale), iscales[choice, cols], zero


class Q6_K(BlockCodec, qtype="Q6_K"):
    chunk_blocks = 512
    group = 3  # candidates rounded per pass

    @classmethod
    def quantize_blocks(cls, x: np.ndarray, out: np.ndarray, ws: Scratch) -> None:
        n = x.shape[0]
        X = ws("X", (16, 16 * n))
        np.copyto(X, x.reshape(-1, 16).T)
        x_hi, x_lo = X.max(axis=0), X.min(axis=0)
        require_finite(x_hi, x_lo)
        scale, iscale, zero = _qx_search(X, x_hi, x_lo, ws)
        scales = scale.reshape(n, 16)

        mag = np.abs(scales)
        mag = np.where(mag > 0, mag, F32(0))  # NaN never wins `abs_scale > max_abs_scale`
        first = mag.argmax(axis=1)
        rows = np.arange(n)
        dead = mag[rows, first] < GROUP_MAX_EPS  # the whole block stays zero
        block_iscale = F32(-128) / np.where(dead, F32(1), scales[rows, first])
        sc = np.minimum(nearest_int(block_iscale[:, None] * scales), 127).astype(np.int8)
        store_half(out, 208, F32(1) / block_iscale)
        out[:, 192:208] = sc.view(np.uint8)

        d = (half_at(out, 208) * sc.astype(F32)).reshape(-1)
        L = np.clip(nearest_int(X / d), -32, 31) + 32
        keep = np.flatnonzero(d == 0)  # `if (!d) continue;`: these keep the search's levels
        if keep.size:
            S = X[:, keep] * iscale[keep]
            np.rint(S, out=S)
            _clamp(S, -32, 31)
            L[:, keep] = np.where(zero[keep], F32(0), S + F32(32))
        q = L.astype(np.uint8).T.reshape(n, 2, 4, 32)
        out[:, :128] = ((q[:, :, 0:2] & 0x0F) | ((q[:, :, 2:4] & 0x0F) << 4)).reshape(n, 128)
        out[:, 128:192] = (
            (q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6)
        ).reshape(n, 64)
        out[dead] = 0
