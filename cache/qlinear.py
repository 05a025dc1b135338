"""``QuantLinear``: a linear layer that keeps its weight as GGML blocks and unpacks it per call.

Resident memory stays near the packed size (what people reach for bitsandbytes for, with no
CUDA needed): the blocks are a view of the bake's memory map, and the weight is unpacked a band
of rows at a time (about ``CHUNK`` bytes of floats) into one work buffer per thread, device and
dtype, reused by every layer. No float copy of a weight exists, and no band-sized block is ever
freed: glibc keeps freed blocks of a few hundred KiB and more resident (its mmap threshold grows
to the largest freed one), which with a fresh band per call left ~3x a band per distinct size
resident after one forward pass.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from prebake.cache.packed import PackedTensor
from torch import nn

CHUNK = 1 << 20
_local = threading.local()


def _work(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """This thread's reusable buffer of at least ``numel`` elements."""
    bufs = _local.__dict__.setdefault("bufs", {})
    buf = bufs.get((dtype, device))
    if buf is None or buf.numel() < numel:
        buf = bufs[(dtype, device)] = torch.empty(max(numel, CHUNK // 4), dtype=dtype, device=device)
    return buf[:numel]


class QuantLinear(nn.Module):
    def __init__(self, packed: PackedTensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = packed.shape
        self.qtype, self.weight_dtype = packed.qtype, packed.dtype
        self.register_buffer("blocks", packed.blocks, persistent=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @property
    def packed(self) -> PackedTensor:
        return PackedTensor(self.blocks, self.qtype, (self.out_features, self.in_features), self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        step = min(self.out_features, max(1, CHUNK // (4 * self.in_features)))
        packed, shape = self.packed, (step, self.in_features)
        work = _work(step * self.in_features, torch.float32, x.device).view(shape)  # the unpacking's
        band = work if x.dtype == torch.float32 else _work(work.numel(), x.dtype, x.device).view(shape)
        parts = []
        for r in range(0, self.out_features, step):
            rows = packed.rows(r, r + step)
            k = rows.shape[0]
            rows.dequantize(out=work[:k])
            if band is not work:
                band[:k].copy_(work[:k])
            if step == self.out_features:
                return F.linear(x, band, bias)
            parts.append(F.linear(x, band[:k]))
        y = torch.cat(parts, dim=-1)
        return y if bias is None else y + bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}"


def swap_linears(module: nn.Module, packed: dict[str, PackedTensor]) -> list[str]:
    """Replaces each ``nn.Linear`` whose ``NAME.weight`` is in ``packed`` with a :class:`QuantLinear`.

    Returns the weight names it used; the bias stays a parameter of the new layer (still to be
    loaded if it is on the meta device).
    """
    used = []
    for name, p in packed.items():
        path = name.removesuffix(".weight")
        if not name.endswith(".weight"):
            continue
        try:
            layer = module.get_submodule(path)
        except AttributeError:
            continue
        if not isinstance(layer, nn.Linear) or tuple(layer.weight.shape) != tuple(p.shape):
            continue
        parent, _, child = path.rpartition(".")
        q = QuantLinear(p, layer.bias)
        setattr(module.get_submodule(parent) if parent else module, child, q)
        used.append(name)
    return used


def dequantize_all(state: dict, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Plain tensors for every entry: packed ones are unpacked (copies), the rest returned as they are."""
    return {k: v.dequantize(dtype) if isinstance(v, PackedTensor) else v for k, v in state.items()}
