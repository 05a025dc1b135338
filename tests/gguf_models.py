"""Tiny Hugging Face models written as GGUF files the way llama.cpp's ``convert_hf_to_gguf.py`` writes them.

Only what the tests need of the converter, on gguf-py's own pieces: tensor names from
``TensorNameMap``, the metadata keys its ``set_gguf_parameters`` writes, the llama family's Q/K
row permutation, Gemma's ``+1`` on norm weights, MoE experts stacked into ``ffn_*_exps``,
1-D tensors, norms and routers in F32 and the rest at the asked type, and the vocabulary as
``_set_vocab_gpt2`` (byte-level BPE, merges and special ids through ``gguf.SpecialVocab``) or
``_set_vocab_sentencepiece`` (pieces, scores and token types) writes it. Blocks come from
``gguf.quants.quantize`` (Q8_0) and prebake's quantizer (Q4_K, byte-identical to llama.cpp's).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import numpy as np
import torch

ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen2_moe": "qwen2moe", "qwen3": "qwen3",
         "qwen3_moe": "qwen3moe", "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3"}
PERMUTED = {"llama"}  # llama.cpp's LlamaModel permutes Q and K rows for its rope
NORM_SHIFT = {"gemma2", "gemma3"}  # Gemma stores norm weights as w + 1
TYPES = {"F32": gguf.GGMLQuantizationType.F32, "F16": gguf.GGMLQuantizationType.F16,
         "Q8_0": gguf.GGMLQuantizationType.Q8_0, "Q4_K": gguf.GGMLQuantizationType.Q4_K}


def write_gguf(src: Path, out: Path, qtype: str = "F32", name: str = "tiny") -> Path:
    """Writes the model saved at ``src`` (config, safetensors, tokenizer) as the GGUF ``out``."""
    hp = json.loads((src / "config.json").read_text())
    arch = ARCHS[hp["model_type"]]
    w = gguf.GGUFWriter(str(out), arch)
    _parameters(w, hp, arch, name, qtype)
    _vocab(w, src, hp)
    names = gguf.get_tensor_name_map(_arch_enum(arch), hp["num_hidden_layers"])
    for hf_name, data in _tensors(src, hp, arch):
        new = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert new is not None, hf_name
        _add(w, new, data, qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _arch_enum(arch: str):
    return next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)


def _parameters(w, hp: dict, arch: str, name: str, qtype: str) -> None:
    """TextModel.set_gguf_parameters and the architectures' additions."""
    w.add_name(name)
    w.add_block_count(hp["num_hidden_layers"])
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(hp["num_attention_heads"])
    w.add_head_count_kv(hp["num_key_value_heads"])
    theta = hp.get("rope_theta") or (hp.get("rope_parameters") or {}).get("rope_theta") \
        or (hp.get("rope_parameters") or {}).get("full_attention", {}).get("rope_theta")
    if theta is not None:
        w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    if "head_dim" in hp and arch != "llama":
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
    if arch == "llama":  # LlamaModel.set_gguf_parameters
        w.add_vocab_size(hp["vocab_size"])
        w.add_rope_dimension_count(hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"])
    if _experts(hp):
        w.add_expert_count(_experts(hp))
        w.add_expert_used_count(hp["num_experts_per_tok"])
        w.add_expert_feed_forward_length(hp["moe_intermediate_size"])
        if hp.get("shared_expert_intermediate_size"):
            w.add_expert_shared_feed_forward_length(hp["shared_expert_intermediate_size"])
    if arch in NORM_SHIFT and hp.get("sliding_window"):
        w.add_sliding_window(hp["sliding_window"])
    w.add_file_type({"F32": 0, "F16": 1, "Q8_0": 7, "Q4_K": 15}[qtype])


def _experts(hp: dict) -> int | None:
    """find_hparam(["num_local_experts", "num_experts"]), as the converter asks."""
    return hp.get("num_local_experts") or hp.get("num_experts")


def _tensors(src: Path, hp: dict, arch: str):
    """(HF name, float32 numpy) in file order, transformed as llama.cpp's modify_tensors does."""
    from safetensors.torch import load_file

    state = load_file(str(src / "model.safetensors"))
    experts: dict[str, list] = {}
    for name, t in state.items():
        t = t.float()
        if arch in PERMUTED and re.search(r"\.(q_proj|k_proj)\.(weight|bias)$", name):
            heads = hp["num_attention_heads"] if ".q_proj." in name else hp["num_key_value_heads"]
            t = t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
        if arch in NORM_SHIFT and name.endswith("norm.weight"):
            t = t + 1
        m = re.match(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(\w+)\.weight$", name)
        if m:  # Qwen2MoeModel: stack one layer's experts per projection
            group = experts.setdefault(f"{m[1]}.{m[3]}.weight", [None] * _experts(hp))
            group[int(m[2])] = t
            if all(x is not None for x in group):
                yield f"{m[1]}.{m[3]}.weight", torch.stack(group).numpy()
            continue
        yield name, t.numpy()


def _add(w, name: str, data: np.ndarray, qtype: str) -> None:
    """ModelBase.prepare_tensors' type rule: 1-D tensors, norms and routers F32, the rest ``qtype``."""
    kind = qtype
    if data.ndim <= 1 or name.endswith("_norm.weight") or ".ffn_gate_inp" in name:
        kind = "F32"
    if kind == "F32":
        w.add_tensor(name, data.astype(np.float32))
    elif kind == "F16":
        w.add_tensor(name, data.astype(np.float16))
    elif kind == "Q8_0":
        w.add_tensor(name, gguf.quants.quantize(data.astype(np.float32), TYPES[kind]), raw_dtype=TYPES[kind])
    else:  # gguf-py makes no K-quants: prebake's quantizer, byte-identical to llama.cpp's reference
        from prebake.formats.quants import quantize

        rows = np.ascontiguousarray(data, dtype=np.float32).reshape(-1, data.shape[-1])
        w.add_tensor(name, quantize(rows, kind).reshape(*data.shape[:-1], -1), raw_dtype=TYPES[kind])


def _vocab(w, src: Path, hp: dict) -> None:
    """_set_vocab_gpt2 for a byte-level BPE folder, _set_vocab_sentencepiece for one with piece scores."""
    tok = json.loads((src / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    n = max(len(vocab), max(added, default=-1) + 1)
    tokens = [None] * n
    for piece, i in vocab.items():
        tokens[i] = piece
    for i, a in added.items():
        tokens[i] = a["content"]
    scores_file = src / "spm_scores.json"
    if scores_file.exists():
        _spm(w, tokens, json.loads(scores_file.read_text()), added)
        special = gguf.SpecialVocab(src, n_vocab=n)
    else:
        types = [gguf.TokenType.NORMAL if i not in added else
                 gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED for i in range(n)]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        special = gguf.SpecialVocab(src, load_merges=True)
    special.add_to_gguf(w, quiet=True)


def _spm(w, tokens: list[str], scores: list[float], added: dict) -> None:
    """_create_vocab_sentencepiece: UNKNOWN / CONTROL / BYTE / NORMAL by what the piece is."""
    types = []
    for i, piece in enumerate(tokens):
        if piece in ("<unk>",):
            types.append(gguf.TokenType.UNKNOWN)
        elif re.fullmatch(r"<0x[0-9A-F]{2}>", piece):
            types.append(gguf.TokenType.BYTE)
        elif i in added and added[i]["special"]:
            types.append(gguf.TokenType.CONTROL)
        else:
            types.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
