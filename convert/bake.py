"""``convert()``: one checkpoint in, one finished bake out (or nothing at all).

:func:`prepare` is the front end every conversion shares, ``--dry-run`` included: it finds
what ``src`` holds (one model, or a folder of components), reads every tensor's description,
checks the variant specs and plans each bake, all before a byte is written.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from prebake.convert import execute, output
from prebake.convert.hf_files import hf_index, mark_quantized
from prebake.convert.plan import BakePlan, Options, plan_bake
from prebake.convert.sources import Source, component_folders, describe_source, open_source
from prebake.convert.variants import VariantSpec, add_variants, parse_named
from prebake.formats import __version__
from prebake.formats.errors import PrebakeWarning, SpecError
from prebake.formats.manifest import MANIFEST_NAME, AliasEntry, Manifest, hasher
from prebake.formats.safetensors_writer import is_padding


@dataclass
class Prepared:
    """What a conversion of ``src`` will write: its sources, their plans, the variants asked for.

    ``sources``/``plans`` are keyed by component name, ``""`` for a single model.
    """

    src: Path
    components: bool
    sources: dict[str, Source]
    plans: dict[str, BakePlan]
    specs: list[tuple[str, VariantSpec]]

    @property
    def total_bytes(self) -> int:
        return sum(p.total_bytes for p in self.plans.values())

    def summary(self) -> dict:
        """A JSON-ready description of every plan (what ``--dry-run`` prints)."""
        plans = {name: plan.summary() for name, plan in self.plans.items()}
        if not self.components:
            return {"src": str(self.src), "bytes": self.total_bytes, **plans[""],
                    "variants": [name for name, _ in self.specs]}
        return {"src": str(self.src), "bytes": self.total_bytes, "components": plans}


def prepare(src: str | os.PathLike, options: Options, variants: list[str] = ()) -> Prepared:
    """Reads and plans the conversion of ``src``; writes nothing."""
    src = Path(src)
    specs = [parse_named(v) for v in variants]  # bad specs fail before any work
    parts = component_folders(src)
    if parts and specs:
        raise SpecError("variants apply to one model; add them to a component's folder instead")
    sources = {name: open_source(p, options.names, options.gguf_metadata) for name, p in parts.items()} if parts \
        else {"": open_source(src, options.names, options.gguf_metadata)}
    plans = {}
    for name, s in sources.items():
        plans[name] = plan_bake(s.tensors, options, s.skipped, s.stem, s.blocks_dtype)
        plans[name].warnings[:0] = s.notes
    return Prepared(src, bool(parts), sources, plans, specs)


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
    job = prepare(src, options, variants)
    for plan in job.plans.values():
        for message in plan.warnings:
            warnings.warn(message, PrebakeWarning, stacklevel=2)
    update = progress(job.total_bytes) if progress else (lambda n: None)
    with output.writing(out, force, job.src, job.total_bytes) as tmp:
        if job.components:
            return _bake_components(job, tmp, out, options, update)
        return _bake_one(job.sources[""], job.plans[""], tmp, out, options, update, job.specs)


def _bake_one(source: Source, plan: BakePlan, folder: Path, root: Path, options: Options, update,
              specs) -> Manifest:
    """Writes one model's bake (shards, files, variants, index, manifest) into ``folder``."""
    with ThreadPoolExecutor(1) as pool:  # a GGUF's config and tokenizer are made while the shards are written
        making = pool.submit(lambda: [path for write in source.writers for path in write(folder, plan)])
        shards, tensors = execute.write_shards(plan, folder, update)
        made = making.result()
    files = execute.copy_files(source.copy, folder)
    names = {p.name for p in made}
    files = [f for f in files if f.path not in names] + [execute.file_entry(p) for p in made]
    metadata = source.metadata
    manifest = Manifest(
        source=describe_source(source), options=options.manifest_record(), shards=shards, tensors=tensors,
        aliases={a.name: AliasEntry(a.target, a.storage_offset, list(a.shape), list(a.strides))
                 for a in plan.aliases},
        padding=[s.name for sh in plan.shards for s in sh.slots if is_padding(s.name)],
        files=files, skipped=[{"name": s.name, "kind": s.kind} for s in source.skipped],
        metadata=metadata, prebake_version=__version__, created=_now(), root=root)
    if plan.quant_notes:
        manifest.metadata["quant_notes"] = plan.quant_notes
    manifest.files = mark_quantized(folder, manifest, manifest.files)
    add_variants(manifest, folder, specs)
    execute.write_json(folder / f"{source.stem}.safetensors.index.json", hf_index(manifest))
    execute.write_json(folder / MANIFEST_NAME, manifest.to_json())
    return manifest


def _bake_components(job: Prepared, folder: Path, root: Path, options: Options, update) -> Manifest:
    """Bakes each component into its sub-folder; copies the rest; writes the top manifest."""
    components = {}
    for name, source in job.sources.items():
        (folder / name).mkdir()
        m = _bake_one(source, job.plans[name], folder / name, root / name, options, update, [])
        components[name] = {"path": name, "tensors": len(m.tensors), "bytes": m.total_bytes,
                            "format": m.source["format"], "fingerprint": m.source["fingerprint"]}
    src = job.src
    files = execute.copy_files(sorted(p for p in src.iterdir() if p.is_file() and not p.name.startswith(".")
                                      and p.name != MANIFEST_NAME), folder)
    for sub in sorted(p for p in src.iterdir() if p.is_dir() and p.name not in job.sources):
        files += execute.copy_tree(sub, folder)
    h = hasher()
    h.update("".join(c["fingerprint"] for c in components.values()).encode())
    manifest = Manifest(
        source={"path": str(src.resolve()), "format": "components", "files": [], "fingerprint": h.hexdigest()},
        options=options.manifest_record(), shards=[], tensors={}, files=files, components=components,
        prebake_version=__version__, created=_now(), root=root)
    execute.write_json(folder / MANIFEST_NAME, manifest.to_json())
    return manifest


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
