"""Reader for legacy ``torch.save(..., _use_new_zipfile_serialization=False)`` checkpoints.

Layout: five pickles back to back (magic number, protocol version, system info, the object
tree, the sorted list of storage keys), then for each key in that order an int64 element count
followed by the storage's raw bytes.
"""

from __future__ import annotations

import mmap
import pickle
import struct

from prebake.formats.errors import FormatError, UnsupportedError
from prebake.formats.tensor import DTYPE_SIZES, SkippedLeaf, SourceFile
from prebake.formats.torch_pickle import RestrictedUnpickler, flatten
from prebake.formats.torch_zip import _load, describe

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001


class _PlainUnpickler(pickle.Unpickler):
    """For the header pickles, which hold only numbers, strings and dicts."""

    def find_class(self, module, name):
        raise FormatError(f"unexpected global {module}.{name} in a legacy checkpoint header")


def read_torch_legacy(path: str) -> SourceFile:
    """Describes every tensor of a legacy torch checkpoint without reading tensor bytes."""
    with open(path, "rb") as f:
        magic = _header(f, path)
        if magic != MAGIC_NUMBER:
            raise FormatError("not a torch checkpoint (bad magic number)", path)
        if _header(f, path) != PROTOCOL_VERSION:
            raise UnsupportedError("unknown legacy torch protocol version", path)
        info = _header(f, path)
        if isinstance(info, dict) and not info.get("little_endian", True):
            raise UnsupportedError("big-endian checkpoints are not supported", path)
        unpickler = RestrictedUnpickler(f, legacy=True)
        obj = _load(unpickler, path)
        keys = _header(f, path)
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        starts = _storage_starts(mm, f.tell(), keys, unpickler.storages, path)
    records, leaves = flatten(obj)
    tensors = [describe(name, rec, mm, starts[rec.storage.key], path) for name, rec in records]
    return SourceFile(path, "torch-legacy", tensors, [SkippedLeaf(n, k) for n, k in leaves])


def _header(f, path: str):
    try:
        return _PlainUnpickler(f).load()
    except FormatError as e:
        raise FormatError(str(e), path) from None
    except Exception as e:
        raise FormatError(f"not a torch checkpoint or truncated ({type(e).__name__}: {e})", path) from None


def _storage_starts(mm: mmap.mmap, pos: int, keys, storages, path: str) -> dict[str, int]:
    if not isinstance(keys, list):
        raise FormatError("corrupt storage key list", path)
    starts = {}
    for key in map(str, keys):
        rec = storages.get(key)
        if rec is None:
            raise FormatError(f"storage {key!r} is listed but no tensor uses it", path)
        if pos + 8 > len(mm):
            raise FormatError(f"truncated before storage {key!r}", path)
        (count,) = struct.unpack_from("<q", mm, pos)
        nbytes = rec.numel * DTYPE_SIZES[rec.dtype]
        if count != rec.numel or pos + 8 + nbytes > len(mm):
            raise FormatError(f"storage {key!r} is truncated or corrupt", path)
        starts[key] = pos + 8
        pos += 8 + nbytes
    missing = set(storages) - set(starts)
    if missing:
        raise FormatError(f"checkpoint is missing storage {sorted(missing)[0]!r}", path)
    return starts
