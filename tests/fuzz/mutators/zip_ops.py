"""Field-aware mutations of torch zip checkpoints: header fields, member names, members.

``zip_field`` sets one numeric field of a local header, central entry, data descriptor or
end record (sizes, offsets, name and extra lengths, compression method, flags, disk numbers,
counts), on one side or on both sides of a local/central pair. ``zip_name`` edits member names
in place (a duplicate of another member's name, a byte that is not UTF-8, a storage key that
does not exist, a folder outside the layout). ``zip_members`` rewrites the archive with a
member duplicated, dropped, added, compressed, reordered, retyped or resized, or the central
directory repeating or omitting entries; ``zip_bomb`` swaps ``data.pkl`` for a deflate bomb.
"""

from __future__ import annotations

import zipfile
from random import Random

from tests.fuzz.mutators import zip_layout as zl
from tests.fuzz.mutators.base import NO_CONTEXT, NotApplicable, interesting

METHODS = [zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA, 1, 6, 9, 93, 98, 99, 0xFFFF]
FLAG_BITS = [0, 1, 3, 6, 11, 13]
BOMBS = {"bomb.deflate": zipfile.ZIP_DEFLATED, "bomb.bzip2": zipfile.ZIP_BZIP2}  # seed extras: BOMB_SIZE zeros
BOMB_SIZE = 5 << 29  # 2.5 GiB


def _value(rng: Random, slot: zl.Slot, old: int) -> int:
    kind = slot.name.rsplit(".", 1)[1]
    if kind == "method":
        return rng.choice([m for m in METHODS if m != old])
    if kind == "flags":
        return old ^ (1 << rng.choice(FLAG_BITS))
    if kind in ("nlen", "xlen", "clen") and rng.random() < 0.7:
        return max(0, old + rng.choice([-2, -1, 1, 2, 4, 100]))
    return interesting(rng, old, 8 * slot.width)


def _twin(layout: zl.Layout, slot: zl.Slot) -> zl.Slot | None:
    """The same field on the other side of a local/central pair, if it has one."""
    side, _, rest = slot.name.partition("[")
    other = {"local": "central", "central": "local"}.get(side)
    return next((s for s in layout.slots if s.name == f"{other}[{rest}"), None) if other else None


def zip_field(data: bytes, rng: Random, ctx=NO_CONTEXT) -> tuple[bytes, str]:
    layout = zl.parse(data)
    slot = rng.choice(layout.slots)
    old = int.from_bytes(data[slot.offset:slot.offset + slot.width], "little")
    new = _value(rng, slot, old) & ((1 << 8 * slot.width) - 1)
    out = bytearray(data)
    targets = [slot] + ([t] if rng.random() < 0.5 and (t := _twin(layout, slot)) else [])
    for s in targets:
        out[s.offset:s.offset + s.width] = new.to_bytes(s.width, "little")
    return bytes(out), f"{' and '.join(s.name for s in targets)}: {old} -> {new}"


def _rename(data: bytes, m: zl.Member, new: bytes) -> bytes:
    """``data`` with member ``m``'s name replaced, in its local header and central entry (same length)."""
    out = bytearray(data)
    out[m.central + 46:m.central + 46 + len(new)] = new
    out[m.local + 30:m.local + 30 + len(new)] = new
    return bytes(out)


def zip_name(data: bytes, rng: Random, ctx=NO_CONTEXT) -> tuple[bytes, str]:
    layout = zl.parse(data)
    m = rng.choice(layout.members)
    same = [o.name for o in layout.members if o is not m and len(o.name) == len(m.name)]
    roll = rng.random()
    if roll < 0.35 and same:
        new = rng.choice(same)
    elif roll < 0.55:
        i = rng.randrange(len(m.name))
        new = m.name[:i] + bytes([rng.choice([0xFF, 0xC3, 0x80, 0x00])]) + m.name[i + 1:]
    elif roll < 0.75:
        new = bytes([rng.randrange(0x21, 0x7F)]) + m.name[1:]  # another archive folder
    else:
        i = rng.randrange(len(m.name))
        new = m.name[:i] + rng.choice([b"/", b"\\", b".", b"9", b"Z"]) + m.name[i + 1:]
    if new == m.name:
        raise NotApplicable("same name")
    return _rename(data, m, new), f"member {m.name!r} renamed {new!r}"


def zip_members(data: bytes, rng: Random, ctx=NO_CONTEXT) -> tuple[bytes, str]:
    members = zl.entries(data)
    root = zl.prefix(members)
    i = rng.randrange(len(members))
    e = members[i]
    central = None
    comment = b""
    roll = rng.randrange(11)
    if roll == 0:
        twin = zl.Entry(e.name, bytes(reversed(e.raw)) if rng.random() < 0.5 else e.raw)
        members.insert(rng.choice([i + 1, len(members)]), twin)
        what = f"{e.name!r} duplicated"
    elif roll == 1:
        del members[i]
        what = f"{e.name!r} dropped"
    elif roll == 2:
        name = rng.choice([root + b"/data/99", root + b"/../evil", b"other/data.pkl", root + b"/data.pkl",
                           root + b"/data/0/x", b"/abs", root + b"/.data/x", root + b"/byteorder"])
        members.insert(rng.randrange(len(members) + 1), zl.Entry(name, rng.choice([b"", b"big", bytes(64)])))
        what = f"member {name!r} added"
    elif roll == 3:
        method = rng.choice([zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
        members[i] = zl.Entry(e.name, e.raw, method)
        what = f"{e.name!r} compressed with method {method}"
    elif roll == 4:
        rng.shuffle(members)
        what = "members reordered"
    elif roll == 5:
        central = [rng.randrange(len(members)) for _ in range(rng.randrange(1, len(members) + 2))]
        what = f"central directory names entries {central}"
    elif roll == 6:
        members[i] = zl.Entry(e.name, rng.randbytes(len(e.raw)))
        what = f"{e.name!r} filled with random bytes"
    elif roll == 7:
        n = rng.choice([0, 1, len(e.raw) // 2, len(e.raw) - 1, len(e.raw) + 1, 2 * len(e.raw) + 8])
        members[i] = zl.Entry(e.name, (e.raw * 3)[:n])
        what = f"{e.name!r} resized to {n} bytes"
    elif roll == 8:
        new_root = rng.choice([b"archive", b"x", b"a/b", b"", b"..", b"\xff"])
        members = [zl.Entry(new_root + m.name[len(root):], m.raw) for m in members]
        what = f"archive folder renamed {new_root!r}"
    elif roll == 9:
        members[i] = zl.Entry(e.name, e.raw, zipfile.ZIP_DEFLATED, usize=rng.choice([0, 1, len(e.raw) // 2, 1 << 31]))
        what = f"{e.name!r} deflated, declaring another size"
    else:
        comment = rng.randbytes(rng.choice([1, 100, 65535]))
        what = f"comment of {len(comment)} bytes"
    return zl.build(members, central, comment), f"rewritten: {what}"


def zip_bomb(data: bytes, rng: Random, ctx=NO_CONTEXT) -> tuple[bytes, str]:
    """``data.pkl`` (or another member) replaced by a bomb: 2.5 GiB of zeros deflated into 2.5 MiB,
    or put through bzip2 into 2 KiB."""
    kinds = sorted(k for k in BOMBS if k in ctx.extras)
    if not kinds:
        raise NotApplicable("no bomb seed")
    kind = rng.choice(kinds)
    members = zl.entries(data)
    i = rng.randrange(len(members))
    declared = rng.choice([BOMB_SIZE, len(members[i].raw)])
    members[i] = zl.Entry(members[i].name, b"", BOMBS[kind], payload=ctx.extras[kind], usize=declared)
    return zl.build(members), f"{members[i].name!r} is a {kind} declaring {declared} bytes"


ZIP_OPS = {f.__name__: f for f in (zip_field, zip_name, zip_members, zip_bomb)}
