"""Reader for legacy ``torch.save(..., _use_new_zipfile_serialization=False)`` checkpoints.

Layout: five pickles back to back (magic number, protocol version, system info, the object
tree, the list of storage keys), then for each key in that order an int64 element count
followed by the storage's raw bytes. Every pickle is scanned and bounded like the zip format's
``data.pkl``; every count and size is checked against the bytes left before anything is read.
"""

from __future__ import annotations

import mmap
import struct

from prebake.formats.errors import FormatError, UnsupportedError
from prebake.formats.tensor import DTYPE_SIZES, SourceFile
from prebake.formats.torch_pickle import header_pickle, unpickle
from prebake.formats.torch_records import StorageRecord
from prebake.formats.torch_zip import describe_tree, naming

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
_COUNT = struct.Struct("<q")


def read_torch_legacy(path: str) -> SourceFile:
    """Describes every tensor of a legacy torch checkpoint without reading tensor bytes."""
    with naming(path), open(path, "rb") as f:
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:
            raise FormatError("file is empty") from None
        magic, pos = _header(mm, 0)
        if type(magic) is not int or magic != MAGIC_NUMBER:
            raise FormatError("not a torch checkpoint (bad magic number)")
        version, pos = _header(mm, pos)
        if type(version) is not int or version != PROTOCOL_VERSION:
            raise UnsupportedError("unknown legacy torch protocol version")
        info, pos = _header(mm, pos)
        if type(info) is dict and info.get("little_endian", True) is not True:
            raise UnsupportedError("big-endian checkpoints are not supported")
        unpickled = unpickle(mm, pos, legacy=True)
        keys, pos = _header(mm, unpickled.end)
        starts = _storage_starts(mm, pos, keys, unpickled.storages)
        tensors, skipped = describe_tree(unpickled, mm, starts, path)
    return SourceFile(path, "torch-legacy", tensors, skipped)


def _header(mm: mmap.mmap, pos: int):
    try:
        return header_pickle(mm, pos)
    except FormatError as e:
        raise FormatError(f"not a torch checkpoint or truncated ({e.message})") from None


def _storage_starts(mm: mmap.mmap, pos: int, keys, storages: dict[str, StorageRecord]) -> dict[str, int]:
    """File offset of each storage's bytes: the keys in order, each an int64 count then the bytes."""
    if type(keys) is not list or any(type(k) not in (str, int) for k in keys):
        raise FormatError("corrupt storage key list")
    keys = [str(k) for k in keys]
    if len(set(keys)) != len(keys):
        raise FormatError("the storage key list names a storage twice")
    starts = {}
    for key in keys:
        rec = storages.get(key)
        if rec is None:
            raise FormatError(f"storage {key!r} is listed but no tensor uses it")
        if pos + _COUNT.size > len(mm):
            raise FormatError(f"truncated before storage {key!r}")
        (count,) = _COUNT.unpack_from(mm, pos)
        elements = rec.nbytes // DTYPE_SIZES[rec.dtype]
        if count != elements:
            raise FormatError(f"storage {key!r} is corrupt (its header says {count} elements, "
                              f"the pickle {elements})")
        left = len(mm) - pos - _COUNT.size
        if rec.nbytes > left:
            raise FormatError(f"storage {key!r} is truncated ({left} of {rec.nbytes} bytes)")
        starts[key] = pos + _COUNT.size
        pos += _COUNT.size + rec.nbytes
    missing = set(storages) - set(starts)
    if missing:
        raise FormatError(f"checkpoint is missing storage {sorted(missing)[0]!r}")
    return starts
