"""Reader for safetensors files: an 8-byte header length, a JSON header, then the data buffer."""

from __future__ import annotations

import json
import mmap
import os
import struct

from prebake.formats.errors import FormatError, UnsupportedError
from prebake.formats.tensor import DTYPE_SIZES, SourceFile, StorageRef, TensorInfo, numel, raw_view

MAX_HEADER = 100 * 1024 * 1024  # the limit the reference implementation enforces


def read_header(path: str, f) -> tuple[int, dict]:
    """Returns (data buffer start, header dict) of the open safetensors file ``f``, validated for size."""
    size = os.fstat(f.fileno()).st_size
    head = f.read(8)
    if len(head) < 8:
        raise FormatError("too short to be a safetensors file", path)
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER or 8 + n > size:
        raise FormatError(f"not a safetensors file or truncated (header of {n} bytes, file of {size})", path)
    try:
        header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"corrupt safetensors header ({e})", path) from None
    if not isinstance(header, dict):
        raise FormatError("corrupt safetensors header (not an object)", path)
    return 8 + n, header


def read_safetensors(path: str) -> SourceFile:
    """Describes every tensor of a safetensors file; tensor bytes stay in one memory map."""
    with open(path, "rb") as f:
        start, header = read_header(path, f)
        size = os.fstat(f.fileno()).st_size
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata  # null is allowed; [], "" or 0 are not
    if not isinstance(metadata, dict) or not all(type(v) is str for v in metadata.values()):
        raise FormatError("corrupt safetensors header (__metadata__ is not an object of strings)", path)
    tensors = [_describe(name, entry, mm, start, size, path) for name, entry in header.items()]
    tensors.sort(key=lambda t: (t.storage.start, t.storage.end))  # file order
    _check_covered(tensors, size - start, path)
    return SourceFile(path, "safetensors", tensors, metadata={"safetensors": metadata})


def _check_covered(tensors: list[TensorInfo], data_size: int, path: str) -> None:
    """The format's rule, as its reference checks it: the tensors cover the data buffer exactly,
    one after another, no hole, no overlap, no trailing byte (what a polyglot file would hide)."""
    pos = 0
    for t in tensors:
        if t.storage.start != pos:
            what = "overlaps the tensor before it" if t.storage.start < pos else f"leaves bytes {pos}-{t.storage.start} unused"
            raise FormatError(f"tensor {t.name!r} {what}: not a well-formed safetensors file", path)
        pos = t.storage.end
    if pos != data_size:
        raise FormatError(f"the data buffer holds {data_size - pos} bytes after its last tensor: not a well-formed "
                          "safetensors file (or one whose header length is wrong)", path)


def _describe(name: str, entry, mm, start: int, size: int, path: str) -> TensorInfo:
    try:
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    except (KeyError, TypeError):
        raise FormatError(f"corrupt header entry for tensor {name!r}", path) from None
    if type(shape) is not list or type(offsets) is not list or len(offsets) != 2:  # as the reference's serde reads them
        raise FormatError(f"corrupt header entry for tensor {name!r} (shape and data_offsets must be JSON lists, "
                          "data_offsets of two)", path)
    shape, (begin, end) = tuple(shape), offsets
    if not (isinstance(dtype, str) and all(type(d) is int and d >= 0 for d in shape)
            and type(begin) is int and type(end) is int):
        raise FormatError(f"corrupt header entry for tensor {name!r} (dtype, shape or offsets of the wrong type)",
                          path)
    if dtype not in DTYPE_SIZES:
        raise UnsupportedError(f"tensor {name!r} has dtype {dtype}, which prebake does not support", path)
    itemsize = DTYPE_SIZES[dtype]
    nbytes = numel(shape) * itemsize
    if not (0 <= begin <= end) or end - begin != nbytes or start + end > size:
        raise FormatError(f"tensor {name!r} lies outside the file or has the wrong size (truncated?)", path)
    def read(offset=start + begin):
        return raw_view(mm, offset, shape, itemsize)

    return TensorInfo(name, dtype, shape, nbytes, path, read, StorageRef(name, begin, end, True),
                      offset=start + begin)
