"""``export_gguf``: a bake out as one GGUF file, written with gguf-py's ``GGUFWriter``.

:func:`plan_export` works out everything from the manifest and the bake's small files (the
tensors and their GGML types, :mod:`~prebake.convert.gguf_tensors`; the architecture's keys,
:mod:`~prebake.convert.gguf_arch`); :func:`export_gguf` then writes the header and metadata,
and streams each tensor from the bake's memory maps a window at a time
(:mod:`~prebake.convert.gguf_stream`), under a temporary name renamed into place at the end.

Two kinds of bake export:

- a bake of a transformers model folder (``config.json``, tokenizer files): named, laid out and
  described as llama.cpp's ``convert_hf_to_gguf.py`` does for its architecture;
- a bake of a GGUF that kept GGUF's names (``prebake convert FILE.gguf --keep-quant``): its
  tensors and key-value metadata go back as they came, so the file's tensor data round-trips
  byte for byte.

>>> export_gguf("baked/", "model.gguf")                       # doctest: +SKIP
>>> export_gguf("baked/", "model-q4_k_m.gguf", quant="q4_k_m")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from prebake.convert import output
from prebake.convert.bake_source import bake_tensors, full_aliases
from prebake.convert.gguf_arch import ArchSpec, add_hparams, arch_of, generated_tensors, hparams
from prebake.convert.gguf_tensors import ExportTensor, plan_passthrough, plan_tensors
from prebake.convert.quant_policy import QuantPolicy, choose
from prebake.formats.errors import OutputError, UnsupportedError, UsageError
from prebake.formats.manifest import Manifest, read_manifest
from prebake.formats.tensor import TensorInfo

OUTTYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
# llama.cpp's general.file_type (gguf.LlamaFileType) of each recipe, and of files mostly of one type
RECIPE_FILE_TYPES = {"q8_0": 7, "q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9, "q4_k": 14, "q6_k": 18, "q4_k_m": 15}
TYPE_FILE_TYPES = {"F32": 0, "F16": 1, "BF16": 32, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9,
                   "Q2_K": 10, "Q3_K": 12, "Q4_K": 15, "Q5_K": 17, "Q6_K": 18}


@dataclass
class ExportPlan:
    """Everything an export writes, before a byte is written (``prebake export --dry-run`` prints it)."""

    manifest: Manifest = field(repr=False)
    arch: str  # GGUF's general.architecture
    source: str  # the transformers architecture, or "gguf" for a bake of a GGUF
    tensors: list[ExportTensor]
    file_type: int
    spec: ArchSpec | None = None
    hparams: dict = field(default_factory=dict, repr=False)
    tokenizer_pre: str | None = None
    retyped: bool = False  # a GGUF bake exported with other types than it came with: general.file_type changes
    quant_notes: dict = field(default_factory=dict)  # --quant: tensors not at the recipe's type, and why

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def summary(self) -> dict:
        return {"arch": self.arch, "from": self.source, "file_type": self.file_type, "tensors": len(self.tensors),
                "bytes": self.total_bytes, "types": dict(Counter(t.qtype for t in self.tensors)),
                "notes": {t.name: t.note for t in self.tensors if t.note}, "quant_notes": self.quant_notes}


def plan_export(bake: str | os.PathLike | Manifest, outtype: str | None = None, quant: str | QuantPolicy | None = None,
                tokenizer_pre: str | None = None) -> ExportPlan:
    """Plans the export of ``bake`` (a folder, its manifest, or a Manifest read); writes nothing.

    ``outtype``: ``f32``, ``f16`` or ``bf16`` for the float matrices (default: as stored).
    ``quant``: a recipe (``q8_0`` ... ``q4_k_m``) or a :class:`QuantPolicy`, for a bake without blocks.
    ``tokenizer_pre``: llama.cpp's name of a BPE pre-tokenizer prebake does not recognize.
    """
    m = bake if isinstance(bake, Manifest) else read_manifest(bake)
    if m.components:
        raise UsageError(f"the bake holds components ({', '.join(m.components)}); export one of them: "
                         f"prebake export {m.root}/NAME OUT.gguf")
    dtype = _outtype(outtype)
    tensors = bake_tensors(m)
    policy = _policy(quant, tensors)
    chosen, notes = choose(policy, list(tensors.values())) if policy else ({}, {})
    if _gguf_named(m, tensors):
        plan = _plan_gguf(m, tensors, dtype, chosen, policy)
    else:
        config = _config(m)
        source, spec = arch_of(config, m.root / "config.json")
        h = hparams(config, spec)
        generated = {n: _array_info(n, a) for n, a in generated_tensors(spec, h).items()}
        planned = plan_tensors(spec, h, tensors, full_aliases(m), dtype, chosen, generated)
        plan = ExportPlan(m, spec.gguf, source, planned, _file_type(m, planned, policy), spec, h, tokenizer_pre)
    plan.quant_notes = notes
    return plan


def export_gguf(bake: str | os.PathLike | Manifest, path: str | os.PathLike, outtype: str | None = None,
                quant: str | QuantPolicy | None = None, progress=None, *, tokenizer_pre: str | None = None,
                force: bool = False) -> dict:
    """Writes the bake ``bake`` as the GGUF file ``path``; returns :meth:`ExportPlan.summary` plus ``out``.

    ``outtype``, ``quant``, ``tokenizer_pre``: as :func:`plan_export`. ``progress``, if given, is
    called once with the bytes to write and returns the callable fed each increment (a tqdm
    bar's ``update`` fits). ``path`` is replaced only if it is a GGUF file (or with ``force``);
    on any failure it is left as it was.
    """
    import gguf

    plan = plan_export(bake, outtype, quant, tokenizer_pre)
    path = Path(path)
    _check_output(path, force)
    update = progress(plan.total_bytes) if progress else (lambda n: None)
    with output.writing_file(path) as tmp, output.guard(path):
        w = gguf.GGUFWriter(tmp, plan.arch)
        try:
            _write(w, plan, update)
        finally:
            w.close()
        output.fsync_path(tmp)
    return {"out": str(path.resolve()), **plan.summary()}


def _write(w, plan: ExportPlan, update) -> None:
    import gguf

    for t in plan.tensors:
        w.add_tensor_info(t.name, t.shape, _PLACEHOLDER, t.nbytes, raw_dtype=gguf.GGMLQuantizationType[t.qtype])
    _add_metadata(w, plan)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    from prebake.convert.gguf_stream import TensorStream

    for t in plan.tensors:
        w.write_tensor_data(TensorStream(t, update))


_PLACEHOLDER = np.dtype(np.float32)  # any dtype but uint8 tells GGUFWriter the shape given is the logical one


def _add_metadata(w, plan: ExportPlan) -> None:
    import gguf

    m = plan.manifest
    if plan.spec is None:  # a GGUF's own keys, typed as they were
        from prebake.convert.gguf_kv import add_metadata, gguf_keys

        meta, types = gguf_keys(m)
        alignment = meta.get("general.alignment")
        if isinstance(alignment, int) and alignment > 0 and not alignment & (alignment - 1):
            w.data_alignment = alignment
            w.add_custom_alignment(alignment)
        add_metadata(w, meta, types,
                     {"general.file_type": (plan.file_type, "UINT32")} if plan.retyped else None)
        return
    from prebake.convert.gguf_vocab import add_vocab

    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(_model_name(m, plan.hparams))
    total, shared, expert, count = w.get_total_parameter_count()
    if total > 0:
        w.add_size_label(gguf.size_label(total, shared, expert, count))
    add_hparams(w, plan.spec, plan.hparams, plan.file_type)
    embd = next((t for t in plan.tensors if t.name == "token_embd.weight"), None)
    n_vocab = embd.shape[0] if embd is not None else plan.hparams["vocab_size"]
    add_vocab(w, m.root, plan.spec.vocab, n_vocab, plan.tokenizer_pre, plan.spec.space_prefix)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _model_name(m: Manifest, h: dict) -> str:
    name = h.get("_name_or_path") or Path(m.source.get("path", "") or str(m.root)).name
    return str(name).rstrip("/").rsplit("/", 1)[-1] or "model"


def _outtype(outtype: str | None) -> str | None:
    if outtype is None:
        return None
    if outtype.lower() not in OUTTYPES:
        raise UsageError(f"--outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    return OUTTYPES[outtype.lower()]


def _policy(quant, tensors: dict[str, TensorInfo]) -> QuantPolicy | None:
    if quant is None:
        return None
    blocks = sorted({t.qtype for t in tensors.values() if t.qtype})
    if blocks:
        raise UsageError(f"the bake holds {', '.join(blocks)} blocks already; they are exported as they are. "
                         "--quant quantizes a bake of float tensors")
    return quant if isinstance(quant, QuantPolicy) else QuantPolicy(quant.lower())


def _gguf_named(m: Manifest, tensors: dict) -> bool:
    """A bake of a GGUF that kept GGUF's tensor names (``token_embd.weight``, ``blk.N.*``)."""
    meta = m.metadata.get("gguf") or {}
    return "general.architecture" in meta and any(n.startswith("blk.") or n == "token_embd.weight" for n in tensors)


def _plan_gguf(m: Manifest, tensors, dtype, chosen, policy) -> ExportPlan:
    meta = m.metadata["gguf"]
    planned = plan_passthrough(tensors, dtype, chosen)
    file_type, retyped = meta.get("general.file_type"), bool(dtype or policy)
    if retyped or not isinstance(file_type, int):
        file_type = _file_type(m, planned, policy)
    return ExportPlan(m, meta["general.architecture"], "gguf", planned, file_type, retyped=retyped)


def _config(m: Manifest) -> dict:
    path = m.root / "config.json"
    if not path.is_file() and m.metadata.get("gguf"):
        raise UnsupportedError("a bake of a GGUF whose tensors were renamed to transformers' names, without a "
                               "config.json: export needs GGUF's names (bake the GGUF with them) or a config.json",
                               m.root)
    if not path.is_file():
        raise UnsupportedError("the bake has no config.json, so its architecture is unknown; export needs a bake "
                               "of a Hugging Face model folder (config.json and tokenizer files beside the "
                               "weights) or of a GGUF file", m.root)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UnsupportedError(f"cannot read config.json ({e})", path) from None


def _file_type(m: Manifest, planned: list[ExportTensor], policy: QuantPolicy | None) -> int:
    """general.file_type: the recipe's, else the type holding most bytes of the matrices."""
    recipe = policy.recipe if policy else m.options.get("quant")
    if recipe in RECIPE_FILE_TYPES:
        return RECIPE_FILE_TYPES[recipe]
    weights = Counter()
    for t in planned:
        if len(t.shape) >= 2:
            weights[t.qtype] += t.nbytes
    kind = weights.most_common(1)[0][0] if weights else "F32"
    return TYPE_FILE_TYPES.get(kind, 1)


def _array_info(name: str, array) -> TensorInfo:
    """A computed float32 tensor (rope factors) dressed as a source tensor."""
    return TensorInfo(name, "F32", tuple(array.shape), array.nbytes, "<config.json>", lambda: array)


def _check_output(path: Path, force: bool) -> None:
    if path.is_dir():
        raise OutputError("is a folder; give the GGUF file's path", path)
    if path.exists() and not force:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise OutputError("exists and is not a GGUF file; choose another name or pass --force", path)
