"""Bit-exact building blocks for the numba quantizer kernels.

The kernels in :mod:`~prebake.formats.quants_jit` and :mod:`~prebake.formats.quants_k_jit`
follow the numpy codecs operation for operation, with these conventions:

* every float is a float32 (literals are ``np.float32`` constants, so nothing is promoted to
  float64), there is no fastmath and numba never contracts into fused multiply-adds;
* float-to-integer casts reproduce numpy's ``astype(np.uint8/np.int8)`` on x86-64: truncate to
  int32 (NaN, infinities and values outside int32 give INT32_MIN) and keep the low byte;
* ``nearest_int`` is llama.cpp's bit trick, done on the float's bits;
* fp16 fields are converted in the kernel with numpy's float32->float16 algorithm (round to
  nearest even, subnormals, overflow to infinity) and read back exactly.

Speed: numba widens int32 arithmetic to int64, which halves the SIMD width of a reduction and
stops LLVM vectorizing some. The ``*32`` intrinsics keep the hot integer work in int32.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .ggml_codec import F32, MAGIC
from .jit_cache import check

ZERO = F32(0)
ONE = F32(1)
FLT_MAX = F32(np.finfo(np.float32).max)
SUBNORMAL_UNIT = F32(2.0**-24)  # value of the lowest fp16 mantissa bit below the normals
INT32_LO, INT32_HI = -2147483649.0, 2147483648.0  # open range that converts to int32
ZERO32 = np.int32(0)
NONE32 = np.int32(-1)
INF_BITS = 0x7F800000  # magnitude bits at and above this are infinity or NaN

OK, AMBIGUOUS = -1, -2
JIT = {"cache": True, "nogil": True, "error_model": "numpy"}  # numpy: x/0 is inf/NaN, as in C; nogil: workers in threads run at once
check(JIT)  # cached kernels compiled from other sources or flags than these are dropped (jit_cache says why)
_I32 = ir.IntType(32)


@intrinsic
def bits(typingctx, v):
    """The bits of a float32 as an int32 (C's memcpy)."""
    if v != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def from_bits(typingctx, i):
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
    return (np.int64(bits(f + MAGIC)) & 0x7FFFFF) - 0x400000


@njit(inline="always")
def low_byte(v):
    """numpy's float32 -> uint8/int8 cast on x86-64, as an unsigned byte value."""
    if v > INT32_LO and v < INT32_HI:
        return np.int64(np.int32(v)) & 0xFF
    return 0  # INT32_MIN: NaN, infinities and out-of-range values


@njit(inline="always")
def half_bits(v):
    """numpy's float32 -> float16 conversion (``npy_floatbits_to_halfbits``), as an int."""
    f = np.int64(bits(v)) & 0xFFFFFFFF
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
        v = F32(m) * SUBNORMAL_UNIT
        return -v if sgn else v
    if e == 31:
        return from_bits(sgn | 0x7F800000 | (m << 13))
    return from_bits(sgn | ((e + 112) << 23) | (m << 13))


@njit(inline="always")
def store_half(row, offset, h):
    row[offset] = h & 0xFF
    row[offset + 1] = (h >> 8) & 0xFF


@njit(inline="always")
def inverse(d):
    return ZERO if d == ZERO else ONE / d


@njit(inline="always")
def store_half_at(out, b, offset, h):
    """``store_half`` into row ``b`` of ``out`` without making a view of the row (no refcount)."""
    out[b, offset] = h & 0xFF
    out[b, offset + 1] = (h >> 8) & 0xFF


@intrinsic
def abs32(typingctx, v):
    """The magnitude bits of a float32, as an int32: ordered as the magnitudes are."""
    if v != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.and_(builder.bitcast(args[0], _I32), ir.Constant(_I32, 0x7FFFFFFF))

    return types.int32(types.float32), codegen


@intrinsic
def key32(typingctx, v):
    """An int32 ordered as the floats are (-0.0 just below +0.0); :func:`unkey` inverts it."""
    if v != types.float32:
        return None

    def codegen(context, builder, signature, args):
        b = builder.bitcast(args[0], _I32)
        flip = builder.and_(builder.ashr(b, ir.Constant(_I32, 31)), ir.Constant(_I32, 0x7FFFFFFF))
        return builder.xor(b, flip)

    return types.int32(types.float32), codegen


@njit(inline="always")
def unkey(k):
    return from_bits(k ^ ((k >> 31) & 0x7FFFFFFF))


def _to_i32(builder, v):
    """An LLVM integer as i32: truncated, or zero-extended (levels and shifts are never negative)."""
    width = v.type.width
    if width > 32:
        return builder.trunc(v, _I32)
    return builder.zext(v, _I32) if width < 32 else v


@intrinsic
def high_bit32(typingctx, acc, q, at):
    """``acc | ((q >> 4) << at)`` in int32: the fifth bit of level ``q`` put at bit ``at``."""
    if not (isinstance(q, types.Integer) and isinstance(at, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        a, level, shift = args
        high = builder.lshr(_to_i32(builder, level), ir.Constant(_I32, 4))
        return builder.or_(a, builder.shl(high, _to_i32(builder, shift)))

    return types.int32(types.int32, q, at), codegen
