"""Reader for ``torch.save`` zip checkpoints (``.bin``, ``.pth``, ``.pt``; torch >= 1.6).

The zip holds ``<prefix>/data.pkl`` (the object tree) and one stored (uncompressed) member per
storage, ``<prefix>/data/<key>``. The pickle goes through the restricted unpickler; every
storage becomes a byte range of one read-only memory map of the whole file.
"""

from __future__ import annotations

import io
import mmap
import struct
import zipfile

from prebake.formats.errors import FormatError, UnsupportedError
from prebake.formats.tensor import (
    DTYPE_SIZES,
    SkippedLeaf,
    SourceFile,
    StorageRef,
    TensorInfo,
    numel,
    raw_view,
)
from prebake.formats.torch_pickle import RestrictedUnpickler, StorageRecord, TensorRecord, flatten

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., name length, extra length


def read_torch_zip(path: str) -> SourceFile:
    """Describes every tensor of a torch zip checkpoint without reading tensor bytes."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise FormatError(f"not a readable torch zip checkpoint ({e})", path) from None
    with zf, open(path, "rb") as f:
        prefix = _archive_prefix(zf, path)
        byteorder = _member(zf, f"{prefix}/byteorder", path, optional=True)
        if byteorder not in (None, b"little"):
            raise UnsupportedError(f"byte order {byteorder!r} is not supported (little-endian only)", path)
        unpickler = RestrictedUnpickler(io.BytesIO(_member(zf, f"{prefix}/data.pkl", path)))
        obj = _load(unpickler, path)
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        starts = {key: _storage_start(zf, mm, prefix, rec, path) for key, rec in unpickler.storages.items()}
    records, leaves = flatten(obj)
    tensors = [describe(name, rec, mm, starts[rec.storage.key], path) for name, rec in records]
    return SourceFile(path, "torch-zip", tensors, [SkippedLeaf(n, k) for n, k in leaves])


def _load(unpickler: RestrictedUnpickler, path: str):
    try:
        return unpickler.load()
    except FormatError as e:
        raise type(e)(str(e), path) from None
    except Exception as e:  # a corrupt pickle raises anything from EOFError to UnpicklingError
        raise FormatError(f"corrupt pickle ({type(e).__name__}: {e})", path) from None


def _archive_prefix(zf: zipfile.ZipFile, path: str) -> str:
    pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
        raise FormatError("zip file is not a torch checkpoint (no <name>/data.pkl)", path)
    return pkls[0].rsplit("/", 1)[0]


def _member(zf: zipfile.ZipFile, name: str, path: str, optional: bool = False) -> bytes | None:
    try:
        return zf.read(name)
    except KeyError:
        if optional:
            return None
        raise FormatError(f"checkpoint is missing {name}", path) from None
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise FormatError(f"cannot read {name} ({e})", path) from None


def _storage_start(zf: zipfile.ZipFile, mm: mmap.mmap, prefix: str, rec: StorageRecord, path: str) -> int:
    """File offset of a storage's first byte, checked against the storage's declared size."""
    name = f"{prefix}/data/{rec.key}"
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise FormatError(f"checkpoint is missing storage {name}", path) from None
    if info.compress_type != zipfile.ZIP_STORED:
        raise UnsupportedError(f"storage {name} is compressed; re-save it with torch.save", path)
    sig, name_len, extra_len = _LOCAL_HEADER.unpack_from(mm, info.header_offset)
    if sig != b"PK\x03\x04":
        raise FormatError(f"bad zip local header for {name}", path)
    start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    need = rec.numel * DTYPE_SIZES[rec.dtype]
    if info.file_size < need or start + info.file_size > len(mm):
        raise FormatError(f"storage {name} is truncated ({info.file_size} of {need} bytes)", path)
    return start


def describe(name: str, rec: TensorRecord, buf, storage_start: int, path: str) -> TensorInfo:
    """A :class:`TensorInfo` over ``buf`` for a rebuilt-tensor record whose storage starts there."""
    itemsize = DTYPE_SIZES[rec.dtype]
    storage_bytes = rec.storage.numel * DTYPE_SIZES[rec.storage.dtype]
    span = _span(rec.shape, rec.strides)
    first = rec.offset * itemsize
    end = first + span * itemsize
    if any(s < 0 for s in rec.strides) or end > storage_bytes:
        raise FormatError(f"tensor {name!r} reaches past its storage ({end} > {storage_bytes} bytes)", path)
    contiguous = _is_contiguous(rec.shape, rec.strides)
    start = storage_start + first
    if contiguous:
        def read(start=start):
            return raw_view(buf, start, rec.shape, itemsize)
    else:
        def read(start=start):
            return raw_view(buf, start, rec.shape, itemsize, rec.strides)
    ref = StorageRef(rec.storage.key, first, end, contiguous, rec.strides)
    return TensorInfo(name, rec.dtype, rec.shape, numel(rec.shape) * itemsize, path, read, ref)


def _span(shape: tuple[int, ...], strides: tuple[int, ...]) -> int:
    """Elements from a tensor's first item to one past its last, 0 when it is empty."""
    if numel(shape) == 0:
        return 0
    return 1 + sum((d - 1) * s for d, s in zip(shape, strides, strict=True))


def _is_contiguous(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    expected = 1
    for d, s in zip(reversed(shape), reversed(strides), strict=True):
        if d != 1 and s != expected:
            return False
        expected *= d
    return True
