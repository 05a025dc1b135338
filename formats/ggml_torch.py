"""GGML blocks decoded with torch: prebake's one dequantizer, at conversion and at run time.

:func:`dequantize` turns uint8 blocks into float32, vectorized over all blocks, on any device.
Each kernel follows gguf-py's ``dequantize_blocks`` step for step in float32 (``d * q``, then
``+ m`` or ``- dm``; no fused multiply-add), so every value is bit-equal to
``gguf.quants.dequantize`` (on the CPU even the NaNs of broken scales; GPUs keep no NaN
payloads). Types without a kernel here (IQ*, TQ*, MXFP4, ...) go through
gguf-py itself, on the CPU; types gguf-py cannot decode either (Q8_1, Q8_K, ...) are refused.
:func:`prebake.formats.quants.dequantize` is the same for numpy arrays.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .errors import UnsupportedError
from .ggml_types import BLOCK_SIZES, qtype_name

# values per kernel call (4 MiB of float32): the byte-sized temporaries of a window stay in the
# CPU's cache, and the calls are few enough that their overhead does not show
WINDOW = 1 << 20


_HALVES: dict[torch.device, torch.Tensor] = {}


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Little-endian fp16 fields (n, 2) -> float32 (n, 1), exactly as numpy converts them.

    A table of all 65536 values made by numpy: torch's own conversion turns NaNs into its
    canonical NaN outside its vector loop, which gguf-py's arithmetic would not give.
    """
    table = _HALVES.get(b.device)
    if table is None:
        halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
        table = _HALVES[b.device] = torch.from_numpy(halves).to(b.device)
    index = b[:, 0].int() | (b[:, 1].int() << 8)
    return torch.index_select(table, 0, index).unsqueeze(1)


def _nibbles(qs: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Low nibbles, then high ones, along ``dim``: the order of GGML's 4-bit levels."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=dim)


def _crumbs(qs: torch.Tensor, dim: int) -> torch.Tensor:
    """The four 2-bit fields of each byte (bits 0-1 first), along ``dim``."""
    return torch.cat([(qs >> s) & 0x03 for s in (0, 2, 4, 6)], dim=dim)


_BIT_TABLES: dict[tuple[torch.device, int], torch.Tensor] = {}


def _bits(qh: torch.Tensor, value: int) -> torch.Tensor:
    """(n, k) bytes -> (n, k, 8): bit j of each byte as ``value`` or 0 (a lookup, not 8 shifts)."""
    table = _BIT_TABLES.get((qh.device, value))
    if table is None:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        table = _BIT_TABLES[(qh.device, value)] = (bits * value).to(torch.uint8).to(qh.device)
    return torch.index_select(table, 0, qh.reshape(-1).int()).reshape(*qh.shape, 8)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and mins packed in 12 bytes (Q4_K, Q5_K), as float32 (n, 8)."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc.float(), mn.float()


def _offset_(x: torch.Tensor, m: torch.Tensor, sign: int) -> None:
    """``x += m`` (sign 1) or ``x -= m`` (sign -1) in place, with numpy's NaN where both are NaN.

    There numpy (gguf-py) keeps the left operand's NaN and torch the right one's; scales that
    make NaN are rare, so only then is the left side kept aside. GPUs keep no NaN payloads.
    """
    left = x.clone() if x.device.type == "cpu" and bool(torch.isnan(m).any()) else None
    if sign > 0:
        x.add_(m)
    else:
        x.sub_(m)
    if left is not None:
        x.copy_(torch.where(torch.isnan(left), left, x))


# Each fills ``out`` (n, block elements, float32) from blocks ``b`` (n, block bytes) in place:
# the levels are cast into ``out`` and scaled there, so the only temporaries are byte-sized.


def _q8_0(b, out):
    out.copy_(b[:, 2:].view(torch.int8))
    out.mul_(_f16(b[:, :2]))


def _q4_0(b, out):
    out.copy_(_nibbles(b[:, 2:]).view(torch.int8).sub_(8))
    out.mul_(_f16(b[:, :2]))


def _q4_1(b, out):
    out.copy_(_nibbles(b[:, 4:]))
    _offset_(out.mul_(_f16(b[:, :2])), _f16(b[:, 2:4]), 1)


def _q5_0(b, out):
    q = _nibbles(b[:, 6:]).bitwise_or_(_bits(b[:, 2:6], 16).reshape(-1, 32))
    out.copy_(q.view(torch.int8).sub_(16))
    out.mul_(_f16(b[:, :2]))


def _q5_1(b, out):
    out.copy_(_nibbles(b[:, 8:]).bitwise_or_(_bits(b[:, 4:8], 16).reshape(-1, 32)))
    _offset_(out.mul_(_f16(b[:, :2])), _f16(b[:, 2:4]), 1)


def _q2_k(b, out):
    n, sc = b.shape[0], b[:, :16]
    dl = (_f16(b[:, 80:82]) * (sc & 0x0F).float()).reshape(n, 16, 1)
    ml = (_f16(b[:, 82:84]) * (sc >> 4).float()).reshape(n, 16, 1)
    q = out.view(n, 16, 16)
    q.copy_(_crumbs(b[:, 16:80].reshape(n, 2, 1, 32), dim=2).reshape(n, 16, 16))
    _offset_(q.mul_(dl), ml, -1)


def _q3_k(b, out):
    n, sc = b.shape[0], b[:, 96:108]
    scales = _nibbles(sc[:, :8]).bitwise_or_(_crumbs(sc[:, 8:12], dim=1) << 4)
    dl = (_f16(b[:, 108:110]) * scales.view(torch.int8).sub_(32).float()).reshape(n, 16, 1)
    low = _crumbs(b[:, 32:96].reshape(n, 2, 1, 32), dim=2).reshape(n, 16, 16)
    # a clear bit of the high mask subtracts 4 ("the offset is zero when the bitmask is 1")
    minus = _bits(b[:, :32], 4).transpose(1, 2).reshape(n, 16, 16).bitwise_xor_(4)
    q = out.view(n, 16, 16)
    q.copy_(low.view(torch.int8).sub_(minus.view(torch.int8)))
    q.mul_(dl)


def _q4_k(b, out):
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_f16(b[:, :2]) * sc).reshape(n, 8, 1)
    dm = (_f16(b[:, 2:4]) * mn).reshape(n, 8, 1)
    q = out.view(n, 8, 32)
    q.copy_(_nibbles(b[:, 16:].reshape(n, 4, 1, 32), dim=2).reshape(n, 8, 32))
    _offset_(q.mul_(d), dm, -1)


def _q5_k(b, out):
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_f16(b[:, :2]) * sc).reshape(n, 8, 1)
    dm = (_f16(b[:, 2:4]) * mn).reshape(n, 8, 1)
    levels = _nibbles(b[:, 48:].reshape(n, 4, 1, 32), dim=2).reshape(n, 8, 32)
    high = _bits(b[:, 16:48], 16).transpose(1, 2)  # bit j of qh[i]: the fifth bit of value 32j + i
    q = out.view(n, 8, 32)
    q.copy_(levels.bitwise_or_(high))
    _offset_(q.mul_(d), dm, -1)


def _q6_k(b, out):
    n = b.shape[0]
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = (_f16(b[:, 208:210]) * scales).reshape(n, 16, 1)
    ql = _nibbles(b[:, :128].reshape(n, 2, 1, 64), dim=2).reshape(n, 8, 32)
    qh = _crumbs(b[:, 128:192].reshape(n, 2, 1, 32), dim=2).reshape(n, 8, 32)
    q = out.view(n, 16, 16)
    q.copy_(ql.bitwise_or_(qh.bitwise_left_shift_(4)).view(torch.int8).sub_(32).reshape(n, 16, 16))
    q.mul_(d)


DEQUANTIZERS: dict[str, Callable[[torch.Tensor, torch.Tensor], None]] = {
    "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}


def dequantize(blocks: torch.Tensor, qtype: object, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 blocks, ``(n_blocks, type_size)`` or ``(rows, bytes per row)``, -> float32
    ``(n_blocks, block_size)`` or ``(rows, elements per row)``; into ``out`` when given (float32,
    contiguous, that many elements, any shape). Raises
    :class:`~prebake.formats.errors.UnsupportedError` for a type no one can decode."""
    name = qtype_name(qtype)
    bs, ts = BLOCK_SIZES[name]
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[-1] % ts:
        raise ValueError(f"{name} blocks must be uint8 (rows, a multiple of {ts} bytes), not "
                         f"{blocks.dtype} {tuple(blocks.shape)}")
    shape = (blocks.shape[0], blocks.shape[1] // ts * bs)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=blocks.device)
    elif out.dtype != torch.float32 or not out.is_contiguous() or out.numel() != shape[0] * shape[1]:
        raise ValueError(f"out must be contiguous float32 of {shape[0] * shape[1]} elements, not "
                         f"{out.dtype} {tuple(out.shape)}")
    src, dst = blocks.reshape(-1, ts), out.view(-1, bs)
    kernel = DEQUANTIZERS.get(name)
    if kernel is None:
        _reference(src, name, dst)
        return out
    step = max(1, WINDOW // bs)
    for i in range(0, src.shape[0], step):
        kernel(src[i : i + step], dst[i : i + step])
    return out


def _reference(blocks: torch.Tensor, name: str, out: torch.Tensor) -> None:
    """gguf-py's own dequantizer, for the types without a kernel here."""
    import gguf

    try:
        with np.errstate(all="ignore"):  # overflow on odd scales is the reference's own arithmetic
            ref = gguf.quants.dequantize(blocks.cpu().numpy(), gguf.GGMLQuantizationType[name])
    except (KeyError, NotImplementedError):
        raise UnsupportedError(f"cannot dequantize GGML type {name}: neither prebake nor gguf-py "
                               "decodes it") from None
    out.copy_(torch.from_numpy(ref.reshape(out.shape)))
