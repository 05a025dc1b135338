"""The manifest: the one description of a bake that the run-time side needs.

``OUT/manifest.json`` is written last and atomically. Schema (version 1)::

    {
      "format": "prebake", "version": 1, "prebake_version": "0.1.0", "created": "<UTC ISO time>",
      "checksum": "xxh3_128",
      "source": {"path": ..., "format": "torch-zip" | "torch-legacy" | "safetensors" | "gguf" | "hf-folder",
                 "files": [{"path", "size", "mtime_ns", "fingerprint"}], "fingerprint": "<hex>"},
      "options": {"shard_size", "align", "dtype"},
      "shards": [{"file", "size", "data_offset"}],
      "tensors": {name: {"dtype", "shape", "shard", "offset", "nbytes", "checksum", "source_dtype"?}},
      "aliases": {name: {"target", "storage_offset", "shape", "strides"}},
      "quantized": {name: {"qtype", "shape", "dtype", "shard", "offset", "nbytes", "checksum"}},
                                                        # GGML blocks (U8 in their own shards); shape
                                                        # and dtype are the logical tensor's
      "padding": [names of padding entries, which loaders skip],
      "files": [{"path", "size", "checksum"}],          # config.json, tokenizer, ... copied as they are
      "skipped": [{"name", "kind"}],                    # non-tensor leaves of pickled checkpoints
      "metadata": {...},                                # e.g. GGUF key-value metadata
      "variants": {name: {"spec", "layers", "experts", "bytes", "config"?,
                          "tensors": {variant name: {"source": stored name, "rows"?: [...]}}}},
      "components": {name: {"path", "tensors", "bytes"}}  # sub-folders, each a bake of its own
    }

``offset`` is the absolute byte offset of the tensor in its shard file; ``tensors`` is in
layout (execution) order. Later versions add keys (quantized blobs, variants, components);
readers ignore keys they do not know and refuse a newer major ``version``.

Why xxh3-128: verification should run at disk speed. XXH3 hashes at tens of GB/s on one core,
far above any disk, and 128 bits make an accidental match impossible in practice. The checksum
guards against corruption (bit rot, truncated copies), not tampering, so a cryptographic hash
(BLAKE3, ~1-3 GB/s per core) would only slow verification down.
"""

from __future__ import annotations

import json
import os
from collections import namedtuple
from pathlib import Path

MANIFEST_NAME = "manifest.json"
FORMAT = "prebake"
VERSION = 1
CHECKSUM = "xxh3_128"


# Entries are plain namedtuples and Manifest a plain class: immutable records, and several times
# cheaper to define at import than dataclasses or typing.NamedTuple, which matters on the load
# path of a process that should be serving a few milliseconds after it starts.
TensorEntry = namedtuple("TensorEntry", "dtype shape shard offset nbytes checksum source_dtype", defaults=(None,))
TensorEntry.__doc__ = "A stored tensor: dtype, shape, shard index, absolute offset, size, checksum."
QuantEntry = namedtuple("QuantEntry", "qtype shape dtype shard offset nbytes checksum")
QuantEntry.__doc__ = "GGML blocks of a tensor: shape and dtype are the logical tensor's, the rest the blob's."
AliasEntry = namedtuple("AliasEntry", "target storage_offset shape strides")
AliasEntry.__doc__ = "A view of a stored tensor (tied weights, slices): offset and strides in elements."
ShardEntry = namedtuple("ShardEntry", "file size data_offset")
FileEntry = namedtuple("FileEntry", "path size checksum")


class Manifest:
    """A bake's description (see the module docstring for the JSON schema)."""

    def __init__(self, source: dict, options: dict, shards: list, tensors: dict, *, aliases=None, quantized=None,
                 padding=None, files=None, skipped=None, metadata=None, variants=None, components=None,
                 prebake_version: str = "0.1.0", created: str = "", checksum: str = CHECKSUM,
                 root: Path | None = None):
        self.source, self.options, self.shards, self.tensors = source, options, shards, tensors
        self.aliases: dict[str, AliasEntry] = aliases or {}
        self.quantized: dict[str, QuantEntry] = quantized or {}
        self.padding: list[str] = padding or []
        self.files: list[FileEntry] = files or []
        self.skipped: list[dict] = skipped or []
        self.metadata: dict = metadata or {}
        self.variants: dict[str, dict] = variants or {}
        self.components: dict[str, dict] = components or {}
        self.prebake_version, self.created, self.checksum = prebake_version, created, checksum
        self.root = root  # the folder the manifest was read from; not serialized

    def to_json(self) -> str:
        d = {"format": FORMAT, "version": VERSION, "prebake_version": self.prebake_version,
             "created": self.created, "checksum": self.checksum, "source": self.source,
             "options": self.options, "shards": [s._asdict() for s in self.shards],
             "tensors": {k: _compact(v._asdict()) for k, v in self.tensors.items()},
             "aliases": {k: v._asdict() for k, v in self.aliases.items()},
             "quantized": {k: v._asdict() for k, v in self.quantized.items()},
             "padding": self.padding, "files": [f._asdict() for f in self.files],
             "skipped": self.skipped, "metadata": self.metadata, "variants": self.variants,
             "components": self.components}
        return json.dumps(d, separators=(",", ":"))  # compact: parsed at every load

    def shard_path(self, index: int) -> Path:
        return self.root / self.shards[index].file

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values()) + sum(q.nbytes for q in self.quantized.values())


def _compact(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


def manifest_path(path: str | os.PathLike) -> Path:
    """``path`` may be a bake folder or its manifest file."""
    p = Path(path)
    return p / MANIFEST_NAME if p.is_dir() else p


def is_bake(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a finished bake (a manifest of ours)."""
    try:
        with open(Path(folder) / MANIFEST_NAME) as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _error(message: str, path: Path):
    # Imported here, not at the top: every load goes through this module, and each module
    # imported costs a process start most of a millisecond.
    from prebake.formats.errors import ManifestError

    return ManifestError(message, path)


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Reads and checks a manifest; ``path`` is the bake folder or its ``manifest.json``."""
    mp = manifest_path(path)
    try:
        with open(mp) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise _error("no manifest.json here: is this a prebake output folder?", mp) from None
    except (OSError, ValueError) as e:
        raise _error(f"cannot read manifest ({e})", mp) from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise _error("not a prebake manifest", mp)
    if not isinstance(d.get("version"), int) or d["version"] > VERSION:
        raise _error(f"manifest version {d.get('version')} is newer than this prebake "
                            f"understands ({VERSION}); upgrade prebake", mp)
    try:
        return Manifest(
            source=d["source"], options=d["options"],
            shards=[ShardEntry(**s) for s in d["shards"]],
            tensors={k: TensorEntry(**v) for k, v in d["tensors"].items()},
            aliases={k: AliasEntry(**v) for k, v in d.get("aliases", {}).items()},
            quantized={k: QuantEntry(**v) for k, v in d.get("quantized", {}).items()},
            padding=d.get("padding", []), files=[FileEntry(**f) for f in d.get("files", [])],
            skipped=d.get("skipped", []), metadata=d.get("metadata", {}),
            variants=d.get("variants", {}), components=d.get("components", {}),
            prebake_version=d.get("prebake_version", ""), created=d.get("created", ""),
            checksum=d.get("checksum", CHECKSUM), root=mp.parent)
    except (KeyError, TypeError) as e:
        raise _error(f"malformed manifest ({type(e).__name__}: {e})", mp) from None
