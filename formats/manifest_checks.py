"""Checking a manifest read from disk before anything trusts it.

A manifest decides which files a load maps and which byte ranges become tensors, so every
field is checked here, once: types, ranges, that every path is a plain relative path that stays
inside the bake after resolving symlinks, that every byte range lies inside its shard's data
and has the size its shape and dtype (or GGML type) call for, that aliases stay inside their
targets and variants point at stored tensors. Past this point the code trusts its records.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from prebake.formats.dtypes import DTYPE_SIZES, FLOAT_DTYPES, numel
from prebake.formats.errors import ManifestError
from prebake.formats.ggml_types import BLOCK_SIZES, QUANT_TYPES

MAX_DIMS = 16


class _Bad(Exception):
    """A field that is not what the schema says; turned into one ManifestError naming it."""


def check_manifest(d: dict, mp: Path, build: Callable):
    """Checks the manifest dict ``d`` read from ``mp``; returns ``build(d, root)``."""
    root = mp.parent
    where = "manifest"
    try:
        for key in ("source", "options"):
            where = key
            _need(isinstance(d.get(key), dict), "is not an object")
        paths = _Paths(root)
        where = "shards"
        shards = _list(d.get("shards"))
        files = set()
        for i, s in enumerate(shards):
            where = f"shards[{i}]"
            _shard(s, paths)
            _need(s["file"] not in files, "names a shard listed before")
            files.add(s["file"])
        where = "tensors"
        tensors = _dict(d.get("tensors"))
        for name, t in tensors.items():
            where = f"tensor {name!r}"
            _tensor(t, shards)
        for name, a in _dict(d.get("aliases", {})).items():
            where = f"alias {name!r}"
            _alias(name, a, tensors)
        where = "padding"
        _need(all(type(p) is str for p in _list(d.get("padding", []))), "holds a non-string name")
        for i, f in enumerate(_list(d.get("files", []))):
            where = f"files[{i}]"
            _file(f, paths)
        for key in ("metadata",):
            where = key
            _need(isinstance(d.get(key, {}), dict), "is not an object")
        where = "skipped"
        _list(d.get("skipped", []))
        for name, v in _dict(d.get("variants", {})).items():
            where = f"variant {name!r}"
            _variant(v, tensors, d.get("aliases", {}), paths)
        for name, c in _dict(d.get("components", {})).items():
            where = f"component {name!r}"
            _need(isinstance(c, dict), "is not an object")
            paths.inside(c.get("path"), folder=True)
    except _Bad as e:
        raise ManifestError(f"{where}: {e}", mp) from None
    return build(d, root)


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise _Bad(what)


def _list(x) -> list:
    _need(isinstance(x, list), "is not a list")
    return x


def _dict(x) -> dict:
    _need(isinstance(x, dict), "is not an object")
    return x


def _int(x, what: str, low: int = 0) -> int:
    _need(type(x) is int and x >= low, f"{what} is not an integer >= {low}")
    return x


def _shape(x, what: str = "shape") -> list:
    _need(isinstance(x, list) and len(x) <= MAX_DIMS and all(type(d) is int and d >= 0 for d in x),
          f"{what} is not a list of at most {MAX_DIMS} non-negative integers")
    return x


def _checksum(x) -> None:
    _need(type(x) is str and len(x) == 32, "checksum is not a 32-digit hex string")


class _Paths:
    """Checks that relative paths stay inside the bake folder, symlinks resolved."""

    def __init__(self, root: Path):
        self.root = root
        self.real = os.path.realpath(root)

    def inside(self, rel, folder: bool = False) -> None:
        _need(type(rel) is str and rel != "" and "\x00" not in rel and "\\" not in rel
              and not rel.startswith("/"), f"path {rel!r} is not a plain relative path")
        _need(all(part not in ("", ".", "..") for part in rel.split("/")),
              f"path {rel!r} is not a plain relative path (empty, '.' or '..' parts)")
        real = os.path.realpath(self.root / rel)
        _need(real.startswith(self.real + os.sep), f"path {rel!r} points outside the bake (to {real})")


def _shard(s, paths: _Paths) -> None:
    _need(isinstance(s, dict), "is not an object")
    paths.inside(s.get("file"))
    size = _int(s.get("size"), "size", 8)
    _need(type(s.get("data_offset")) is int and 8 <= s["data_offset"] <= size,
          "data_offset is not inside the shard")


def _blob_range(t: dict, shards: list, nbytes: int) -> None:
    shard = t.get("shard")
    _need(type(shard) is int and 0 <= shard < len(shards), f"shard {shard!r} is not a shard index")
    s = shards[shard]
    offset = t.get("offset")
    _need(t.get("nbytes") == nbytes, f"nbytes {t.get('nbytes')!r} is not the {nbytes} its shape calls for")
    _need(type(offset) is int and s["data_offset"] <= offset and offset + nbytes <= s["size"],
          f"bytes [{offset!r}, +{nbytes}) are not inside shard {shard}'s data")
    _checksum(t.get("checksum"))


def _blocks_nbytes(qtype, shape: list) -> int:
    _need(qtype in QUANT_TYPES, f"qtype {qtype!r} is not a GGML block type")
    block, size = BLOCK_SIZES[qtype]
    _need(bool(shape) and shape[-1] % block == 0, f"shape {shape} does not end in whole {qtype} blocks")
    return numel(shape) // block * size


def _tensor(t, shards: list) -> None:
    _need(isinstance(t, dict), "is not an object")
    dtype, shape = t.get("dtype"), _shape(t.get("shape"))
    _need(dtype in DTYPE_SIZES, f"dtype {dtype!r} is not a safetensors dtype")
    qtype = t.get("qtype")
    if qtype is None:
        _blob_range(t, shards, numel(shape) * DTYPE_SIZES[dtype])
        _need(t["offset"] % DTYPE_SIZES[dtype] == 0, f"offset {t['offset']} is not a multiple of the item size")
    else:
        _need(dtype in FLOAT_DTYPES, f"blocks decode to {dtype!r}, which is not a float dtype")
        _blob_range(t, shards, _blocks_nbytes(qtype, shape))
    _need(t.get("source_dtype") is None or type(t["source_dtype"]) is str, "source_dtype is not a string")
    _need(t.get("source_name") is None or type(t["source_name"]) is str, "source_name is not a string")
    packed = t.get("packed")
    if packed is not None:
        _need(isinstance(packed, dict) and qtype is None and dtype in FLOAT_DTYPES,
              "packed form is not an object beside float bytes")
        _blob_range(packed, shards, _blocks_nbytes(packed.get("qtype"), shape))


def _alias(name: str, a, tensors: dict) -> None:
    _need(isinstance(a, dict) and type(a.get("target")) is str, "is not an object naming its target")
    target = tensors.get(a["target"])
    _need(name not in tensors, "is also a stored tensor")
    _need(target is not None and target.get("qtype") is None, f"target {a.get('target')!r} is not a stored "
          "tensor of plain items")
    shape, strides = _shape(a.get("shape")), _shape(a.get("strides"), "strides")
    _need(len(shape) == len(strides), "shape and strides differ in length")
    start = _int(a.get("storage_offset"), "storage_offset")
    if numel(shape):
        last = start + sum((d - 1) * s for d, s in zip(shape, strides, strict=True))
        _need(last < numel(target["shape"]), f"reaches element {last}, past its target's {numel(target['shape'])}")


def _file(f, paths: _Paths) -> None:
    _need(isinstance(f, dict), "is not an object")
    paths.inside(f.get("path"))
    _int(f.get("size"), "size")
    _checksum(f.get("checksum"))


def _variant(v, tensors: dict, aliases: dict, paths: _Paths) -> None:
    _need(isinstance(v, dict), "is not an object")
    for vname, e in _dict(v.get("tensors")).items():
        _need(isinstance(e, dict), f"tensor {vname!r} is not an object")
        source = e.get("source")
        _need(type(source) is str, f"tensor {vname!r} does not name its source")
        stored = tensors.get(source) or aliases.get(source)
        shape = stored["shape"] if stored else None
        _need(shape is not None, f"tensor {vname!r} maps to {source!r}, which the bake does not hold")
        rows = e.get("rows")
        if rows is not None:
            _need(isinstance(rows, list) and bool(shape) and rows != []
                  and all(type(r) is int and 0 <= r < shape[0] for r in rows),
                  f"tensor {vname!r}: rows are not indices of {source!r}'s first dimension")
    if v.get("config") is not None:
        paths.inside(v["config"])
