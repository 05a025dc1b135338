"""Mutations of prebake archives: header fields, the index's JSON, chunk bytes, frames, files.

An archive is a 40-byte header (magic, version, reserved, index length, index digest), the
index (JSON: files, chunk rows ``[file, offset, length, layout, frames, checksum]``, total
size), then each chunk's zstd frames. :func:`split` takes one apart and :func:`join` puts it
back, re-signing the index (its digest, its ``size``) unless told not to, as an attacker with a
packer of their own would. So mutations reach past the checksums: an index edited and
re-signed, chunk bytes changed with their checksum recomputed, a file of the bake (the
manifest above all) replaced by a hostile one and packed properly.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from random import Random

import numpy as np
import xxhash
import zstandard as zstd

from tests.fuzz.mutators.base import NO_CONTEXT, NotApplicable, interesting
from tests.fuzz.mutators.json_tree import INTS, dumps, mutate_tree

HEADER = struct.Struct("<8sIIQ16s")
PLANES = {"bytes": 1, "planes2": 2, "planes4": 4, "planes8": 8}
CHUNK = 4 << 20


@dataclass
class Archive:
    magic: bytes
    version: int
    reserved: int
    index: dict
    blobs: list[bytes]  # each chunk's frames, back to back, in index order
    tail: bytes = b""  # bytes after the last chunk


def split(data: bytes) -> Archive:
    if len(data) < HEADER.size:
        raise NotApplicable("too short")
    magic, version, reserved, length, _ = HEADER.unpack_from(data)
    try:
        index = json.loads(data[HEADER.size:HEADER.size + length])
        rows = index["chunks"]
        at = HEADER.size + length
        blobs = []
        for row in rows:
            n = sum(row[4])
            blobs.append(data[at:at + n])
            at += n
    except (ValueError, KeyError, TypeError, IndexError):
        raise NotApplicable("index does not parse") from None
    return Archive(magic, version, reserved, index, blobs, data[at:])


def join(a: Archive, sign: bool = True, resize: bool = True) -> bytes:
    """The archive's bytes; ``sign``: the digest of the index written; ``resize``: its ``size``
    set to the archive's real length."""
    body = b"".join(a.blobs) + a.tail
    text = dumps(a.index)
    for _ in range(3):
        if resize and isinstance(a.index, dict):
            a.index["size"] = HEADER.size + len(text) + len(body)
            text = dumps(a.index)
    digest = xxhash.xxh3_128_digest(text) if sign else bytes(16)
    return HEADER.pack(a.magic, a.version, a.reserved, len(text), digest) + text + body


def _rows(a: Archive) -> list[list]:
    rows = a.index.get("chunks") if isinstance(a.index, dict) else None
    if not rows:
        raise NotApplicable("no chunks")
    return rows


def decode(row: list, blob: bytes) -> bytes:
    """A chunk's raw bytes from its frames (planes merged back into elements)."""
    k = PLANES[row[3]]
    planes, at = [], 0
    for size in row[4]:
        planes.append(zstd.ZstdDecompressor().decompress(blob[at:at + size]))
        at += size
    if k == 1:
        return planes[0]
    rotated = np.stack([np.frombuffer(p, np.uint8) for p in planes], axis=1).copy().view(f"<u{k}").ravel()
    bits = np.uint64(8 * k - 1).astype(rotated.dtype)
    one = np.uint64(1).astype(rotated.dtype)
    return ((rotated >> one) | (rotated << bits)).tobytes()


def encode(raw: bytes) -> tuple[bytes, str]:
    """One plain (``bytes``) chunk: its zstd frame and checksum."""
    return zstd.ZstdCompressor(level=3).compress(raw), xxhash.xxh3_128_hexdigest(raw)


def archive_index(data: bytes, rng: Random, ctx=NO_CONTEXT) -> tuple[bytes, str]:
    a = split(data)
    a.index, what = mutate_tree(a.index, rng, {"chunks": INTS + ["bytes", "planes4", [1 << 30], [], "0" * 32]})
    sign, resize = rng.random() < 0.9, rng.random() < 0.5
    return join(a, sign, resize), f"index {what} (signed={sign}, resized={resize})"


def archive_header(data: bytes, rng: Random, ctx=NO_CONTEXT) -> tuple[bytes, str]:
    if len(data) < HEADER.size:
        raise NotApplicable("too short")
    fields = [("version", 8, 4), ("reserved", 12, 4), ("index length", 16, 8), ("digest", 24, 8),
              ("magic", 0, 8)]
    name, at, width = rng.choice(fields)
    old = int.from_bytes(data[at:at + width], "little")
    new = interesting(rng, old, 8 * width)
    return data[:at] + new.to_bytes(width, "little") + data[at + width:], f"header {name}: {old} -> {new}"


def archive_chunk(data: bytes, rng: Random, ctx=NO_CONTEXT) -> tuple[bytes, str]:
    """A byte of a chunk's frames changed; half the time its checksum is made to match again."""
    a = split(data)
    rows = _rows(a)
    i = rng.randrange(len(rows))
    blob = bytearray(a.blobs[i])
    if not blob:
        raise NotApplicable("empty chunk")
    at = rng.randrange(len(blob))
    blob[at] ^= 1 << rng.randrange(8)
    a.blobs[i] = bytes(blob)
    fixed = False
    if rng.random() < 0.5:
        try:
            rows[i][5] = xxhash.xxh3_128_hexdigest(decode(rows[i], a.blobs[i]))
            fixed = True
        except (zstd.ZstdError, ValueError, KeyError, TypeError, IndexError):
            pass
    return join(a), f"chunk {i} byte {at} flipped (checksum fixed: {fixed})"


def archive_file(data: bytes, rng: Random, ctx=NO_CONTEXT) -> tuple[bytes, str]:
    """One file of the bake replaced and packed properly (checksums, sizes, index all agree)."""
    a = split(data)
    rows, files = _rows(a), a.index.get("files")
    if not files:
        raise NotApplicable("no files")
    names = [f.get("path") for f in files]
    i = names.index("manifest.json") if "manifest.json" in names and rng.random() < 0.6 else rng.randrange(len(files))
    mine = [j for j, r in enumerate(rows) if r[0] == i]
    try:
        raw = b"".join(decode(rows[j], a.blobs[j]) for j in mine)
    except (zstd.ZstdError, ValueError, KeyError, TypeError, IndexError):
        raise NotApplicable("chunk does not decode") from None
    if names[i] == "manifest.json":
        try:
            tree, what = mutate_tree(json.loads(raw), rng)
        except ValueError:
            raise NotApplicable("manifest is not JSON") from None
        new = dumps(tree)
    else:
        at = rng.randrange(len(raw)) if raw else 0
        new = raw[:at] + bytes([rng.randrange(256)]) + raw[at + 1:] if raw else b"x"
        what = f"byte {at} changed"
    frames = [encode(new[s:s + CHUNK]) for s in range(0, len(new), CHUNK)] or [encode(b"")]
    first = mine[0] if mine else len(rows)
    new_rows = [[i, s * CHUNK, len(new[s * CHUNK:(s + 1) * CHUNK]), "bytes", [len(f)], c] for s, (f, c) in enumerate(frames)]
    keep = [j for j in range(len(rows)) if j not in mine]
    before = [j for j in keep if j < first]
    after = [j for j in keep if j > first]
    a.index["chunks"] = [rows[j] for j in before] + new_rows + [rows[j] for j in after]
    a.blobs = [a.blobs[j] for j in before] + [f for f, _ in frames] + [a.blobs[j] for j in after]
    files[i]["size"] = len(new)
    return join(a), f"file {names[i]!r} repacked: {what}"[:200]


def archive_frames(data: bytes, rng: Random, ctx=NO_CONTEXT) -> tuple[bytes, str]:
    """Chunk data moved: two chunks swapped (rows or bytes), or frame sizes shifted."""
    a = split(data)
    rows = _rows(a)
    if len(rows) < 2:
        i, j = 0, 0
    else:
        i, j = rng.sample(range(len(rows)), 2)
    roll = rng.randrange(3)
    if roll == 0:
        a.blobs[i], a.blobs[j] = a.blobs[j], a.blobs[i]
        rows[i][4], rows[j][4] = rows[j][4], rows[i][4]
        what = f"frames of chunks {i} and {j} swapped"
    elif roll == 1:
        a.blobs[i], a.blobs[j] = a.blobs[j], a.blobs[i]
        what = f"bytes of chunks {i} and {j} swapped"
    else:
        frames = rows[i][4]
        k = rng.randrange(len(frames))
        delta = rng.choice([-1, 1, -8, 8])
        frames[k] = max(0, frames[k] + delta)
        what = f"frame {k} of chunk {i} resized by {delta}"
    return join(a), what


ARCHIVE_OPS = {f.__name__: f for f in (archive_index, archive_header, archive_chunk, archive_file, archive_frames)}
