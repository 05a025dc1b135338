"""Mutations of torch checkpoints' pickles in place: a zip's ``data.pkl``, a legacy file's five
pickles, the element counts before its storages, and its list of storage keys."""

from __future__ import annotations

import io
import pickle
from random import Random

from tests.fuzz.mutators import zip_layout as zl
from tests.fuzz.mutators.base import NO_CONTEXT, Context, NotApplicable, interesting
from tests.fuzz.mutators.pickle_ops import mutate_pickle, parse

ITEM_SIZES = {"Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2, "Char": 1,
              "Byte": 1, "Bool": 1, "ComplexFloat": 8, "ComplexDouble": 16, "UInt16": 2, "UInt32": 4,
              "UInt64": 8, "Float8_e4m3fn": 1, "Float8_e5m2": 1, "Float8_e8m0fnu": 1, "Untyped": 1}


def data_pkl(data: bytes) -> tuple[list[zl.Entry], int]:
    """A torch zip's members and the index of its ``data.pkl``."""
    members = zl.entries(data)
    found = [i for i, m in enumerate(members) if m.name.endswith(b"/data.pkl")]
    if len(found) != 1:
        raise NotApplicable("no single data.pkl")
    return members, found[0]


def zip_pickle(data: bytes, rng: Random, ctx: Context = NO_CONTEXT) -> tuple[bytes, str]:
    """One opcode-aware mutation of the zip's ``data.pkl``; the zip is rewritten around it."""
    members, i = data_pkl(data)
    pickles = []
    for other in ctx.others:
        try:
            theirs, j = data_pkl(other)
            pickles.append(theirs[j].raw)
        except NotApplicable:
            continue
    new, what = mutate_pickle(members[i].raw, rng, Context(pickles, ctx.extras))
    members[i] = zl.Entry(members[i].name, new)
    return zl.build(members), f"data.pkl: {what}"


def split_legacy(data: bytes) -> tuple[list[bytes], bytes]:
    """A legacy checkpoint's five pickles (magic, protocol, system info, objects, storage keys)
    and the storage bytes after them."""
    pickles, rest = [], data
    for _ in range(5):
        ops, after = parse(rest)
        pickles.append(rest[:len(rest) - len(after)])
        rest = after
    return pickles, rest


class _Plain(pickle.Unpickler):
    def find_class(self, module, name):
        raise NotApplicable("key list names a global")


def storage_keys(pickles: list[bytes]) -> list[str]:
    try:
        keys = _Plain(io.BytesIO(pickles[4])).load()
    except NotApplicable:
        raise
    except Exception as e:
        raise NotApplicable(f"key list does not load ({e})") from None
    if not isinstance(keys, list):
        raise NotApplicable("key list is not a list")
    return [str(k) for k in keys]


def storage_types(objects: bytes) -> dict[str, int]:
    """Storage key -> item size, from the persistent ids in the object pickle."""
    ops, _ = parse(objects)
    out = {}
    for end, op in enumerate(ops):
        if op.name != "BINPERSID":
            continue
        start = max(i for i in range(end) if ops[i].name == "MARK")
        kind = next((o.arg.split(" ")[1] for o in ops[start:end] if o.name == "GLOBAL"), "")
        strings = [o.arg for o in ops[start:end] if isinstance(o.arg, str) and o.name != "GLOBAL"]
        if len(strings) >= 2 and kind.endswith("Storage"):
            out.setdefault(strings[1], ITEM_SIZES.get(kind[:-len("Storage")], 1))
    return out


def count_offsets(pickles: list[bytes], rest: bytes) -> list[int]:
    """Offsets in ``rest`` of each storage's int64 element count."""
    sizes, at, out = storage_types(pickles[3]), 0, []
    for key in storage_keys(pickles):
        if at + 8 > len(rest) or key not in sizes:
            break
        out.append(at)
        at += 8 + int.from_bytes(rest[at:at + 8], "little", signed=True) * sizes[key]
    return out


def legacy_pickle(data: bytes, rng: Random, ctx: Context = NO_CONTEXT) -> tuple[bytes, str]:
    pickles, rest = split_legacy(data)
    which = 3 if rng.random() < 0.75 else rng.randrange(5)
    others = []
    for other in ctx.others:
        try:
            others.append(split_legacy(other)[0][which])
        except NotApplicable:
            continue
    pickles[which], what = mutate_pickle(pickles[which], rng, Context(others, ctx.extras))
    return b"".join(pickles) + rest, f"pickle {which}: {what}"


def legacy_count(data: bytes, rng: Random, ctx: Context = NO_CONTEXT) -> tuple[bytes, str]:
    pickles, rest = split_legacy(data)
    offsets = count_offsets(pickles, rest)
    if not offsets:
        raise NotApplicable("no storages")
    at = rng.choice(offsets)
    old = int.from_bytes(rest[at:at + 8], "little")
    new = interesting(rng, old, 64)
    rest = rest[:at] + new.to_bytes(8, "little") + rest[at + 8:]
    return b"".join(pickles) + rest, f"count of storage at {at}: {old} -> {new}"


def legacy_keys(data: bytes, rng: Random, ctx: Context = NO_CONTEXT) -> tuple[bytes, str]:
    pickles, rest = split_legacy(data)
    keys: list = storage_keys(pickles)
    roll = rng.randrange(5)
    if roll == 0 and len(keys) > 1:
        keys.reverse()
    elif roll == 1 and keys:
        keys.pop(rng.randrange(len(keys)))
    elif roll == 2 and keys:
        keys.insert(rng.randrange(len(keys) + 1), rng.choice(keys))
    elif roll == 3:
        keys.append(rng.choice(["99", "", "../0", 0]))
    else:
        keys = rng.choice([{}, None, "0", [[]], [0] * len(keys)])
    pickles[4] = pickle.dumps(keys, protocol=2)
    return b"".join(pickles) + rest, f"storage keys -> {keys!r}"[:160]


TORCH_OPS = {f.__name__: f for f in (zip_pickle, legacy_pickle, legacy_count, legacy_keys)}
