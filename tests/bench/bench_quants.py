"""GGML block codecs: quantize / dequantize throughput against gguf-py's numpy codecs.

Run ``python tests/bench/bench_quants.py [--rows R] [--cols C] [--repeat N]`` (or
``python -m tests.bench quants``). Single thread; each figure is the median of ``--repeat``
runs on the same float32 matrix (default 4096 x 4096 normal weights, 64 MiB), in MB/s of
float32 (quantize input, dequantize output). Quantize is timed on both backends: the numpy
codecs (``PREBAKE_NO_JIT=1``) and the numba kernels of ``prebake.formats.quants_jit`` (``-``
where numba is not installed; compiled, or loaded from numba's cache, before timing). gguf-py
cannot quantize Q4_K/Q6_K; llama.cpp's C reference is the yardstick there. With
``--ggml-lib PATH/libggml-base.so`` (or ``GGML_BASE_LIB``; a llama-cpp-python install has one,
see tests/golden/make_quant_golden.py) the table adds llama.cpp's ``ggml_quantize_chunk`` (no
imatrix: ``quantize_row_*_ref``, one thread) on the same matrix, checks that its bytes equal
ours, and prints our jit speed over it; without one it prints the figures recorded below.
Dequantize runs prebake's torch kernels (``prebake.formats.ggml_torch``), on the blocks quantized
above, and for Q2_K/Q3_K/Q5_K (decoded, not made, here) on random blocks with modest scales.

llama.cpp reference, measured on this machine through ctypes (llama-cpp-python 0.3.36, its
default build; ``ggml_quantize_chunk`` without imatrix on 1024 x 4096 normal weights, median of
5, one thread, quiet machine): Q8_0 330, Q4_0 1850, Q4_1 2100, Q5_0 780, Q5_1 1040,
Q4_K 49, Q6_K 113 MB/s. Under load from a neighbour the same runs gave Q4_K 16, Q6_K 48.
Interleaved with ours on 512 x 4096 (medians of 5, CPU time, a busy machine): Q4_K 40-51
against our 41-53, Q6_K 96-114 against our 60-78 MB/s.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402

import gguf  # noqa: E402
import numpy as np  # noqa: E402
from prebake.formats import quants  # noqa: E402
from prebake.formats.ggml_torch import DEQUANTIZERS  # noqa: E402
from prebake.formats.ggml_types import BLOCK_SIZES  # noqa: E402
from prebake.formats.quants import QTYPES, dequantize, quantize  # noqa: E402

# fp16 scale fields of the types decoded but not made here: random blocks get modest scales there
SCALE_FIELDS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q5_K": (0, 2)}


def median_seconds(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@contextlib.contextmanager
def numpy_backend() -> Iterator[None]:
    """``quantize`` on the numpy codecs (``PREBAKE_NO_JIT=1``) inside the block."""
    saved = os.environ.get("PREBAKE_NO_JIT")
    os.environ["PREBAKE_NO_JIT"] = "1"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["PREBAKE_NO_JIT"]
        else:
            os.environ["PREBAKE_NO_JIT"] = saved


def gguf_codec(qtype: str, what: str) -> Callable[[np.ndarray], np.ndarray] | None:
    """gguf-py's quantize/dequantize for ``qtype``, or None where it has none."""
    gt = gguf.GGMLQuantizationType[qtype]
    bs, ts = BLOCK_SIZES[qtype]
    fn, probe = {
        "quantize": (gguf.quants.quantize, np.zeros((1, bs), np.float32)),
        "dequantize": (gguf.quants.dequantize, np.zeros((1, ts), np.uint8)),
    }[what]
    try:
        fn(probe, gt)
    except NotImplementedError:
        return None
    return lambda a: fn(a, gt)


def ggml_quantizer(path: str | None) -> Callable[[np.ndarray, str], np.ndarray] | None:
    """llama.cpp's reference quantizer from ``libggml-base.so`` at ``path``, or None."""
    if not path:
        return None
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # also when run as a script
    from tests.golden.make_quant_golden import load_ggml, reference_quantize

    lib = load_ggml(path)
    return lambda x, qtype: reference_quantize(lib, x, qtype)


def bench(rows: int, cols: int, repeat: int, ggml=None) -> list[dict]:
    x = (np.random.default_rng(0).standard_normal((rows, cols)) * 0.02).astype(np.float32)
    mb = x.nbytes / 1e6
    results = []
    for qtype in QTYPES:
        bs, ts = BLOCK_SIZES[qtype]
        with numpy_backend():
            blocks = quantize(x, qtype)
            row = {"qtype": qtype, "bpw": 8 * ts / bs, "bytes": blocks.nbytes}
            row["q"] = mb / median_seconds(lambda q=qtype: quantize(x, q), repeat)
        row["q_jit"] = None
        if quants.jit_quantizer(qtype) is not None:
            if not np.array_equal(quantize(x, qtype), blocks):  # also compiles the kernel
                raise AssertionError(f"{qtype}: the jit and numpy backends disagree")
            row["q_jit"] = mb / median_seconds(lambda q=qtype: quantize(x, q), repeat)
        row["dq"] = mb / median_seconds(lambda q=qtype, b=blocks: dequantize(b, q), repeat)
        for what, arg, key in (("quantize", x, "q_ref"), ("dequantize", blocks, "dq_ref")):
            ref = gguf_codec(qtype, what)
            row[key] = mb / median_seconds(lambda r=ref, a=arg: r(a), repeat) if ref else None
        row["q_c"] = row["c_same"] = None
        if ggml is not None:
            row["c_same"] = bool(np.array_equal(ggml(x, qtype), blocks))
            row["q_c"] = mb / median_seconds(lambda q=qtype: ggml(x, q), repeat)
        results.append(row)
    for qtype in (q for q in DEQUANTIZERS if q not in QTYPES):
        bs, ts = BLOCK_SIZES[qtype]
        blocks = random_blocks(qtype, x.size // bs)
        row = {"qtype": qtype, "bpw": 8 * ts / bs, "bytes": blocks.nbytes, "q": None, "q_jit": None,
               "q_ref": None, "q_c": None, "c_same": None}
        row["dq"] = mb / median_seconds(lambda q=qtype, b=blocks: dequantize(b, q), repeat)
        ref = gguf_codec(qtype, "dequantize")
        row["dq_ref"] = mb / median_seconds(lambda r=ref, b=blocks: r(b), repeat)
        results.append(row)
    return results


def random_blocks(qtype: str, n: int) -> np.ndarray:
    """``n`` random blocks of a type prebake does not quantize to, with scales of a small model's size."""
    _, ts = BLOCK_SIZES[qtype]
    blocks = np.random.default_rng(1).integers(0, 256, (n, ts), dtype=np.uint8)
    for at in SCALE_FIELDS[qtype]:
        scale = np.random.default_rng(at).uniform(1e-4, 1e-3, n).astype(np.float16)
        blocks[:, at : at + 2] = scale.view(np.uint8).reshape(n, 2)
    return blocks


def print_table(results: list[dict], rows: int, cols: int, repeat: int) -> None:
    def rate(v: float | None) -> str:
        return f"{v:8.0f}" if v else "       -"

    def ratio(a: float, b: float | None) -> str:
        return f"{a / b:6.1f}x" if b else "      -"

    print(f"{rows} x {cols} float32 ({rows * cols * 4 / 2**20:.0f} MiB), median of {repeat}, MB/s of float32")
    print(
        "type   bits/w   bytes on disk |  quantize      jit  gguf-py   ratio jit/ref "
        "| dequantize  gguf-py   ratio"
    )
    for r in results:
        print(
            f"{r['qtype']:5} {r['bpw']:7.2f} {r['bytes']:15,d} | {rate(r['q'])} {rate(r['q_jit'])} "
            f"{rate(r['q_ref'])} {ratio(r['q'] or 0, r['q_ref'])} {ratio(r['q_jit'] or 0, r['q_ref'])} "
            f"|   {rate(r['dq'])} {rate(r['dq_ref'])} {ratio(r['dq'], r['dq_ref'])}"
        )
    if any(r["q_c"] for r in results):
        print("\nllama.cpp's reference quantizer (ggml_quantize_chunk, no imatrix, one thread), same matrix")
        print("type   llama.cpp   jit / llama.cpp   same bytes")
        for r in results:
            if r["q"]:
                speedup = ratio(r["q_jit"] or r["q"], r["q_c"])
                print(f"{r['qtype']:5} {rate(r['q_c'])}   {speedup:>15}   {r['c_same']}")
    else:
        print("llama.cpp's reference, recorded on this machine (see this module's docstring): "
              "Q4_K ~49, Q6_K ~113 MB/s; pass --ggml-lib to measure it in this run")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--ggml-lib", default=os.environ.get("GGML_BASE_LIB"),
                        help="libggml-base.so of a llama.cpp build, to time its reference quantizer too")
    args = parser.parse_args(argv if argv is not None else [])
    ggml = ggml_quantizer(args.ggml_lib)
    print_table(bench(args.rows, args.cols, args.repeat, ggml), args.rows, args.cols, args.repeat)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
