"""The 32-value GGML block codecs (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1), equal to gguf-py's.

Blocks are processed in "quad" layout: a chunk's (n, 32) floats are transposed to (8, 4n), so
every per-block reduction and every scaling step is a contiguous vector operation over all
blocks, and each quantizer does gguf-py's float32 operations in gguf-py's order.
"""

from __future__ import annotations

import numpy as np

from .ggml_codec import (
    F32,
    HALF_BELOW,
    BlockCodec,
    Scratch,
    full,
    inverse,
    require_finite,
    signed_peak,
    store_half,
)


def quads(x: np.ndarray, ws: Scratch) -> np.ndarray:
    """Blocks (n, 32) as (8, 4n): row g holds positions 4g..4g+3 of every block.

    Reductions over a block then run as contiguous vector operations over all blocks (numpy's
    short reductions along a last axis are several times slower), and the transpose moves
    16-byte units, several times cheaper than a float-by-float one.
    """
    Y = ws("quads", (8, 4 * x.shape[0]))
    np.copyto(Y.view(np.complex128), x.view(np.complex128).T)
    return Y


def _per_quad(v: np.ndarray, ws: Scratch) -> np.ndarray:
    """A per-block value (n,) laid out to broadcast over the rows of :func:`quads`."""
    return ws.copy("per_quad", np.repeat(v, 4))


def _store_quads(out: np.ndarray, offset: int, q: np.ndarray) -> None:
    """Write uint8 rows ``q`` (r, 4n) in quad order to bytes offset.. of each block.

    One copy per quad row: numpy would copy the transposed whole along its short axis.
    """
    dst, src = out[:, offset : offset + 4 * q.shape[0]].view(np.uint32), q.view(np.uint32)
    for g in range(q.shape[0]):
        dst[:, g] = src[g]


def _per_block(v4: np.ndarray, op: np.ufunc) -> np.ndarray:
    """Reduce the 4 lanes per block of a quad-row reduction (n*4,) to (n,)."""
    return op.reduce(np.ascontiguousarray(v4.reshape(-1, 4).T), axis=0)


def _block_range(Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per block (max, min) of quads ``Y``; NaN propagates into both."""
    return _per_block(Y.max(axis=0), np.maximum), _per_block(Y.min(axis=0), np.minimum)


def _half_away(Y: np.ndarray, ws: Scratch) -> np.ndarray:
    """copysign(nextafter(0.5, 0), Y) by bits: added before truncation, rounds half away from 0."""
    s = ws("sign", Y.shape, np.uint32)
    np.bitwise_and(Y.view(np.uint32), np.uint32(0x80000000), out=s)
    s |= HALF_BELOW.view(np.uint32)
    return s.view(F32)


def _cast(Y: np.ndarray, dtype: type, ws: Scratch) -> np.ndarray:
    """``Y.astype(dtype)`` (truncating, as C's float-to-int cast) into a scratch array."""
    q = ws("levels", Y.shape, dtype)
    np.copyto(q, Y, casting="unsafe")
    return q


def _levels(Y: np.ndarray, top: int, ws: Scratch) -> np.ndarray:
    """``MIN(top, (uint8)Y)``, as gguf-py's ``trunc(Y).astype(uint8).clip(0, top)``."""
    q = _cast(Y, np.uint8, ws)
    return np.minimum(q, full(q.shape, top, np.uint8), out=q)


def _nibbles(q: np.ndarray, ws: Scratch, bits: int) -> np.ndarray:
    """Pack quad-ordered levels: low nibbles from positions 0..15, high from 16..31."""
    packed = ws("nibbles", (4, q.shape[1]), np.uint8)
    np.left_shift(q[4:], np.uint8(4), out=packed)  # the uint8 shift drops a fifth bit
    if bits == 4:
        packed |= q[:4]
    else:
        packed |= np.bitwise_and(
            q[:4], full(packed.shape, 0x0F, np.uint8), out=ws("low", packed.shape, np.uint8)
        )
    return packed


def _fifth_bits(q: np.ndarray) -> np.ndarray:
    """Bit 4 of quad-ordered levels, as the 4 little-endian bytes of Q5's ``qh`` per block."""
    quad = (q >> 4).view(np.uint32)  # four 0/1 bytes per block and quad
    nib = (quad * np.uint32(0x01020408)) >> 24  # gathers them into bits 0..3
    return (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8).T


# ---------------------------------------------------------------------------- codecs
# Each quantizer follows its ``quantize_row_*_ref`` / gguf-py twin operation for operation.
# Q4_0/Q5_0 and Q4_1/Q5_1 differ only in their level count and where the fifth bits go.


def _symmetric(x: np.ndarray, out: np.ndarray, ws: Scratch, bits: int) -> None:
    """Q4_0/Q5_0: ``d = peak / -2**(bits-1)``, levels ``x/d + 2**(bits-1) + 0.5``."""
    half, qs_at = 1 << (bits - 1), 2 if bits == 4 else 6
    Y = quads(x, ws)
    peak = signed_peak(x, *_block_range(Y))
    require_finite(peak)
    d = peak / F32(-half)
    Y *= _per_quad(inverse(d), ws)
    Y += F32(half + 0.5)
    _store_levels(out, qs_at, _levels(Y, 2 * half - 1, ws), ws, bits)
    store_half(out, 0, d)


def _affine(x: np.ndarray, out: np.ndarray, ws: Scratch, bits: int) -> None:
    """Q4_1/Q5_1: ``d = (max - min) / (2**bits - 1)``, levels ``(x - min)/d + 0.5``."""
    top, qs_at = (1 << bits) - 1, 4 if bits == 4 else 8
    Y = quads(x, ws)
    hi, lo = _block_range(Y)
    require_finite(hi, lo)
    d = (hi - lo) / F32(top)
    Y -= _per_quad(lo, ws)
    Y *= _per_quad(inverse(d), ws)
    Y += F32(0.5)
    _store_levels(out, qs_at, _levels(Y, top, ws), ws, bits)
    store_half(out, 0, d)
    store_half(out, 2, lo)


def _store_levels(out: np.ndarray, qs_at: int, q: np.ndarray, ws: Scratch, bits: int) -> None:
    """Nibbles from byte ``qs_at``; for 5 bits the fifth bits in the 4 bytes before them."""
    _store_quads(out, qs_at, _nibbles(q, ws, bits))
    if bits == 5:
        out[:, qs_at - 4 : qs_at] = _fifth_bits(q)


class Q8_0(BlockCodec, qtype="Q8_0"):
    @classmethod
    def quantize_blocks(cls, x: np.ndarray, out: np.ndarray, ws: Scratch) -> None:
        Y = quads(x, ws)
        amax = np.abs(_per_block(np.maximum(Y.max(axis=0), -Y.min(axis=0)), np.maximum))  # never -0
        require_finite(amax)
        d = amax / F32(127)
        iscale = inverse(d)
        iscale[np.isinf(iscale)] = np.nan  # gguf-py rounds +-inf to NaN before the int8 cast
        Y *= _per_quad(iscale, ws)
        Y += _half_away(Y, ws)  # roundf(x * id), as the cast below truncates
        _store_quads(out, 2, _cast(Y, np.int8, ws))
        store_half(out, 0, d)


class Q4_0(BlockCodec, qtype="Q4_0"):
    bits = 4

    @classmethod
    def quantize_blocks(cls, x: np.ndarray, out: np.ndarray, ws: Scratch) -> None:
        _symmetric(x, out, ws, cls.bits)


class Q5_0(Q4_0, qtype="Q5_0"):
    bits = 5


class Q4_1(BlockCodec, qtype="Q4_1"):
    bits = 4

    @classmethod
    def quantize_blocks(cls, x: np.ndarray, out: np.ndarray, ws: Scratch) -> None:
        _affine(x, out, ws, cls.bits)


class Q5_1(Q4_1, qtype="Q5_1"):
    bits = 5
