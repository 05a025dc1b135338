"""The Hugging Face files of a bake: the shard index, and ``config.json``'s ``quantization_config``.

A bake of a Hugging Face model stays a Hugging Face checkpoint: ``model.safetensors.index.json``
maps every tensor to its shard, and where float weights were replaced by GGML blocks the
config says so (``quant_method: "prebake"``), so ``from_pretrained`` loads them packed through
:mod:`prebake.cache.hf`, or stops at the unknown method without it, never loading random weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from prebake.convert import execute
from prebake.formats import __version__
from prebake.formats.manifest import FileEntry, Manifest


def hf_index(m: Manifest) -> dict:
    """The ``model.safetensors.index.json`` of a bake: every tensor in the main shards (blocks
    kept beside float copies live in shards of their own and are left out)."""
    return {"metadata": {"total_size": sum(t.nbytes for t in m.tensors.values()), "format": "pt"},
            "weight_map": {name: m.shards[t.shard].file for name, t in m.tensors.items()}}


def quantization_config(m: Manifest) -> dict | None:
    """``config.json``'s ``quantization_config`` for a bake whose weights are blocks, else None."""
    modules: dict[str, list[str]] = {}
    for name, t in m.tensors.items():
        if t.qtype is not None:
            modules.setdefault(t.qtype, []).append(name.removesuffix(".weight"))
    if not modules:
        return None
    return {"quant_method": "prebake", "recipe": m.options.get("quant") or "gguf", "modules": modules,
            "prebake_version": __version__}


def mark_quantized(folder: Path, m: Manifest, files: list[FileEntry]) -> list[FileEntry]:
    """Adds ``quantization_config`` to the bake's copied ``config.json`` when it holds blocks;
    returns the file records with that file's checksum renewed."""
    qc = quantization_config(m)
    path = folder / "config.json"
    if qc is None or not path.exists():
        return files
    config = json.loads(path.read_text())
    config["quantization_config"] = qc
    execute.write_json(path, json.dumps(config, indent=2))
    return [execute.file_entry(path) if f.path == "config.json" else f for f in files]
