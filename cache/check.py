"""``prebake check``: does the bake compute what its source computes?

``verify`` re-hashes the bake; ``check`` runs it. Both the source and the bake are loaded as
transformers models (the bake the way a user would load it: ``from_pretrained(OUT)``, packed
where it holds GGML blocks) and run on one fixed input; the outputs are compared by their
largest absolute difference, their cosine and (for logits) top-1 agreement, against the
tolerance of how the bake was made:

=============================  =========================================
bake                           passes when
=============================  =========================================
lossless                       the outputs are equal, bit for bit
``--dtype`` cast               cosine >= 0.999
``--quant q8_0``               cosine >= 0.999
``q6_k``                       cosine >= 0.998
``q5_0``, ``q5_1``             cosine >= 0.99
``q4_0``, ``q4_1``, ``q4_k``,
``q4_k_m``, GGUF blocks        cosine >= 0.98
=============================  =========================================

(Random tiny models, the hardest case for 4-bit types, measure 0.990-0.994 with ``q4_k_m``;
trained ones 0.9999.) Where transformers cannot build the model (no ``config.json``, an
unknown architecture), the bake's tensors are compared with the source's one by one instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch
from prebake.formats.errors import CheckError
from prebake.formats.manifest import Manifest, read_manifest

COSINE = {"q8_0": 0.999, "q6_k": 0.998, "q5_0": 0.99, "q5_1": 0.99, "q4_0": 0.98, "q4_1": 0.98, "q4_k": 0.98,
          "q4_k_m": 0.98, "gguf": 0.98, "cast": 0.999}


@dataclass
class CheckReport:
    """What ``check`` compared and found; ``ok`` says whether it is within ``tolerance``."""

    mode: str  # "model" (outputs of the two models) or "tensors" (one by one)
    tolerance: dict
    max_abs_diff: float = 0.0
    cosine: float = 1.0
    top1: float | None = None
    tensors: int = 0
    worst: str | None = None  # tensors mode: the tensor furthest from its source
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        if self.tolerance.get("exact"):
            return self.max_abs_diff == 0
        return self.cosine >= self.tolerance["cosine"]

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def tolerance(m: Manifest) -> dict:
    """The tolerance for a bake, from how it was made (see the module docstring)."""
    quant = m.options.get("quant") or ("gguf" if any(t.qtype for t in m.tensors.values()) else None)
    if quant:
        return {"cosine": COSINE.get(quant, 0.98), "why": f"quantized ({quant})"}
    if any(t.source_dtype for t in m.tensors.values()):
        return {"cosine": COSINE["cast"], "why": "cast or dequantized"}
    return {"exact": True, "why": "lossless"}


def check_models(bake: str | os.PathLike, source: str | os.PathLike) -> CheckReport:
    """Runs the source model and the bake's ``from_pretrained`` model on one input; compares outputs."""
    import prebake.cache.hf  # noqa: F401  (a quantized bake loads packed, as a user would load it)

    m = read_manifest(bake)
    ref, got = _model(source), _model(bake)
    x = torch.randint(0, min(ref.config.get_text_config().vocab_size, 1 << 15), (2, 16),
                      generator=torch.Generator().manual_seed(0))
    a, b = _outputs(ref, x), _outputs(got, x)
    report = CheckReport("model", tolerance(m))
    _compare(report, a, b)
    if a.shape[-1] == ref.config.get_text_config().vocab_size:
        report.top1 = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    return report


def check_tensors(m: Manifest, source: Mapping[str, torch.Tensor]) -> CheckReport:
    """Compares every tensor of the bake with the source's tensor of the same name (unpacked)."""
    from prebake.cache.load import load_from_manifest

    baked = load_from_manifest(m, quant=None)
    report = CheckReport("tensors", tolerance(m))
    missing = sorted(set(source) - set(baked))
    if missing:
        raise CheckError(f"the bake lacks {len(missing)} of the source's tensors, e.g. {missing[0]!r}", m.root)
    worst = 1.0
    for name, ref in source.items():
        one = CheckReport("tensors", report.tolerance)
        _compare(one, ref, baked[name])
        report.max_abs_diff = max(report.max_abs_diff, one.max_abs_diff)
        if one.cosine < worst:
            worst, report.worst = one.cosine, name
        report.tensors += 1
    report.cosine = worst
    return report


def _compare(report: CheckReport, a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise CheckError(f"the outputs have shapes {tuple(a.shape)} (source) and {tuple(b.shape)} (bake)")
    if a.dtype == b.dtype and a.dtype in (torch.bool, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        report.max_abs_diff = 0.0 if torch.equal(a, b) else float("inf")
        report.cosine = 1.0 if torch.equal(a, b) else 0.0
        return
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    if torch.equal(a, b):
        return
    report.max_abs_diff = float((a - b).abs().max()) if a.numel() else 0.0
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        report.cosine = 0.0
        return
    report.cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=0)) if a.any() or b.any() else 1.0


def _model(path):
    import transformers

    transformers.utils.logging.disable_progress_bar()
    config = transformers.AutoConfig.from_pretrained(path)
    names = getattr(config, "architectures", None) or []
    cls = next((getattr(transformers, n) for n in names if hasattr(transformers, n)), None)
    if cls is None:
        raise CheckError(f"transformers has no model class for {names or config.model_type!r}", path)
    return cls.from_pretrained(path).eval()


def _outputs(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            out = model(input_ids=x, decoder_input_ids=x[:, : x.shape[1] // 2])
        else:
            out = model(input_ids=x)
    for key in ("logits", "last_hidden_state"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    return out[0]


def can_build(path: str | os.PathLike) -> bool:
    """Whether transformers can build the model at ``path`` (a folder with a known config.json)."""
    try:
        import transformers

        config = transformers.AutoConfig.from_pretrained(path)
    except Exception:  # no config, an unknown model_type, a config transformers cannot read
        return False
    return any(hasattr(transformers, n) for n in getattr(config, "architectures", None) or [])
