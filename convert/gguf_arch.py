"""The architectures a bake exports to GGUF: one row each, and the hyperparameters llama.cpp reads.

A row (:class:`ArchSpec`) says what llama.cpp's ``convert_hf_to_gguf.py`` does differently for
a transformers architecture: the GGUF architecture name, whether Q/K rows are permuted for
GGML's rope (the llama family), whether RMSNorm weights are stored minus one (Gemma), whether
the output head is ever written, and which tokenizer routes are tried in which order.
:func:`add_hparams` writes the ``{arch}.*`` keys the same way for every row, from ``config.json``
(as llama.cpp's generic ``set_gguf_parameters`` does), then the row's own extras.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from prebake.formats.errors import UnsupportedError


@dataclass(frozen=True)
class ArchSpec:
    """How one transformers architecture becomes a GGUF architecture."""

    gguf: str  # gguf-py's MODEL_ARCH name, as general.architecture spells it
    permute_qk: bool = False  # Q/K rows reordered from HF's rotate-half to GGML's adjacent-pair rope
    norm_shift: float = 0.0  # added to every "*norm.weight" (Gemma's RMSNorm scales by 1 + weight)
    head: bool = True  # False: lm_head is never written (Gemma ties it, llama.cpp ignores it)
    vocab: tuple[str, ...] = ("bpe",)  # tokenizer routes, tried in order (see gguf_vocab)
    space_prefix: bool | None = None  # tokenizer.ggml.add_space_prefix, where llama.cpp sets it
    defaults: dict = field(default_factory=dict)  # transformers' config defaults for keys llama.cpp needs
    extra: Callable | None = None  # extra keys: extra(writer, hparams)


def _llama(w, h: dict) -> None:
    w.add_vocab_size(h["vocab_size"])
    w.add_rope_dimension_count(h.get("head_dim") or h["hidden_size"] // h["num_attention_heads"])


def _moe_ff(w, h: dict) -> None:
    if h.get("moe_intermediate_size") is not None:
        w.add_expert_feed_forward_length(h["moe_intermediate_size"])
    if h.get("shared_expert_intermediate_size") is not None:
        w.add_expert_shared_feed_forward_length(h["shared_expert_intermediate_size"])


def _gemma2(w, h: dict) -> None:
    if h.get("attn_logit_softcapping") is not None:
        w.add_attn_logit_softcapping(h["attn_logit_softcapping"])
    if h.get("final_logit_softcapping") is not None:
        w.add_final_logit_softcapping(h["final_logit_softcapping"])
    w.add_sliding_window(h["sliding_window"])


def _gemma3(w, h: dict) -> None:
    if h.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(h["final_logit_softcapping"])
    if h.get("sliding_window_pattern") != 1:
        w.add_sliding_window(h["sliding_window"])


def _phi3(w, h: dict) -> None:
    rope = rope_parameters(h)
    w.add_rope_dimension_count(int(rope.get("partial_rotary_factor", 1.0) * h["hidden_size"])
                               // h["num_attention_heads"])
    original = rope.get("original_max_position_embeddings", h.get("original_max_position_embeddings"))
    if original is not None:
        w.add_rope_scaling_orig_ctx_len(original)
    w.add_sliding_window(h.get("sliding_window") or 0)
    if rope.get("long_factor") and original:  # Phi-3 128k: longrope, its attention factor from the context ratio
        scale = h["max_position_embeddings"] / original
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)


_LLAMA = ArchSpec("llama", permute_qk=True, vocab=("spm", "llama_hf", "bpe"), extra=_llama,
                  defaults={"rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "rope_theta": 10000.0})
_QWEN2 = {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "rope_theta": 10000.0}
_GEMMA = {"rms_norm_eps": 1e-6, "max_position_embeddings": 8192, "head_dim": 256}

ARCHS: dict[str, ArchSpec] = {
    "LlamaForCausalLM": _LLAMA,
    "MistralForCausalLM": _LLAMA,
    "MixtralForCausalLM": _LLAMA,
    "Qwen2ForCausalLM": ArchSpec("qwen2", vocab=("spm", "bpe"), defaults=_QWEN2),
    "Qwen2MoeForCausalLM": ArchSpec("qwen2moe", extra=_moe_ff, defaults=_QWEN2),
    "Qwen3ForCausalLM": ArchSpec("qwen3", vocab=("spm", "bpe"), defaults=_QWEN2),
    "Qwen3MoeForCausalLM": ArchSpec("qwen3moe", extra=_moe_ff, defaults=_QWEN2),
    "GemmaForCausalLM": ArchSpec("gemma", norm_shift=1.0, head=False, vocab=("spm",), space_prefix=False,
                                 defaults=_GEMMA),
    "Gemma2ForCausalLM": ArchSpec("gemma2", norm_shift=1.0, head=False, vocab=("spm",), space_prefix=False,
                                  extra=_gemma2, defaults={**_GEMMA, "sliding_window": 4096,
                                                           "attn_logit_softcapping": 50.0,
                                                           "final_logit_softcapping": 30.0}),
    "Gemma3ForCausalLM": ArchSpec("gemma3", norm_shift=1.0, vocab=("spm", "bpe"), space_prefix=False,
                                  extra=_gemma3, defaults={**_GEMMA, "max_position_embeddings": 131072,
                                                           "sliding_window": 4096, "rope_theta": 1_000_000.0}),
    "Phi3ForCausalLM": ArchSpec("phi3", vocab=("gpt2_class", "spm"), extra=_phi3,
                                defaults={"rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
                                          "rope_theta": 10000.0}),
}


def arch_of(config: dict, where) -> tuple[str, ArchSpec]:
    """The architecture named by ``config.json`` and its row; refuses one without a row."""
    names = config.get("architectures") or []
    for name in names:
        if name in ARCHS:
            return name, ARCHS[name]
    known = ", ".join(sorted(ARCHS))
    raise UnsupportedError(f"cannot export architecture {names[0] if names else '(none in config.json)'!r} to "
                           f"GGUF: prebake maps {known}", where)


def hparams(config: dict, spec: ArchSpec) -> dict:
    """``config.json`` with a ``text_config`` lifted to the top and the row's defaults filled in."""
    h = {**config, **config.get("text_config", {})}
    for key, value in spec.defaults.items():
        if h.get(key) is None:
            h[key] = value
    return h


def rope_parameters(h: dict) -> dict:
    """The full-attention rope settings, whichever way the config spells them.

    transformers 5 nests them (``rope_parameters``, per layer kind for Gemma 3); older configs
    have ``rope_theta`` and ``rope_scaling`` at the top.
    """
    rope = dict(h.get("rope_parameters") or h.get("rope_scaling") or {})
    rope = dict(rope.get("full_attention", rope))
    if "rope_theta" not in rope and h.get("rope_theta") is not None:
        rope["rope_theta"] = h["rope_theta"]
    if "rope_type" not in rope and rope.get("type") is not None:
        rope["rope_type"] = rope["type"]
    return rope


def _first(h: dict, *keys):
    return next((h[k] for k in keys if h.get(k) is not None), None)


def add_hparams(w, spec: ArchSpec, h: dict, file_type: int) -> None:
    """Writes the model's hyperparameters to the GGUFWriter ``w`` (keys under ``{arch}.``)."""
    import gguf

    w.add_block_count(h["num_hidden_layers"])
    for value, add in ((_first(h, "max_position_embeddings", "n_positions"), w.add_context_length),
                       (h.get("hidden_size"), w.add_embedding_length),
                       (h.get("intermediate_size"), w.add_feed_forward_length),
                       (h.get("num_attention_heads"), w.add_head_count),
                       (_first(h, "num_key_value_heads", "num_attention_heads"), w.add_head_count_kv),
                       (h.get("rms_norm_eps"), w.add_layer_norm_rms_eps),
                       (_first(h, "layer_norm_eps", "layer_norm_epsilon"), w.add_layer_norm_eps),
                       (_first(h, "num_local_experts", "num_experts"), w.add_expert_count),
                       (h.get("num_experts_per_tok"), w.add_expert_used_count),
                       (h.get("head_dim"), w.add_key_length),
                       (h.get("head_dim"), w.add_value_length)):
        if value is not None:
            add(value)
    rope = rope_parameters(h)
    if rope.get("rope_theta") is not None:
        w.add_rope_freq_base(rope["rope_theta"])
    _add_rope_scaling(w, rope, gguf)
    w.add_file_type(file_type)
    if spec.extra is not None:
        spec.extra(w, h)


def _add_rope_scaling(w, rope: dict, gguf) -> None:
    kind, factor = (rope.get("rope_type") or "default").lower(), rope.get("factor")
    if kind == "linear" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(factor)
    elif kind == "yarn" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        for key, add in (("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
                         ("attention_factor", w.add_rope_scaling_yarn_attn_factor),
                         ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            if rope.get(key) is not None:
                add(rope[key])
    elif kind in ("su", "longrope"):
        w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
    elif kind not in ("default", "llama3"):  # llama3: a rope_freqs tensor (generated_tensors)
        raise UnsupportedError(f"rope scaling {kind!r} has no GGUF form prebake writes")


def generated_tensors(spec: ArchSpec, h: dict) -> dict[str, np.ndarray]:
    """Tensors llama.cpp's converter computes from the config: Llama 3's rope frequency factors,
    Phi-3's long and short rope factors."""
    rope = rope_parameters(h)
    if spec.gguf == "phi3" and rope.get("long_factor"):
        return {"rope_factors_long.weight": np.asarray(rope["long_factor"], np.float32),
                "rope_factors_short.weight": np.asarray(rope["short_factor"], np.float32)}
    if spec.gguf != "llama" or (rope.get("rope_type") or "").lower() != "llama3":
        return {}
    base = rope.get("rope_theta", 10000.0)
    dim = h.get("head_dim") or h["hidden_size"] // h["num_attention_heads"]
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for f in freqs:  # Llama 3.1's scaling: long wavelengths slowed by `factor`, short kept, smooth between
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return {"rope_freqs.weight": np.asarray(factors, np.float32)}
