"""Variants: named views over a bake's shards that keep a subset of layers and experts.

A variant duplicates no tensor bytes: the manifest maps each of its tensor names to a stored
tensor (``{"source": name}``), or to rows of one (``{"source": name, "rows": [...]}``, a MoE
router keeping some experts' rows). Layers and experts are renumbered contiguously, so the
names are the ones a model built from the variant's ``config.json`` expects.

SPEC is ``key=value`` items joined by ``;``::

    first=2                 layers 0 and 1
    layers=0-3,22-23        those layers (renumbered 0..5)
    experts=0,3             MoE experts 0 and 3 (renumbered 0, 1), router rows too
    head=no                 leave the output head out (default: keep it)
    include=GLOB,GLOB       only tensors matching a glob (after layer selection)
    exclude=GLOB,GLOB       drop tensors matching a glob
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

from prebake.convert.order import FIRST_NUMBER, is_head, is_router, layer_of
from prebake.formats.errors import SpecError


@dataclass(frozen=True)
class VariantSpec:
    text: str
    layers: tuple[int, ...] | None = None  # None: every layer
    first: int | None = None
    experts: tuple[int, ...] | None = None
    head: bool = True
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()


@dataclass
class Variant:
    name: str
    spec: str
    tensors: dict[str, dict]  # variant name -> {"source": stored name, "rows"?: [...]}
    layers: list[int]  # original layer numbers kept, in order
    experts: list[int] | None
    config: dict | None = None  # the variant's config.json, when the bake has one
    bytes: int = 0
    files: list[str] = field(default_factory=list)


def _ints(text: str) -> tuple[int, ...]:
    out: list[int] = []
    for part in filter(None, text.split(",")):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise SpecError(f"not a number or range: {part!r}")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise SpecError(f"empty range {part!r}")
        out.extend(range(lo, hi + 1))
    return tuple(dict.fromkeys(out))


def parse_spec(text: str) -> VariantSpec:
    """Parses SPEC (see the module docstring)."""
    kw: dict = {}
    for item in filter(None, (s.strip() for s in text.split(";"))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise SpecError(f"variant spec item {item!r} is not key=value")
        if key == "layers":
            kw["layers"] = _ints(value)
        elif key == "first":
            kw["first"] = int(value) if value.strip().isdigit() else _bad(item)
        elif key == "experts":
            kw["experts"] = _ints(value)
        elif key == "head":
            kw["head"] = value.strip().lower() in ("yes", "true", "1", "on")
        elif key in ("include", "exclude"):
            kw[key] = tuple(p.strip() for p in value.split(",") if p.strip())
        else:
            raise SpecError(f"unknown variant spec key {key!r} (layers, first, experts, head, include, exclude)")
    if "layers" in kw and "first" in kw:
        raise SpecError("give layers= or first=, not both")
    return VariantSpec(text, **kw)


def _bad(item: str):
    raise SpecError(f"bad variant spec item {item!r}")


def parse_named(text: str) -> tuple[str, VariantSpec]:
    """``NAME=SPEC`` -> (name, spec)."""
    name, sep, spec = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise SpecError(f"expected NAME=SPEC with a simple NAME, got {text!r}")
    return name, parse_spec(spec)


_EXPERT = re.compile(r"\.experts\.(\d+)(?=\.)")
_STACKED_EXPERTS = re.compile(r"(_exps\.(weight|bias)$|\.experts\.[a-z_]+$)")
LAYER_KEYS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "num_decoder_layers",
              "num_encoder_layers", "num_single_layers", "encoder_layers", "decoder_layers")
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
TOP_K_KEYS = ("num_experts_per_tok", "moe_topk", "top_k")


def plan_variant(name: str, spec: VariantSpec, shapes: dict[str, list[int]], config: dict | None = None,
                 nbytes: dict[str, int] | None = None) -> Variant:
    """Which stored tensor (or rows of one) each name of the variant maps to.

    ``shapes`` holds every tensor name of the bake (aliases included) and its shape.
    """
    stacks: dict[str, set[int]] = {}
    for n in shapes:
        layer = layer_of(n)
        if layer is not None:
            stacks.setdefault(layer[0], set()).add(layer[1][0])
    renumber = {stack: _select_layers(sorted(found), spec) for stack, found in stacks.items()}
    experts = _expert_count(shapes, config)
    keep = _select_experts(spec, experts)
    tensors: dict[str, dict] = {}
    for n, shape in shapes.items():
        new = _rename(n, renumber, keep)
        if new is None or (not spec.head and is_head(n)) or not _globs_allow(n, spec):
            continue
        entry: dict = {"source": n}
        if keep is not None and shape and shape[0] == experts and (is_router(n) or _STACKED_EXPERTS.search(n)):
            entry["rows"] = list(keep)
        tensors[new] = entry
    if not tensors:
        raise SpecError(f"variant {name!r} ({spec.text}) selects no tensor")
    kept_layers = sorted({old for m in renumber.values() for old in m}) if renumber else []
    variant = Variant(name, spec.text, tensors, kept_layers, list(keep) if keep is not None else None)
    if nbytes:
        variant.bytes = sum(nbytes.get(e["source"], 0) * (len(e["rows"]) / shapes[e["source"]][0] if "rows" in e else 1)
                            for e in tensors.values())
        variant.bytes = int(variant.bytes)
    if config is not None:
        variant.config = variant_config(config, {s: (len(found), len(renumber[s])) for s, found in stacks.items()},
                                        renumber, experts, keep)
        if isinstance(config, _GGUFConfig):
            variant.config = {config.gguf_keys[k]: v for k, v in variant.config.items()}
    return variant


def _select_layers(found: list[int], spec: VariantSpec) -> dict[int, int]:
    """old layer number -> new number, for one stack."""
    if spec.first is not None:
        chosen = [n for n in found if n < spec.first]
    elif spec.layers is not None:
        missing = [n for n in spec.layers if n not in found]
        if missing:
            raise SpecError(f"layers {missing} are not in the model (it has layers {found[0]}-{found[-1]})")
        chosen = sorted(spec.layers)
    else:
        chosen = found
    return {old: new for new, old in enumerate(chosen)}


def _expert_count(shapes: dict[str, list[int]], config: dict | None) -> int | None:
    numbered = [int(m.group(1)) for n in shapes for m in [_EXPERT.search(n)] if m]
    if numbered:
        return max(numbered) + 1
    for key in EXPERT_KEYS:
        if config and isinstance(config.get(key), int):
            return config[key]
    stacked = [s[0] for n, s in shapes.items() if _STACKED_EXPERTS.search(n) and s]
    return stacked[0] if stacked else None


def _select_experts(spec: VariantSpec, experts: int | None) -> tuple[int, ...] | None:
    if spec.experts is None:
        return None
    if experts is None:
        raise SpecError("experts= given but the model has no experts")
    bad = [e for e in spec.experts if e >= experts]
    if bad:
        raise SpecError(f"experts {bad} are not in the model (it has {experts})")
    return tuple(sorted(spec.experts))


def _rename(name: str, renumber: dict[str, dict[int, int]], keep: tuple[int, ...] | None) -> str | None:
    """The variant's name for ``name``: layer and expert renumbered; None if it is left out."""
    m = FIRST_NUMBER.search(name)
    if m is not None:
        new = renumber[name[:m.start()]].get(int(m.group(1)))
        if new is None:
            return None
        name = f"{name[:m.start(1)]}{new}{name[m.end(1):]}"
    m = _EXPERT.search(name)
    if m and keep is not None:
        expert = int(m.group(1))
        if expert not in keep:
            return None
        name = f"{name[:m.start(1)]}{keep.index(expert)}{name[m.end(1):]}"
    return name


def _globs_allow(name: str, spec: VariantSpec) -> bool:
    if spec.include and not any(fnmatch.fnmatchcase(name, g) for g in spec.include):
        return False
    return not any(fnmatch.fnmatchcase(name, g) for g in spec.exclude)


def variant_config(config: dict, counts: dict[str, tuple[int, int]], renumber: dict[str, dict[int, int]],
                   experts: int | None, keep: tuple[int, ...] | None) -> dict:
    """The model config with layer and expert counts (and per-layer lists) cut to the variant."""
    out = dict(config)
    by_count = {old: (new, stack) for stack, (old, new) in counts.items()}
    for key in LAYER_KEYS:
        if isinstance(out.get(key), int) and out[key] in by_count:
            out[key] = by_count[out[key]][0]
    for key, value in config.items():  # per-layer lists, e.g. layer_types
        if isinstance(value, list) and len(value) in by_count and key not in LAYER_KEYS:
            kept = sorted(renumber[by_count[len(value)][1]])
            out[key] = [value[i] for i in kept]
    if keep is not None:
        for key in EXPERT_KEYS:
            if isinstance(out.get(key), int) and out[key] == experts:
                out[key] = len(keep)
        for key in TOP_K_KEYS:
            if isinstance(out.get(key), int):
                out[key] = min(out[key], len(keep))
    return out


def add_variants(manifest, folder, specs: list[tuple[str, VariantSpec]]) -> None:
    """Plans each variant over ``manifest``'s tensors, writes its config, records it in the manifest.

    ``folder`` is where the bake's files are (the manifest's folder, or the temporary one of a
    conversion under way). Nothing is written to the shards.
    """
    import json
    from pathlib import Path

    from prebake.convert.execute import write_json

    folder = Path(folder)
    shapes = {n: t.shape for n, t in manifest.tensors.items()}  # every tensor, whatever form its bytes take
    shapes.update({n: a.shape for n, a in manifest.aliases.items()})
    nbytes = {n: t.nbytes for n, t in manifest.tensors.items()}
    nbytes.update({n: manifest.tensors[a.target].nbytes for n, a in manifest.aliases.items()})
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else None
    gguf = manifest.metadata.get("gguf")
    if config is None and gguf:  # GGUF keeps its config in metadata: {arch}.block_count, ...
        config = gguf_config(gguf)
    for name, spec in specs:
        v = plan_variant(name, spec, shapes, config, nbytes)
        if v.config is not None:
            _cut_quantization_config(v)
        record = {"spec": v.spec, "layers": v.layers, "experts": v.experts, "bytes": v.bytes,
                  "tensors": v.tensors}
        if v.config is not None:
            rel = f"variants/{name}/{'gguf_metadata' if gguf and not config_path.exists() else 'config'}.json"
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            write_json(folder / rel, v.config)
            record["config"] = rel
        manifest.variants[name] = record


def _cut_quantization_config(v: Variant) -> None:
    """A variant's ``quantization_config`` lists its own packed modules, under their new names."""
    qc = v.config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "prebake":
        return
    qtypes = {m: q for q, names in qc.get("modules", {}).items() for m in names}
    modules: dict[str, list[str]] = {}
    for new, e in v.tensors.items():
        qtype = qtypes.get(e["source"].removesuffix(".weight"))
        if qtype is not None and "rows" not in e:
            modules.setdefault(qtype, []).append(new.removesuffix(".weight"))
    v.config["quantization_config"] = {**qc, "modules": modules}


def gguf_config(metadata: dict) -> dict:
    """The GGUF counts a variant changes, under the config keys plan_variant knows.

    ``variant_config`` cuts num_hidden_layers / num_local_experts / num_experts_per_tok; they are
    written back under their GGUF names ({arch}.block_count, .expert_count, .expert_used_count).
    """
    arch = metadata.get("general.architecture", "llama")
    keys = {"num_hidden_layers": f"{arch}.block_count", "num_local_experts": f"{arch}.expert_count",
            "num_experts_per_tok": f"{arch}.expert_used_count"}
    return _GGUFConfig({k: metadata[g] for k, g in keys.items() if isinstance(metadata.get(g), int)}, keys)


class _GGUFConfig(dict):
    """A config dict that remembers the GGUF key of each entry (see :func:`gguf_config`)."""

    def __init__(self, values: dict, keys: dict):
        super().__init__(values)
        self.gguf_keys = keys


def add_variant_to_bake(out, text: str) -> dict:
    """``prebake variant add OUT NAME=SPEC``: a new variant on an existing bake (manifest rewritten atomically)."""
    from prebake.convert.execute import write_json
    from prebake.formats.manifest import MANIFEST_NAME, read_manifest

    name, spec = parse_named(text)
    m = read_manifest(out)
    add_variants(m, m.root, [(name, spec)])
    write_json(m.root / MANIFEST_NAME, m.to_json())
    return m.variants[name]
