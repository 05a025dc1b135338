"""Quantized tensors at run time: GGML blocks kept packed in the memory map.

A :class:`PackedTensor` holds a zero-copy ``uint8`` view of the blocks, the GGML type and the
logical shape and dtype; ``dequantize()`` unpacks it with :func:`prebake.formats.ggml_torch.dequantize`,
vectorized over all blocks and equal to ``gguf.quants.dequantize`` bit for bit (then one cast to
the dtype asked for).
"""

from __future__ import annotations

import torch
from prebake.formats import ggml_torch
from prebake.formats.ggml_types import BLOCK_SIZES


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
        blocks = self.blocks.reshape(-1, BLOCK_SIZES[self.qtype][1])
        if out is not None and out.shape != self.shape:
            raise ValueError(f"out has shape {tuple(out.shape)}, the tensor {tuple(self.shape)}")
        if out is not None and out.dtype == torch.float32 and out.is_contiguous():
            ggml_torch.dequantize(blocks, self.qtype, out)
            return out
        flat = ggml_torch.dequantize(blocks, self.qtype).reshape(self.shape)
        return flat.to(dtype or self.dtype) if out is None else out.copy_(flat)

    def __repr__(self) -> str:
        return (f"PackedTensor({self.qtype}, shape={tuple(self.shape)}, dtype={self.dtype}, "
                f"{self.nbytes} bytes)")
