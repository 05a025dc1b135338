"""Mutations of safetensors files: the header's JSON tree, its entries' fields, its length prefix.

The file is an 8-byte header length, the JSON header (tensor name -> dtype, shape,
data_offsets; ``__metadata__``), then the data. Mutations rewrite the header (and its length)
and keep the data: a tree mutation anywhere, or a targeted one of one entry: its offsets
(swapped, shifted, overlapping another's, past the end), its dtype (one of the same size,
which is still a valid file, or not), its shape (same element count or not), its name (empty,
reserved by prebake, ``__metadata__``, a duplicate key in the JSON text); or the length prefix
alone.
"""

from __future__ import annotations

import json
import struct
from random import Random

from tests.fuzz.mutators.base import NO_CONTEXT, NotApplicable, interesting
from tests.fuzz.mutators.json_tree import DTYPES, SHAPES, dumps, mutate_tree

SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "U16": 2,
         "U32": 4, "U64": 8, "BOOL": 1, "C64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}
NAMES = ["", "__prebake_pad__.0", "__metadata__", "a" * 70000, "../x", "x/y", "é", " ", "\x00"]


def split(data: bytes) -> tuple[dict, bytes]:
    """(header, data after it) of a well-formed file."""
    if len(data) < 8:
        raise NotApplicable("too short")
    (n,) = struct.unpack_from("<Q", data)
    try:
        header = json.loads(data[8:8 + n])
    except ValueError:
        raise NotApplicable("header is not JSON") from None
    if not isinstance(header, dict):
        raise NotApplicable("header is not an object")
    return header, data[8 + n:]


def join(header_bytes: bytes, body: bytes, pad: int = 0) -> bytes:
    header_bytes += b" " * pad
    return struct.pack("<Q", len(header_bytes)) + header_bytes + body


def _entries(header: dict) -> list[str]:
    names = [k for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if not names:
        raise NotApplicable("no tensors")
    return names


def st_tree(data: bytes, rng: Random, ctx=NO_CONTEXT) -> tuple[bytes, str]:
    header, body = split(data)
    new, what = mutate_tree(header, rng)
    return join(dumps(new), body, rng.choice([0, 0, 1, 7])), f"header {what}"


def st_entry(data: bytes, rng: Random, ctx=NO_CONTEXT) -> tuple[bytes, str]:
    header, body = split(data)
    names = _entries(header)
    name = rng.choice(names)
    e = dict(header[name])
    begin, end = e.get("data_offsets", [0, 0])
    roll = rng.randrange(8)
    if roll == 0:
        other = header[rng.choice(names)]["data_offsets"]
        e["data_offsets"] = rng.choice([[end, begin], list(other), [begin + 1, end + 1], [begin, end - 1],
                                        [begin - 8, end - 8], [0, len(body) + 1], [len(body), len(body)]])
    elif roll == 1:
        same = [d for d, s in SIZES.items() if s == SIZES.get(e["dtype"]) and d != e["dtype"]]
        e["dtype"] = rng.choice(same) if same and rng.random() < 0.6 else rng.choice(DTYPES)
    elif roll == 2:
        n = 1
        for d in e["shape"]:
            n *= d
        e["shape"] = rng.choice([[n], [1, n], [n, 1], list(reversed(e["shape"])), *SHAPES])
    elif roll == 3:
        new = rng.choice(NAMES + [n for n in names if n != name])
        header = {(new if k == name else k): v for k, v in header.items()}
        return join(dumps(header), body), f"tensor {name!r} renamed {new!r}"[:160]
    elif roll == 4:
        text = dumps(header)[:-1] + b"," + json.dumps(name).encode() + b":" + dumps(header[rng.choice(names)]) + b"}"
        return join(text, body), f"tensor {name!r} repeated as a duplicate key"
    elif roll == 5:
        header["__metadata__"] = rng.choice([{"a": 1}, [], "x", {"format": None}, {"k": "v" * 10000}, None])
        return join(dumps(header), body), f"metadata -> {header['__metadata__']!r}"[:160]
    elif roll == 6:
        e["data_offsets"] = [interesting(rng, begin, 64) if rng.random() < 0.5 else begin,
                             interesting(rng, end, 64) if rng.random() < 0.5 else end]
    else:
        del header[name]
        return join(dumps(header), body), f"tensor {name!r} removed"
    header[name] = e
    return join(dumps(header), body), f"tensor {name!r}: {e}"[:200]


def st_length(data: bytes, rng: Random, ctx=NO_CONTEXT) -> tuple[bytes, str]:
    if len(data) < 8:
        raise NotApplicable("too short")
    (n,) = struct.unpack_from("<Q", data)
    new = rng.choice([n - 1, n + 1, n - 8, n + 8, 0, len(data), len(data) - 8, 1 << 63, (1 << 64) - 1, 100 << 20,
                      n + 4096]) % (1 << 64)
    return struct.pack("<Q", new) + data[8:], f"header length {n} -> {new}"


SAFETENSORS_OPS = {f.__name__: f for f in (st_tree, st_entry, st_length)}
