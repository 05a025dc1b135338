"""Field-aware mutations of GGUF files: every count, length, type, dim and offset is a slot.

:func:`slots` walks a GGUF file as the spec lays it out (header; key-value pairs with their
value types, array item types, counts and string lengths; tensor infos with their dims, GGML
types and data offsets) and records where each numeric field lies. :func:`gguf_field` sets one
of them to a value chosen for its kind: a STRING turned ARRAY, a count of 2**63, a string
length past the end, a dim of 0 or one that overflows, a GGML type with no dequantizer or none
at all, an offset that is unaligned, overlapping or past the end.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from random import Random

from tests.fuzz.mutators.base import NO_CONTEXT, NotApplicable, interesting

FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes
STRING, ARRAY = 8, 9
STRINGS_KEPT = 3  # string-length slots recorded per array (its first ones and its last)
KIND_WEIGHTS = {"vtype": 3, "item_type": 2, "count": 3, "str_len": 2, "key_len": 1, "name_len": 1, "n_dims": 2,
                "dim": 4, "ggml_type": 3, "offset": 4, "version": 1, "n_tensors": 1, "n_kv": 1, "scalar": 1,
                "alignment": 2}


@dataclass(frozen=True)
class Slot:
    offset: int
    width: int
    kind: str
    what: str  # "key 'general.name' value type", "tensor 'output.weight' dim 1", ...


class _Walk:
    def __init__(self, data: bytes):
        self.data, self.pos, self.slots = data, 0, []

    def num(self, width: int, kind: str, what: str) -> int:
        if self.pos + width > len(self.data):
            raise EOFError
        value = int.from_bytes(self.data[self.pos:self.pos + width], "little")
        self.slots.append(Slot(self.pos, width, kind, what))
        self.pos += width
        return value

    def string(self, kind: str, what: str, record: bool = True) -> bytes:
        if record:
            n = self.num(8, kind, what)
        else:
            n = int.from_bytes(self.data[self.pos:self.pos + 8], "little")
            self.pos += 8
        if self.pos + n > len(self.data):
            raise EOFError
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def value(self, vtype: int, what: str, depth: int = 0) -> None:
        if vtype == STRING:
            self.string("str_len", f"{what} string length")
        elif vtype == ARRAY:
            item = self.num(4, "item_type", f"{what} item type")
            count = self.num(8, "count", f"{what} count")
            if depth > 4 or count > len(self.data):
                raise EOFError
            for i in range(count):
                self.value(item, f"{what}[{i}]", depth + 1) if item in (STRING, ARRAY) and (
                    i < STRINGS_KEPT or i == count - 1) else self._skip(item)
        elif vtype in FIXED:
            self.slots.append(Slot(self.pos, FIXED[vtype], "scalar", f"{what} value"))
            self.pos += FIXED[vtype]
        else:
            raise EOFError

    def _skip(self, vtype: int) -> None:
        if vtype == STRING:
            self.string("", "", record=False)
        elif vtype in FIXED:
            self.pos += FIXED[vtype]
        else:
            raise EOFError


def slots(data: bytes) -> list[Slot]:
    """Every numeric field of a GGUF file, as far as it can be walked."""
    if data[:4] != b"GGUF":
        raise NotApplicable("not GGUF")
    w = _Walk(data)
    w.pos = 4
    try:
        w.num(4, "version", "version")
        n_tensors = w.num(8, "n_tensors", "tensor count")
        n_kv = w.num(8, "n_kv", "key-value count")
        for _ in range(min(n_kv, 10000)):
            key = w.string("key_len", "key length").decode(errors="replace")
            vtype = w.num(4, "vtype", f"key {key!r} value type")
            if key == "general.alignment" and vtype == 4:
                w.slots.append(Slot(w.pos, 4, "alignment", "general.alignment"))
            w.value(vtype, f"key {key!r}")
        for _ in range(min(n_tensors, 10000)):
            name = w.string("name_len", "tensor name length").decode(errors="replace")
            n_dims = w.num(4, "n_dims", f"tensor {name!r} n_dims")
            for d in range(min(n_dims, 8)):
                w.num(8, "dim", f"tensor {name!r} dim {d}")
            w.num(4, "ggml_type", f"tensor {name!r} GGML type")
            w.num(8, "offset", f"tensor {name!r} data offset")
    except EOFError:
        pass
    return w.slots


def _value(rng: Random, slot: Slot, old: int, data: bytes, all_slots: list[Slot]) -> int:
    k = slot.kind
    if k in ("vtype", "item_type"):
        return rng.choice([ARRAY if old == STRING else STRING] * 3 + list(range(14)) + [0xFFFFFFFF])
    if k == "ggml_type":
        return rng.choice(list(range(42)) + [4, 5, 9, 15, 31, 32, 33, 0xFFFFFFFF, 1 << 31])
    if k == "n_dims":
        return rng.choice([0, 1, 2, 3, 4, 5, 8, 0xFFFFFFFF])
    if k == "version":
        return rng.choice([0, 1, 2, 3, 4, 0x03000000, 0xFFFFFFFF])
    if k == "alignment":
        return rng.choice([0, 1, 3, 8, 16, 64, 4096, 1 << 31, 0xFFFFFFFF])
    if k == "dim":
        return rng.choice([0, 1, old + 1, old - 1, old * 2, old * 32, 1 << 32, 1 << 62, (1 << 64) - 1,
                           ((1 << 63) // max(old, 1)) + 1, interesting(rng, old, 64)])
    if k == "offset":
        others = [int.from_bytes(data[s.offset:s.offset + 8], "little") for s in all_slots if s.kind == "offset"]
        return rng.choice([old + 32, old - 32, old + 1, 0, 1 << 63, len(data), *others, interesting(rng, old, 64)])
    if k in ("str_len", "key_len", "name_len", "count"):
        return rng.choice([old + 1, old - 1, 0, old * 2, 1 << 63, (1 << 64) - 1, len(data), 65536, 1 << 32,
                           interesting(rng, old, 64)])
    return interesting(rng, old, 8 * slot.width)


def gguf_field(data: bytes, rng: Random, ctx=NO_CONTEXT) -> tuple[bytes, str]:
    found = slots(data)
    if not found:
        raise NotApplicable("no slots")
    kinds = sorted({s.kind for s in found})
    kind = rng.choices(kinds, [KIND_WEIGHTS.get(k, 1) for k in kinds])[0]
    slot = rng.choice([s for s in found if s.kind == kind])
    old = int.from_bytes(data[slot.offset:slot.offset + slot.width], "little")
    new = _value(rng, slot, old, data, found) % (1 << 8 * slot.width)
    if new == old:
        new = (old + 1) % (1 << 8 * slot.width)
    return (data[:slot.offset] + new.to_bytes(slot.width, "little") + data[slot.offset + slot.width:],
            f"{slot.what}: {old} -> {new}")


def gguf_tensor_swap(data: bytes, rng: Random, ctx=NO_CONTEXT) -> tuple[bytes, str]:
    """Two tensors trade their data offsets (or one takes the other's): bytes land elsewhere."""
    offsets = [s for s in slots(data) if s.kind == "offset"]
    if len(offsets) < 2:
        raise NotApplicable("fewer than two tensors")
    a, b = rng.sample(offsets, 2)
    va, vb = (struct.unpack_from("<Q", data, s.offset)[0] for s in (a, b))
    out = bytearray(data)
    struct.pack_into("<Q", out, a.offset, vb)
    if rng.random() < 0.5:
        struct.pack_into("<Q", out, b.offset, va)
    return bytes(out), f"{a.what} and {b.what}: offsets swapped or shared"


GGUF_OPS = {f.__name__: f for f in (gguf_field, gguf_tensor_swap)}
