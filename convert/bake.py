"""``convert()``: one checkpoint in, one finished bake out (or nothing at all).

The front end (:func:`~prebake.convert.prepare.prepare`) reads and plans; this module writes.
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
from prebake.convert.plan import BakePlan, Options
from prebake.convert.prepare import Prepared, prepare
from prebake.convert.sources import Source, describe_source
from prebake.convert.variants import add_variants
from prebake.formats import __version__
from prebake.formats.errors import PrebakeWarning
from prebake.formats.manifest import MANIFEST_NAME, WHOLE, AliasEntry, Manifest, hasher
from prebake.formats.safetensors_writer import is_padding


def convert(src: str | os.PathLike, out: str | os.PathLike, options: Options | None = None, *,
            force: bool = False, progress=None, variants: list[str] = (), workers: int | None = None,
            ray: str | bool | None = None) -> Manifest:
    """Bakes the checkpoint at ``src`` into the folder ``out``.

    ``src`` is a checkpoint file, a model folder, or a folder of components (diffusers layout:
    ``text_encoder/``, ``vae/``, ``transformer/``... each a model folder), which bakes into one
    output whose manifest lists the components, each a bake of its own in its sub-folder.
    ``progress``, if given, is called once with the total bytes to write and returns the
    callable that is then fed each increment (a tqdm bar's ``update`` fits).
    ``variants`` are ``NAME=SPEC`` texts (see :mod:`prebake.convert.variants`).
    ``workers``: threads doing the work (default: the cores this process may use); the bake's
    bytes are the same whatever the number. ``ray``: do the work as tasks on a Ray cluster
    instead (``True`` or ``"auto"``: ``ray.init()``'s default, a local Ray when none runs; an
    address: that cluster); ``src`` and ``out`` must then be on storage every node sees.
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
    run = Run(update, workers, _ray_runner(src, options, ray) if ray else None)
    with output.writing(out, force, job.src, job.total_bytes) as tmp:
        if job.components:
            return _bake_components(job, tmp, out, options, run)
        return _bake_one(job.sources[""], job.plans[""], tmp, out, options, run, job.specs)


@dataclass
class Run:
    """How the shards get written: progress, local workers, or a runner elsewhere (Ray)."""

    progress: object
    workers: int | None = None
    runner: object = None

    def write_shards(self, plan: BakePlan, folder: Path, component: str = ""):
        runner = self.runner(component) if self.runner else None
        return execute.write_shards(plan, folder, self.progress, self.workers, runner)


def _ray_runner(src, options: Options, address):
    from prebake.convert.ray_runner import ray_runner

    return lambda component: ray_runner(Path(src), options, component, address)


def _bake_one(source: Source, plan: BakePlan, folder: Path, root: Path, options: Options, run: Run,
              specs, component: str = "") -> Manifest:
    """Writes one model's bake (shards, files, variants, index, manifest) into ``folder``."""
    # a GGUF's tokenizer and config are made in a thread beside the shards; on this project's 2-core
    # machines that is measured no sooner than one after the other (the 0.3 s of Python of a 152k-token
    # tokenizer and the shards' kernel copies share the cores), and no later
    with ThreadPoolExecutor(1) as pool:
        making = pool.submit(lambda: [path for write in source.writers for path in write(folder, plan)])
        shards, tensors = run.write_shards(plan, folder, component)
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
        metadata=metadata, prebake_version=__version__, created=_now(), checksum=f"{WHOLE}/{options.piece}",
        root=root)
    if plan.quant_notes:
        manifest.metadata["quant_notes"] = plan.quant_notes
    if plan.tp_notes:
        manifest.metadata["tp_notes"] = plan.tp_notes
    manifest.files = mark_quantized(folder, manifest, manifest.files)
    add_variants(manifest, folder, specs)
    execute.write_json(folder / f"{source.stem}.safetensors.index.json", hf_index(manifest))
    execute.write_json(folder / MANIFEST_NAME, manifest.to_json())
    return manifest


def _bake_components(job: Prepared, folder: Path, root: Path, options: Options, run: Run) -> Manifest:
    """Bakes each component into its sub-folder; copies the rest; writes the top manifest."""
    components = {}
    for name, source in job.sources.items():
        (folder / name).mkdir()
        m = _bake_one(source, job.plans[name], folder / name, root / name, options, run, [], name)
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
