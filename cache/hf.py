"""transformers integration: a quantized bake loads through stock ``from_pretrained``, packed.

A bake whose float weights were replaced by GGML blocks says so in its ``config.json``::

    "quantization_config": {"quant_method": "prebake", "recipe": "q4_k_m",
                            "modules": {"Q4_K": ["model.layers.0.self_attn.q_proj", ...], "Q6_K": [...]}}

Importing this module registers that method with transformers' own extension point
(``register_quantization_config`` / ``register_quantizer``). ``from_pretrained(OUT)`` then
builds the model on the meta device, this quantizer swaps each listed ``nn.Linear``
(``nn.Embedding``) for a :class:`~prebake.cache.qlinear.QuantLinear`
(:class:`~prebake.cache.qlinear.QuantEmbedding`) whose ``weight`` has the blocks' shape (a head
tied to packed embeddings too), and transformers' loader fills them from the shards as it fills
every other tensor:
the weights stay packed in memory, and no block is ever decoded at load. Without this import,
transformers stops at the unknown quantization method: a quantized bake never loads as a model
with random weights.

>>> import prebake.cache.hf  # noqa: F401                                     # doctest: +SKIP
>>> model = AutoModelForCausalLM.from_pretrained("baked-q4_k_m/")            # doctest: +SKIP
"""

from __future__ import annotations

import re

import torch
from prebake.cache.packed import PackedTensor
from prebake.cache.qlinear import QuantEmbedding, QuantLinear
from prebake.formats.ggml_types import BLOCK_SIZES
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

METHOD = "prebake"


class PrebakeConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a prebake bake: which modules hold which GGML blocks.

    ``modules`` maps a GGML type (``"Q4_K"``) to the modules whose weight is stored as its
    blocks; ``recipe`` is the ``--quant`` recipe (or ``"gguf"`` for a GGUF's own blocks).
    """

    def __init__(self, modules: dict[str, list[str]] | None = None, recipe: str | None = None, **kwargs):
        self.quant_method = METHOD
        self.recipe = recipe
        self.modules = modules or {}
        for key, value in kwargs.items():  # keys a later prebake may add
            setattr(self, key, value)

    def qtypes(self) -> dict[str, str]:
        """Module name -> GGML type."""
        return {m: qtype for qtype, names in self.modules.items() for m in names}


class PrebakeQuantizer(HfQuantizer):
    """Swaps the listed layers for packed ones before transformers loads the weights.

    Weights that transformers' converters merge at load (transformers 5 fuses MoE experts into
    one 3-D parameter) have no layer to swap: :class:`Unpack` unpacks them on their way in.
    """

    requires_calibration = True  # the blocks are made by `prebake convert`, never at load
    quantization_config: PrebakeConfig
    serialized_names = {"weight": ["weight"]}

    def _process_model_before_weight_loading(self, model, **kwargs):
        keep = [f".{k}." for k in getattr(model, "_keep_in_fp32_modules", None) or []]
        self.unpacked: list[str] = []
        for name, qtype in self.quantization_config.qtypes().items():
            if any(k in f".{name}." for k in keep):  # the model computes in float there (T5's `wo`): unpack
                self.unpacked.append(name)
                continue
            try:
                layer = model.get_submodule(name)
            except AttributeError:
                continue  # merged by a converter: unpacked at load (Unpack)
            if isinstance(layer, nn.Linear):
                model.set_submodule(name, QuantLinear.like(layer, qtype))
            elif isinstance(layer, nn.Embedding):
                model.set_submodule(name, QuantEmbedding.like(layer, qtype))
            else:
                raise ValueError(f"{name!r} is a {type(layer).__name__}; prebake packs Linear and Embedding weights")
        self._pack_tied(model)
        return model

    def _pack_tied(self, model) -> None:
        """A head tied to packed embeddings is packed too, so transformers' tying hands it the same
        blocks (the bake stores them once, under the embeddings' name)."""
        qtypes = self.quantization_config.qtypes()
        tied = getattr(model, "all_tied_weights_keys", None) or {}
        for target, source in tied.items():
            owner, head = source.removesuffix(".weight"), target.removesuffix(".weight")
            if owner not in qtypes or head in qtypes or not target.endswith(".weight"):
                continue
            try:
                layer = model.get_submodule(head)
            except AttributeError:
                continue
            if isinstance(layer, nn.Linear):
                model.set_submodule(head, QuantLinear.like(layer, qtypes[owner]))

    def get_load_operations(self) -> dict:
        return {"dequantize": Unpack}

    def update_weight_conversions(self, weight_conversions, model):
        """The model's converters unpack blocks first; the layers left float get a converter of their own."""
        from transformers.core_model_loading import WeightConverter

        converters = super().update_weight_conversions(weight_conversions, model)
        for name in getattr(self, "unpacked", []):
            key = f"{name}.weight"  # a pattern: its dots match any character, the key itself included
            converters.append(WeightConverter([key], [key], [Unpack(self)]))
        return converters

    def qtype_of(self, layer_name: str, pattern: str) -> str | None:
        """The GGML type of the tensors a converter collects for ``pattern`` (``.experts.*.w1.weight``)
        while it builds ``layer_name`` (``model.layers.0.mlp.experts.gate_up_proj``), from the config.

        The checkpoint names are not handed to conversion ops, so they are found among the
        config's modules: those of the same layer (the name up to its first number) that match
        the pattern. One layer's experts of one projection share one type (the policy decides
        by projection and layer), so one type is found, or none for float tensors.
        """
        first = re.search(r"\.\d+\.", layer_name)
        layer = layer_name[:first.end()] if first else ""
        want = re.compile(re.escape(pattern.removesuffix(".weight")).replace(r"\*", r"\d+") + "$")
        found = {q for m, q in self.quantization_config.qtypes().items() if m.startswith(layer) and want.search(m)}
        if len(found) > 1:
            raise ValueError(f"{layer_name}: the tensors matching {pattern!r} hold several GGML types {sorted(found)}")
        return found.pop() if found else None

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False  # already quantized: every tensor loads as it is stored

    def is_serializable(self) -> bool:
        return True  # the packed layers' state dict is the bake's own tensors

    @property
    def is_trainable(self) -> bool:
        return False


class Unpack(ConversionOps):
    """Unpacks blocks a converter is about to merge (MoE experts fused into one parameter)."""

    def __init__(self, hf_quantizer: PrebakeQuantizer):
        self.hf_quantizer = hf_quantizer  # the name transformers looks for on ops that load

    def convert(self, input_dict, source_patterns, target_patterns, full_layer_name=None, model=None, **kwargs):
        try:
            dtype = model.get_parameter(full_layer_name).dtype
        except (AttributeError, TypeError):
            dtype = torch.float32
        out = {}
        for pattern, tensors in input_dict.items():
            qtype = self.hf_quantizer.qtype_of(full_layer_name or "", pattern)
            items = tensors if isinstance(tensors, list) else [tensors]
            if qtype is not None:
                items = [_unpack(t, qtype, dtype) if t.dtype == torch.uint8 else t for t in items]
            out[pattern] = items if isinstance(tensors, list) else items[0]
        return out


def _unpack(blocks: torch.Tensor, qtype: str, dtype: torch.dtype) -> torch.Tensor:
    block, size = BLOCK_SIZES[qtype]
    shape = (*blocks.shape[:-1], blocks.shape[-1] // size * block)
    return PackedTensor(blocks, qtype, shape, dtype).dequantize()


def register() -> None:
    """Registers the ``prebake`` method with transformers (once; importing this module does it)."""
    if METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(METHOD)(PrebakeConfig)
    if METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(METHOD)(PrebakeQuantizer)


register()
