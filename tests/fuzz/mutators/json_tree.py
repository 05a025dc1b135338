"""Mutations of a JSON tree (a safetensors header, an archive index, a manifest).

A mutation picks one node, walking down from the root, and replaces, removes, duplicates or
retypes it. Replacement values come from a table keyed by the nearest object key above the
node (``"dtype"``, ``"offset"``, ``"path"``...), so most changes are ones the format could
almost mean, plus a pool of values of every JSON type. The input tree is never changed.
"""

from __future__ import annotations

import copy
import json
from random import Random

from tests.fuzz.mutators.base import NotApplicable

INTS = [0, 1, -1, 2, 7, 8, 255, 256, 4095, 4096, 4097, 65535, 1 << 20, (1 << 31) - 1, 1 << 31, 1 << 32,
        (1 << 53) + 1, (1 << 63) - 1, 1 << 63, 1 << 64, -(1 << 31), -(1 << 63)]
ANY = [None, True, False, 0, -1, 1.5, -0.0, 1e308, "", "x", [], {}, [0], {"a": 1}, "0", [[]], 2 ** 100]
PATHS = ["", ".", "..", "/", "../x", "../../bait/secret", "/etc/passwd", "/dev/zero", "/proc/self/mem",
         "a/../..", "sub/.", "./x", "x/", "x//y", "\\x", "x\x00y", "bait/secret", "manifest.json", "é", "x" * 300]
DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL", "C64",
          "F8_E4M3", "F8_E5M2", "F8_E8M0", "F128", "f32", "Q4_K", "", "F4", "I4"]
QTYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K",
          "IQ4_NL", "F32", "Q9_9", ""]
SHAPES = [[], [0], [1], [-1], [2, -2], [1 << 31, 1 << 31], [1 << 62, 4], [1.5], ["4"], [None], [0, 1 << 40],
          [1] * 17, [3, 5], [4096]]
HEX = ["0" * 32, "f" * 32, "0" * 31, "g" * 32, "", 0]

BY_KEY: dict[str, list] = {  # the nearest key above a node -> values worth trying there
    "dtype": DTYPES, "source_dtype": DTYPES, "qtype": QTYPES, "shape": SHAPES, "strides": SHAPES,
    "data_offsets": [[0, 0], [0, 1], [1, 0], [-4, 0], [0, 1 << 40], [0.0, 4.0], ["0", "4"], [0], [0, 4, 8]],
    "file": PATHS, "path": PATHS, "config": PATHS, "target": ["", "x", "nope", "__prebake_pad__.0"],
    "checksum": HEX + ["xxh3_128", "xxh3_128/4096", "xxh3_128/3", "md5"], "layout": ["bytes", "planes2",
                                                                                   "planes4", "planes8", "planes3", ""],
    "format": ["prebake", "prebake-archive", "torch-zip", "gguf", "components", ""],
    "version": [0, 1, 2, 3, -1, "2", 1 << 40], "tp": [None, "row", "column", "row:2", "row:0", "row:x", "vocab"],
    "rows": [[0], [-1], [1 << 40], [], [0, 0], "0"], "source": ["", "nope", "layers.0.w"],
    "codec": ["zstd", "zlib", ""], "chunk_fields": [[], ["file"], ["file", "offset", "length", "layout", "frames"]],
}
for key in ("size", "offset", "nbytes", "data_offset", "storage_offset", "shard", "length", "tensors", "bytes",
            "shard_size", "align", "mtime_ns"):
    BY_KEY[key] = INTS


def mutate_tree(tree, rng: Random, by_key: dict[str, list] | None = None) -> tuple[object, str]:
    """A changed deep copy of ``tree`` and a line saying what changed."""
    table = {**BY_KEY, **(by_key or {})}
    before = canonical(tree)
    for _ in range(20):
        new = copy.deepcopy(tree)
        holder, key, where, context = _pick(new, rng)
        if holder is None:
            new, what = copy.deepcopy(rng.choice(ANY)), "root replaced"
        else:
            what = _change(holder, key, rng, table.get(context, []))
        if canonical(new) != before:
            return new, f"{where}: {what}"
    raise NotApplicable("no change found")


def canonical(tree) -> str:
    return json.dumps(tree, sort_keys=True, default=repr)


def _pick(tree, rng: Random):
    """(container, key, path text, nearest object key) of a node, or Nones for the root."""
    holder, key, path, context = None, None, "$", ""
    node = tree
    while True:
        if isinstance(node, dict) and node:
            k = rng.choice(list(node))
            holder, key, path, context = node, k, f"{path}.{k}", k
        elif isinstance(node, list) and node:
            i = rng.randrange(len(node))
            holder, key, path = node, i, f"{path}[{i}]"
        else:
            return holder, key, path, context
        node = holder[key]
        if not isinstance(node, (dict, list)) or not node or rng.random() < 0.3:
            return holder, key, path, context


def _change(holder, key, rng: Random, pool: list) -> str:
    value = holder[key]
    roll = rng.random()
    if roll < 0.08 and isinstance(holder, dict):
        del holder[key]
        return "deleted"
    if roll < 0.14 and isinstance(holder, list):
        holder.insert(key, copy.deepcopy(value))
        return "duplicated"
    if roll < 0.20 and isinstance(holder, dict):
        holder[f"{key}\u00a0" if rng.random() < 0.5 else f"{key}_"] = copy.deepcopy(value)
        return "dup key beside"
    if roll < 0.45 and isinstance(value, int) and not isinstance(value, bool):
        new = rng.choice([value + 1, value - 1, -value, value * 2, value // 2, value + 4096, value ^ (1 << rng.randrange(64))])
        holder[key] = new
        return f"{value} -> {new}"
    if roll < 0.80 and pool:
        holder[key] = copy.deepcopy(rng.choice(pool))
        return f"set {holder[key]!r}"[:120]
    if roll < 0.90 and isinstance(value, str):
        holder[key] = value + rng.choice(["/..", "\x00", "é", "x", "/"])
        return f"appended to {value!r}"[:120]
    holder[key] = copy.deepcopy(rng.choice(ANY))
    return f"set {holder[key]!r}"[:120]


def dumps(tree) -> bytes:
    """JSON as prebake writes it: compact, ASCII kept as it is."""
    return json.dumps(tree, separators=(",", ":"), allow_nan=True).encode()
