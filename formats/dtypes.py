"""The dtype codes prebake stores (safetensors' own), and their sizes: plain data, no numpy.

The load path reads this table for every bake; keeping it free of numpy keeps that path light.
"""

from __future__ import annotations

# safetensors dtype code -> bytes per element
DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
    "C64": 8,
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0"})


def numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
