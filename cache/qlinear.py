"""``QuantLinear`` and ``QuantEmbedding``: layers that keep their weight as GGML blocks.

Their ``weight`` is a frozen parameter holding the blocks (``uint8``, (rows, bytes per row)), so
a state dict (and ``save_pretrained``) gives back the bake's bytes under the bake's names,
transformers' loader fills it straight from the shard (:mod:`prebake.cache.hf`), and its
weight tying (a head tied to packed embeddings) shares it as it shares any parameter. (A
parameter, not a buffer: transformers ties and marks parameters only, as its own GGUF layers
know.) Optimizers skip it: it never requires a gradient.

``QuantLinear`` unpacks its weight per call.
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
from torch.autograd.function import once_differentiable

CHUNK = 1 << 20
_local = threading.local()


def _work(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """This thread's reusable buffer of at least ``numel`` elements."""
    bufs = _local.__dict__.setdefault("bufs", {})
    buf = bufs.get((dtype, device))
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):  # made in inference mode, it could not be written outside it
            buf = bufs[(dtype, device)] = torch.empty(max(numel, CHUNK // 4), dtype=dtype, device=device)
    return buf[:numel]


def _empty_blocks(qtype: str, shape: tuple[int, int], device) -> torch.Tensor:
    from prebake.formats.ggml_types import blocks_shape

    return torch.empty(blocks_shape(qtype, shape), dtype=torch.uint8, device=device)


class QuantLinear(nn.Module):
    """``nn.Linear`` over GGML blocks: ``x @ W.T + b`` with W unpacked a band of rows at a time."""

    def __init__(self, packed: PackedTensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = packed.shape
        self.qtype, self.weight_dtype = packed.qtype, packed.dtype
        self.weight = nn.Parameter(packed.blocks, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def like(cls, linear: nn.Linear, qtype: str) -> QuantLinear:
        """An empty layer (on ``linear``'s device, meta while a model is being built) for ``linear``'s blocks."""
        shape = (linear.out_features, linear.in_features)
        blocks = _empty_blocks(qtype, shape, linear.weight.device)
        return cls(PackedTensor(blocks, qtype, shape, linear.weight.dtype), linear.bias)

    @property
    def packed(self) -> PackedTensor:
        return PackedTensor(self.weight, self.qtype, (self.out_features, self.in_features), self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _PackedMatmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def bands(self, dtype: torch.dtype, device: torch.device):
        """Yields (first row, the weight's rows from there, unpacked): views of the shared work
        buffer, valid until the next band is asked for."""
        step = min(self.out_features, max(1, CHUNK // (4 * self.in_features)))
        packed, shape = self.packed, (step, self.in_features)
        work = _work(step * self.in_features, torch.float32, device).view(shape)  # the unpacking's
        band = work if dtype == torch.float32 else _work(work.numel(), dtype, device).view(shape)
        for r in range(0, self.out_features, step):
            rows = packed.rows(r, r + step)
            k = rows.shape[0]
            rows.dequantize(out=work[:k])
            if band is not work:
                band[:k].copy_(work[:k])
            yield r, band[:k]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}"


class _PackedMatmul(torch.autograd.Function):
    """``x @ W.T`` a band of W's rows at a time; the backward pass unpacks the bands again rather
    than keeping them (they live in the shared work buffer), so gradients flow to ``x`` (adapters
    on a quantized base) with no float copy of W kept."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
        ctx.layer = layer
        parts = [F.linear(x, w) for _, w in layer.bands(x.dtype, x.device)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    @staticmethod
    @once_differentiable  # the bands are gone after the call: no graph of the backward itself
    def backward(ctx, grad: torch.Tensor):
        gx = None  # summed over bands in float32, as one matmul would, then cast once
        for r, w in ctx.layer.bands(grad.dtype, grad.device):
            part = (grad[..., r : r + w.shape[0]] @ w).float()
            gx = part if gx is None else gx.add_(part)
        return gx.to(grad.dtype), None


class QuantEmbedding(nn.Module):
    """``nn.Embedding`` over GGML blocks: each looked-up row is unpacked, the table never is.

    A row of the table is a whole number of blocks, so a lookup gathers those bytes and unpacks
    only them. ``embed_scale`` (Gemma's, Bart's scaled embeddings) is kept and applied.
    """

    def __init__(self, packed: PackedTensor, embed_scale=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = packed.shape
        self.qtype, self.weight_dtype = packed.qtype, packed.dtype
        self.weight = nn.Parameter(packed.blocks, requires_grad=False)
        self.embed_scale = embed_scale

    @classmethod
    def like(cls, embedding: nn.Embedding, qtype: str) -> QuantEmbedding:
        shape = (embedding.num_embeddings, embedding.embedding_dim)
        blocks = _empty_blocks(qtype, shape, embedding.weight.device)
        return cls(PackedTensor(blocks, qtype, shape, embedding.weight.dtype), embed_scale_of(embedding))

    @property
    def packed(self) -> PackedTensor:
        return PackedTensor(self.weight, self.qtype, (self.num_embeddings, self.embedding_dim), self.weight_dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight.index_select(0, ids.reshape(-1))
        out = PackedTensor(rows, self.qtype, (rows.shape[0], self.embedding_dim), self.weight_dtype).dequantize()
        if self.embed_scale is not None:
            out = out * torch.as_tensor(self.embed_scale).to(out.dtype)
        return out.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.qtype}"


def embed_scale_of(embedding: nn.Module):
    """A scaled embedding's factor: the plain number where the module keeps one (Gemma 3 keeps it
    beside a buffer that, on a model built on the meta device, holds no value until its own
    weight initialization runs, which a swapped-in layer never gets), else its ``embed_scale``."""
    scalar = getattr(embedding, "scalar_embed_scale", None)
    return scalar if scalar is not None else getattr(embedding, "embed_scale", None)


def swap_linears(module: nn.Module, packed: dict[str, PackedTensor]) -> list[str]:
    """Replaces each ``nn.Linear`` (``nn.Embedding``) whose ``NAME.weight`` is in ``packed`` with a
    :class:`QuantLinear` (:class:`QuantEmbedding`) over those blocks.

    Returns the weight names it used; a bias stays a parameter of the new layer (still to be
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
        if tuple(layer.weight.shape) != tuple(p.shape):
            continue
        if isinstance(layer, nn.Linear):
            module.set_submodule(path, QuantLinear(p, layer.bias))
        elif isinstance(layer, nn.Embedding):
            module.set_submodule(path, QuantEmbedding(p, embed_scale_of(layer)))
        else:
            continue
        used.append(name)
    _pack_tied_heads(module, packed, used)
    return used


def _pack_tied_heads(module: nn.Module, packed: dict[str, PackedTensor], used: list[str]) -> None:
    """A head tied to packed embeddings (stored once, under the embeddings' name) becomes a
    :class:`QuantLinear` over the same blocks, so re-tying shares them instead of handing a
    ``nn.Linear`` blocks it cannot multiply by."""
    for target, source in (getattr(module, "all_tied_weights_keys", None) or {}).items():
        if source not in used or target in packed or not target.endswith(".weight"):
            continue
        head = target.removesuffix(".weight")
        try:
            layer = module.get_submodule(head)
        except AttributeError:
            continue
        if isinstance(layer, nn.Linear) and tuple(layer.weight.shape) == tuple(packed[source].shape):
            module.set_submodule(head, QuantLinear(packed[source], layer.bias))


def dequantize_all(state: dict, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Plain tensors for every entry: packed ones are unpacked (copies), the rest returned as they are."""
    return {k: v.dequantize(dtype) if isinstance(v, PackedTensor) else v for k, v in state.items()}
