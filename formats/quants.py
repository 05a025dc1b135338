"""GGML block quantization: quantize to and dequantize from GGUF's block bytes.

This is the driver: :func:`quantize` cuts rows into chunks for the numpy codecs
(:mod:`~prebake.formats.quants_legacy` for the 32-value types, :mod:`~prebake.formats.quants_k`
for Q4_K/Q6_K) or their numba kernels (:mod:`~prebake.formats.quants_jit`); the sizes and the
codec base are in :mod:`~prebake.formats.ggml_types`. Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 match
gguf-py's numpy quantizer (``gguf.quants``) byte for byte, which itself follows
``quantize_row_*_ref`` in llama.cpp's ``ggml-quants.c``; Q4_K and Q6_K match llama.cpp's
``quantize_row_q*_K_ref``. :func:`dequantize` runs the torch kernels of
:mod:`~prebake.formats.ggml_torch` on numpy arrays, equal to ``gguf.quants.dequantize`` bit for
bit. Each codec works on all blocks of a chunk at once; no Python loop runs per block.

>>> import numpy as np
>>> x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32)
>>> q = quantize(x, "Q8_0")
>>> q.shape, q.dtype
((2, 34), dtype('uint8'))
>>> float(abs(dequantize(q, "Q8_0") - x).max()) < 0.01
True
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Iterator

import numpy as np

from . import quants_k, quants_legacy  # noqa: F401  (importing them registers their codecs)
from .errors import UnsupportedError
from .ggml_codec import CODECS, F32, BlockCodec, NonFinite, Scratch
from .ggml_types import BLOCK_SIZES, qtype_name

# the types prebake quantizes to, in GGML's order
QTYPES: tuple[str, ...] = tuple(q for q in BLOCK_SIZES if q in CODECS)


# ---------------------------------------------------------------------------- public API


def quantize(data: np.ndarray, qtype: str) -> np.ndarray:
    """Quantize ``data`` (..., n) to GGUF block bytes (..., n // block_size * type_size).

    ``n`` must be a multiple of the block size; NaN or infinity raise
    :class:`~prebake.formats.errors.UnsupportedError`. Rows are processed a chunk at a time,
    so memory beyond input and output stays bounded; a contiguous input is never copied whole.
    """
    codec = _codec(qtype)
    jit = jit_quantizer(codec.qtype)
    data = np.asarray(data)
    rows = _as_rows(data, codec.block_size, codec.qtype, "row length")
    bs, ts = codec.block_size, codec.type_size
    out = np.empty((rows.shape[0], rows.shape[1] // bs * ts), np.uint8)
    ws = Scratch()
    # overflow and invalid operations inside a block are the reference's own arithmetic
    with np.errstate(all="ignore"):
        for r, b0, b1 in _windows(rows.shape[0], rows.shape[1] // bs, codec.chunk_blocks):
            x = np.ascontiguousarray(rows[r, b0 * bs : b1 * bs], dtype=F32).reshape(-1, bs)
            dst = out[r, b0 * ts : b1 * ts].reshape(-1, ts)
            try:
                if jit is None or not jit(x, dst):
                    codec.quantize_blocks(x, dst, ws)
            except NonFinite:
                raise _non_finite_error(x, codec.qtype, r.start, b0 * bs, (b1 - b0) * bs) from None
    return out.reshape(*data.shape[:-1], out.shape[-1])


def dequantize(blocks: np.ndarray, qtype: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Decode GGUF block bytes (..., k * type_size) to float32 (..., k * block_size).

    With ``shape`` (the tensor's element shape), ``blocks`` may be flat bytes of any layout and
    the result takes that shape. The torch kernels of :mod:`~prebake.formats.ggml_torch` do the
    work on a view of ``blocks`` (no copy), bit-equal to ``gguf.quants.dequantize``; a type
    no one can decode (:func:`can_dequantize`) raises
    :class:`~prebake.formats.errors.UnsupportedError`.
    """
    import torch

    from .ggml_torch import dequantize as dequantize_tensor

    name = qtype_name(qtype)
    bs, ts = BLOCK_SIZES[name]
    raw = np.frombuffer(blocks, np.uint8) if isinstance(blocks, (bytes, bytearray, memoryview)) else blocks
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        raw = raw.view(np.uint8)
    if shape is not None:
        shape = tuple(int(s) for s in shape)
        if not shape or shape[-1] % bs:
            raise UnsupportedError(f"{name} tensor shape {shape} must end in a multiple of {bs}")
        row_bytes = shape[-1] // bs * ts
        if raw.size != int(np.prod(shape[:-1], dtype=np.int64)) * row_bytes:
            raise UnsupportedError(f"{raw.size} bytes of {name} cannot hold a tensor of shape {shape}")
        raw = raw.reshape(-1, row_bytes)
    rows = _as_rows(raw, ts, name, "bytes per row")
    out = np.empty((rows.shape[0], rows.shape[1] // ts * bs), F32)
    if rows.strides[-1] != 1 or rows.strides[0] < 0:
        rows = np.ascontiguousarray(rows)
    with warnings.catch_warnings():  # a read-only memory map: the kernels only read it
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        view = torch.from_numpy(rows)
    dequantize_tensor(view, name, out=torch.from_numpy(out))
    return out.reshape(shape) if shape is not None else out.reshape(*raw.shape[:-1], out.shape[-1])


@functools.cache
def can_dequantize(qtype: object) -> bool:
    """Whether :func:`dequantize` decodes ``qtype``: every type gguf-py decodes.

    prebake's torch kernels cover the common types and gguf-py (the reference they are tested
    against) the rest; Q8_1, Q8_K and the plain integer types have no decoder.
    """
    import gguf

    try:
        name = qtype_name(qtype)
        probe = np.zeros((1, BLOCK_SIZES[name][1]), np.uint8)
        gguf.quants.dequantize(probe, gguf.GGMLQuantizationType[name])
    except (UnsupportedError, KeyError, NotImplementedError):
        return False
    return True


# ---------------------------------------------------------------------------- driver


_jit_kernels: dict[str, Callable[[np.ndarray, np.ndarray], bool]] | None = None


def jit_quantizer(qtype: str) -> Callable[[np.ndarray, np.ndarray], bool] | None:
    """The numba kernel for ``qtype`` (:mod:`~prebake.formats.quants_jit`), or None.

    None where numba is not installed, the type has no kernel, or ``PREBAKE_NO_JIT`` is set to
    anything but ``0``. numba is imported on first use only; kernels compile (or load from
    numba's cache) on their first call.
    """
    global _jit_kernels
    if os.environ.get("PREBAKE_NO_JIT", "0") not in ("", "0"):
        return None
    if _jit_kernels is None:
        try:
            from .quants_jit import KERNELS
        except ImportError:
            KERNELS = {}
        _jit_kernels = KERNELS
    return _jit_kernels.get(qtype)


def _codec(qtype: object) -> type[BlockCodec]:
    name = str(getattr(qtype, "name", qtype)).upper()
    codec = CODECS.get(name)
    if codec is None:
        known = "" if name in BLOCK_SIZES else "unknown "
        raise UnsupportedError(f"cannot quantize to {known}GGML quantization type {qtype!r}; "
                               f"prebake quantizes to {', '.join(QTYPES)}")
    return codec


def _as_rows(data: np.ndarray, unit: int, qtype: str, what: str) -> np.ndarray:
    if data.ndim == 0:
        raise UnsupportedError(f"cannot {qtype}-code a 0-d array")
    if data.shape[-1] % unit:
        raise UnsupportedError(f"{what} {data.shape[-1]} is not a multiple of the {qtype} block ({unit})")
    return data.reshape(-1, data.shape[-1])


def _windows(n_rows: int, blocks_per_row: int, max_blocks: int) -> Iterator[tuple[slice, int, int]]:
    """Yield (row slice, first block, end block) windows of at most ``max_blocks`` blocks.

    Whole rows are grouped while a row fits; a longer row is cut on block boundaries, so every
    window is one contiguous stretch of the output.
    """
    if blocks_per_row == 0:
        return
    if blocks_per_row <= max_blocks:
        step = max_blocks // blocks_per_row
        for r in range(0, n_rows, step):
            yield slice(r, r + step), 0, blocks_per_row
        return
    for r in range(n_rows):
        for b in range(0, blocks_per_row, max_blocks):
            yield slice(r, r + 1), b, min(b + max_blocks, blocks_per_row)


def _non_finite_error(x: np.ndarray, qtype: str, row0: int, col0: int, width: int) -> UnsupportedError:
    flat = int(np.flatnonzero(~np.isfinite(x))[0])
    row, col = row0 + flat // width, col0 + flat % width
    return UnsupportedError(
        f"cannot quantize to {qtype}: value {x.flat[flat]} at row {row}, column {col}; "
        "GGML blocks hold only finite numbers"
    )
