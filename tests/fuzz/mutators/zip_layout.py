"""A torch zip's structure, read and written without ``zipfile``: where every header field lies.

:func:`parse` finds the end-of-central-directory records (zip64 ones too), every central entry,
its local header and data descriptor, and lists each numeric field as a :class:`Slot` (file
offset, width, name), so a mutation can set any field. :func:`build` writes members back into
a zip of stored, deflated, bzip2 or LZMA members, with any central directory order (repeats
and omissions included), as a hostile writer could.
"""

from __future__ import annotations

import bz2
import struct
import zipfile
import zlib
from dataclasses import dataclass, field

from tests.fuzz.mutators.base import NotApplicable

LOCAL_FIELDS = [("need", 4, 2), ("flags", 6, 2), ("method", 8, 2), ("crc", 14, 4), ("csize", 18, 4),
                ("usize", 22, 4), ("nlen", 26, 2), ("xlen", 28, 2)]
CENTRAL_FIELDS = [("made", 4, 2), ("need", 6, 2), ("flags", 8, 2), ("method", 10, 2), ("crc", 16, 4),
                  ("csize", 20, 4), ("usize", 24, 4), ("nlen", 28, 2), ("xlen", 30, 2), ("clen", 32, 2),
                  ("disk", 34, 2), ("eattr", 38, 4), ("offset", 42, 4)]
EOCD_FIELDS = [("disk", 4, 2), ("cd_disk", 6, 2), ("n_here", 8, 2), ("n_total", 10, 2), ("cd_size", 12, 4),
               ("cd_offset", 16, 4), ("clen", 20, 2)]
EOCD64_FIELDS = [("size", 4, 8), ("disk", 16, 4), ("cd_disk", 20, 4), ("n_here", 24, 8), ("n_total", 32, 8),
                 ("cd_size", 40, 8), ("cd_offset", 48, 8)]
LOCATOR_FIELDS = [("disk", 4, 4), ("offset", 8, 8), ("disks", 16, 4)]
DESCRIPTOR_FIELDS = [("crc", 4, 4), ("csize", 8, 4), ("usize", 12, 4)]


@dataclass(frozen=True)
class Slot:
    offset: int
    width: int
    name: str  # "central[3].csize", "eocd64.cd_offset", ...


@dataclass
class Member:
    name: bytes
    local: int  # offset of its local header
    central: int  # offset of its central entry
    data: int  # offset of its data
    csize: int
    usize: int
    method: int
    flags: int
    crc: int

    def payload(self, data: bytes) -> bytes:
        return data[self.data:self.data + self.csize]


@dataclass
class Layout:
    members: list[Member]
    slots: list[Slot] = field(default_factory=list)
    eocd: int = 0


def _fields(data: bytes, at: int, table, prefix: str) -> list[Slot]:
    return [Slot(at + off, width, f"{prefix}.{name}") for name, off, width in table if at + off + width <= len(data)]


def parse(data: bytes) -> Layout:
    """The layout of a well-formed zip; :class:`NotApplicable` if it is not one."""
    eocd = data.rfind(b"PK\x05\x06")
    if eocd < 0 or eocd + 22 > len(data):
        raise NotApplicable("no end of central directory")
    slots = _fields(data, eocd, EOCD_FIELDS, "eocd")
    (n_total,) = struct.unpack_from("<H", data, eocd + 10)
    (cd_offset,) = struct.unpack_from("<I", data, eocd + 16)
    locator = eocd - 20
    if locator >= 0 and data[locator:locator + 4] == b"PK\x06\x07":
        slots += _fields(data, locator, LOCATOR_FIELDS, "locator64")
        (e64,) = struct.unpack_from("<Q", data, locator + 8)
        if data[e64:e64 + 4] == b"PK\x06\x06":
            slots += _fields(data, e64, EOCD64_FIELDS, "eocd64")
            n_total, cd_offset = struct.unpack_from("<Q", data, e64 + 32)[0], struct.unpack_from("<Q", data, e64 + 48)[0]
    members, at = [], cd_offset
    for i in range(n_total):
        if data[at:at + 4] != b"PK\x01\x02":
            raise NotApplicable("bad central directory")
        flags, method, _, _, crc, csize, usize, nlen, xlen, clen = struct.unpack_from("<HHHHIIIHHH", data, at + 8)
        (local,) = struct.unpack_from("<I", data, at + 42)
        name = data[at + 46:at + 46 + nlen]
        slots += _fields(data, at, CENTRAL_FIELDS, f"central[{i}]")
        if data[local:local + 4] != b"PK\x03\x04":
            raise NotApplicable("bad local header")
        slots += _fields(data, local, LOCAL_FIELDS, f"local[{i}]")
        lnlen, lxlen = struct.unpack_from("<HH", data, local + 26)
        start = local + 30 + lnlen + lxlen
        members.append(Member(name, local, at, start, csize, usize, method, flags, crc))
        end = start + csize
        if flags & 8 and data[end:end + 4] == b"PK\x07\x08":
            slots += _fields(data, end, DESCRIPTOR_FIELDS, f"descriptor[{i}]")
        at += 46 + nlen + xlen + clen
    return Layout(members, slots, eocd)


@dataclass
class Entry:
    """A member to write: its name, raw bytes, and how to store them."""

    name: bytes
    raw: bytes
    method: int = zipfile.ZIP_STORED
    payload: bytes | None = None  # the bytes as stored, when given (a bomb); else made from ``raw``
    usize: int | None = None  # the uncompressed size to declare, when not len(raw)


def compress(raw: bytes, method: int) -> bytes:
    if method == zipfile.ZIP_DEFLATED:
        c = zlib.compressobj(6, zlib.DEFLATED, -15)
        return c.compress(raw) + c.flush()
    if method == zipfile.ZIP_BZIP2:
        return bz2.compress(raw)
    if method == zipfile.ZIP_LZMA:
        c = zipfile.LZMACompressor()
        return c.compress(raw) + c.flush()
    return raw


def build(entries: list[Entry], central: list[int] | None = None, comment: bytes = b"") -> bytes:
    """A zip of ``entries`` (local headers in order); ``central`` lists which entries the central
    directory names, in its order (default: all, in order)."""
    out, records = bytearray(), []
    for e in entries:
        payload = e.payload if e.payload is not None else compress(e.raw, e.method)
        crc, usize = zlib.crc32(e.raw), e.usize if e.usize is not None else len(e.raw)
        records.append((len(out), crc, len(payload), usize, e))
        out += struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0x800, e.method, 0, 0x21, crc, len(payload), usize,
                           len(e.name), 0) + e.name + payload
    cd_start = len(out)
    order = range(len(entries)) if central is None else central
    for i in order:
        at, crc, csize, usize, e = records[i]
        out += struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0x800, e.method, 0, 0x21, crc, csize, usize,
                           len(e.name), 0, 0, 0, 0, 0, at) + e.name
    out += struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(order), len(order), len(out) - cd_start, cd_start,
                       len(comment)) + comment
    return bytes(out)


def entries(data: bytes) -> list[Entry]:
    """The members of a well-formed zip, as entries to write back (stored as they were read)."""
    layout = parse(data)
    out = []
    for m in layout.members:
        if m.method != zipfile.ZIP_STORED:
            raise NotApplicable("compressed member")
        out.append(Entry(m.name, m.payload(data)))
    return out


def prefix(members: list[Entry]) -> bytes:
    """The archive folder of a torch zip (``b"archive"``)."""
    return members[0].name.split(b"/", 1)[0] if members else b"archive"
