"""A numpy forward pass over a GGUF file, in llama.cpp's conventions, for the export tests.

No llama.cpp is at hand in the test environment (llama-cpp-python ships no wheel on PyPI), so
this reads a GGUF the way llama.cpp's ``llm_build_llama`` / ``llm_build_qwen2`` graphs use it:
GGML's rope modes (NORM for the llama family: rotate adjacent pairs, which is why the exporter
permutes Q/K rows; NEOX for Qwen: rotate halves), RMSNorm with the file's epsilon, GQA by the
file's head counts, top-k softmax MoE routing (Mixtral's, weights renormalized), and the output
head from ``output.weight`` or, when it is absent, ``token_embd.weight``. Only what the file
says is used: if the exporter wrote the wrong layout or metadata, the logits differ from
transformers'.
"""

from __future__ import annotations

import gguf
import numpy as np

NEOX = {"qwen2", "qwen2moe", "qwen3", "qwen3moe"}


def gguf_logits(path, tokens: list[int]) -> np.ndarray:
    """Logits (len(tokens), n_vocab) of the GGUF model at ``path``, float32 math."""
    r = gguf.GGUFReader(str(path))
    kv = {k: f.contents() for k, f in r.fields.items()}
    arch = kv["general.architecture"]
    w = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(d) for d in t.shape])))
         .astype(np.float32) for t in r.tensors}
    eps = kv[f"{arch}.attention.layer_norm_rms_epsilon"]
    x = w["token_embd.weight"][tokens]
    for i in range(kv[f"{arch}.block_count"]):
        x = x + _attention(w, kv, arch, i, _rms(x, w[f"blk.{i}.attn_norm.weight"], eps))
        x = x + _ffn(w, kv, arch, i, _rms(x, w[f"blk.{i}.ffn_norm.weight"], eps))
    x = _rms(x, w["output_norm.weight"], eps)
    return x @ w.get("output.weight", w["token_embd.weight"]).T


def _rms(x, weight, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight


def _attention(w, kv, arch, i, x):
    n_head, n_kv = kv[f"{arch}.attention.head_count"], kv[f"{arch}.attention.head_count_kv"]
    p = f"blk.{i}."

    def proj(name):
        y = x @ w[p + name + ".weight"].T
        return y + w[p + name + ".bias"] if p + name + ".bias" in w else y

    T = x.shape[0]
    q, k, v = proj("attn_q").reshape(T, n_head, -1), proj("attn_k").reshape(T, n_kv, -1), proj("attn_v")
    hd = q.shape[-1]
    if p + "attn_q_norm.weight" in w:  # Qwen3: RMSNorm over each head
        eps = kv[f"{arch}.attention.layer_norm_rms_epsilon"]
        q, k = _rms(q, w[p + "attn_q_norm.weight"], eps), _rms(k, w[p + "attn_k_norm.weight"], eps)
    base = kv.get(f"{arch}.rope.freq_base", 10000.0)
    q, k = _rope(q, base, arch in NEOX), _rope(k, base, arch in NEOX)
    v = v.reshape(T, n_kv, hd)
    group = n_head // n_kv
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
    scores = scores + np.triu(np.full((T, T), -np.inf, np.float32), 1)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("hqk,khd->qhd", probs, v).reshape(T, -1)
    return out @ w[p + "attn_output.weight"].T


def _rope(x, base, neox: bool):
    """GGML's rope: NORM rotates pairs (2i, 2i+1), NEOX pairs (i, i + d/2); angle pos * base^(-2i/d)."""
    T, _, d = x.shape
    theta = np.arange(T, dtype=np.float32)[:, None] * base ** (-np.arange(0, d, 2, dtype=np.float32) / d)
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    a, b = (x[..., :d // 2], x[..., d // 2:]) if neox else (x[..., 0::2], x[..., 1::2])
    ra, rb = a * cos - b * sin, a * sin + b * cos
    return np.concatenate([ra, rb], -1) if neox else np.stack([ra, rb], -1).reshape(x.shape)


def _silu(x):
    return x / (1 + np.exp(-x))


def _ffn(w, kv, arch, i, x):
    p = f"blk.{i}."
    if p + "ffn_gate_inp.weight" not in w:
        return (_silu(x @ w[p + "ffn_gate.weight"].T) * (x @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
    logits = x @ w[p + "ffn_gate_inp.weight"].T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, -1)[:, :kv[f"{arch}.expert_used_count"]]
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        weights = probs[t, top[t]]
        if arch != "qwen2moe":  # Mixtral and Qwen3-MoE renormalize the chosen experts' weights
            weights = weights / weights.sum()
        for e, g in zip(top[t], weights, strict=True):
            h = _silu(x[t] @ w[p + "ffn_gate_exps.weight"][e].T) * (x[t] @ w[p + "ffn_up_exps.weight"][e].T)
            out[t] += g * (h @ w[p + "ffn_down_exps.weight"][e].T)
    if p + "ffn_gate_shexp.weight" in w:  # Qwen2-MoE's shared expert, gated by a sigmoid
        h = _silu(x @ w[p + "ffn_gate_shexp.weight"].T) * (x @ w[p + "ffn_up_shexp.weight"].T)
        gate = 1 / (1 + np.exp(-(x @ w[p + "ffn_gate_inp_shexp.weight"].reshape(1, -1).T)))
        out += gate * (h @ w[p + "ffn_down_shexp.weight"].T)
    return out
