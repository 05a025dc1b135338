"""Regenerate ``quant_golden.npz``: llama.cpp's own quantizer output on hard inputs.

The tests compare ``prebake.formats.quants`` against this file, so CI never builds llama.cpp.
It was made with llama-cpp-python 0.3.36 (bundled llama.cpp / ggml 0.25.3) on x86-64 Linux.
To regenerate, in a throwaway venv (it compiles llama.cpp, ~6 minutes on 2 cores):

    python3 -m venv /tmp/llamavenv
    /tmp/llamavenv/bin/pip install llama-cpp-python==0.3.36
    /tmp/llamavenv/bin/python tests/golden/make_quant_golden.py

The script loads ``libggml-base.so`` from the installed ``llama_cpp`` package and calls
``ggml_quantize_chunk`` with no importance matrix, which for every type here runs
``quantize_row_<type>_ref`` from ``ggml/src/ggml-quants.c``. It needs only numpy and ctypes.

The file holds ``x`` (rows of 512 float32), ``case`` (what each row tests), one uint8 array of
block bytes per type, and ``llama_cpp_version``.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys

import numpy as np

# enum ggml_type values (ggml/include/ggml.h) and (elements, bytes) per block
GGML_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q4_K": 12, "Q6_K": 14}
BLOCKS = {
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q8_0": (32, 34),
    "Q4_K": (256, 144),
    "Q6_K": (256, 210),
}
ROW = 512
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quant_golden.npz")


def load_ggml(path: str | None = None) -> ctypes.CDLL:
    """ggml's base library: ``path``, or the one of the installed ``llama_cpp`` package."""
    if path is None:
        import llama_cpp

        libdir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
        path = sorted(glob.glob(os.path.join(libdir, "libggml-base.so*")))[0]
    lib = ctypes.CDLL(path)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    return lib


def reference_quantize(lib: ctypes.CDLL, x: np.ndarray, qtype: str) -> np.ndarray:
    """llama.cpp's reference blocks for float32 rows ``x`` (rows, n)."""
    x = np.ascontiguousarray(x, np.float32)
    rows, n = x.shape
    bs, ts = BLOCKS[qtype]
    out = np.zeros((rows, n // bs * ts), np.uint8)
    lib.ggml_quantize_chunk(GGML_TYPES[qtype], x.ctypes.data, out.ctypes.data, 0, rows, n, None)
    return out


def hard_cases(rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
    f = np.float32

    def normal(scale: float = 1.0) -> np.ndarray:
        return (rng.standard_normal(ROW) * scale).astype(f)

    def full(v: float) -> np.ndarray:
        return np.full(ROW, v, f)

    ramp = np.linspace(-1, 1, ROW, dtype=f)
    cases = [
        ("zeros", full(0.0)),
        ("negative zeros", full(-0.0)),
        ("mixed signed zeros", np.where(rng.random(ROW) < 0.5, f(0.0), f(-0.0)).astype(f)),
        ("constant 1", full(1.0)),
        ("constant -1", full(-1.0)),
        ("constant 0.37", full(0.37)),
        ("constant -1e-3", full(-1e-3)),
        ("constant 1e-30", full(1e-30)),
        ("constant -1e-40 (denormal)", full(-1e-40)),
        ("constant 3e4", full(3e4)),
        ("constant 1e-15 (GROUP_MAX_EPS)", full(1e-15)),
        ("normal * 1e-15", normal(1e-15)),
        ("normal * 1e-30", normal(1e-30)),
        ("normal * 1e-38 (some denormal)", normal(1e-38)),
        ("normal * 1e-42 (denormals)", normal(1e-42)),
        ("normal * 1e-7 (fp16-subnormal scales)", normal(1e-7)),
        ("normal * 1e-5", normal(1e-5)),
        ("normal * 1e6", normal(1e6)),
        ("normal * 1e8 (fp16 scale overflow)", normal(1e8)),
        ("normal * 1e20 (x*x overflows)", normal(1e20)),
        ("normal * 1e30", normal(1e30)),
        ("normal * 1e37", normal(1e37)),
        ("float32 max and min", np.where(rng.random(ROW) < 0.5, f(3.4e38), f(-3.4e38)).astype(f)),
        ("ramp", ramp),
        ("ramp * 1e30", ramp * f(1e30)),
        ("uniform positive", rng.random(ROW).astype(f)),
        ("uniform negative", -rng.random(ROW).astype(f)),
        ("ints -1..1", rng.integers(-1, 2, ROW).astype(f)),
        ("ints -8..7 (ties)", rng.integers(-8, 8, ROW).astype(f)),
        ("ints 0..15", rng.integers(0, 16, ROW).astype(f)),
        ("half integers", (rng.integers(-8, 8, ROW) + 0.5).astype(f)),
        ("tenths", (rng.integers(-30, 31, ROW) * 0.1).astype(f)),
        ("+a/-a alternating", np.tile(np.array([0.5, -0.5], f), ROW // 2)),
        ("-a/+a alternating", np.tile(np.array([-0.25, 0.25], f), ROW // 2)),
        ("two values", np.where(rng.random(ROW) < 0.3, f(0.7), f(-0.2)).astype(f)),
        ("sparse", np.where(rng.random(ROW) < 0.05, normal(), f(0)).astype(f)),
        ("one value per 32", np.where(np.arange(ROW) % 32 == 5, normal(), f(0)).astype(f)),
        ("one value per 16", np.where(np.arange(ROW) % 16 == 15, normal(), f(0)).astype(f)),
        ("outliers 100x", np.where(rng.random(ROW) < 0.03, normal(100.0), normal(1.0)).astype(f)),
        ("one huge outlier", np.where(np.arange(ROW) == 77, f(1e4), normal(0.02)).astype(f)),
        ("one tiny sub-block", np.where(np.arange(ROW) // 32 == 3, normal(1e-6), normal(1.0)).astype(f)),
        ("sub-block scales 10^(j-4)", (normal() * f(10.0) ** (np.arange(ROW) // 32 % 8 - 4)).astype(f)),
        ("16-block scales 10^(j-8)", (normal() * f(10.0) ** (np.arange(ROW) // 16 % 16 - 8)).astype(f)),
        ("constant per sub-block", np.repeat(rng.standard_normal(ROW // 32), 32).astype(f)),
        ("constant per 16", np.repeat(rng.standard_normal(ROW // 16), 16).astype(f)),
        ("positive constant per sub-block", np.repeat(rng.random(ROW // 32) + 0.1, 32).astype(f)),
        ("laplace", rng.laplace(size=ROW).astype(f)),
        ("student-t 2", rng.standard_t(2, ROW).astype(f)),
        ("lognormal", rng.lognormal(size=ROW).astype(f)),
        ("shifted normal", (normal() + f(5)).astype(f)),
        ("shifted negative", (normal() - f(5)).astype(f)),
        ("mostly positive", (np.abs(normal()) - f(0.1)).astype(f)),
        ("bf16-rounded normal", (normal().view(np.uint32) & 0xFFFF0000).view(f)),
        ("fp16-rounded normal", normal().astype(np.float16).astype(f)),
    ]
    return cases


def make_inputs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(20240607)
    cases = hard_cases(rng)
    # a realistic weight matrix: normal weights, a few outlier input channels
    w = (rng.standard_normal((48, ROW)) * 0.02).astype(np.float32)
    w[:, rng.choice(ROW, 6, replace=False)] *= 20
    cases += [("weights", row) for row in w]
    # random distributions at random magnitudes
    for _ in range(24):
        scale = 10.0 ** rng.uniform(-9, 9)
        kind = rng.integers(0, 3)
        row = [rng.standard_normal(ROW), rng.laplace(size=ROW), rng.random(ROW) - 0.3][kind]
        cases.append((f"random kind {kind} scale {scale:.3g}", (row * scale).astype(np.float32)))
    x = np.stack([row for _, row in cases]).astype(np.float32)
    return x, np.array([name for name, _ in cases])


def main() -> None:
    import llama_cpp

    lib = load_ggml()
    x, case = make_inputs()
    out = {"x": x, "case": case, "llama_cpp_version": np.array(llama_cpp.__version__)}
    for qtype in GGML_TYPES:
        out[qtype] = reference_quantize(lib, x, qtype)
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT}: {x.shape[0]} rows, llama-cpp-python {llama_cpp.__version__}", file=sys.stderr)


if __name__ == "__main__":
    main()
