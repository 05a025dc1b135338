"""``convert()``: one checkpoint in, one finished bake out (or nothing at all)."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

import xxhash
from prebake.cache.manifest import MANIFEST_NAME, AliasEntry, Manifest
from prebake.convert import execute, output
from prebake.convert.plan import BakePlan, Options, plan_bake
from prebake.convert.sources import Source, component_folders, describe_source, open_source
from prebake.convert.variants import SpecError, add_variants, parse_named
from prebake.formats.safetensors_writer import is_padding

VERSION = "0.1.0"
GGUF_METADATA = "gguf_metadata.json"  # every GGUF key-value pair, long arrays included
SHORT_LIST = 64


def convert(src: str | os.PathLike, out: str | os.PathLike, options: Options | None = None, *,
            force: bool = False, progress=None, variants: list[str] = ()) -> Manifest:
    """Bakes the checkpoint at ``src`` into the folder ``out``.

    ``src`` is a checkpoint file, a model folder, or a folder of components (diffusers layout:
    ``text_encoder/``, ``vae/``, ``transformer/``... each a model folder), which bakes into one
    output whose manifest lists the components, each a bake of its own in its sub-folder.
    ``progress``, if given, is called once with the total bytes to write and returns the
    callable that is then fed each increment (a tqdm bar's ``update`` fits).
    ``variants`` are ``NAME=SPEC`` texts (see :mod:`prebake.convert.variants`).
    Returns the manifest that was written. Raises :class:`~prebake.formats.errors.PrebakeError`
    subclasses for bad input or an unwritable output; on any failure ``out`` is left as it was.

    >>> convert("pytorch_model.bin", "baked/")  # doctest: +SKIP
    """
    options = options or Options()
    out = Path(out)
    specs = [parse_named(v) for v in variants]  # bad specs fail before any work
    parts = component_folders(Path(src))
    if parts and specs:
        raise SpecError("variants apply to one model; add them to a component's folder instead")
    sources = {name: open_source(p) for name, p in parts.items()} if parts else {"": open_source(src)}
    plans = {name: plan_bake(s.tensors, options, s.skipped, s.stem) for name, s in sources.items()}
    update = progress(sum(p.total_bytes for p in plans.values())) if progress else (lambda n: None)
    tmp = output.start(out, force, Path(src), sum(p.total_bytes for p in plans.values()))
    try:
        if parts:
            manifest = _bake_components(Path(src), sources, plans, tmp, out, options, update)
        else:
            manifest = _bake_one(sources[""], plans[""], tmp, out, options, update, specs)
        output.commit(tmp, out)
    except BaseException:
        output.abort(tmp)
        raise
    return manifest


def _bake_one(source: Source, plan: BakePlan, folder: Path, root: Path, options: Options, update,
              specs) -> Manifest:
    """Writes one model's bake (shards, files, variants, index, manifest) into ``folder``."""
    shards, tensors, quantized = execute.write_shards(plan, folder, update)
    files = execute.copy_files(source.copy, folder)
    metadata = source.metadata
    if "gguf" in metadata:  # tokenizer arrays can hold 100k+ strings: keep them out of the manifest
        execute.write_json(folder / GGUF_METADATA, metadata["gguf"])
        files.append(execute.file_entry(folder / GGUF_METADATA))
        metadata = {**metadata, "gguf": {k: v for k, v in metadata["gguf"].items()
                                         if not isinstance(v, list) or len(v) <= SHORT_LIST}}
    manifest = Manifest(
        source=describe_source(source), options=options.manifest_record(), shards=shards, tensors=tensors,
        quantized=quantized,
        aliases={a.name: AliasEntry(a.target, a.storage_offset, list(a.shape), list(a.strides))
                 for a in plan.aliases},
        padding=[s.name for sh in plan.shards for s in sh.slots if is_padding(s.name)],
        files=files, skipped=[{"name": s.name, "kind": s.kind} for s in source.skipped],
        metadata=metadata, prebake_version=VERSION, created=_now(), root=root)
    if plan.quant_kept:
        manifest.metadata["quant_kept"] = plan.quant_kept
    add_variants(manifest, folder, specs)
    execute.write_json(folder / f"{source.stem}.safetensors.index.json", hf_index(manifest))
    execute.write_json(folder / MANIFEST_NAME, manifest.to_json())
    return manifest


def _bake_components(src: Path, sources: dict[str, Source], plans: dict[str, BakePlan], folder: Path,
                     root: Path, options: Options, update) -> Manifest:
    """Bakes each component into its sub-folder; copies the rest; writes the top manifest."""
    components = {}
    for name, source in sources.items():
        (folder / name).mkdir()
        m = _bake_one(source, plans[name], folder / name, root / name, options, update, [])
        components[name] = {"path": name, "tensors": len(m.tensors), "bytes": m.total_bytes,
                            "format": m.source["format"], "fingerprint": m.source["fingerprint"]}
    files = execute.copy_files(sorted(p for p in src.iterdir() if p.is_file() and not p.name.startswith(".")
                                      and p.name != MANIFEST_NAME), folder)
    for sub in sorted(p for p in src.iterdir() if p.is_dir() and p.name not in sources):
        files += execute.copy_tree(sub, folder)
    fingerprint = xxhash.xxh3_128("".join(c["fingerprint"] for c in components.values()).encode()).hexdigest()
    manifest = Manifest(
        source={"path": str(src.resolve()), "format": "components", "files": [], "fingerprint": fingerprint},
        options=options.manifest_record(), shards=[], tensors={}, files=files, components=components,
        prebake_version=VERSION, created=_now(), root=root)
    execute.write_json(folder / MANIFEST_NAME, manifest.to_json())
    return manifest


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def hf_index(m: Manifest) -> dict:
    """The Hugging Face ``model.safetensors.index.json`` for a bake (padding left out)."""
    return {"metadata": {"total_size": m.total_bytes, "format": "pt"},
            "weight_map": {name: m.shards[t.shard].file for name, t in m.tensors.items()}}
