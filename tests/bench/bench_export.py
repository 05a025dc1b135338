"""Issue 14: a Q4_K_M GGUF by prebake (convert --quant + export) against llama.cpp's own route.

Run ``python -m tests.bench export``. On the ~1.8 GB bf16 bench checkpoint (with a small
SentencePiece tokenizer added, which both converters read), one run each, same threads
(``PREBAKE_BENCH_THREADS``, default 1: prebake's quantizers use one core):

- prebake: ``prebake convert SRC OUT --quant q4_k_m`` then ``prebake export OUT FILE.gguf``;
- llama.cpp, when ``LLAMA_CPP_DIR`` names a checkout with ``convert_hf_to_gguf.py`` and a built
  ``llama-quantize`` (``build/bin/``): ``convert_hf_to_gguf.py SRC --outtype bf16`` then
  ``llama-quantize BF16.gguf Q4_K_M.gguf Q4_K_M THREADS`` (this venv's python runs the converter:
  it needs torch, transformers, sentencepiece, all here).

Prints wall time and peak anonymous memory (RssAnon) of each step and in all, and compares the
two files tensor by tensor: every tensor both quantize to one type, byte for byte. Without
llama.cpp it prints prebake's side and says what it skipped.

Then, when llama-cpp-python is importable (``pip install llama-cpp-python``; PyPI ships only its
source, so this bench does not install it), a tiny float Llama exported by prebake runs in
llama.cpp and its logits are compared with transformers'.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from tests.bench.common import WORK, big_checkpoint, run_timed, table

THREADS = int(os.environ.get("PREBAKE_BENCH_THREADS", "1"))


def main() -> None:
    src = big_checkpoint().parent
    if not (src / "tokenizer.model").exists():
        from tests.export_models import spm_tokenizer

        spm_tokenizer(src, 400)
    env = {**os.environ, **{v: str(THREADS) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS",
                                                      "OPENBLAS_NUM_THREADS")}}
    work = WORK / "export"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    prebake = str(Path(sys.executable).parent / "prebake")
    steps = {"prebake convert --quant q4_k_m": run_timed([prebake, "convert", str(src), str(work / "baked"),
                                                          "--quant", "q4_k_m", "-q"], env),
             "prebake export": run_timed([prebake, "export", str(work / "baked"), str(work / "prebake.gguf"), "-q"],
                                         env)}
    rows = _rows(steps, "prebake")
    theirs = _llama_cpp(src, work, env)
    if theirs:
        rows += _rows(theirs, "llama.cpp")
        ours, ref = sum(w for w, _ in steps.values()), sum(w for w, _ in theirs.values())
        print(table(f"Q4_K_M GGUF of a {_size(src)} bf16 Llama, {THREADS} thread(s)", rows,
                    ("step", "wall", "peak RssAnon")))
        print(f"prebake end to end: {ref / ours:.2f}x llama.cpp's speed")
        _compare(work / "prebake.gguf", work / "llama.cpp-q4_k_m.gguf")
    else:
        print(table(f"Q4_K_M GGUF of a {_size(src)} bf16 Llama, {THREADS} thread(s)", rows,
                    ("step", "wall", "peak RssAnon")))
    _llama_cpp_logits()
    shutil.rmtree(work / "baked", ignore_errors=True)


def _rows(steps: dict, who: str) -> list[tuple]:
    rows = [(name, f"{wall:.1f} s", f"{peak:.0f} MiB") for name, (wall, peak) in steps.items()]
    rows.append((f"{who}, in all", f"{sum(w for w, _ in steps.values()):.1f} s",
                 f"{max(p for _, p in steps.values()):.0f} MiB"))
    return rows


def _size(src: Path) -> str:
    return f"{sum(p.stat().st_size for p in src.iterdir()) / 1e9:.1f} GB"


def _llama_cpp(src: Path, work: Path, env: dict) -> dict | None:
    """llama.cpp's route, timed; None (with a message) when LLAMA_CPP_DIR has no built llama-quantize."""
    root = os.environ.get("LLAMA_CPP_DIR")
    quantize = next((p for p in (Path(root or "/nonexistent") / "build" / "bin" / "llama-quantize",
                                 Path(root or "/nonexistent") / "llama-quantize") if p.is_file()), None)
    convert = Path(root or "/nonexistent") / "convert_hf_to_gguf.py"
    if not root or quantize is None or not convert.is_file():
        print("\nllama.cpp's route skipped: set LLAMA_CPP_DIR to a llama.cpp checkout with convert_hf_to_gguf.py "
              "and a built llama-quantize (cmake -B build && cmake --build build --target llama-quantize)")
        return None
    bf16, out = work / "llama.cpp-bf16.gguf", work / "llama.cpp-q4_k_m.gguf"
    steps = {"convert_hf_to_gguf.py --outtype bf16": run_timed(
                 [sys.executable, str(convert), str(src), "--outfile", str(bf16), "--outtype", "bf16"], env),
             "llama-quantize Q4_K_M": run_timed([str(quantize), str(bf16), str(out), "Q4_K_M", str(THREADS)], env)}
    bf16.unlink()
    return steps


def _compare(ours: Path, theirs: Path) -> None:
    """Tensor by tensor: types of each, and bytes where both quantized to one type."""
    import gguf
    import numpy as np

    a = {t.name: t for t in gguf.GGUFReader(str(ours)).tensors}
    b = {t.name: t for t in gguf.GGUFReader(str(theirs)).tensors}
    same, differ, other = [], [], []
    for name in sorted(a.keys() & b.keys()):
        if a[name].tensor_type != b[name].tensor_type:
            other.append(f"{name} ({a[name].tensor_type.name} / {b[name].tensor_type.name})")
        elif a[name].tensor_type.name not in ("F32", "F16", "BF16"):
            (same if np.array_equal(np.asarray(a[name].data), np.asarray(b[name].data)) else differ).append(name)
    print(f"quantized tensors of one type in both: {len(same)} byte-equal, {len(differ)} differ"
          + (f" ({', '.join(differ[:5])})" if differ else ""))
    print(f"typed differently ({len(other)}): {', '.join(other[:8])}{' ...' if len(other) > 8 else ''}")
    print(f"only in prebake's: {sorted(a.keys() - b.keys())}; only in llama.cpp's: {sorted(b.keys() - a.keys())}")


def _llama_cpp_logits() -> None:
    """A tiny float Llama exported by prebake, run in llama.cpp (llama-cpp-python), against transformers."""
    try:
        import llama_cpp
    except ImportError:
        print("\nllama.cpp logits check skipped: llama-cpp-python is not installed (pip install llama-cpp-python; "
              "PyPI has only its source, so it builds llama.cpp)")
        return
    import numpy as np
    import torch
    from prebake.convert.bake import convert
    from prebake.convert.export import export_gguf

    from tests.export_models import bpe_tokenizer, save_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "llama"
        model = save_model("llama", folder, hidden=256, layers=2, vocab=320)
        bpe_tokenizer(folder, 300)
        convert(folder, Path(tmp) / "baked")
        export_gguf(Path(tmp) / "baked", Path(tmp) / "llama.gguf")
        tokens = [5, 17, 99, 3, 250, 11, 42, 7, 100, 64]
        with torch.no_grad():
            want = model(torch.tensor([tokens])).logits[0].numpy()
        llm = llama_cpp.Llama(str(Path(tmp) / "llama.gguf"), logits_all=True, n_ctx=64, verbose=False)
        llm.eval(tokens)
        got = np.asarray(llm.scores[:len(tokens)], np.float32)
    err = float(np.abs(got - want).max())
    print(f"\nllama.cpp ({llama_cpp.__version__}) ran prebake's f32 GGUF of a tiny Llama: max |logits - "
          f"transformers'| = {err:.2e} (logits up to {float(np.abs(want).max()):.2f})")


if __name__ == "__main__":
    main()
