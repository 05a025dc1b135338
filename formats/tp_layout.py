"""Which tensors tensor-parallel ranks split, and how: a table per architecture, as data.

Tensor parallelism (Megatron-style, as vLLM's ``ColumnParallelLinear`` / ``RowParallelLinear``)
splits each attention and MLP weight among the ranks:

- **column**-parallel layers (Q, K, V, gate, up; MoE experts' w1/w3) split their output rows
  (dimension 0 of the ``(out, in)`` weight, and their bias); each rank computes a slice of the
  output, no communication;
- **row**-parallel layers (O, down; experts' w2) split their input columns (dimension 1); each
  rank computes a partial sum, and an all-reduce adds them (their bias is added once, after);
- **vocab**-parallel embeddings and heads split the vocabulary (dimension 0);
- everything else (norms, routers, row-parallel biases) is replicated.

Rows of a row-major tensor are contiguous, so a column-parallel slice is one byte range of the
tensor as stored; a row-parallel slice is not, which is what ``--tp-layout N`` changes: such a
weight is stored as ``(N, out, in / N)`` (its N column blocks one after another), so the slice
of rank r of any degree k dividing N is one byte range. GGML blocks run along rows, so a
quantized weight splits on block boundaries: its input dimension must divide into N x block.

:data:`ARCHITECTURES` maps a ``model_type`` to its patterns; :data:`DEFAULT` covers the
Llama / Qwen / Mistral / Gemma / Mixtral / Qwen-MoE / BERT naming, and GGUF's. A new
architecture is a new row (``PATTERNS`` of the three kinds); an unknown tensor is replicated.
"""

from __future__ import annotations

import re

COLUMN, ROW, VOCAB = "column", "row", "vocab"

DEFAULT = {
    COLUMN: r"\.(q_proj|k_proj|v_proj|gate_proj|up_proj|w1|w3|query|key|value|intermediate\.dense"
            r"|attn_q|attn_k|attn_v|ffn_gate|ffn_up)\.(weight|bias)$",
    ROW: r"\.(o_proj|down_proj|w2|output\.dense|attn_output|ffn_down)\.weight$",
    VOCAB: r"(^|\.)(embed_tokens|word_embeddings|lm_head|token_embd|output)\.weight$",
}
ARCHITECTURES: dict[str, dict[str, str]] = {
    "llama": DEFAULT, "mistral": DEFAULT, "qwen2": DEFAULT, "qwen3": DEFAULT, "mixtral": DEFAULT,
    "qwen2_moe": DEFAULT, "qwen3_moe": DEFAULT, "gemma": DEFAULT, "gemma2": DEFAULT, "gemma3_text": DEFAULT,
    "bert": DEFAULT,
}
_compiled: dict[str, list[tuple[str, re.Pattern]]] = {}


def split_kind(name: str, model_type: str | None = None) -> str | None:
    """``"column"``, ``"row"``, ``"vocab"`` or None (replicated) for the tensor ``name``."""
    table = _compiled.get(model_type or "")
    if table is None:
        patterns = ARCHITECTURES.get(model_type or "", DEFAULT)
        table = _compiled[model_type or ""] = [(k, re.compile(p)) for k, p in patterns.items()]
    for kind, pattern in table:
        if pattern.search(name):
            return kind
    return None


def split_dim(kind: str | None) -> int | None:
    """The dimension a kind splits: 0 for column and vocab, 1 for row, None when replicated."""
    return {COLUMN: 0, VOCAB: 0, ROW: 1}.get(kind)
