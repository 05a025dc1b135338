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
from prebake.formats.manifest_records import COLUMNS, REQUIRED, PackedForm, TensorEntry

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
        where = "source"
        _need(type(d["source"].get("path")) is str and type(d["source"].get("format")) is str,
              "does not name its path and format")
        where = "checksum"
        _checksum_scheme(d.get("checksum"))
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
        tensors = _records(d.get("tensors"))
        for name in _rows_to_check(tensors, shards):  # every row, where the fast pass found one wrong
            where = f"tensor {name!r}"
            _tensor(tensors[name], shards)
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
            _int(c.get("tensors"), "tensors")
            _int(c.get("bytes"), "bytes")
            paths.inside(c.get("path"), folder=True)
    except _Bad as e:
        raise ManifestError(f"{where}: {e}", mp) from None
    return build(d, root, tensors)


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


def _checksum_scheme(x) -> None:
    """``xxh3_128`` (whole ranges) or ``xxh3_128/P``, P a power of two from 4 KiB to 1 GiB."""
    name, _, size = x.partition("/") if type(x) is str else ("", "", "")
    ok = name == "xxh3_128" and (size == "" or (size.isdigit() and 4096 <= int(size) <= 1 << 30
                                                and int(size) & (int(size) - 1) == 0))
    _need(ok, f"{x!r} is not a checksum scheme prebake knows")


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


def _records(table) -> dict[str, TensorEntry]:
    """The tensor table's columns as one record per tensor (names unique, columns of one length)."""
    _need(isinstance(table, dict) and all(c in table for c in REQUIRED), f"is not a table with columns {REQUIRED}")
    names = _list(table["name"])
    columns = [table.get(c) for c in COLUMNS[1:]]
    n = len(names)
    _need(all(c is None or (isinstance(c, list) and len(c) == n) for c in columns),
          f"columns are not lists of {n} values")
    _need(all(type(x) is str for x in names) and len(set(names)) == n, "names are not distinct strings")
    columns = [c if c is not None else [None] * n for c in columns]
    packed = columns[TensorEntry._fields.index("packed")]
    for i, p in enumerate(packed):
        if p is not None:
            _need(isinstance(p, dict) and set(p) == set(PackedForm._fields),
                  f"packed form of {names[i]!r} is not a record of {PackedForm._fields}")
            packed[i] = PackedForm(**p)
    return dict(zip(names, map(TensorEntry, *columns), strict=True))


def _rows_to_check(tensors: dict[str, TensorEntry], shards: list) -> list[str]:
    """The names of the records :func:`_tensor` must check one by one.

    A load of 10,000 expert tensors checks its manifest at every start, so the common records
    (plain items, whole) are checked at once, column by column with numpy (which torch has
    already imported); the rest, and every record when a column is wrong somewhere (so the
    error names the first wrong one), go through :func:`_tensor`.
    """
    special = [n for n, t in tensors.items() if t.qtype is not None or t.packed is not None
               or (t.tp is not None and t.tp not in ("column", "row", "vocab"))]
    plain = [t for n, t in tensors.items() if not (t.qtype is not None or t.packed is not None
                                                    or (t.tp is not None and t.tp not in ("column", "row", "vocab")))]
    return special if _plain_rows_ok(plain, shards) else list(tensors)


def _plain_rows_ok(rows: list[TensorEntry], shards: list) -> bool:
    if not rows:
        return True
    import numpy as np

    columns = list(zip(*rows, strict=True))
    dtypes, shapes, shard, offset, nbytes, checksums, _, source_dtype, _, _, source_name = columns
    try:
        if not (set(dtypes) <= DTYPE_SIZES.keys() and {type(x) for x in (*shard, *offset, *nbytes)} == {int}
                and all(type(c) is str and len(c) == 32 for c in checksums)
                and {type(x) for x in (*source_dtype, *source_name)} <= {str, type(None)}
                and all(type(x) is list and len(x) <= MAX_DIMS for x in shapes)
                and {type(d) for x in shapes for d in x} <= {int}):
            return False
    except TypeError:  # an unhashable dtype
        return False
    counts = np.array([_numel_or_minus(x) for x in shapes], dtype=object)
    try:  # a value past int64 (a row's or a shard's) takes the slow path, which names it
        shard, offset, nbytes = (np.array(c, dtype=np.int64) for c in (shard, offset, nbytes))
        starts = np.array([s["data_offset"] for s in shards], dtype=np.int64)
        ends = np.array([s["size"] for s in shards], dtype=np.int64)
    except OverflowError:
        return False
    if (shard < 0).any() or (shard >= len(shards)).any() or (counts < 0).any() or \
            not ((offset >= 0) & (offset < 1 << 62) & (nbytes >= 0) & (nbytes < 1 << 62)).all():
        return False  # (below 2**62 each, offset + nbytes cannot overflow)
    itemsize = np.array([DTYPE_SIZES[d] for d in dtypes], dtype=object)
    starts, ends = starts[shard], ends[shard]
    return bool((counts * itemsize == nbytes.astype(object)).all() and (offset >= starts).all()
                and (offset + nbytes <= ends).all() and (offset % itemsize.astype(np.int64) == 0).all())


def _numel_or_minus(shape: list) -> int:
    """The element count of a shape, -1 if a dimension is negative."""
    n = 1
    for d in shape:
        if d < 0:
            return -1
        n *= d
    return n


def _blob_range(t, shards: list, nbytes: int) -> None:
    shard = t.shard
    _need(type(shard) is int and 0 <= shard < len(shards), f"shard {shard!r} is not a shard index")
    s = shards[shard]
    offset = t.offset
    _need(t.nbytes == nbytes, f"nbytes {t.nbytes!r} is not the {nbytes} its shape calls for")
    _need(type(offset) is int and s["data_offset"] <= offset and offset + nbytes <= s["size"],
          f"bytes [{offset!r}, +{nbytes}) are not inside shard {shard}'s data")
    _checksum(t.checksum)


def _blocks_nbytes(qtype, shape: list) -> int:
    _need(type(qtype) is str and qtype in QUANT_TYPES, f"qtype {qtype!r} is not a GGML block type")
    block, size = BLOCK_SIZES[qtype]
    _need(bool(shape) and shape[-1] % block == 0, f"shape {shape} does not end in whole {qtype} blocks")
    return numel(shape) // block * size


def _tensor(t: TensorEntry, shards: list) -> None:
    dtype, shape = t.dtype, _shape(t.shape)
    _need(type(dtype) is str and dtype in DTYPE_SIZES, f"dtype {dtype!r} is not a safetensors dtype")
    qtype = t.qtype
    if qtype is None:
        _blob_range(t, shards, numel(shape) * DTYPE_SIZES[dtype])
        _need(t.offset % DTYPE_SIZES[dtype] == 0, f"offset {t.offset} is not a multiple of the item size")
    else:
        _need(dtype in FLOAT_DTYPES, f"blocks decode to {dtype!r}, which is not a float dtype")
        _blob_range(t, shards, _blocks_nbytes(qtype, shape))
    _need(t.source_dtype is None or type(t.source_dtype) is str, "source_dtype is not a string")
    _need(t.source_name is None or type(t.source_name) is str, "source_name is not a string")
    _tp(t, shape)
    if t.packed is not None:
        _need(qtype is None and dtype in FLOAT_DTYPES, "packed form is not beside float bytes")
        _blob_range(t.packed, shards, _blocks_nbytes(t.packed.qtype, shape))


def _tp(t: TensorEntry, shape: list) -> None:
    """``tp``: column, vocab, row, or row:N, a stored tiling whose N divides the columns (in blocks)."""
    if t.tp is None or t.tp in ("column", "vocab", "row"):
        return
    kind, _, n = t.tp.partition(":") if type(t.tp) is str else ("", "", "")
    _need(kind == "row" and n.isdigit() and int(n) >= 2 and len(shape) == 2, f"tp {t.tp!r} is not a split prebake knows")
    unit = BLOCK_SIZES[t.qtype][0] if t.qtype else 1
    _need(shape[1] % (int(n) * unit) == 0, f"tp {t.tp!r}: {shape[1]} columns do not divide into {n} x {unit}")


def _alias(name: str, a, tensors: dict) -> None:
    _need(isinstance(a, dict) and type(a.get("target")) is str, "is not an object naming its target")
    target = tensors.get(a["target"])
    _need(name not in tensors, "is also a stored tensor")
    _need(target is not None and target.qtype is None, f"target {a.get('target')!r} is not a stored "
          "tensor of plain items")
    shape, strides = _shape(a.get("shape")), _shape(a.get("strides"), "strides")
    _need(len(shape) == len(strides), "shape and strides differ in length")
    start = _int(a.get("storage_offset"), "storage_offset")
    if numel(shape):
        last = start + sum((d - 1) * s for d, s in zip(shape, strides, strict=True))
        _need(last < numel(target.shape), f"reaches element {last}, past its target's {numel(target.shape)}")


def _file(f, paths: _Paths) -> None:
    _need(isinstance(f, dict), "is not an object")
    paths.inside(f.get("path"))
    _int(f.get("size"), "size")
    _checksum(f.get("checksum"))


def _variant(v, tensors: dict, aliases: dict, paths: _Paths) -> None:
    _need(isinstance(v, dict), "is not an object")
    _need(type(v.get("spec")) is str, "spec is not a string")
    _int(v.get("bytes"), "bytes")
    for key in ("layers", "experts"):
        _need(v.get(key) is None or (isinstance(v[key], list) and all(type(i) is int for i in v[key])),
              f"{key} is not a list of integers")
    for vname, e in _dict(v.get("tensors")).items():
        _need(isinstance(e, dict), f"tensor {vname!r} is not an object")
        source = e.get("source")
        _need(type(source) is str, f"tensor {vname!r} does not name its source")
        stored = tensors.get(source)
        shape = stored.shape if stored else aliases[source]["shape"] if source in aliases else None
        _need(shape is not None, f"tensor {vname!r} maps to {source!r}, which the bake does not hold")
        rows = e.get("rows")
        if rows is not None:
            _need(isinstance(rows, list) and bool(shape) and rows != []
                  and all(type(r) is int and 0 <= r < shape[0] for r in rows),
                  f"tensor {vname!r}: rows are not indices of {source!r}'s first dimension")
    if v.get("config") is not None:
        paths.inside(v["config"])
