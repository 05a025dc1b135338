"""GGML types: their ids in GGUF files, and the size of each one's blocks. Plain data, no numpy.

:data:`BLOCK_SIZES` is prebake's one table of GGML types, keyed by gguf-py's names: elements
and bytes per block as ``ggml-common.h`` and gguf-py's ``GGML_QUANT_SIZES`` define them (a
test keeps the two equal; plain types are blocks of one element). :data:`TYPE_IDS` numbers
them as ``ggml.h``'s ``enum ggml_type`` does (GGUF's tensor records hold these ids). The load
path reads this table, so it stays free of numpy; the codecs' base is
:mod:`~prebake.formats.ggml_codec`.
"""

from __future__ import annotations

import math

from .errors import UnsupportedError

# elements per block, bytes per block, in GGML's type order (ggml.h's enum ggml_type)
BLOCK_SIZES: dict[str, tuple[int, int]] = {
    "F32": (1, 4), "F16": (1, 2), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22),
    "Q5_1": (32, 24), "Q8_0": (32, 34), "Q8_1": (32, 40), "Q2_K": (256, 84), "Q3_K": (256, 110),
    "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210), "Q8_K": (256, 292),
    "IQ2_XXS": (256, 66), "IQ2_XS": (256, 74), "IQ3_XXS": (256, 98), "IQ1_S": (256, 50),
    "IQ4_NL": (32, 18), "IQ3_S": (256, 110), "IQ2_S": (256, 82), "IQ4_XS": (256, 136),
    "I8": (1, 1), "I16": (1, 2), "I32": (1, 4), "I64": (1, 8), "F64": (1, 8), "IQ1_M": (256, 56),
    "BF16": (1, 2), "TQ1_0": (256, 54), "TQ2_0": (256, 66), "MXFP4": (32, 17), "NVFP4": (64, 36),
    "Q1_0": (128, 18),
}



def qtype_name(qtype: object) -> str:
    """The table's name of a GGML type given by name (any case) or as gguf-py's enum member."""
    name = str(getattr(qtype, "name", qtype)).upper()
    if name not in BLOCK_SIZES:
        raise UnsupportedError(f"unknown GGML type {qtype!r}")
    return name


def blocks_shape(qtype: str, shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, bytes per row) of a tensor of logical ``shape`` stored as ``qtype`` blocks."""
    row = shape[-1] if shape else 1
    elements, size = BLOCK_SIZES[qtype]
    return math.prod(shape[:-1]), row // elements * size


# GGML type id -> name, as ggml.h numbers them (4, 5, 31-33 and 36-38 are retired or unused)
TYPE_IDS: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K",
    11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS",
    18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8",
    25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0",
    39: "MXFP4", 40: "NVFP4", 41: "Q1_0",
}
# the block types (several elements per block); the rest are plain items
QUANT_TYPES = frozenset(name for name, (elements, _) in BLOCK_SIZES.items() if elements > 1)

