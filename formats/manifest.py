"""The manifest: the one description of a bake that the run-time side needs.

``OUT/manifest.json`` is written last and atomically. Schema (version 2)::

    {
      "format": "prebake", "version": 2, "prebake_version": "0.2.0", "created": "<UTC ISO time>",
      "checksum": "xxh3_128",
      "source": {"path": ..., "format": "torch-zip" | "torch-legacy" | "safetensors" | "gguf" | "hf-folder",
                 "files": [{"path", "size", "mtime_ns", "fingerprint"}], "fingerprint": "<hex>"},
      "options": {"shard_size", "align", "dtype", "quant"?, ...},
      "shards": [{"file", "size", "data_offset"}],
      "tensors": {"name": [...], "dtype": [...], "shape": [...], "shard": [...], "offset": [...],
                  "nbytes": [...], "checksum": [...],                  # a column per field, a row
                  "qtype"?: [...], "source_dtype"?: [...],             # per tensor; optional ones
                  "packed"?: [null | {"qtype", "shard", "offset", "nbytes", "checksum"}, ...],
                  "tp"?: [null | "column" | "row" | "row:N" | "vocab", ...],
                  "source_name"?: [null | "<the source's name>", ...]},
      "aliases": {name: {"target", "storage_offset", "shape", "strides"}},
      "padding": [names of padding entries, which loaders skip],
      "files": [{"path", "size", "checksum"}],          # config.json, tokenizer, ... copied as they are
      "skipped": [{"name", "kind"}],                    # non-tensor leaves of pickled checkpoints
      "metadata": {...},                                # e.g. GGUF key-value metadata
      "variants": {name: {"spec", "layers", "experts", "bytes", "config"?,
                          "tensors": {variant name: {"source": stored name, "rows"?: [...]}}}},
      "components": {name: {"path", "tensors", "bytes"}}  # sub-folders, each a bake of its own
    }

One record per tensor, in execution order (the order a forward pass touches them, whatever
shard each is in), kept as a table of columns: a JSON object per tensor costs a starting
process several times more to parse than the same fields as lists (220 ms against 10-30 ms for
7,720 expert tensors, most of it allocating the objects). A record says what the tensor means (``shape`` and ``dtype``, the logical
ones), where its bytes are (``shard``, ``offset``: absolute in the shard file, ``nbytes``,
``checksum``) and what they are: ``dtype`` items, or GGML blocks of ``qtype`` (stored ``U8``,
``(rows, bytes per row)``). ``packed`` is a second form of the same tensor, GGML blocks kept
beside its float bytes (``--keep-float``). ``source_dtype`` is the dtype (or GGML type) the
source held when the bake changed it; ``source_name`` the tensor's name in the source when the
bake renamed it (a GGUF's ``blk.0.attn_q.weight`` under its Hugging Face name). ``tp`` says how tensor-parallel ranks split the tensor
(:mod:`prebake.formats.tp_layout`); ``row:N`` means its bytes are stored as N column blocks one
after another, ``(N, rows, columns / N)`` (``--tp-layout N``), so each rank's slice is one range. Readers ignore keys they do not know and refuse a newer
``version``; version-1 manifests (separate ``tensors`` and ``quantized`` maps) are read into
this form.

A manifest is input like any other: :func:`read_manifest` checks every field (types, ranges,
paths that stay inside the bake after resolving symlinks, byte ranges inside their shards,
aliases inside their targets) and raises :class:`ManifestError` naming the entry otherwise.

Checksums (``"checksum": "xxh3_128/16777216"``: the hash and the piece size P): a byte range
of at most P bytes has the XXH3-128 of its bytes; a longer one the XXH3-128 of the concatenated
16-byte digests of its P-byte pieces (the last one shorter), in order. Pieces can be made, written and
checked by different workers, in any order, and a reader can check each as it passes.
Version-1 manifests (``"xxh3_128"``) hash every range whole.

Why xxh3-128: verification should run at disk speed. XXH3 hashes at tens of GB/s on one core,
far above any disk, and 128 bits make an accidental match impossible in practice. The checksum
guards against corruption (bit rot, truncated copies), not tampering, so a cryptographic hash
(BLAKE3, ~1-3 GB/s per core) would only slow verification down.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from prebake.formats.errors import ManifestError
from prebake.formats.manifest_checks import check_manifest
from prebake.formats.manifest_records import (  # noqa: F401  (the schema's records, importable from here)
    COLUMNS,
    AliasEntry,
    Blob,
    FileEntry,
    PackedForm,
    ShardEntry,
    TensorEntry,
)

MANIFEST_NAME = "manifest.json"
FORMAT = "prebake"
VERSION = 2
WHOLE = "xxh3_128"  # version 1's: every range hashed whole
PIECE = 16 << 20  # bytes per checksum piece; also bytes hashed per call (full speed, still cached)
CHECKSUM = f"{WHOLE}/{PIECE}"
BLOCK = PIECE

class Manifest:
    """A bake's description (see the module docstring for the JSON schema)."""

    def __init__(self, source: dict, options: dict, shards: list, tensors: dict, *, aliases=None,
                 padding=None, files=None, skipped=None, metadata=None, variants=None, components=None,
                 prebake_version: str = "", created: str = "", checksum: str = CHECKSUM,
                 root: Path | None = None):
        self.source, self.options, self.shards = source, options, shards
        self.tensors: dict[str, TensorEntry] = tensors
        self.aliases: dict[str, AliasEntry] = aliases or {}
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
             "tensors": _table(self.tensors),
             "aliases": {k: v._asdict() for k, v in self.aliases.items()},
             "padding": self.padding, "files": [f._asdict() for f in self.files],
             "skipped": self.skipped, "metadata": self.metadata, "variants": self.variants,
             "components": self.components}
        return json.dumps(d, separators=(",", ":"))  # compact: parsed at every load

    def shard_path(self, index: int) -> Path:
        return self.root / self.shards[index].file

    def blobs(self) -> Iterator[tuple[str, Blob]]:
        """Every stored byte range with the tensor it belongs to: float bytes and packed forms."""
        for name, t in self.tensors.items():
            yield name, Blob(t.shard, t.offset, t.nbytes, t.checksum, "U8" if t.qtype else t.dtype, t.qtype)
            if t.packed is not None:
                p = t.packed
                yield name, Blob(p.shard, p.offset, p.nbytes, p.checksum, "U8", p.qtype)

    @property
    def total_bytes(self) -> int:
        return sum(b.nbytes for _, b in self.blobs())


def _table(tensors: dict[str, TensorEntry]) -> dict[str, list]:
    """The tensor records as columns; an optional column that is all null is left out."""
    rows = [(name, *(t._replace(packed=t.packed._asdict()) if t.packed is not None else t)) for name, t in tensors.items()]
    columns = [list(col) for col in zip(*rows, strict=True)] if rows else [[] for _ in COLUMNS]
    return {c: v for c, v in zip(COLUMNS, columns, strict=True)
            if c in COLUMNS[:7] or any(x is not None for x in v)}


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


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Reads and checks a manifest; ``path`` is the bake folder or its ``manifest.json``.

    Raises :class:`ManifestError` naming the entry at the first field that is not what the
    schema says, or that points outside the bake.
    """
    mp = manifest_path(path)
    if os.path.realpath(mp) != os.path.join(os.path.realpath(mp.parent), mp.name):
        raise ManifestError(f"is a link to {os.path.realpath(mp)}: a bake's manifest is a file of its own", mp)
    try:
        with open(mp, "rb") as f:
            d = json.loads(f.read())
    except FileNotFoundError:
        raise ManifestError("no manifest.json here: is this a prebake output folder?", mp) from None
    except (OSError, ValueError, RecursionError) as e:
        raise ManifestError(f"cannot read manifest ({type(e).__name__}: {e})", mp) from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise ManifestError("not a prebake manifest", mp)
    version = d.get("version")
    if type(version) is not int or version < 1:
        raise ManifestError(f"manifest version {version!r} is not a version number", mp)
    if version > VERSION:
        raise ManifestError(f"manifest version {version} is newer than this prebake understands ({VERSION}); "
                            "upgrade prebake", mp)
    if version == 1:
        d = _from_version_1(d, mp)
    return check_manifest(d, mp, _build)


def read_component(m: Manifest, name: str) -> Manifest:
    """The manifest of the component ``name`` of ``m`` (a bake of several models)."""
    if name not in m.components:
        from prebake.formats.errors import NotInBakeError

        raise NotInBakeError(f"no component {name!r} (the bake has {sorted(m.components) or 'none'})", m.root)
    sub = read_manifest(m.root / m.components[name]["path"])
    if sub.components:
        raise ManifestError(f"component {name!r} holds components itself; a bake nests one level only", m.root)
    return sub


def _build(d: dict, root: Path, tensors: dict[str, TensorEntry]) -> Manifest:
    """The Manifest of a dict that :func:`check_manifest` has checked, with its tensor records."""
    return Manifest(
        source=d["source"], options=d["options"], shards=[_record(ShardEntry, s) for s in d["shards"]],
        tensors=tensors, aliases={k: _record(AliasEntry, v) for k, v in d.get("aliases", {}).items()},
        padding=d.get("padding", []), files=[_record(FileEntry, f) for f in d.get("files", [])],
        skipped=d.get("skipped", []), metadata=d.get("metadata", {}), variants=d.get("variants", {}),
        components=d.get("components", {}), prebake_version=d.get("prebake_version", ""),
        created=d.get("created", ""), checksum=d.get("checksum", CHECKSUM), root=root)


def _record(kind, d: dict):
    """A record from its JSON object; keys a later prebake may add are left out."""
    return kind(*(d[f] for f in kind._fields))


def _from_version_1(d: dict, mp: Path) -> dict:
    """A version-1 manifest (float ``tensors`` and GGML ``quantized`` apart) in the version-2 form."""
    tensors, quantized = d.get("tensors"), d.get("quantized", {})
    if not isinstance(tensors, dict) or not isinstance(quantized, dict):
        raise ManifestError("malformed version-1 manifest (tensors or quantized is not an object)", mp)
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in tensors.items()}
    for name, q in quantized.items():
        if not isinstance(q, dict):
            raise ManifestError(f"malformed version-1 manifest (quantized {name!r} is not an object)", mp)
        form = {k: q.get(k) for k in ("qtype", "shard", "offset", "nbytes", "checksum")}
        if name in out and isinstance(out[name], dict):
            out[name]["packed"] = form
        else:
            out[name] = {"dtype": q.get("dtype"), "shape": q.get("shape"), **form}

    def position(item):  # version 1 kept blocks in shards of their own: layout order is (shard, offset)
        v = item[1]
        return (v.get("shard"), v.get("offset")) if isinstance(v, dict) else (0, 0)

    try:
        ordered = dict(sorted(out.items(), key=position))
    except TypeError:
        raise ManifestError("malformed version-1 manifest (shard or offset is not a number)", mp) from None
    if not all(isinstance(v, dict) for v in ordered.values()):
        raise ManifestError("malformed version-1 manifest (a tensor record is not an object)", mp)
    return {**d, "tensors": {"name": list(ordered), **{c: [v.get(c) for v in ordered.values()] for c in COLUMNS[1:]}}}


def hasher():
    """A fresh hash object of the manifest's checksum (xxh3-128)."""
    import xxhash

    return xxhash.xxh3_128()


def piece_digest(data) -> bytes:
    """The 16-byte digest of one piece of at most :data:`PIECE` bytes."""
    import xxhash

    return xxhash.xxh3_128_digest(data)


def combine(digests: list[bytes]) -> str:
    """The checksum of a byte range from its pieces' digests, in order (see the module docstring)."""
    if len(digests) == 1:
        return digests[0].hex()
    if not digests:
        return hasher().hexdigest()
    import xxhash

    return xxhash.xxh3_128_hexdigest(b"".join(digests))


def piece_size(scheme: str) -> int | None:
    """The piece size of a checksum scheme (``"xxh3_128/16777216"``), None for whole-range hashing."""
    return None if scheme == WHOLE else int(scheme.rpartition("/")[2])


def checksum(data, scheme: str = CHECKSUM, progress=None) -> str:
    """The checksum of a whole byte range (a memoryview, bytes) under ``scheme``; ``progress``,
    if given, is called with the bytes hashed after each piece."""
    view = memoryview(data).cast("B")
    size = piece_size(scheme)
    whole = hasher() if size is None else None
    digests = []
    for i in range(0, len(view), size or BLOCK):
        piece = view[i:i + (size or BLOCK)]
        if whole is not None:
            whole.update(piece)
        else:
            digests.append(piece_digest(piece))
        if progress is not None:
            progress(len(piece))
    return whole.hexdigest() if whole is not None else combine(digests)


def file_checksum(path: str | os.PathLike) -> str:
    """The manifest's checksum (xxh3-128, hex) of a whole file."""
    h = hasher()
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            h.update(block)
    return h.hexdigest()
