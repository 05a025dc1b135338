"""``convert()``: one checkpoint in, one finished bake out (or nothing at all)."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

from prebake.cache.manifest import MANIFEST_NAME, AliasEntry, Manifest
from prebake.convert import execute, output
from prebake.convert.plan import Options, plan_bake
from prebake.convert.sources import describe_source, open_source
from prebake.formats.safetensors_writer import is_padding

VERSION = "0.1.0"
GGUF_METADATA = "gguf_metadata.json"  # every GGUF key-value pair, long arrays included
SHORT_LIST = 64


def convert(src: str | os.PathLike, out: str | os.PathLike, options: Options | None = None, *,
            force: bool = False, progress=None) -> Manifest:
    """Bakes the checkpoint at ``src`` (file or model folder) into the folder ``out``.

    ``progress``, if given, is called once with the total bytes to write and returns the
    callable that is then fed each increment (a tqdm bar's ``update`` fits).
    Returns the manifest that was written. Raises :class:`~prebake.formats.errors.PrebakeError`
    subclasses for bad input or an unwritable output; on any failure ``out`` is left as it was.

    >>> convert("pytorch_model.bin", "baked/")  # doctest: +SKIP
    """
    options = options or Options()
    out = Path(out)
    source = open_source(src)
    plan = plan_bake(source.tensors, options, source.skipped)
    update = progress(plan.total_bytes) if progress else (lambda n: None)
    tmp = output.start(out, force)
    try:
        shards, tensors = execute.write_shards(plan, tmp, update)
        files = execute.copy_files(source.copy, tmp)
        metadata = source.metadata
        if "gguf" in metadata:  # tokenizer arrays can hold 100k+ strings: keep them out of the manifest
            execute.write_json(tmp / GGUF_METADATA, metadata["gguf"])
            files.append(execute.file_entry(tmp / GGUF_METADATA))
            metadata = {**metadata, "gguf": {k: v for k, v in metadata["gguf"].items()
                                             if not isinstance(v, list) or len(v) <= SHORT_LIST}}
        manifest = Manifest(
            source=describe_source(source),
            options={"shard_size": options.shard_size, "align": options.align, "dtype": options.dtype},
            shards=shards, tensors=tensors,
            aliases={a.name: AliasEntry(a.target, a.storage_offset, list(a.shape), list(a.strides))
                     for a in plan.aliases},
            padding=[s.name for sh in plan.shards for s in sh.slots if is_padding(s.name)],
            files=files, skipped=[{"name": s.name, "kind": s.kind} for s in source.skipped],
            metadata=metadata, prebake_version=VERSION,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"), root=out)
        execute.write_json(tmp / "model.safetensors.index.json", hf_index(manifest))
        execute.write_json(tmp / MANIFEST_NAME, manifest.to_json())
        output.commit(tmp, out)
    except BaseException:
        output.abort(tmp)
        raise
    return manifest


def hf_index(m: Manifest) -> dict:
    """The Hugging Face ``model.safetensors.index.json`` for a bake (padding left out)."""
    return {"metadata": {"total_size": m.total_bytes, "format": "pt"},
            "weight_map": {name: m.shards[t.shard].file for name, t in m.tensors.items()}}
