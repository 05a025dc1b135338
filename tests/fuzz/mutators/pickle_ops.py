"""Opcode-aware mutations of a pickle (a torch zip's ``data.pkl``, a legacy checkpoint's pickles).

A pickle is split into its opcodes with :mod:`pickletools` and each mutation edits that list:
argument values (integers, memo indices, strings, globals, the fields of a storage's
persistent id), the length prefixes of strings, the opcodes themselves (swapped for kin,
deleted, duplicated, moved), or inserts what a hostile pickle would: deep nesting, a dict that
holds itself, huge allocations and memo indices, a ``BUILD`` state on any object, spliced
opcodes from another seed, and payloads that would create the sentinel file if anything ran
them. Every mutation returns the whole pickle's new bytes (trailing bytes kept).
"""

from __future__ import annotations

import pickle
import pickletools
import struct
from dataclasses import dataclass
from random import Random

from tests.fuzz.mutators.base import NO_CONTEXT, NotApplicable
from tests.fuzz.sandbox import SENTINEL

INT_OPS = {"BININT", "BININT1", "BININT2", "LONG1", "LONG4", "INT", "LONG"}
PUT_OPS, GET_OPS = {"BINPUT", "LONG_BINPUT", "PUT"}, {"BINGET", "LONG_BINGET", "GET"}
STR_OPS = {"BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE", "BINSTRING", "SHORT_BINSTRING", "STRING"}
BYTES_OPS = {"BINBYTES", "SHORT_BINBYTES", "BINBYTES8"}
LENGTH_FIELD = {"BINUNICODE": 4, "SHORT_BINUNICODE": 1, "BINUNICODE8": 8, "BINSTRING": 4, "SHORT_BINSTRING": 1,
                "BINBYTES": 4, "SHORT_BINBYTES": 1, "BINBYTES8": 8, "LONG1": 1, "LONG4": 4}
KIN = [["TUPLE", "LIST", "DICT", "FROZENSET"], ["TUPLE1", "TUPLE2", "TUPLE3"],
       ["EMPTY_DICT", "EMPTY_LIST", "EMPTY_TUPLE", "EMPTY_SET"], ["NEWTRUE", "NEWFALSE", "NONE"],
       ["SETITEM", "APPEND"], ["SETITEMS", "APPENDS", "ADDITEMS"], ["REDUCE", "BUILD", "BINPERSID", "NEWOBJ"],
       ["MARK", "POP", "POP_MARK", "DUP"]]
INTS = [0, 1, -1, -8, 2, 3, 255, 256, 65535, 65536, (1 << 31) - 1, 1 << 31, -(1 << 31), 1 << 32, 1 << 40,
        1 << 62, (1 << 63) - 1, 1 << 63, 1 << 64, -(1 << 63)]
STRINGS = ["", "0", "1", "99", "cpu", "cuda:0", "meta", "storage", "__prebake_pad__.0", "items", "keys", "..",
           "a/b", "x" * 1000, "é", "\x00", "model", "weight", "__class__", "__dict__", "torch"]
GLOBALS = [("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"),
           ("torch._utils", "_rebuild_tensor_v3"), ("torch._utils", "_rebuild_parameter"),
           ("torch._utils", "_rebuild_parameter_with_state"), ("torch._tensor", "_rebuild_from_type_v2"),
           ("torch._utils", "_rebuild_sparse_tensor"), ("torch._utils", "_rebuild_qtensor"),
           ("torch._utils", "_rebuild_meta_tensor_no_storage"), ("torch", "Tensor"),
           ("torch.nn.parameter", "Parameter"), ("collections", "OrderedDict"), ("__builtin__", "set"),
           ("builtins", "frozenset"), ("builtins", "complex"), ("builtins", "slice"), ("builtins", "bytearray"),
           ("_codecs", "encode"), ("torch", "Size"), ("torch", "FloatStorage"), ("torch", "HalfStorage"),
           ("torch", "BFloat16Storage"), ("torch", "LongStorage"), ("torch", "BoolStorage"),
           ("torch", "ByteStorage"), ("torch", "UntypedStorage"), ("torch", "ComplexDoubleStorage"),
           ("torch", "QInt8Storage"), ("torch", "float32"), ("torch", "int64"), ("torch", "complex128"),
           ("torch", "float8_e4m3fn"), ("numpy.core.multiarray", "scalar"), ("numpy", "dtype"),
           ("argparse", "Namespace"), ("torch", "device"), ("posix", "system"), ("builtins", "eval"),
           ("builtins", "getattr"), ("os", "system"), ("subprocess", "call"), ("torch", "load"),
           ("torch.nn.modules.linear", "Linear"), ("builtins", "dict"), ("builtins", "list")]


@dataclass
class Op:
    name: str
    arg: object
    raw: bytes


def parse(data: bytes) -> tuple[list[Op], bytes]:
    """The opcodes up to and including ``STOP``, and the bytes after it."""
    found = []
    try:
        for opcode, arg, pos in pickletools.genops(data):
            found.append((opcode.name, arg, pos))
            if opcode.name == "STOP":
                break
    except Exception as e:  # a mutated pickle may not parse: the caller picks another mutation
        raise NotApplicable(f"not a pickle ({e})") from None
    if not found or found[-1][0] != "STOP":
        raise NotApplicable("no STOP")
    ends = [pos for _, _, pos in found[1:]] + [found[-1][2] + 1]
    return [Op(n, a, data[p:e]) for (n, a, p), e in zip(found, ends, strict=True)], data[ends[-1]:]


def dump(ops: list[Op], rest: bytes = b"") -> bytes:
    return b"".join(op.raw for op in ops) + rest


def enc_int(v: int) -> bytes:
    if 0 <= v < 256:
        return b"K" + bytes([v])
    if 0 <= v < 65536:
        return b"M" + struct.pack("<H", v)
    if -(1 << 31) <= v < 1 << 31:
        return b"J" + struct.pack("<i", v)
    raw = pickle.encode_long(v)
    return b"\x8a" + bytes([len(raw)]) + raw


def enc_str(s: str | bytes) -> bytes:
    """BINUNICODE of ``s`` (bytes are written as they are, valid UTF-8 or not)."""
    raw = s if isinstance(s, bytes) else s.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(raw)) + raw


def enc_memo(kind: str, i: int) -> bytes:
    short, long = (b"q", b"r") if kind == "put" else (b"h", b"j")
    return short + bytes([i]) if 0 <= i < 256 else long + struct.pack("<I", i & 0xFFFFFFFF)


def enc_global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _pick(ops: list[Op], rng: Random, names: set[str]) -> int:
    found = [i for i, op in enumerate(ops) if op.name in names]
    if not found:
        raise NotApplicable(f"no {sorted(names)[0]}")
    return rng.choice(found)


def _edit(data: bytes, rng: Random, change) -> tuple[bytes, str]:
    ops, rest = parse(data)
    what = change(ops, rng)
    return dump(ops, rest), what


def _int(ops: list[Op], rng: Random) -> str:
    i = _pick(ops, rng, INT_OPS)
    old = ops[i].arg if isinstance(ops[i].arg, int) and not isinstance(ops[i].arg, bool) else 0
    new = rng.choice([v for v in INTS + [old + 1, old - 1, old * 2, -old, old * 4096] if v != old])
    ops[i] = Op("INT", new, enc_int(new))
    return f"int #{i}: {old} -> {new}"


def _memo(ops: list[Op], rng: Random) -> str:
    i = _pick(ops, rng, PUT_OPS | GET_OPS)
    puts = sorted({op.arg for op in ops if op.name in PUT_OPS and isinstance(op.arg, int)})
    old = ops[i].arg
    new = rng.choice([*(puts or [0]), max(puts or [0]) + 1, 1 << 28, (1 << 31) - 1, 0, (old or 0) + 1])
    kind = "put" if ops[i].name in PUT_OPS else "get"
    ops[i] = Op(kind, new, enc_memo(kind, new))
    return f"memo {kind} #{i}: {old} -> {new}"


def _string(ops: list[Op], rng: Random) -> str:
    i = _pick(ops, rng, STR_OPS | BYTES_OPS)
    old = ops[i].arg
    others = [op.arg for op in ops if op.name in STR_OPS and op.arg != old]
    new = rng.choice(STRINGS + others + [b"\xff\xfe" + (old.encode() if isinstance(old, str) else old or b"")])
    if ops[i].name in BYTES_OPS:
        raw = new if isinstance(new, bytes) else new.encode("utf-8", "surrogatepass")
        ops[i] = Op("BINBYTES", raw, b"B" + struct.pack("<I", len(raw)) + raw)
    else:
        ops[i] = Op("BINUNICODE", new, enc_str(new))
    return f"string #{i}: {old!r} -> {new!r}"[:160]


def _length(ops: list[Op], rng: Random) -> str:
    i = _pick(ops, rng, set(LENGTH_FIELD))
    width = LENGTH_FIELD[ops[i].name]
    raw = ops[i].raw
    old = int.from_bytes(raw[1:1 + width], "little")
    top = (1 << 8 * width) - 1
    new = rng.choice([v for v in (old + 1, old - 1, 0, top, old * 2, old + 8) if 0 <= v <= top and v != old] or [top])
    ops[i] = Op(ops[i].name, None, raw[:1] + new.to_bytes(width, "little") + raw[1 + width:])
    return f"length of {ops[i].name} #{i}: {old} -> {new}"


def _global(ops: list[Op], rng: Random) -> str:
    i = _pick(ops, rng, {"GLOBAL"})
    module, name = rng.choice(GLOBALS)
    old = ops[i].arg
    ops[i] = Op("GLOBAL", f"{module} {name}", enc_global(module, name))
    return f"global #{i}: {old} -> {module}.{name}"


def _kin(ops: list[Op], rng: Random) -> str:
    group_of = {name: g for g in KIN for name in g}
    i = _pick(ops, rng, set(group_of))
    new = rng.choice([n for n in group_of[ops[i].name] if n != ops[i].name])
    old = ops[i].name
    ops[i] = Op(new, None, _CODES[new].encode("latin-1"))
    return f"op #{i}: {old} -> {new}"


_CODES = {op.name: op.code for op in pickletools.opcodes}


def _delete(ops: list[Op], rng: Random) -> str:
    i = rng.randrange(1, max(2, len(ops) - 1))
    op = ops.pop(i)
    return f"op #{i} {op.name} deleted"


def _duplicate(ops: list[Op], rng: Random) -> str:
    i = rng.randrange(1, max(2, len(ops) - 1))
    ops.insert(i, ops[i])
    return f"op #{i} {ops[i].name} duplicated"


def _move(ops: list[Op], rng: Random) -> str:
    if len(ops) < 4:
        raise NotApplicable("too few ops")
    i = rng.randrange(1, len(ops) - 2)
    ops[i], ops[i + 1] = ops[i + 1], ops[i]
    return f"ops #{i} and #{i + 1} swapped"


def _nest(ops: list[Op], rng: Random) -> str:
    """The whole object wrapped in ``n`` lists, tuples or dicts (opcodes torch's reader knows too)."""
    n = rng.choice([64, 1000, 20000, 100000])
    kind = rng.choice(["list", "tuple", "dict"])
    opening = {"list": b"]", "tuple": b"(", "dict": b"}" + enc_str("k")}[kind]  # EMPTY_LIST, MARK, EMPTY_DICT
    closing = {"list": b"a", "tuple": b"t", "dict": b"s"}[kind]  # APPEND, TUPLE, SETITEM
    start = 1 if ops[0].name == "PROTO" else 0
    ops.insert(start, Op("NEST", None, opening * n))
    ops.insert(len(ops) - 1, Op("NEST", None, closing * n))
    return f"object nested in {n} {kind}s"


def _cycle(ops: list[Op], rng: Random) -> str:
    """A dict or list that holds itself (right after it is made and memoized)."""
    spots = [i for i in range(len(ops) - 1) if ops[i].name in ("EMPTY_DICT", "EMPTY_LIST")
             and ops[i + 1].name in PUT_OPS and isinstance(ops[i + 1].arg, int)]
    if not spots:
        raise NotApplicable("no memoized container")
    i = rng.choice(spots)
    k = ops[i + 1].arg
    add = enc_str("self") + enc_memo("get", k) + b"s" if ops[i].name == "EMPTY_DICT" else enc_memo("get", k) + b"a"
    ops.insert(i + 2, Op("CYCLE", None, add))
    return f"container #{i} made to hold itself"


def _huge(ops: list[Op], rng: Random) -> str:
    """An allocation in proportion to a number in the pickle (the pickle itself stays small)."""
    roll = rng.randrange(3)
    if roll == 0:
        n = rng.choice([3 << 30, 1 << 40, (1 << 31) - 1])
        add, what = enc_global("builtins", "bytearray") + enc_int(n) + b"\x85R0", f"bytearray({n})"
    elif roll == 1:
        n = rng.choice([1 << 28, (1 << 32) - 1, 1 << 30])
        add, what = b"N" + enc_memo("put", n) + b"0", f"memo index {n}"
    else:
        n = rng.choice([1 << 31, 1 << 40, (1 << 64) - 1])
        op = rng.choice([b"\x8d", b"\x8e", b"\x96"])  # BINUNICODE8, BINBYTES8, BYTEARRAY8
        add, what = op + n.to_bytes(8, "little") + b"xx" + b"0", f"{op!r} declaring {n} bytes"
    i = rng.randrange(1, len(ops))
    ops.insert(i, Op("HUGE", None, add))
    return f"{what} at op #{i}"


def _build(ops: list[Op], rng: Random) -> str:
    """A ``BUILD`` with a state dict on an object some ``REDUCE`` made (an OrderedDict, a tensor)."""
    i = _pick(ops, rng, {"REDUCE", "BINPERSID"})
    key = rng.choice(["items", "keys", "values", "shape", "storage", "offset", "dtype", "__class__", "numel"])
    value = rng.choice([enc_int(0), enc_int(1 << 40), b"N", b")", b"}", enc_str("x")])
    ops.insert(i + 1, Op("BUILD", None, b"}" + enc_str(key) + value + b"sb"))
    return f"BUILD {{{key!r}: ...}} after op #{i} {ops[i].name}"


def _payload(ops: list[Op], rng: Random) -> str:
    """A call that would create the sentinel file, its result popped."""
    calls = [enc_global("posix", "system") + enc_str(f"touch {SENTINEL}") + b"\x85",
             enc_global("os", "system") + enc_str(f"touch {SENTINEL}") + b"\x85",
             enc_global("builtins", "eval") + enc_str(f"open({SENTINEL!r}, 'w')") + b"\x85",
             enc_global("builtins", "open") + enc_str(SENTINEL) + enc_str("w") + b"\x86",
             enc_global("subprocess", "call") + b"]" + enc_str("touch") + b"a" + enc_str(SENTINEL) + b"a\x85",
             enc_global("builtins", "exec") + enc_str(f"open({SENTINEL!r}, 'w')") + b"\x85"]
    i = rng.randrange(1, len(ops))
    ops.insert(i, Op("PAYLOAD", None, rng.choice(calls) + b"R0"))
    return f"payload call at op #{i}"


def _storage(ops: list[Op], rng: Random) -> str:
    """One field of a storage's persistent id: its type, key, location or element count."""
    ids = [i for i, op in enumerate(ops) if op.name == "BINPERSID"]
    if not ids:
        raise NotApplicable("no persistent id")
    end = rng.choice(ids)
    start = max(i for i in range(end) if ops[i].name == "MARK")
    fields = [i for i in range(start + 1, end) if ops[i].name in STR_OPS | INT_OPS | {"GLOBAL"} | GET_OPS]
    if not fields:
        raise NotApplicable("empty persistent id")
    i = rng.choice(fields)
    if ops[i].name in INT_OPS:
        return _int_at(ops, i, rng)
    if ops[i].name == "GLOBAL" or ops[i].name in GET_OPS:
        module, name = rng.choice([g for g in GLOBALS if g[1].endswith("Storage")])
        ops[i] = Op("GLOBAL", None, enc_global(module, name))
        return f"storage type #{i} -> {name}"
    new = rng.choice(["0", "1", "99", "", "../0", "cuda:0", "meta", "0/../1"])
    ops[i] = Op("BINUNICODE", new, enc_str(new))
    return f"storage field #{i} -> {new!r}"


def _int_at(ops: list[Op], i: int, rng: Random) -> str:
    old = ops[i].arg if isinstance(ops[i].arg, int) else 0
    new = rng.choice([v for v in INTS + [old + 1, old - 1] if v != old])
    ops[i] = Op("INT", new, enc_int(new))
    return f"storage count #{i}: {old} -> {new}"


def _splice(ops: list[Op], rng: Random, ctx) -> str:
    others = []
    for other in ctx.others:
        try:
            others.append(parse(other)[0])
        except NotApplicable:
            continue
    if not others:
        raise NotApplicable("no other pickle")
    theirs = rng.choice(others)
    a = rng.randrange(1, len(ops) - 1)
    b = min(len(ops) - 1, a + rng.randrange(1, 20))
    c = rng.randrange(1, len(theirs) - 1)
    d = min(len(theirs) - 1, c + rng.randrange(1, 20))
    ops[a:b] = theirs[c:d]
    return f"ops #{a}:{b} replaced with another pickle's #{c}:{d}"


CHANGES = {f.__name__.lstrip("_"): f for f in (_int, _memo, _string, _length, _global, _kin, _delete, _duplicate,
                                               _move, _nest, _cycle, _huge, _build, _payload, _storage)}


def mutate_pickle(data: bytes, rng: Random, ctx=NO_CONTEXT, change: str | None = None) -> tuple[bytes, str]:
    """One opcode-aware mutation of the pickle ``data`` (``change`` names it; random if None)."""
    name = change or rng.choice([*CHANGES, "splice"])
    if name == "splice":
        return _edit(data, rng, lambda ops, r: _splice(ops, r, ctx))
    return _edit(data, rng, CHANGES[name])
