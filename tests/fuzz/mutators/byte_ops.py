"""Format-blind mutations of a file's bytes: bit flips, overwritten words, truncation, splices."""

from __future__ import annotations

from random import Random

from tests.fuzz.mutators.base import NO_CONTEXT, NotApplicable, interesting, offset


def flip_bit(data: bytes, rng: Random, ctx=NO_CONTEXT) -> tuple[bytes, str]:
    at = offset(rng, len(data))
    bit = rng.randrange(8)
    return data[:at] + bytes([data[at] ^ (1 << bit)]) + data[at + 1:], f"flip bit {bit} of byte {at}"


def set_byte(data: bytes, rng: Random, ctx=NO_CONTEXT) -> tuple[bytes, str]:
    at = offset(rng, len(data))
    new = rng.choice([b for b in (0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)) if b != data[at]])
    return data[:at] + bytes([new]) + data[at + 1:], f"byte {at} = {new:#x}"


def set_word(data: bytes, rng: Random, ctx=NO_CONTEXT) -> tuple[bytes, str]:
    """A little-endian 2-, 4- or 8-byte word at any offset set to an interesting value."""
    width = rng.choice([2, 4, 8])
    if len(data) < width:
        raise NotApplicable("too short")
    at = min(offset(rng, len(data)), len(data) - width)
    old = int.from_bytes(data[at:at + width], "little")
    new = interesting(rng, old, 8 * width)
    return data[:at] + new.to_bytes(width, "little") + data[at + width:], f"u{8 * width} at {at}: {old} -> {new}"


def truncate(data: bytes, rng: Random, ctx=NO_CONTEXT) -> tuple[bytes, str]:
    if len(data) < 2:
        raise NotApplicable("too short")
    roll = rng.random()
    keep = (rng.randrange(1, min(len(data), 512)) if roll < 0.3 else len(data) - rng.randrange(1, min(len(data), 64))
            if roll < 0.6 else rng.randrange(1, len(data)))
    return data[:keep], f"truncated to {keep} of {len(data)} bytes"


def insert_bytes(data: bytes, rng: Random, ctx=NO_CONTEXT) -> tuple[bytes, str]:
    at = offset(rng, len(data) + 1)
    n = rng.choice([1, 2, 4, 8, 16, 100, 4096])
    fill = bytes(n) if rng.random() < 0.5 else rng.randbytes(n)
    return data[:at] + fill + data[at:], f"{n} bytes inserted at {at}"


def delete_range(data: bytes, rng: Random, ctx=NO_CONTEXT) -> tuple[bytes, str]:
    if len(data) < 2:
        raise NotApplicable("too short")
    at = offset(rng, len(data) - 1)
    n = min(rng.choice([1, 2, 4, 8, 16, 100, 4096]), len(data) - at)
    return data[:at] + data[at + n:], f"{n} bytes deleted at {at}"


def duplicate_range(data: bytes, rng: Random, ctx=NO_CONTEXT) -> tuple[bytes, str]:
    if len(data) < 2:
        raise NotApplicable("too short")
    start = offset(rng, len(data) - 1)
    n = min(rng.choice([4, 16, 64, 512]), len(data) - start)
    at = rng.randrange(len(data) + 1)
    return data[:at] + data[start:start + n] + data[at:], f"bytes {start}+{n} copied to {at}"


def splice(data: bytes, rng: Random, ctx=NO_CONTEXT) -> tuple[bytes, str]:
    """This file's start joined to another seed's end."""
    others = [s for s in ctx.others if isinstance(s, bytes) and s != data]
    if not others or len(data) < 2:
        raise NotApplicable("no other seed")
    other = rng.choice(others)
    cut, cut2 = rng.randrange(1, len(data)), rng.randrange(len(other))
    return data[:cut] + other[cut2:], f"spliced at {cut} with another seed from {cut2}"


BYTE_OPS = {f.__name__: f for f in (flip_bit, set_byte, set_word, truncate, insert_bytes, delete_range,
                                     duplicate_range, splice)}
