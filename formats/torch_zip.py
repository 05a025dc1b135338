"""Reader for ``torch.save`` zip checkpoints (``.bin``, ``.pth``, ``.pt``; torch >= 1.6).

The zip holds one folder, ``<prefix>/``, with exactly the records torch's writer makes:
``data.pkl`` (the object tree), ``data/<key>`` for each storage the pickle names (stored,
uncompressed), ``version`` or ``.data/version``, and optionally ``byteorder``,
``.format_version``, ``.storage_alignment`` and ``.data/serialization_id``; the container is
checked by :mod:`prebake.formats.torch_zip_layout`, the records as torch checks them. The
pickle goes through the restricted unpickler; every storage becomes a byte range of one
read-only memory map of the whole file.
"""

from __future__ import annotations

import contextlib
import mmap
import re
import struct
import zipfile
import zlib

from prebake.formats.errors import FormatError, PrebakeError, UnsupportedError
from prebake.formats.tensor import DTYPE_SIZES, SkippedLeaf, SourceFile, StorageRef, TensorInfo, raw_view
from prebake.formats.torch_pickle import Unpickled, unpickle
from prebake.formats.torch_records import StorageRecord, TensorRecord
from prebake.formats.torch_tree import flatten
from prebake.formats.torch_zip_layout import ZipLayout, zip_layout

MAX_DATA_PKL = 1 << 30  # 8 million tensors' worth
MAX_DEFLATED_DATA_PKL = 64 << 20  # deflate expands 1000-fold: a cap on what a small file can unpack
_MAX_RECORD = 4096  # version, byteorder, ...: a few bytes each
_VERSIONS = range(1, 11)  # the file format versions torch 2.13's reader accepts


def read_torch_zip(path: str) -> SourceFile:
    """Describes every tensor of a torch zip checkpoint without reading tensor bytes."""
    with naming(path), _open(path) as zf, open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        layout = zip_layout(zf, mm)
        _check_records(zf, layout)
        pkl = layout.member("data.pkl")
        data = _read(zf, pkl, MAX_DATA_PKL if pkl.compress_type == zipfile.ZIP_STORED else MAX_DEFLATED_DATA_PKL)
        unpickled = unpickle(data, file_bytes=pkl.compress_size)
        starts = _storage_starts(layout, unpickled.storages)
        tensors, skipped = describe_tree(unpickled, mm, starts, path)
    return SourceFile(path, "torch-zip", tensors, skipped)


@contextlib.contextmanager
def naming(path: str):
    """Adds ``path`` to the errors raised inside that do not name a file yet."""
    try:
        yield
    except PrebakeError as e:
        if e.path is None:
            raise type(e)(e.message, path) from None
        raise


def _open(path: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError,
            struct.error) as e:  # ValueError covers UnicodeDecodeError in a member's name
        raise FormatError(f"not a readable torch zip checkpoint ({type(e).__name__}: {e})") from None


def _read(zf: zipfile.ZipFile, info: zipfile.ZipInfo, cap: int) -> bytes:
    """A small member's bytes, decompressed no further than its declared size (at most ``cap``)."""
    name = info.filename
    if info.file_size > cap:
        raise FormatError(f"member {name} declares {info.file_size} bytes, more than the {cap} allowed")
    try:
        with zf.open(info) as f:
            data = f.read(info.file_size + 1)  # bounded: the decompressor stops at this length
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, RuntimeError, NotImplementedError,
            struct.error) as e:
        raise FormatError(f"cannot read member {name} ({type(e).__name__}: {e})") from None
    if len(data) != info.file_size:
        raise FormatError(f"member {name} holds {len(data)} bytes, not the {info.file_size} its header declares")
    return data


def _check_records(zf: zipfile.ZipFile, layout: ZipLayout) -> None:
    """The small records torch.load reads, checked as it checks them."""
    members, prefix = layout.members, layout.prefix
    if (info := members.get(f"{prefix}/byteorder")) is not None:
        order = _read(zf, info, _MAX_RECORD)
        if order == b"big":
            raise UnsupportedError("byte order b'big' is not supported (little-endian only)")
        if order != b"little":
            raise FormatError(f"record {info.filename} is {order[:20]!r}, neither little nor big")
    _check_version(zf, members.get(f"{prefix}/.data/version") or layout.member("version"))
    if (info := members.get(f"{prefix}/.storage_alignment")) is not None:
        try:
            int(_read(zf, info, _MAX_RECORD))
        except ValueError:
            raise FormatError(f"record {info.filename} is not a number (torch.load refuses it too)") from None
    if (info := members.get(f"{prefix}/.format_version")) is not None:
        _read(zf, info, _MAX_RECORD)  # any content, but it must read
    if (info := members.get(f"{prefix}/.data/serialization_id")) is not None:
        try:
            _read(zf, info, _MAX_RECORD).decode("utf-8")  # torch decodes it to log it
        except UnicodeDecodeError:
            raise FormatError(f"record {info.filename} is not UTF-8 (torch.load refuses it too)") from None


def _check_version(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
    text = _read(zf, info, _MAX_RECORD)
    found = re.match(rb"\s*(\d{1,9})", text)  # torch parses it with std::stoull
    if found is None or int(found[1]) not in _VERSIONS:
        raise UnsupportedError(f"record {info.filename} says file format version {text[:20]!r}; torch "
                               f"reads versions {_VERSIONS.start} to {_VERSIONS.stop - 1}")


def _storage_starts(layout: ZipLayout, storages: dict[str, StorageRecord]) -> dict[str, int]:
    """File offset of each storage's first byte; every ``data/`` member must be a storage the pickle names."""
    folder = f"{layout.prefix}/data/"
    starts = {key: _storage_start(layout, folder + key, rec) for key, rec in storages.items()}
    stored = [name for name in layout.members if name.startswith(folder)]
    if len(stored) != len(starts):  # each named storage was found, so one member is not named
        unnamed = next(name for name in stored if name[len(folder):] not in starts)
        raise FormatError(f"member {unnamed[:200]} is a storage that the pickle does not name")
    return starts


def _storage_start(layout: ZipLayout, name: str, rec: StorageRecord) -> int:
    info = layout.members.get(name)
    if info is None:
        raise FormatError(f"checkpoint is missing storage {name}")
    if info.compress_type != zipfile.ZIP_STORED:
        raise UnsupportedError(f"storage {name} is compressed; re-save it with torch.save")
    if info.file_size != rec.nbytes:
        if info.file_size < rec.nbytes:
            raise FormatError(f"storage {name} is truncated ({info.file_size} of {rec.nbytes} bytes)")
        raise FormatError(f"storage {name} holds {info.file_size} bytes, not the {rec.nbytes} its "
                          "persistent id declares (torch.load refuses it too)")
    return layout.data_start(info)


def describe_tree(unpickled: Unpickled, buf, starts: dict[str, int], path: str
                  ) -> tuple[list[TensorInfo], list[SkippedLeaf]]:
    """Names and describes every tensor of an unpickled checkpoint whose storages start at ``starts``.

    A tensor torch would refuse is refused under its name; one that no name reaches (inside a
    skipped value) is refused too, under its storage: torch.load would fail on it all the same.
    """
    records, leaves = flatten(unpickled.obj, unpickled.budget)
    tensors = [describe(name, rec, buf, starts[rec.storage.key] if rec.storage else 0, path)
               for name, rec in records]
    for rec in unpickled.problems:  # none was named, or describe() would have raised
        where = f" on storage {rec.storage.key!r}" if rec.storage else ""
        raise FormatError(f"a tensor{where} inside a skipped value: {rec.problem}", path)
    return tensors, [SkippedLeaf(n, k) for n, k in leaves]


def describe(name: str, rec: TensorRecord, buf, storage_start: int, path: str) -> TensorInfo:
    """A :class:`TensorInfo` over ``buf`` for a checked record whose root storage starts there."""
    if rec.problem:
        raise FormatError(f"tensor {name!r}: {rec.problem}", path)
    itemsize = DTYPE_SIZES[rec.dtype]
    shape, strides = rec.shape, rec.strides
    count, span, contiguous = _extent(shape, strides)
    # offsets inside the root storage; an empty tensor reads nothing, wherever its offset points
    first = rec.storage.start + (rec.offset * itemsize if count else 0)
    start = storage_start + first
    if contiguous:
        def read(start=start):
            return raw_view(buf, start, shape, itemsize)
    else:
        def read(start=start):
            return raw_view(buf, start, shape, itemsize, strides)
    ref = StorageRef(rec.storage.key, first, first + span * itemsize, contiguous, strides)
    return TensorInfo(name, rec.dtype, shape, count * itemsize, path, read, ref,
                      offset=start if contiguous else None)


def _extent(shape: tuple[int, ...], strides: tuple[int, ...]) -> tuple[int, int, bool]:
    """(items, elements from the first item to one past the last (0 if empty), C-contiguous)."""
    count, span, expected, contiguous = 1, 1, 1, True
    for d, s in zip(reversed(shape), reversed(strides), strict=True):
        count *= d
        span += (d - 1) * s
        if d != 1 and s != expected:
            contiguous = False
        expected *= d
    return count, (span if count else 0), contiguous
