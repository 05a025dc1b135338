"""Quantized tensors at run time: GGML blocks kept packed in the memory map.

A :class:`PackedTensor` holds a zero-copy ``uint8`` view of the blocks, the GGML type and the
logical shape and dtype; ``dequantize()`` unpacks it with torch, vectorized over all blocks.
The arithmetic follows gguf-py's ``dequantize_blocks`` step for step in float32, so the result
equals ``gguf.quants.dequantize`` bit for bit (then one cast to the dtype asked for).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from prebake.formats.ggml_types import BLOCK_SIZES


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Little-endian fp16 fields (n, 2) -> float32 (n, 1)."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, k) bytes -> (n, 2k): low nibbles first, then high, as GGML's 32-blocks lay them out."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


_HIGH_BITS: dict[torch.device, torch.Tensor] = {}


def _high_bits(qh: torch.Tensor) -> torch.Tensor:
    """(n, 4) bytes of a little-endian u32 -> (n, 32) bytes, 16 where its bit is set, bit 0 first."""
    table = _HIGH_BITS.get(qh.device)
    if table is None:  # byte value -> its 8 bits, each as 0 or 16 (the fifth bit of a level)
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        table = _HIGH_BITS[qh.device] = (bits * 16).to(torch.uint8).to(qh.device)
    return torch.index_select(table, 0, qh.reshape(-1).int()).reshape(qh.shape[0], 32)


# Each fills ``out`` (n, block elements, float32) from blocks ``b`` (n, block bytes) in place:
# the levels are cast into ``out`` and scaled there, so the only temporaries are byte-sized.
# The order of the float operations is gguf-py's (d * q, then + m or - dm), so every value is
# bit-equal to ``gguf.quants.dequantize``.


def _q8_0(b, out):
    out.copy_(b[:, 2:].view(torch.int8))
    out.mul_(_f16(b[:, :2]))


def _q4_0(b, out):
    out.copy_(_nibbles(b[:, 2:]).view(torch.int8).sub_(8))
    out.mul_(_f16(b[:, :2]))


def _q4_1(b, out):
    out.copy_(_nibbles(b[:, 4:]))
    out.mul_(_f16(b[:, :2])).add_(_f16(b[:, 2:4]))


def _q5_0(b, out):
    q = _nibbles(b[:, 6:]).bitwise_or_(_high_bits(b[:, 2:6]))
    out.copy_(q.view(torch.int8).sub_(16))
    out.mul_(_f16(b[:, :2]))


def _q5_1(b, out):
    out.copy_(_nibbles(b[:, 8:]).bitwise_or_(_high_bits(b[:, 4:8])))
    out.mul_(_f16(b[:, :2])).add_(_f16(b[:, 2:4]))


def _q4_k(b, out):
    n = b.shape[0]
    scales = b[:, 4:16].reshape(n, 3, 4)
    d_, m_, md = scales[:, 0], scales[:, 1], scales[:, 2]
    sc = torch.cat([d_ & 0x3F, (md & 0x0F) | ((d_ >> 2) & 0x30)], dim=1)
    mn = torch.cat([m_ & 0x3F, (md >> 4) | ((m_ >> 2) & 0x30)], dim=1)
    d = (_f16(b[:, :2]) * sc.float()).reshape(n, 8, 1)
    dm = (_f16(b[:, 2:4]) * mn.float()).reshape(n, 8, 1)
    qs = b[:, 16:].reshape(n, 4, 1, 32)
    q = out.view(n, 8, 32)
    q.copy_(torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(n, 8, 32))
    q.mul_(d).sub_(dm)


def _q6_k(b, out):
    n = b.shape[0]
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = (_f16(b[:, 208:210]) * scales).reshape(n, 16, 1)
    ql = b[:, :128].reshape(n, 2, 1, 64)
    ql = torch.cat([ql & 0x0F, ql >> 4], dim=2).reshape(n, 8, 32)
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    qh = torch.cat([(qh >> s) & 0x03 for s in (0, 2, 4, 6)], dim=2).reshape(n, 8, 32)
    q = out.view(n, 16, 16)
    q.copy_(ql.bitwise_or_(qh.bitwise_left_shift_(4)).view(torch.int8).sub_(32).reshape(n, 16, 16))
    q.mul_(d)


DEQUANTIZERS: dict[str, Callable[[torch.Tensor, torch.Tensor], None]] = {
    "Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q4_K": _q4_k, "Q6_K": _q6_k,
}


def dequantize_blocks(blocks: torch.Tensor, qtype: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """(n, block bytes) uint8 -> (n, block elements) float32, into ``out`` when given; types
    without a torch kernel go through gguf-py (on the CPU)."""
    block, _ = BLOCK_SIZES[qtype]
    if out is None:
        out = torch.empty(blocks.shape[0], block, dtype=torch.float32, device=blocks.device)
    fn = DEQUANTIZERS.get(qtype)
    if fn is not None:
        fn(blocks, out)
        return out
    import gguf

    ref = gguf.quants.dequantize(blocks.cpu().numpy(), gguf.GGMLQuantizationType[qtype])
    return out.copy_(torch.from_numpy(ref.reshape(blocks.shape[0], -1)))


class PackedTensor:
    """GGML blocks of a logical tensor, left packed (a view of the bake's memory map)."""

    __slots__ = ("blocks", "qtype", "shape", "dtype")

    def __init__(self, blocks: torch.Tensor, qtype: str, shape, dtype: torch.dtype):
        self.blocks = blocks  # uint8, (rows, bytes per row)
        self.qtype = qtype
        self.shape = torch.Size(shape)
        self.dtype = dtype  # the logical tensor's (what dequantize() returns by default)

    @property
    def nbytes(self) -> int:
        return self.blocks.nbytes

    @property
    def device(self) -> torch.device:
        return self.blocks.device

    def to(self, device) -> PackedTensor:
        return PackedTensor(self.blocks.to(device), self.qtype, self.shape, self.dtype)

    def rows(self, start: int, stop: int) -> PackedTensor:
        """Rows ``start:stop`` of a packed matrix (a view of the same blocks)."""
        stop = min(stop, self.shape[0])
        return PackedTensor(self.blocks[start:stop], self.qtype, (stop - start, *self.shape[1:]), self.dtype)

    def dequantize(self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The logical tensor, unpacked (float32 math, one cast at the end).

        Into new memory, or into ``out`` (this shape, any dtype; float32 work space is then
        taken only where ``out`` is not float32).
        """
        block, size = BLOCK_SIZES[self.qtype]
        blocks = self.blocks.reshape(-1, size)
        if out is not None and out.shape != self.shape:
            raise ValueError(f"out has shape {tuple(out.shape)}, the tensor {tuple(self.shape)}")
        if out is not None and out.dtype == torch.float32 and out.is_contiguous():
            dequantize_blocks(blocks, self.qtype, out.view(-1, block))
            return out
        flat = dequantize_blocks(blocks, self.qtype).reshape(self.shape)
        return flat.to(dtype or self.dtype) if out is None else out.copy_(flat)

    def __repr__(self) -> str:
        return (f"PackedTensor({self.qtype}, shape={tuple(self.shape)}, dtype={self.dtype}, "
                f"{self.nbytes} bytes)")
