"""Reader for GGUF files, through gguf-py's memory-mapped ``GGUFReader``.

Plain tensors (F32, F16, BF16, F64, integers) come out as raw items; block-quantized tensors
as their blocks, ``dtype`` naming the GGML type (``"Q4_K"``). Shapes are in PyTorch order
(GGUF stores them innermost first).
"""

from __future__ import annotations

from prebake.formats.errors import FormatError, UnsupportedError
from prebake.formats.tensor import DTYPE_SIZES, SourceFile, StorageRef, TensorInfo, numel, raw_view

PLAIN_TYPES = {"F32": "F32", "F16": "F16", "BF16": "BF16", "F64": "F64",
               "I8": "I8", "I16": "I16", "I32": "I32", "I64": "I64"}


def read_gguf(path: str) -> SourceFile:
    """Describes every tensor of a GGUF file and returns its key-value metadata."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # gguf-py raises ValueError, IndexError, ... on bad files
        raise FormatError(f"corrupt or truncated GGUF file ({type(e).__name__}: {e})", path) from None
    size = len(reader.data)
    tensors = []
    for t in reader.tensors:
        qtype = t.tensor_type.name
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if t.data_offset + t.n_bytes > size:
            raise FormatError(f"tensor {t.name!r} is cut off (file truncated)", path)
        tensors.append(_describe(reader, t, qtype, shape, path))
    return SourceFile(path, "gguf", tensors, metadata={"gguf": metadata(reader)})


def _describe(reader, t, qtype: str, shape: tuple[int, ...], path: str) -> TensorInfo:
    import gguf

    offset, nbytes = int(t.data_offset), int(t.n_bytes)
    ref = StorageRef(t.name, offset, offset + nbytes, True)
    if qtype in PLAIN_TYPES:
        dtype = PLAIN_TYPES[qtype]

        def read():
            return raw_view(reader.data, offset, shape, DTYPE_SIZES[dtype])

        return TensorInfo(t.name, dtype, shape, nbytes, path, read, ref)
    if t.tensor_type not in gguf.GGML_QUANT_SIZES:
        raise UnsupportedError(f"tensor {t.name!r} has GGML type {qtype}, which prebake does not support", path)
    block, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
    row = shape[-1] if shape else 1
    if row % block:
        raise FormatError(f"tensor {t.name!r}: row of {row} is not a multiple of the {qtype} block", path)
    rows = numel(shape) // row if row else 0

    def read_blocks():
        return reader.data[offset:offset + nbytes].reshape(rows, row // block * type_size)

    return TensorInfo(t.name, "F32", shape, nbytes, path, read_blocks, ref, qtype)


def metadata(reader) -> dict:
    """The key-value metadata as JSON-ready values (header fields left out)."""
    out = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            value = field.contents()
        except Exception:  # a value type gguf-py cannot decode: keep going without it
            continue
        out[name] = _plain(value)
    return out


def _plain(value):
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if hasattr(value, "item"):
        return value.item()
    return value
