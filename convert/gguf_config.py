"""A Hugging Face ``config.json`` from a GGUF file's metadata, as transformers' own GGUF loader builds it.

transformers turns a GGUF's keys into a config with its tables (``GGUF_CONFIG_MAPPING``,
``GGUF_CONFIG_DEFAULTS_MAPPING``) inside ``load_gguf_checkpoint``. That function cannot be
called here: it parses the whole file with gguf-py's ``GGUFReader`` first, which decodes every
string of the vocabulary into numpy records (half a minute for a 262k-token vocabulary). So
:func:`hf_config` applies the same tables, in the same order and with the same fix-ups, to
the keys prebake's own parser read; ``tests/test_gguf_hf.py`` checks that the result equals
``load_gguf_checkpoint(path)["config"]``. Architectures that transformers rebuilds with its
newer per-architecture functions (``GGUF_CONFIG_ARCHS``) go through those functions directly.
"""

from __future__ import annotations

from prebake.formats.gguf_file import GGUFFile


class NotMappable(Exception):
    """The GGUF cannot become a Hugging Face folder; the message says why (one line)."""


# load_gguf_checkpoint's renames of general.architecture (the llama.cpp name -> transformers' model_type)
_ARCH_RENAMES = {"qwen2moe": "qwen2_moe", "gpt-oss": "gpt_oss", "gpt_oss": "gpt_oss", "qwen3moe": "qwen3_moe",
                 "minimax-m2": "minimax_m2"}
_TEXT_ONLY = {"gemma3": "gemma3_text", "gemma4": "gemma4_text"}  # the GGUF holds the text backbone alone
# Keys transformers' table leaves out, so that its loader gives the config class's defaults instead: a
# Qwen-MoE GGUF whose expert width is not the default checkpoint's builds a model of the wrong shape there.
# prebake reads them as well; where transformers' table has a key, its entry is used.
EXTRA_CONFIG_KEYS = {
    "qwen2_moe": {"expert_feed_forward_length": "moe_intermediate_size",
                  "expert_shared_feed_forward_length": "shared_expert_intermediate_size"},
    "qwen3_moe": {"expert_feed_forward_length": "moe_intermediate_size"},
}


def hf_config(f: GGUFFile) -> dict:
    """The config dict transformers' GGUF loader makes of ``f`` (``model_type`` and all)."""
    from transformers.integrations import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

    arch = _scalar(f, "general.architecture")
    if not isinstance(arch, str):
        raise NotMappable("the file names no general.architecture")
    _refuse_newer_route(arch)
    name = _scalar(f, "general.name")
    config: dict = {}
    updated = _updated_architecture(arch, name, config)
    if arch not in GGUF_CONFIG_MAPPING and updated not in GGUF_CONFIG_MAPPING:
        raise NotMappable(f"transformers cannot load GGUF architecture {arch!r}")
    for key in ("block_count", "embedding_length"):  # without them a config is the class's defaults: not this model
        if f"{arch}.{key}" not in f.fields:
            raise NotMappable(f"the metadata has no {arch}.{key}")
    config["tie_word_embeddings"] = "output.weight" not in f.tensors or arch in ("falcon", "bloom")
    for key, value in GGUF_CONFIG_DEFAULTS_MAPPING.get(updated, GGUF_CONFIG_DEFAULTS_MAPPING.get(arch) or {}).items():
        config.setdefault(key, value)
    for key, field in f.fields.items():
        prefix, _, rest = key.replace(arch, updated).partition(".")
        table = {**EXTRA_CONFIG_KEYS.get(prefix, {}), **GGUF_CONFIG_MAPPING.get(prefix, {})}
        target = table.get(rest)
        if target == -1 or target is None:
            continue
        value = field.value()
        if isinstance(value, list) and len(value) == 1:
            value = value[0]  # transformers reads every value as a list and unwraps those of one item
        if isinstance(value, str) and arch in value:
            value = value.replace(arch, updated)
        config[target] = value
    _fix_up(f, config)
    _plausible(f, config)
    return config


# a model is built from the config before any tensor is read: numbers past these are not a model
_LIMITS = {"num_hidden_layers": 4096, "hidden_size": 1 << 20, "intermediate_size": 1 << 22, "vocab_size": 1 << 24,
           "num_attention_heads": 1 << 14, "num_key_value_heads": 1 << 14, "num_local_experts": 1 << 16,
           "num_experts": 1 << 16, "max_position_embeddings": 1 << 31, "head_dim": 1 << 16}


def _plausible(f: GGUFFile, config: dict) -> None:
    """Refuses a config no real file has before transformers builds a model of it (a hostile
    ``block_count`` of 10**9 would build 10**9 modules): sizes within bounds and positive, no
    more layers than the file has tensors."""
    for key, limit in _LIMITS.items():
        value = config.get(key)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and 0 < value <= limit):
            raise NotMappable(f"its metadata gives {key} = {value!r}, not a size prebake builds a model for")
    if config.get("num_hidden_layers", 0) > len(f.tensors):
        raise NotMappable(f"its metadata gives {config['num_hidden_layers']} layers but the file has "
                          f"{len(f.tensors)} tensors")


def _scalar(f: GGUFFile, key: str):
    field = f.fields.get(key)
    return field.value() if field is not None and field.item_type is None else None


def _refuse_newer_route(arch: str) -> None:
    """Architectures transformers loads through its newer GGUF route (``GGUF_CONFIG_ARCHS``) have
    their tensors renamed and reshaped by weight converters that prebake does not run backwards
    yet: such a file stays under GGUF names."""
    try:
        from transformers.integrations.gguf import GGUF_CONFIG_ARCHS
    except ImportError:  # a transformers from before that route
        return
    if arch in GGUF_CONFIG_ARCHS:
        raise NotMappable(f"transformers loads {arch!r} GGUFs through its newer GGUF route, whose "
                          "converters prebake does not map yet")


def _updated_architecture(arch: str, name: str | None, config: dict) -> str:
    """transformers' model_type for a llama.cpp architecture (its exceptions, kept as they are)."""
    if "llama" in arch and name == "mistral":  # transformers tests `"mistral" in [general.name]`
        return "mistral"
    if "t5" in arch:
        config["is_gated_act"] = True
        umt5 = bool(name) and "umt5" in name.lower()
        if "t5encoder" in arch:
            config["architectures"] = ["UMT5EncoderModel" if umt5 else "T5EncoderModel"]
        return "umt5" if umt5 else "t5"
    for key, renamed in _ARCH_RENAMES.items():
        if key in arch:
            return renamed
    return arch


def _fix_up(f: GGUFFile, config: dict) -> None:
    """load_gguf_checkpoint's per-architecture corrections after the tables ran."""
    model_type = config.get("model_type")
    if model_type in _TEXT_ONLY:
        config["model_type"] = _TEXT_ONLY[model_type]
        if model_type == "gemma4":  # GGUF keeps one EOS id; Gemma 4 stops on three
            config["eos_token_id"] = [1, 106, 50]
    if config.get("model_type") == "minimax_m2" and isinstance(config.get("scoring_func"), int):
        config["scoring_func"] = {0: "none", 1: "softmax", 2: "sigmoid"}.get(config["scoring_func"], "softmax")
    if model_type == "stablelm":
        names = list(f.tensors)
        config["use_qkv_bias"] = any(b in n for n in names for b in ("attn_q.bias", "attn_k.bias", "attn_v.bias"))
        config["use_parallel_residual"] = not any("ffn_norm" in n for n in names)
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in f.fields:
        config["vocab_size"] = f.fields["tokenizer.ggml.tokens"].count
