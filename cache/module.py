"""Building an ``nn.Module`` straight onto a bake's memory maps, skipping random initialisation."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import torch
from prebake.cache.load import Names, load_from_manifest
from prebake.cache.packed import PackedTensor
from prebake.cache.qlinear import dequantize_all, swap_linears
from prebake.formats.errors import FitError
from torch import nn


@contextlib.contextmanager
def params_on_meta():
    """Creates parameters on the meta device (no memory, no init); buffers stay real.

    Buffers stay on the CPU because models compute non-persistent ones (rotary frequencies,
    position ids) in ``__init__`` and a state dict does not carry them.
    """
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def non_persistent_buffers(module: nn.Module) -> set[str]:
    """Names of the buffers a module computes itself and leaves out of its state dict
    (``position_ids``, rotary frequencies): a checkpoint may hold them; they are not the model's to load."""
    return {f"{name}.{b}" if name else b for name, m in module.named_modules() for b in m._non_persistent_buffers_set}


def _back_onto_the_map(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Re-points parameters that tying replaced with copies (transformers pads tied biases) at the map."""
    for name, p in module.named_parameters(remove_duplicate=False):
        t = state.get(name)
        if t is not None and p.data_ptr() != t.data_ptr() and p.shape == t.shape and p.dtype == t.dtype:
            p.data = t


def load_module(factory: Callable[[], nn.Module], path: str | os.PathLike, *, strict: bool = True,
                names: Names = None, quant: str | None = "auto", variant: str | None = None,
                component: str | None = None, **load) -> nn.Module:
    """``factory()`` builds the model with parameters on meta; the bake's tensors are assigned in.

    ``names``, ``quant``, ``variant`` and ``component`` select what is loaded, and ``load``
    (``mode``, ``verify``, ``tp_rank``/``tp_size``, ...) says how, as for
    :func:`~prebake.cache.load.load_from_manifest`. Quantized weights of ``nn.Linear``
    (``nn.Embedding``) layers become :class:`~prebake.cache.qlinear.QuantLinear`
    (:class:`~prebake.cache.qlinear.QuantEmbedding`) layers that keep the blocks packed; other
    packed tensors are unpacked. Buffers the checkpoint holds but the module computes itself
    (``position_ids``) are left to the module.
    No parameter is initialised or copied: each one is a view of the bake's memory maps. Tied
    weights are re-tied (``tie_weights()``) before checking. With ``strict``, raises
    :class:`FitError` (a ``ValueError``) if a parameter is left unset or the bake holds a tensor
    the module lacks.

    >>> model = load_module(lambda: LlamaForCausalLM(config), "baked/")   # doctest: +SKIP
    """
    with params_on_meta():
        module = factory()
    state = load_from_manifest(path, names=names, quant=quant, variant=variant, component=component, **load)
    computed = non_persistent_buffers(module)
    state = {k: v for k, v in state.items() if k not in computed}
    packed = {k: v for k, v in state.items() if isinstance(v, PackedTensor)}
    if packed:
        used = set(swap_linears(module, packed))
        state = dequantize_all({k: v for k, v in state.items() if k not in used})
    result = module.load_state_dict(state, strict=False, assign=True)
    if hasattr(module, "tie_weights"):  # transformers models re-tie weights a checkpoint stores once
        module.tie_weights()
        _back_onto_the_map(module, state)
    unset = [n for n, p in module.named_parameters() if p.is_meta]
    if strict and (unset or result.unexpected_keys):
        raise FitError(f"the bake does not fit the module: missing {unset[:5]} ({len(unset)}), "
                       f"unexpected {result.unexpected_keys[:5]} ({len(result.unexpected_keys)})", path)
    return module
