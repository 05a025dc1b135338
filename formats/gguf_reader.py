"""Reader for GGUF files, on prebake's own parser (:mod:`prebake.formats.gguf_file`).

Plain tensors (F32, F16, BF16, F64, integers) come out as raw items; block-quantized tensors
as their blocks (``dtype`` what they decode to, ``qtype`` the GGML type, ``"Q4_K"``). Shapes
are in PyTorch order (GGUF stores them innermost first). Every read is a view of one map of
the file. For the long metadata arrays as lazy spans (tokens as numpy views, strings decoded
on demand), use :func:`open_gguf` on the same path.
"""

from __future__ import annotations

from prebake.formats.gguf_file import GGUFFile, GGUFTensor, open_gguf
from prebake.formats.tensor import DTYPE_SIZES, SourceFile, StorageRef, TensorInfo, numel, raw_view

__all__ = ["open_gguf", "read_gguf"]

# GGML types stored as plain items, under their safetensors codes (the same names)
PLAIN_TYPES = {"F32": "F32", "F16": "F16", "BF16": "BF16", "F64": "F64",
               "I8": "I8", "I16": "I16", "I32": "I32", "I64": "I64"}


def read_gguf(path: str) -> SourceFile:
    """Describes every tensor of a GGUF file, in file order, with its key-value metadata.

    ``metadata["gguf"]`` holds every key's value as plain JSON (long arrays included: the bake
    writes them to its side file); the header's own fields are not keys and are not in it.
    ``metadata["gguf_types"]`` keeps each key's GGUF type (``"UINT32"``, ``"ARRAY:STRING"``),
    which JSON loses, so an export writes the keys back as they were.
    """
    parsed = open_gguf(path)
    tensors = [_describe(parsed, t) for t in parsed.tensors.values()]
    types = {k: f.type if f.item_type is None else f"{f.type}:{f.item_type}" for k, f in parsed.fields.items()}
    return SourceFile(parsed.path, "gguf", tensors, metadata={"gguf": parsed.metadata(max_list=None),
                                                              "gguf_types": types})


def _describe(parsed: GGUFFile, t: GGUFTensor) -> TensorInfo:
    """A tensor's description; ``read()`` is a view of the map (the parser checked the bounds)."""
    buffer, offset, nbytes, shape = parsed.buffer, t.offset, t.nbytes, t.shape
    ref = StorageRef(t.name, offset, offset + nbytes, True)
    if t.type in PLAIN_TYPES:
        dtype = PLAIN_TYPES[t.type]

        def read():
            return raw_view(buffer, offset, shape, DTYPE_SIZES[dtype])

        return TensorInfo(t.name, dtype, shape, nbytes, parsed.path, read, ref)
    block, type_size = t.block
    row = shape[-1] if shape else 1
    rows, row_bytes = numel(shape) // row, row // block * type_size

    def read_blocks():
        return buffer[offset:offset + nbytes].reshape(rows, row_bytes)

    return TensorInfo(t.name, "F32", shape, nbytes, parsed.path, read_blocks, ref, t.type)
