"""Which GGUF tensors a bake becomes: names, GGML types, and where each one's rows come from.

Plain data, computed from tensor descriptions alone (:func:`plan_tensors`); the exporter then
streams bytes by it. An :class:`ExportTensor` is a concatenation of :class:`Part` s, each the
rows of one baked tensor, optionally reordered:

- names go through gguf-py's ``TensorNameMap`` for the architecture (transformers' names, and
  GGUF's own, which map to themselves);
- the llama family's Q and K rows are reordered from transformers' rotate-half rope to GGML's
  adjacent pairs, as llama.cpp's converter ``permute`` does. The permutation moves whole rows
  (each head's rows ``(2, head_dim/2)`` become ``(head_dim/2, 2)``), so GGML blocks, which run
  along a row, are moved, never re-encoded;
- per-expert MoE matrices are stacked into ``ffn_*_exps`` (E, rows, cols): their rows follow
  one another, blocks intact; transformers 5's fused ``experts.gate_up_proj`` is split by rows;
- Gemma's RMSNorm weights get their ``+1`` (a float32 addition);
- an output head that is the embedding (tied, or absent) is not written: llama.cpp falls back
  to ``token_embd`` when ``output.weight`` is missing.

Types: baked blocks stay as they are; float matrices keep their dtype (or ``outtype``) unless
the quantization policy chose a block type; 1-D tensors, norms, biases and routers are F32, as
llama.cpp's converter writes them.
"""

from __future__ import annotations

import re
from collections import namedtuple
from dataclasses import dataclass, field

import numpy as np
from prebake.convert.gguf_arch import ArchSpec
from prebake.formats.errors import UnsupportedError
from prebake.formats.ggml_types import BLOCK_SIZES
from prebake.formats.tensor import FLOAT_DTYPES, TensorInfo, numel

FLOAT_TYPES = {"F32", "F16", "BF16"}  # GGML's float types, under the safetensors codes' names
SKIPPED = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")  # buffers, not weights
_EXPERT = re.compile(r"^(?P<pre>.+)\.experts\.(?P<e>\d+)\.(?P<proj>[A-Za-z0-9_]+)\.weight$")
_FUSED = re.compile(r"^(?P<pre>.+)\.experts\.(?P<proj>gate_up_proj|down_proj)(?:\.weight)?$")
_QK = re.compile(r"\.(q_proj|k_proj)\.(weight|bias)$")


@dataclass(frozen=True)
class Part:
    """Rows of one baked tensor: all of them in order, or those ``rows`` lists, in that order."""

    source: TensorInfo
    rows: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def n_rows(self) -> int:
        return len(self.rows) if self.rows is not None else _row_count(self.source.shape)


@dataclass(frozen=True)
class ExportTensor:
    """One GGUF tensor: its name, logical shape (PyTorch order), GGML type, and its rows' sources."""

    name: str
    shape: tuple[int, ...]
    qtype: str
    parts: tuple[Part, ...]
    shift: float = 0.0  # added to every value (Gemma's norms)
    note: str = ""  # what was done on the way (for the summary)

    @property
    def nbytes(self) -> int:
        block, size = BLOCK_SIZES[self.qtype]
        return numel(self.shape) // block * size

    @property
    def sources(self) -> list[str]:
        return list(dict.fromkeys(p.source.name for p in self.parts))


def _row_count(shape: tuple[int, ...]) -> int:
    """Rows as the exporter streams a tensor: along the last axis, a 1-D tensor's items one by one."""
    return shape[0] if len(shape) <= 1 else numel(shape) // shape[-1]


def qk_rows(n_rows: int, n_head: int) -> np.ndarray:
    """The row order llama.cpp's ``permute`` gives Q (or K) of ``n_head`` heads.

    Row ``k`` of the result is source row ``order[k]``: within each head, the rows of the two
    rotate-half halves are interleaved, so adjacent rows form GGML's rope pairs.
    """
    if n_rows % (2 * n_head):
        raise UnsupportedError(f"{n_rows} Q/K rows do not split into {n_head} heads of rope pairs")
    return np.arange(n_rows).reshape(n_head, 2, n_rows // n_head // 2).swapaxes(1, 2).reshape(-1)


def plan_tensors(spec: ArchSpec, h: dict, tensors: dict[str, TensorInfo], aliases: dict[str, str],
                 outtype: str | None = None, chosen: dict[str, str] | None = None,
                 generated: dict[str, TensorInfo] | None = None) -> list[ExportTensor]:
    """The GGUF tensors of a bake of transformers tensors (see the module docstring).

    ``tensors``: the bake's stored tensors in execution order; ``aliases``: full aliases (tied
    weights) -> their stored tensor; ``chosen``: the quantization policy's GGML type by
    transformers name; ``generated``: tensors computed from the config (rope factors), written
    first. Raises :class:`UnsupportedError` naming a tensor that has no GGUF counterpart.
    """
    import gguf

    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == spec.gguf)
    names = gguf.get_tensor_name_map(arch, h["num_hidden_layers"])
    chosen = chosen or {}
    staged: list = [(n, [Part(t)], "generated from config.json", 0.0) for n, t in (generated or {}).items()]
    experts: dict[_Stack, dict[int, TensorInfo]] = {}
    for name, t in tensors.items():
        if name.endswith(SKIPPED):
            continue
        m = _EXPERT.match(name)
        if m and names.get_name(f"{m['pre']}.experts.{m['proj']}") is not None:
            key = _Stack(m["pre"], m["proj"])
            if key not in experts:
                staged.append(key)  # the stack takes the place of its first expert
            experts.setdefault(key, {})[int(m["e"])] = t
            continue
        staged += _one(name, t, names, spec, h)
    for name, target in aliases.items():  # a tied head is the embedding: llama.cpp needs no copy
        gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gname is not None and gname != "output.weight":
            staged += _one(name, tensors[target], names, spec, h, gname)
    n_experts = h.get("num_local_experts") or h.get("num_experts")
    out = []
    for item in staged:
        if isinstance(item, _Stack):
            item = _stack(item, experts[item], names, n_experts)
        out.append(_typed(*item, outtype, chosen, names))
    return out


_Stack = namedtuple("_Stack", "pre proj")  # per-expert matrices "{pre}.experts.N.{proj}.weight" to stack


def _one(name: str, t: TensorInfo, names, spec: ArchSpec, h: dict,
         gname: str | None = None) -> list[tuple[str, list[Part], str, float]]:
    """The GGUF tensor(s) one transformers tensor becomes (two for a fused gate_up_proj)."""
    fused = _FUSED.match(name)
    if fused and len(t.shape) == 3:
        return _split_fused(fused["pre"], fused["proj"], t, names)
    gname = gname or names.get_name(name, try_suffixes=(".weight", ".bias"))
    if gname is None:
        raise UnsupportedError(f"tensor {name!r} has no GGUF counterpart in llama.cpp's {spec.gguf!r} "
                               "architecture (gguf-py's TensorNameMap)", t.path)
    if gname == "output.weight" and not spec.head:
        return []  # Gemma: llama.cpp always takes the head from token_embd
    qk = _QK.search(name)
    if spec.permute_qk and qk:
        heads = h["num_attention_heads"] if qk[1] == "q_proj" else \
            h.get("num_key_value_heads") or h["num_attention_heads"]
        rows = qk_rows(_row_count(t.shape), heads)
        return [(gname, [Part(t, rows)], f"rows permuted for GGML's rope ({heads} heads)", 0.0)]
    shift = spec.norm_shift if name.endswith("norm.weight") else 0.0
    return [(gname, [Part(t)], f"+{shift:g} (stored as weight - {shift:g})" if shift else "", shift)]


def _split_fused(pre: str, proj: str, t: TensorInfo, names) -> list[tuple[str, list[Part], str, float]]:
    """transformers 5's fused experts: ``gate_up_proj`` (E, 2I, H) is gate rows then up rows per expert."""
    if proj == "down_proj":
        return [(_expert_name(pre, "down_proj", names, t), [Part(t)], "fused experts", 0.0)]
    e, two_i = t.shape[0], t.shape[1]
    if two_i % 2:
        raise UnsupportedError(f"tensor {t.name!r} of shape {t.shape} does not split into gate and up halves", t.path)
    half = two_i // 2
    base = np.arange(e)[:, None] * two_i
    gate, up = (base + np.arange(half)).reshape(-1), (base + half + np.arange(half)).reshape(-1)
    return [(_expert_name(pre, "gate_proj", names, t), [Part(t, gate)], "gate half of gate_up_proj", 0.0),
            (_expert_name(pre, "up_proj", names, t), [Part(t, up)], "up half of gate_up_proj", 0.0)]


def _expert_name(pre: str, proj: str, names, t: TensorInfo) -> str:
    """llama.cpp's name of the stacked experts ``{pre}.experts.{proj}`` (``blk.N.ffn_*_exps.weight``)."""
    gname = names.get_name(f"{pre}.experts.{proj}")
    if gname is None:
        raise UnsupportedError(f"tensor {t.name!r} has no GGUF counterpart (stacked experts)", t.path)
    return gname + ".weight"


def _stack(key: _Stack, group: dict[int, TensorInfo], names,
           n_experts: int | None) -> tuple[str, list[Part], str, float]:
    """Per-expert matrices stacked along a new first axis, expert 0 first; all must be there, alike."""
    pre, proj = key
    first = group[min(group)]
    missing = sorted(set(range(max(n_experts or 0, max(group) + 1))) - set(group))
    if missing:
        raise UnsupportedError(f"experts {missing} of {pre}.experts.*.{proj} are not in the bake; llama.cpp "
                               "needs every expert the config counts", first.path)
    kinds = {(t.shape, t.qtype or t.dtype) for t in group.values()}
    if len(kinds) > 1:
        raise UnsupportedError(f"experts of {pre}.experts.*.{proj} differ in shape or type ({sorted(kinds)}); "
                               "they cannot be stacked", first.path)
    parts = [Part(group[i]) for i in range(len(group))]
    return _expert_name(pre, proj, names, first), parts, f"{len(parts)} experts stacked", 0.0


def _typed(gname: str, parts: list[Part], note: str, shift: float, outtype: str | None,
           chosen: dict[str, str], names) -> ExportTensor:
    """The ExportTensor, with the GGML type its bytes are written in."""
    src = parts[0].source
    shape = _shape(parts)
    picks = {chosen.get(p.source.name) for p in parts}
    if len(picks) > 1:
        raise UnsupportedError(f"the parts of {gname} were given different quantization types {sorted(map(str, picks))}")
    if src.qtype is not None:
        qtype = "F32" if shift else src.qtype
    elif picks != {None}:
        qtype = picks.pop()
    elif _keeps_f32(gname, shape, names):
        qtype = "F32"
    elif src.dtype in FLOAT_TYPES or src.dtype in FLOAT_DTYPES:
        qtype = outtype or (src.dtype if src.dtype in FLOAT_TYPES else "F32")
    else:
        raise UnsupportedError(f"tensor {src.name!r} holds {src.dtype} items; GGUF export writes float or "
                               "quantized weights", src.path)
    return ExportTensor(gname, shape, qtype, tuple(parts), shift, note)


def _shape(parts: list[Part]) -> tuple[int, ...]:
    src = parts[0].source
    if len(parts) > 1:
        return (len(parts), *src.shape)
    if parts[0].rows is not None and len(src.shape) == 3:  # half of a fused expert tensor
        return (src.shape[0], len(parts[0].rows) // src.shape[0], src.shape[2])
    return tuple(src.shape)


def _keeps_f32(gname: str, shape: tuple[int, ...], names) -> bool:
    """llama.cpp's converter writes these in F32 whatever the file type: 1-D tensors, norms,
    biases, MoE routers (llama.cpp's kernels for them take F32)."""
    import gguf

    kind = names.get_type(gname.rsplit(".", 1)[0]) if gname.endswith((".weight", ".bias")) else None
    return len(shape) <= 1 or gname.endswith("_norm.weight") or not gname.endswith(".weight") or \
        kind in (gguf.MODEL_TENSOR.FFN_GATE_INP, gguf.MODEL_TENSOR.FFN_GATE_INP_SHEXP,
                 gguf.MODEL_TENSOR.POS_EMBD, gguf.MODEL_TENSOR.TOKEN_TYPES)


def plan_passthrough(tensors: dict[str, TensorInfo], outtype: str | None = None,
                     chosen: dict[str, str] | None = None) -> list[ExportTensor]:
    """A bake of a GGUF that kept its names: every tensor as it is (blocks, floats, integers),
    unless ``outtype`` casts float matrices or ``chosen`` quantizes them."""
    chosen = chosen or {}
    out = []
    for name, t in tensors.items():
        if t.qtype is not None:
            qtype = t.qtype
        elif name in chosen:
            qtype = chosen[name]
        elif outtype is not None and t.dtype in FLOAT_TYPES:
            qtype = "F32" if len(t.shape) <= 1 or name.endswith("_norm.weight") else outtype
        elif t.dtype in BLOCK_SIZES:
            qtype = t.dtype
        else:
            raise UnsupportedError(f"tensor {name!r} holds {t.dtype} items, which GGUF has no type for", t.path)
        out.append(ExportTensor(name, tuple(t.shape), qtype, (Part(t),)))
    return out
