"""Reader for GGUF files, on prebake's own parser (:mod:`prebake.formats.gguf_file`).

Plain tensors (F32, F16, BF16, F64, integers) come out as raw items; block-quantized tensors
as their blocks (``dtype`` what they decode to, ``qtype`` the GGML type, ``"Q4_K"``). Shapes
are in PyTorch order (GGUF stores them innermost first). Every read is a view of one map of
the file. For the long metadata arrays as lazy spans (tokens as numpy views, strings decoded
on demand), use :func:`open_gguf` on the same path.
"""

from __future__ import annotations

import struct

from prebake.formats.gguf_file import MAGIC, SHORT_ARRAY, GGUFFile, GGUFTensor, open_gguf
from prebake.formats.tensor import DTYPE_SIZES, SourceFile, StorageRef, TensorInfo, numel, raw_view

__all__ = ["describe", "metadata_only", "open_gguf", "read_gguf", "source_file"]

# GGML types stored as plain items, under their safetensors codes (the same names)
PLAIN_TYPES = {"F32": "F32", "F16": "F16", "BF16": "BF16", "F64": "F64",
               "I8": "I8", "I16": "I16", "I32": "I32", "I64": "I64"}


def read_gguf(path: str) -> SourceFile:
    """Describes every tensor of a GGUF file, in file order, with all its key-value metadata
    (long arrays decoded, every string checked)."""
    return source_file(open_gguf(path), max_list=None)


def source_file(parsed: GGUFFile, max_list: int | None = SHORT_ARRAY) -> SourceFile:
    """The :class:`SourceFile` of a parsed GGUF file.

    ``metadata["gguf"]`` holds every key's value as plain JSON, but for arrays of more than
    ``max_list`` items (``None``: none left out). A tokenizer's 262k-string vocabulary, merges
    and scores are most of the time and memory a big file's metadata takes to decode, so the
    converter leaves them out (:func:`metadata_only` keeps them). The header's own fields are
    not keys and are not in it. ``metadata["gguf_types"]`` keeps each key's GGUF type
    (``"UINT32"``, ``"ARRAY:STRING"``), which JSON values lose and an export needs back.
    """
    tensors = [describe(parsed, t) for t in parsed.tensors.values()]
    types = {k: f.type if f.item_type is None else f"{f.type}:{f.item_type}" for k, f in parsed.fields.items()}
    return SourceFile(parsed.path, "gguf", tensors, metadata={"gguf": parsed.metadata(max_list=max_list),
                                                              "gguf_types": types})


def describe(parsed: GGUFFile, t: GGUFTensor) -> TensorInfo:
    """A tensor's description; ``read()`` is a view of the map (the parser checked the bounds)."""
    buffer, offset, nbytes, shape = parsed.buffer, t.offset, t.nbytes, t.shape
    ref = StorageRef(t.name, offset, offset + nbytes, True)
    if t.type in PLAIN_TYPES:
        dtype = PLAIN_TYPES[t.type]

        def read():
            return raw_view(buffer, offset, shape, DTYPE_SIZES[dtype])

        return TensorInfo(t.name, dtype, shape, nbytes, parsed.path, read, ref, offset=offset)
    block, type_size = t.block
    row = shape[-1] if shape else 1
    rows, row_bytes = numel(shape) // row, row // block * type_size

    def read_blocks():
        return buffer[offset:offset + nbytes].reshape(rows, row_bytes)

    return TensorInfo(t.name, "F32", shape, nbytes, parsed.path, read_blocks, ref, t.type, offset=offset)


def metadata_only(parsed: GGUFFile) -> bytes:
    """A GGUF file of no tensors holding ``parsed``'s key-value section byte for byte.

    Every key stays readable by any GGUF reader (:func:`open_gguf`, gguf-py, llama.cpp's
    tools) at a fraction of a JSON rendering's size, and copying it decodes nothing.
    """
    start, end = parsed.kv_span
    header = MAGIC + struct.pack("<IQQ", parsed.version, 0, len(parsed.fields))
    body = header + parsed.buffer[start:end].tobytes()
    return body + b"\0" * (-len(body) % parsed.alignment)  # data would start here: nothing follows
