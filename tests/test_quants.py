"""GGML block codecs: byte-identical to gguf-py and to llama.cpp's reference quantizers.

Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 are compared with ``gguf.quants.quantize``; Q4_K/Q6_K (which gguf-py
cannot quantize) with llama.cpp's ``quantize_row_q*_K_ref`` output stored in
``tests/golden/quant_golden.npz`` (see ``tests/golden/make_quant_golden.py``). Every torch
dequantizer is compared with ``gguf.quants.dequantize`` bit for bit, on quantized data, on
arbitrary bytes and on edge values of the scales.

Tests taking the ``backend`` fixture run once with the numpy codecs and once with the numba
kernels of ``prebake.formats.quants_jit`` (skipped where numba is not installed).
"""

from __future__ import annotations

import ast
import importlib.util
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GT
from prebake.formats import ggml_torch, quants
from prebake.formats.errors import UnsupportedError
from prebake.formats.ggml_codec import CODECS
from prebake.formats.ggml_torch import DEQUANTIZERS
from prebake.formats.ggml_types import BLOCK_SIZES
from prebake.formats.quants import QTYPES, can_dequantize, dequantize, quantize

GOLDEN = np.load(Path(__file__).parent / "golden" / "quant_golden.npz")
SIMPLE = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
K_QUANTS = ("Q4_K", "Q6_K")
F32 = np.float32


def _rows(seed: int, rows: int, n: int, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, n)) * scale).astype(F32)


def _hard_rows() -> np.ndarray:
    """Rows of 512 that stress scales, rounding and signs (each row is its own case)."""
    rng = np.random.default_rng(7)
    n = 512
    normal = rng.standard_normal(n).astype(F32)
    cases = [
        np.zeros(n, F32),
        np.full(n, -0.0, F32),
        np.where(rng.random(n) < 0.5, F32(0), F32(-0.0)).astype(F32),
        np.full(n, 1.0, F32),
        np.full(n, -2.5, F32),
        np.full(n, 0.3, F32),
        normal * F32(1e30),
        np.where(rng.random(n) < 0.5, F32(3.4e38), F32(-3.4e38)).astype(F32),
        normal * F32(1e20),
        normal * F32(1e-30),
        normal * F32(1e-40),  # denormals
        np.full(n, 1e-45, F32),  # the smallest denormal
        normal * F32(1e-7),
        rng.integers(-8, 8, n).astype(F32),  # exact ties for the rounding
        (rng.integers(-8, 8, n) + 0.5).astype(F32),
        np.tile(np.array([0.5, -0.5], F32), n // 2),  # +a/-a: the first one wins
        np.tile(np.array([-0.5, 0.5], F32), n // 2),
        np.abs(normal),
        -np.abs(normal),
        np.where(rng.random(n) < 0.03, normal * F32(100), normal).astype(F32),
        np.where(np.arange(n) % 32 == 3, normal, F32(0)).astype(F32),
        np.linspace(-1, 1, n, dtype=F32),
    ]
    return np.stack(cases)


def _gguf_quantize(x: np.ndarray, qtype: str) -> np.ndarray:
    with np.errstate(all="ignore"):
        return gguf.quants.quantize(x, GT[qtype])


def _gguf_dequantize(blocks: np.ndarray, qtype: str) -> np.ndarray:
    with np.errstate(all="ignore"):
        return gguf.quants.dequantize(blocks, GT[qtype])


def _assert_bits_equal(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype == np.float32
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


# every type with a decoder (torch kernel or gguf-py's), and the fp16 scale fields of those with a kernel
DECODABLE = [q for q in BLOCK_SIZES if can_dequantize(q)]
SCALE_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q2_K": (80, 82),
                "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
# fp16 bits: signed zeros, subnormals, the smallest normal, +-1, 1/3, +-max, +-inf, quiet NaNs, a signaling NaN
EDGE_HALVES = np.array([0x0000, 0x8000, 0x0001, 0x83FF, 0x0400, 0x3C00, 0xBC00, 0x3555, 0x7BFF, 0xFBFF, 0x7C00,
                        0xFC00, 0x7E00, 0xFE00, 0x7C01], np.uint16)

INPUTS = {
    "normal": lambda: _rows(1, 64, 1024),
    "weights 256x4096": lambda: _rows(2, 256, 4096, 0.02),
    "hard rows": _hard_rows,
    "golden inputs": lambda: GOLDEN["x"],
}


@pytest.fixture(params=["numpy", "jit"])
def backend(request, monkeypatch):
    """Run the test with ``quantize`` on the numpy codecs, then on the numba kernels."""
    if request.param == "jit":
        pytest.importorskip("numba")
        monkeypatch.delenv("PREBAKE_NO_JIT", raising=False)
    else:
        monkeypatch.setenv("PREBAKE_NO_JIT", "1")
    return request.param


# ---------------------------------------------------------------------------- against gguf-py


@pytest.mark.parametrize("data", INPUTS)
@pytest.mark.parametrize("qtype", SIMPLE)
def test_quantize_equals_gguf_py(qtype, data, backend):
    x = INPUTS[data]()
    ours, ref = quantize(x, qtype), _gguf_quantize(x, qtype)
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    bad = np.flatnonzero((ours != ref).any(axis=1))
    assert bad.size == 0, f"{qtype} differs from gguf-py on rows {bad[:10]}"


@pytest.mark.parametrize("qtype", QTYPES)
def test_dequantize_equals_gguf_py(qtype, backend):
    x = np.concatenate([_hard_rows(), _rows(3, 8, 512)])
    blocks = GOLDEN[qtype] if qtype in K_QUANTS else quantize(x, qtype)
    _assert_bits_equal(dequantize(blocks, qtype), _gguf_dequantize(blocks, qtype))


@pytest.mark.parametrize("qtype", DECODABLE)
def test_dequantize_equals_gguf_py_on_arbitrary_bytes(qtype):
    # NaN and infinite scales included: even their bits are gguf-py's
    bs, ts = BLOCK_SIZES[qtype]
    raw = np.random.default_rng(4).integers(0, 256, (32, 4 * ts), dtype=np.uint8)
    _assert_bits_equal(dequantize(raw, qtype), _gguf_dequantize(raw, qtype))


def test_block_sizes_match_gguf():
    for gt, sizes in gguf.constants.GGML_QUANT_SIZES.items():  # every type gguf-py knows
        assert BLOCK_SIZES[gt.name] == sizes, gt.name
    assert set(QTYPES) <= set(BLOCK_SIZES) and {c.qtype for c in CODECS.values()} == set(QTYPES)


# ---------------------------------------------------------------------------- against llama.cpp


def _golden_mismatch(qtype: str) -> list[str]:
    ours = quantize(GOLDEN["x"], qtype)
    return [str(GOLDEN["case"][i]) for i in np.flatnonzero((ours != GOLDEN[qtype]).any(axis=1))]


@pytest.mark.parametrize("qtype", K_QUANTS)
def test_k_quants_equal_llama_cpp_reference(qtype, backend):
    assert _golden_mismatch(qtype) == []


@pytest.mark.parametrize("qtype", SIMPLE)
def test_simple_types_equal_llama_cpp_reference(qtype, backend):
    # gguf-py, which these codecs follow, takes the sign of an all-zero block's scale from the
    # data (first element, or numpy's min/max), while llama.cpp starts from +0.0 / FLT_MAX: the
    # only disagreement is the sign bit of d (and m) in blocks of signed zeros
    zero_rows = {"negative zeros", "mixed signed zeros"}
    assert set(_golden_mismatch(qtype)) <= zero_rows
    rows = np.isin(GOLDEN["case"], list(zero_rows))
    ours = dequantize(quantize(GOLDEN["x"][rows], qtype), qtype)
    assert np.array_equal(ours, dequantize(GOLDEN[qtype][rows], qtype))  # -0.0 == 0.0


def test_golden_file_is_what_the_generator_makes():
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "golden"))
    try:
        import make_quant_golden
    finally:
        sys.path.pop(0)
    x, case = make_quant_golden.make_inputs()
    np.testing.assert_array_equal(x.view(np.uint32), GOLDEN["x"].view(np.uint32))
    assert list(case) == list(GOLDEN["case"])


# ---------------------------------------------------------------------------- API


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused(qtype, bad, backend):
    x = _rows(5, 3, 512)
    x[2, 300] = bad
    with pytest.raises(UnsupportedError, match=r"row 2, column 300"):
        quantize(x, qtype)


@pytest.mark.parametrize("qtype", QTYPES)
def test_row_length_must_be_a_multiple_of_the_block(qtype):
    bs, _ = BLOCK_SIZES[qtype]
    with pytest.raises(UnsupportedError, match="not a multiple"):
        quantize(np.zeros((2, bs + 16), F32), qtype)


def test_unknown_type_is_refused():
    with pytest.raises(UnsupportedError, match="unknown GGML quantization type"):
        quantize(np.zeros(32, F32), "Q3_X")


@pytest.mark.parametrize("qtype", QTYPES)
def test_shapes_dtypes_and_chunking(qtype, monkeypatch, backend):
    bs, ts = BLOCK_SIZES[qtype]
    x = _rows(6, 6, 4 * bs)
    whole = quantize(x, qtype)
    assert whole.shape == (6, 4 * ts)
    # windows of several rows, and of part of one row
    for chunk in (9, 3):
        monkeypatch.setattr(CODECS[qtype], "chunk_blocks", chunk)
        np.testing.assert_array_equal(quantize(x, qtype), whole)
        _assert_bits_equal(dequantize(whole, qtype), dequantize(whole, qtype, shape=x.shape))
    np.testing.assert_array_equal(quantize(x.reshape(2, 3, -1), qtype), whole.reshape(2, 3, -1))
    np.testing.assert_array_equal(quantize(x[0], qtype), whole[0])
    np.testing.assert_array_equal(quantize(np.asfortranarray(x), qtype), whole)
    np.testing.assert_array_equal(quantize(x.astype(np.float64), qtype), whole)
    flat = dequantize(whole.tobytes(), qtype, shape=(6, 4 * bs))
    _assert_bits_equal(flat, dequantize(whole, qtype))
    assert quantize(np.zeros((0, bs), F32), qtype).shape == (0, ts)


@pytest.mark.parametrize("qtype", QTYPES)
def test_round_trip_error_is_small(qtype, backend):
    x = _rows(8, 16, 1024)
    err = np.abs(dequantize(quantize(x, qtype), qtype) - x).max()
    assert err < {"Q8_0": 0.03, "Q6_K": 0.1, "Q5_0": 0.2, "Q5_1": 0.2}.get(qtype, 0.5)


# ---------------------------------------------------------------------------- dequantize


def _edge_blocks(qtype: str, seed: int) -> np.ndarray:
    """Random blocks, all-0x00 and all-0xFF levels, every scale field set to each edge value."""
    _, ts = BLOCK_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (3 * len(EDGE_HALVES) ** 2, ts), dtype=np.uint8)
    raw[1::3], raw[2::3] = 0x00, 0xFF
    fields = SCALE_FIELDS[qtype]
    for i, (a, b) in enumerate(np.ndindex(len(EDGE_HALVES), len(EDGE_HALVES))):
        for at, v in zip(fields, (EDGE_HALVES[a], EDGE_HALVES[b]), strict=False):
            raw[3 * i : 3 * i + 3, at : at + 2] = np.frombuffer(v.tobytes(), np.uint8)
    if qtype in ("Q3_K", "Q6_K"):  # signed sub-block scales: the extremes too
        sc = slice(96, 108) if qtype == "Q3_K" else slice(192, 208)
        half = raw[: len(raw) // 2, sc]
        half[...] = rng.choice(np.array([0x00, 0x80, 0x7F, 0xFF], np.uint8), half.shape)
    return raw


def test_every_type_we_quantize_has_a_torch_kernel():
    assert set(QTYPES) <= set(DEQUANTIZERS) and set(DEQUANTIZERS) == set(SCALE_FIELDS)
    assert set(DEQUANTIZERS) <= set(DECODABLE)


@pytest.mark.parametrize("qtype", sorted(DEQUANTIZERS))
def test_torch_kernels_equal_gguf_py_on_edge_scales(qtype):
    raw = _edge_blocks(qtype, 11)
    _assert_bits_equal(dequantize(raw, qtype), _gguf_dequantize(raw, qtype))
    # torch tensors straight in, as the run time passes them: (rows, bytes per row) and windows
    ref = _gguf_dequantize(raw, qtype).reshape(3, -1)
    got = ggml_torch.dequantize(torch.from_numpy(raw.reshape(3, -1)), qtype)
    _assert_bits_equal(got.numpy(), ref)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q8_0"])
def test_torch_dequantize_layouts_windows_and_out(qtype, monkeypatch):
    bs, ts = BLOCK_SIZES[qtype]
    raw = _edge_blocks(qtype, 12)[: 6 * 8].reshape(6, 8 * ts)
    ref = _gguf_dequantize(raw, qtype)
    monkeypatch.setattr(ggml_torch, "WINDOW", 5 * BLOCK_SIZES[qtype][0])  # windows of 5 blocks cut rows
    t = torch.from_numpy(raw)
    out = torch.full((6 * 8 * bs,), 7.0)
    assert ggml_torch.dequantize(t, qtype, out=out) is out
    _assert_bits_equal(out.numpy().reshape(6, -1), ref)
    # a strided view (every other block of each row), in numpy and in torch
    strided = raw.reshape(6, 8, ts)[:, ::2].reshape(6, 4, ts)
    want = _gguf_dequantize(np.ascontiguousarray(strided).reshape(6, -1), qtype)
    _assert_bits_equal(dequantize(raw[:, : 4 * ts], qtype), ref[:, : 4 * bs])
    _assert_bits_equal(ggml_torch.dequantize(t.view(6, 8, ts)[:, ::2].reshape(6, -1), qtype).numpy(), want)
    _assert_bits_equal(dequantize(raw[::-1], qtype), ref[::-1])
    with pytest.raises(ValueError, match="out must be"):
        ggml_torch.dequantize(t, qtype, out=torch.empty(6, 8 * bs, dtype=torch.float16))
    with pytest.raises(ValueError, match="uint8"):
        ggml_torch.dequantize(t[:, 1:], qtype)


def test_read_only_maps_are_decoded_in_place_without_warnings(tmp_path):
    raw = quantize(_rows(13, 4, 256), "Q6_K")
    raw.tofile(tmp_path / "blocks")
    mapped = np.memmap(tmp_path / "blocks", np.uint8, "r", shape=raw.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_bits_equal(dequantize(mapped, "Q6_K"), _gguf_dequantize(raw, "Q6_K"))


@pytest.mark.parametrize("qtype", ["IQ4_NL", "IQ2_XXS", "TQ2_0", "MXFP4", "BF16"])
def test_types_without_a_kernel_go_through_gguf_py(qtype):
    assert qtype not in DEQUANTIZERS and can_dequantize(qtype)
    _, ts = BLOCK_SIZES[qtype]
    raw = np.random.default_rng(14).integers(0, 256, (8, 2 * ts), dtype=np.uint8)
    _assert_bits_equal(dequantize(raw, qtype), _gguf_dequantize(raw, qtype))


@pytest.mark.parametrize("qtype", ["Q8_1", "Q8_K", "I32"])
def test_types_no_one_decodes_are_refused_by_name(qtype):
    assert not can_dequantize(qtype) and not can_dequantize(GT[qtype])
    _, ts = BLOCK_SIZES[qtype]
    with pytest.raises(UnsupportedError, match=f"cannot dequantize GGML type {qtype}"):
        dequantize(np.zeros((1, ts), np.uint8), qtype)
    with pytest.raises(UnsupportedError, match="unknown GGML type"):
        dequantize(np.zeros((1, 34), np.uint8), "Q9_0")
    assert not can_dequantize("Q9_0")


# ---------------------------------------------------------------------------- layering


GGML_MODULES = {"ggml_types", "ggml_torch", "quants", "quants_legacy", "quants_k", "quants_jit", "quants_k_jit",
                "jit_bits"}


def _formats_imports() -> dict[str, set[str]]:
    """Module -> the ``formats`` modules it imports, at module level or inside functions.

    The GGML modules import no private (``_name``) names from each other.
    """
    root = Path(__file__).resolve().parents[1] / "formats"
    names = {p.stem for p in root.glob("*.py")}
    assert names >= GGML_MODULES
    graph, private = {}, []
    for name in names:
        tree = ast.parse((root / f"{name}.py").read_text())
        graph[name] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                parts = (node.module or "").split(".")
                if node.level == 1 and not node.module:  # from . import x, y
                    targets = [a.name for a in node.names]
                elif node.level == 1 or parts[:2] == ["prebake", "formats"]:
                    targets = [parts[-1]]
                else:
                    continue
                graph[name] |= {t for t in targets if t in names}
                if name in GGML_MODULES:
                    private += [f"{name}: {a.name}" for a in node.names if a.name.startswith("_")]
            elif isinstance(node, ast.Import):
                imported = (a.name.split(".") for a in node.names)
                graph[name] |= {p[2] for p in imported if p[:2] == ["prebake", "formats"] and len(p) > 2}
    assert not private, f"private names imported across modules: {private}"
    return graph


def test_the_codecs_base_imports_no_codec():
    """(Cycles anywhere in the package: tests/test_import_graph.py.)"""
    graph = _formats_imports()  # also refuses private names imported across modules
    assert "quants_k" in graph["quants"] and "ggml_codec" in graph["quants_k"]  # the parser sees both kinds
    assert "ggml_torch" in graph["quants"] and "quants_jit" in graph["quants"]  # function-level ones too
    assert graph["ggml_codec"] <= {"errors", "ggml_types"} and graph["ggml_types"] <= {"errors"}


# ---------------------------------------------------------------------------- numba backend


def _jit_and_numpy(x: np.ndarray, qtype: str, monkeypatch) -> tuple[np.ndarray, np.ndarray]:
    monkeypatch.delenv("PREBAKE_NO_JIT", raising=False)
    assert quants.jit_quantizer(qtype) is not None
    jit = quantize(x, qtype)
    monkeypatch.setenv("PREBAKE_NO_JIT", "1")
    assert quants.jit_quantizer(qtype) is None
    return jit, quantize(x, qtype)


def _mixed_rows(seed: int) -> np.ndarray:
    """Blocks mixing hard cases within a block: signed zeros next to values, huge, tiny."""
    rng = np.random.default_rng(seed)
    shape = (64, 1024)
    x = rng.standard_normal(shape).astype(F32)
    x *= np.exp2(rng.integers(-140, 120, (64, 1)).astype(F32))  # per row: denormal to huge
    pick = rng.random(shape)
    x[pick < 0.2] = 0.0
    x[(pick >= 0.2) & (pick < 0.35)] = -0.0
    x[(pick >= 0.35) & (pick < 0.4)] = np.abs(x[(pick >= 0.35) & (pick < 0.4)])
    x[::3] = np.abs(x[::3])  # non-negative rows: a zero minimum of either sign
    x[1::5] = np.round(x[1::5] * 4) / 4  # exact ties
    return x


@pytest.mark.parametrize("qtype", QTYPES)
def test_jit_equals_numpy_codec(qtype, monkeypatch):
    pytest.importorskip("numba")
    x = np.concatenate([_mixed_rows(9), _mixed_rows(10), _hard_rows().reshape(-1, 1024)])
    jit, ref = _jit_and_numpy(x, qtype, monkeypatch)
    bad = np.flatnonzero((jit != ref).any(axis=1))
    assert bad.size == 0, f"{qtype}: jit differs from numpy on rows {bad[:10]}"


def test_numba_is_imported_only_by_quantize():
    import os
    import subprocess
    import sys

    code = (
        "import sys, numpy as np; from prebake.formats import quants; "
        "assert 'torch' not in sys.modules; "
        "quants.dequantize(np.zeros((1, 34), np.uint8), 'Q8_0'); "
        "assert 'numba' not in sys.modules; "
        "quants.quantize(np.zeros((1, 32), np.float32), 'Q8_0'); print('numba' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PREBAKE_NO_JIT"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    have_numba = importlib.util.find_spec("numba") is not None
    assert out.stdout.strip() == str(have_numba)
