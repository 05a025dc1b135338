"""The zip container of a ``torch.save`` checkpoint, checked so Python and torch read the same bytes.

torch reads checkpoints with miniz (through its C++ ``PyTorchStreamReader``), prebake with
Python's ``zipfile`` and a memory map. The two disagree on malformed archives: zipfile takes
the last of two members with one name, miniz the first; zipfile cuts a name at a NUL byte;
miniz reads a member whose attributes say "directory" as empty, refuses several disks, zip64
records that do not check out, encryption and patch flags, and methods other than stored and
deflate, all of which zipfile lets through or reads differently. :func:`zip_layout` refuses
every such archive, and anything beyond the members ``torch.save`` writes, so that what prebake
bakes is what ``torch.load`` would load.
"""

from __future__ import annotations

import mmap
import operator
import struct
import zipfile
from dataclasses import dataclass

from prebake.formats.errors import FormatError, UnsupportedError

# what torch.save writes inside its folder, besides data/<key> for each storage
RECORDS = {"data.pkl", "byteorder", "version", ".data/version", ".data/serialization_id",
           ".format_version", ".storage_alignment"}
_END = struct.Struct("<4s4H2LH")  # end of central directory: disks, entries, size, offset
_END64_LOCATOR = struct.Struct("<4sLQL")  # zip64 locator: its disk, offset, total disks
_END64 = struct.Struct("<4sQ2H2L4Q")  # zip64 end record: size, versions, disks, entries, size, offset
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., name length, extra length
_CENTRAL_HEADER_SIZE = 46
_UNREADABLE_FLAGS = 0x2061  # encrypted, compressed patch, strong encryption, masked local headers
_DIRECTORY_ATTRIBUTE = 0x10  # MS-DOS: miniz extracts such a member as empty
_UTF8_NAME = 0x800
_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)  # what miniz reads
_HEADER_OFFSET = operator.attrgetter("header_offset")


@dataclass
class ZipLayout:
    """A checked torch zip: its folder, members by name, and where each member's bytes may end."""

    prefix: str
    members: dict[str, zipfile.ZipInfo]
    next_header: dict[str, int]  # member name -> offset of the next header (its bytes end before it)
    mm: mmap.mmap

    def member(self, record: str) -> zipfile.ZipInfo:
        info = self.members.get(f"{self.prefix}/{record}")
        if info is None:
            raise FormatError(f"checkpoint is missing {self.prefix}/{record}")
        return info

    def data_start(self, info: zipfile.ZipInfo) -> int:
        """Where a stored member's bytes begin, by its local header (as miniz computes it), checked
        to end before the next header: a crafted name or extra length cannot point elsewhere."""
        name, offset, room = info.filename, info.header_offset, self.next_header[info.filename]
        if offset + _LOCAL_HEADER.size > room:
            raise FormatError(f"member {name}'s local header at byte {offset} runs past its room in the file")
        sig, name_len, extra_len = _LOCAL_HEADER.unpack_from(self.mm, offset)
        name_at = offset + _LOCAL_HEADER.size
        start = name_at + name_len + extra_len
        if sig != b"PK\x03\x04" or self.mm[name_at:name_at + name_len] != _raw_name(info, name):
            raise FormatError(f"bad zip local header for {name}")
        if start + info.file_size > room:
            raise FormatError(f"member {name}'s bytes ({start}-{start + info.file_size}) run into the next "
                              f"zip header at byte {room}")
        return start


def zip_layout(zf: zipfile.ZipFile, mm: mmap.mmap) -> ZipLayout:
    """Checks the central directory and every member; returns the layout the reader trusts."""
    infos = zf.infolist()
    _check_directory(zf, mm, infos)
    pkls = [i.filename for i in infos if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
    if not pkls:
        raise FormatError("zip file is not a torch checkpoint (no <name>/data.pkl)")
    prefix = pkls[0].split("/")[0]
    if not prefix:
        raise FormatError("member /data.pkl has an empty folder name")
    members: dict[str, zipfile.ZipInfo] = {}
    folder, storages, size = prefix + "/", prefix + "/data/", len(mm)
    for info in infos:
        name = info.filename
        # the fast path, inline (it runs once per member): a member as torch.save writes it
        if not (name not in members and info.orig_filename == name and name.startswith(folder)
                and (name[len(folder):] in RECORDS or (name.startswith(storages) and len(name) > len(storages)))
                and not info.flag_bits & _UNREADABLE_FLAGS and not info.external_attr & _DIRECTORY_ATTRIBUTE
                and info.volume == 0 and info.compress_type in _METHODS and name[-1] != "/"
                and (info.compress_size == info.file_size or info.compress_type != zipfile.ZIP_STORED)
                and (info.compress_size or not info.file_size)
                and info.header_offset + _LOCAL_HEADER.size + info.compress_size <= size):
            _refuse_member(info, prefix, members, size)
        members[name] = info
    # each member's bytes must end before the next local header (or the central directory)
    ordered = sorted(infos, key=_HEADER_OFFSET)
    ends = [i.header_offset for i in ordered[1:]] + [min(zf.start_dir, size)]
    return ZipLayout(prefix, members, {i.filename: end for i, end in zip(ordered, ends, strict=True)}, mm)


def _refuse_member(info: zipfile.ZipInfo, prefix: str, seen: dict, size: int) -> None:
    """Raises the error for the first of zip_layout's member checks that ``info`` fails."""
    name = info.filename
    shown = name[:200]
    if info.orig_filename != name:  # zipfile cuts a name at a NUL byte; miniz does not
        raise FormatError(f"member name {info.orig_filename[:80]!r} holds a NUL byte")
    if name in seen:
        raise FormatError(f"member {shown} appears twice (torch reads the first copy, Python's "
                          "zipfile the last): refused")
    if info.flag_bits & _UNREADABLE_FLAGS:
        raise UnsupportedError(f"member {shown} is encrypted or patched (flags 0x{info.flag_bits:04x})")
    if info.compress_type not in _METHODS:
        raise UnsupportedError(f"member {shown} uses compression method {info.compress_type} "
                               "(torch.save stores members uncompressed)")
    if name.endswith("/") or info.external_attr & _DIRECTORY_ATTRIBUTE:
        raise FormatError(f"member {shown} is marked as a folder: torch would read it as empty")
    if info.volume != 0:
        raise FormatError(f"member {shown} is on disk {info.volume} of a multi-disk archive")
    folder, _, record = name.partition("/")
    if folder != prefix or not (record in RECORDS or (record.startswith("data/") and len(record) > 5)):
        raise FormatError(f"member {shown} is not part of a torch.save checkpoint (folder {prefix[:80]}/)")
    raise FormatError(f"member {shown}'s sizes ({info.compress_size} stored, {info.file_size} "
                      f"unpacked, at byte {info.header_offset}) do not fit the file")


def _check_directory(zf: zipfile.ZipFile, mm: mmap.mmap, infos: list[zipfile.ZipInfo]) -> None:
    """The end records, as miniz checks them: one disk, the entry counts, a zip64 record both
    readers find at the same place, and no bytes before the archive (zipfile shifts every
    offset past them, miniz does not)."""
    at = mm.rfind(b"PK\x05\x06", max(0, len(mm) - (1 << 16) - _END.size), len(mm) - _END.size + 4)
    if at < 0:
        raise FormatError("zip end of central directory not found")
    _, disk, cd_disk, here, total, cd_size, cd_offset, comment = _END.unpack_from(mm, at)
    if comment or at + _END.size != len(mm):
        # torch.save writes neither; miniz's search for the end record fails on some lengths
        # of them (a 30,000-byte comment, 5,000 bytes appended) and not others: refuse them all
        raise FormatError(f"the zip has {len(mm) - at - _END.size} bytes after its end record (an archive "
                          "comment or appended data), which torch.save never writes and torch's reader may "
                          "refuse")
    entries = len(infos)
    end = _zip64_end(mm, at)
    if end is not None:
        _, record_size, _, _, disk, cd_disk, here, total, cd_size, cd_offset = _END64.unpack_from(mm, end)
        if record_size < _END64.size - 12:
            raise FormatError("the zip64 end of central directory record is too short")
    if disk or cd_disk:
        raise FormatError(f"the zip spans several disks (this is disk {disk}, the directory on {cd_disk})")
    if not here == total == entries:
        raise FormatError(f"the zip's end record counts {here} and {total} members; its directory holds {entries}")
    if cd_offset != zf.start_dir:
        raise FormatError(f"the zip has {zf.start_dir - cd_offset} bytes before its first member")
    if cd_size < entries * _CENTRAL_HEADER_SIZE or cd_offset + cd_size > (at if end is None else end):
        raise FormatError("the zip's central directory does not fit between its members and its end record")
    if infos:  # zipfile cuts the last entry's name, extra field and comment at the directory's end
        last = infos[-1]
        lengths = (len(_raw_name(last, last.orig_filename)), len(last.extra), len(last.comment))
        at_last = cd_offset + cd_size - _CENTRAL_HEADER_SIZE - sum(lengths)
        if at_last < cd_offset or struct.unpack_from("<3H", mm, at_last + 28) != lengths:
            raise FormatError(f"the zip directory's last entry ({last.filename[:200]}) runs past its end")


def _raw_name(info: zipfile.ZipInfo, name: str) -> bytes:
    return name.encode("utf-8" if info.flag_bits & _UTF8_NAME else "cp437")


def _zip64_end(mm: mmap.mmap, at: int) -> int | None:
    """Where the zip64 end record is, or None. zipfile reads it just before its locator, miniz
    where the locator points; a record in one place and not the other is refused."""
    locator = at - _END64_LOCATOR.size
    if locator < 0 or mm[locator:locator + 4] != b"PK\x06\x07":
        return None
    _, end64_disk, pointed, disks = _END64_LOCATOR.unpack_from(mm, locator)
    before = locator - _END64.size
    if pointed > len(mm) - _END64.size:
        raise FormatError("the zip64 locator points past the end of the file")
    found = [place >= 0 and mm[place:place + 4] == b"PK\x06\x06" for place in (pointed, before)]
    if found[0] != found[1] or (found[0] and pointed != before):
        raise FormatError("the zip64 end record is not where its locator points")
    if found[0] and (end64_disk != 0 or disks != 1):
        raise FormatError(f"the zip spans {disks} disks")
    return before if found[0] else None
