"""Which tensors are quantized, and to which GGML block type.

Defaults follow what works for LLMs: quantize the 2-D weight matrices of linear layers; keep
embeddings (unless asked), MoE routers, norms, biases, 1-D and small tensors in their dtype. A recipe is a
single type (``q8_0``, ``q4_k``, ...) or a llama.cpp-style mix: ``q4_k_m`` puts the output
head, and ``attn_v``/``ffn_down`` of the layers llama.cpp's ``use_more_bits`` picks, at Q6_K
and everything else at Q4_K; ``q5_k_m``-style mixes are not offered.

As in ``llama-quantize``, a single type leaves the output head (``lm_head``/``output``) at
Q6_K unless the type is Q8_0: the head turns every hidden state into logits, and 4-5 bit error
there shows straight in the output (2-layer tiny random Llama, q4_k: logits cosine 0.98589
with a Q4_K head, 0.98828 with Q6_K). ``pure`` (``--quant-pure``, llama-quantize's ``--pure``) uses the one type
for every tensor.

Rows whose length is not a multiple of the type's block fall back as llama.cpp does (Q4_K ->
Q5_0, Q6_K -> Q8_0, when the row fits a 32-block), else stay unquantized and are reported.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from prebake.convert.order import is_embedding, is_head, is_router, layer_of
from prebake.formats.errors import QuantError
from prebake.formats.ggml_types import BLOCK_SIZES
from prebake.formats.tensor import FLOAT_DTYPES, TensorInfo

SINGLE = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1",
          "q4_k": "Q4_K", "q6_k": "Q6_K"}
RECIPES = (*SINGLE, "q4_k_m")
FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}
MIN_ELEMENTS = 4096  # smaller matrices are not worth a codec
_ATTN_V = re.compile(r"(v_proj|attn_v|\.value)\.weight$")
_FFN_DOWN = re.compile(r"(down_proj|ffn_down|\.w2|fc2|dense_4h_to_h)\.weight$")


@dataclass(frozen=True)
class QuantPolicy:
    recipe: str
    embeddings: bool = False  # quantize embeddings too
    skip: tuple[str, ...] = ()  # globs: never quantize
    only: tuple[str, ...] = ()  # globs: quantize only these
    pure: bool = False  # one type everywhere: no Q6_K output head

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise QuantError(f"unknown --quant {self.recipe!r}; choose one of {', '.join(RECIPES)}")


def choose(policy: QuantPolicy, tensors: list[TensorInfo]) -> tuple[dict[str, str], dict[str, str]]:
    """Returns ({name: GGML type} to quantize, {name: what happened instead, and why}) where the
    recipe's type did not fit: a fallback type, or no quantization at all."""
    n_layers = 1 + max((layer_of(t.name)[1][0] for t in tensors if layer_of(t.name)), default=0)
    chosen, kept = {}, {}
    for t in tensors:
        if not _eligible(policy, t):
            continue
        qtype = _type_for(policy, t.name, n_layers)
        row = t.shape[-1]
        if row % _block(qtype):
            fallback = FALLBACK.get(qtype)
            if fallback is None or row % _block(fallback):
                kept[t.name] = f"not quantized: row of {row} is not a multiple of the {qtype} block ({_block(qtype)})"
                continue
            kept[t.name] = (f"{fallback} instead of {qtype}: row of {row} is not a multiple of the {qtype} "
                            f"block ({_block(qtype)})")
            qtype = fallback
        chosen[t.name] = qtype
    return chosen, kept


def _block(qtype: str) -> int:
    return BLOCK_SIZES[qtype][0]


def _eligible(policy: QuantPolicy, t: TensorInfo) -> bool:
    # GGML blocks (GGUF input without --keep-quant) are re-quantized from their dequantized values
    if t.dtype not in FLOAT_DTYPES or len(t.shape) != 2 or t.numel < MIN_ELEMENTS:
        return False
    if policy.only:
        return any(fnmatch.fnmatchcase(t.name, g) for g in policy.only) and \
            not any(fnmatch.fnmatchcase(t.name, g) for g in policy.skip)
    if any(fnmatch.fnmatchcase(t.name, g) for g in policy.skip) or is_router(t.name):  # llama.cpp keeps routers unquantized too
        return False
    if is_embedding(t.name):
        return policy.embeddings
    return t.name.endswith(".weight") or t.name.endswith("_proj")


def _type_for(policy: QuantPolicy, name: str, n_layers: int) -> str:
    layer = layer_of(name)
    head = layer is None and is_head(name)
    if policy.recipe in SINGLE:
        qtype = SINGLE[policy.recipe]
        return "Q6_K" if head and not policy.pure and qtype != "Q8_0" else qtype
    if layer is None:
        return "Q6_K" if head else "Q4_K"
    if (_ATTN_V.search(name) or _FFN_DOWN.search(name)) and use_more_bits(layer[1][0], n_layers):
        return "Q6_K"
    return "Q4_K"


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of the layers that get more bits in its _M mixes."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2
