"""Issue 14: a Q4_K_M GGUF by prebake (convert --quant + export) against llama.cpp's own route.

Run ``python -m tests.bench export``. On the ~1.8 GB bf16 bench checkpoint (with a small
SentencePiece tokenizer added, which both converters read), the same threads on each side
(``PREBAKE_BENCH_THREADS``, default 1), the two routes run in turn ``PREBAKE_BENCH_REPEAT`` times
(5; two minutes a pair on 2 cores) and their medians compared:

- prebake: ``prebake convert SRC OUT --quant q4_k_m --quant-embeddings --workers THREADS`` then
  ``prebake export OUT FILE.gguf``;
- llama.cpp (``LLAMA_CPP_DIR``, else the build :mod:`tests.bench.llama_cpp` makes once):
  ``convert_hf_to_gguf.py SRC --outtype bf16`` then ``llama-quantize BF16.gguf Q4_K_M.gguf
  Q4_K_M THREADS`` (this venv's python runs the converter, with the gguf-py of its commit: it
  needs torch, transformers, sentencepiece, all here).

Prints wall time and peak anonymous memory (RssAnon) of each step and in all, and compares the
two files tensor by tensor: every tensor both quantize to one type, byte for byte. Without
llama.cpp it prints prebake's side and says what it skipped.

Then a tiny float Llama exported by prebake runs in llama.cpp (llama-cpp-python: installed, or
the sdist's package over the library built here): its logits are compared with transformers', and
llama.cpp's tokenizer, reading the exported vocabulary, with transformers' on a few sentences.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from tests.bench.common import REPEAT, WORK, big_checkpoint, median, run_timed, table
from tests.bench.llama_cpp import checkout, import_llama_cpp, quantize_tool

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
    ours, theirs, llama = [], [], True
    for _ in range(REPEAT):  # interleaved runs; medians
        ours.append(_prebake(prebake, src, work, env))
        if llama:
            theirs.append(_llama_cpp(src, work, env))
            llama = theirs[-1] is not None
    theirs = theirs if llama else []
    rows = _rows(ours, "prebake") + (_rows(theirs, "llama.cpp") if theirs else [])
    print(table(f"Q4_K_M GGUF of a {_size(src)} bf16 Llama, {THREADS} thread(s), median of {len(ours)}", rows,
                ("step", "wall", "peak RssAnon")))
    if theirs:
        each = ", ".join(f"{_total(b) / _total(a):.2f}x" for a, b in zip(ours, theirs, strict=True))
        print(f"prebake end to end: {median([_total(r) for r in theirs]) / median([_total(r) for r in ours]):.2f}x "
              f"llama.cpp's speed (each run: {each})")
        _compare(work / "prebake.gguf", work / "llama.cpp-q4_k_m.gguf")
    _llama_cpp_logits()
    shutil.rmtree(work / "baked", ignore_errors=True)


def _prebake(prebake: str, src: Path, work: Path, env: dict) -> dict:
    """prebake's route, timed. --quant-embeddings: token_embd in Q4_K too, as llama-quantize's Q4_K_M has it
    (prebake's default keeps embeddings in float for the Python side, where a lookup of packed rows gains nothing)."""
    shutil.rmtree(work / "baked", ignore_errors=True)
    return {"prebake convert --quant q4_k_m": run_timed([prebake, "convert", str(src), str(work / "baked"),
                                                         "--quant", "q4_k_m", "--quant-embeddings",
                                                         "--workers", str(THREADS), "-q", "--force"], env),
            "prebake export": run_timed([prebake, "export", str(work / "baked"), str(work / "prebake.gguf"), "-q"],
                                        env)}


def _total(steps: dict) -> float:
    return sum(wall for wall, _ in steps.values())


def _rows(runs: list[dict], who: str) -> list[tuple]:
    rows = [(name, f"{median([r[name][0] for r in runs]):.1f} s", f"{max(r[name][1] for r in runs):.0f} MiB")
            for name in runs[0]]
    rows.append((f"{who}, in all", f"{median([_total(r) for r in runs]):.1f} s",
                 f"{max(p for r in runs for _, p in r.values()):.0f} MiB"))
    return rows


def _size(src: Path) -> str:
    return f"{sum(p.stat().st_size for p in src.iterdir()) / 1e9:.1f} GB"


def _llama_cpp(src: Path, work: Path, env: dict) -> dict | None:
    """llama.cpp's route, timed; None (with a message) when there is no llama.cpp to run."""
    root = checkout()
    quantize = quantize_tool(root) if root else None
    if root is None or quantize is None or not (root / "convert_hf_to_gguf.py").is_file():
        print("\nllama.cpp's route skipped: no llama.cpp build (set LLAMA_CPP_DIR to a checkout with "
              "convert_hf_to_gguf.py and a built llama-quantize, or let the bench build one)")
        return None
    # the converter with the gguf-py of its own commit, as llama.cpp's requirements install it
    env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(root / "gguf-py"), env.get("PYTHONPATH")]))}
    bf16, out = work / "llama.cpp-bf16.gguf", work / "llama.cpp-q4_k_m.gguf"
    steps = {"convert_hf_to_gguf.py --outtype bf16": run_timed(
                 [sys.executable, str(root / "convert_hf_to_gguf.py"), str(src), "--outfile", str(bf16),
                  "--outtype", "bf16"], env),
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
    llama_cpp = import_llama_cpp()
    if llama_cpp is None:
        print("\nllama.cpp logits check skipped: neither llama-cpp-python nor a libllama built by this bench")
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
        llm = llama_cpp.Llama(str(Path(tmp) / "llama.gguf"), logits_all=True, n_ctx=64, verbose=False,
                              type_k=0, type_v=0)  # an F32 KV cache: float tolerance, not f16's
        llm.eval(tokens)
        got = np.asarray(llm.scores[:len(tokens)], np.float32)
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(folder)
        same = [llm.tokenize(text.encode(), add_bos=False, special=True) == hf.encode(text, add_special_tokens=False)
                for text in SENTENCES]
    err = float(np.abs(got - want).max())
    print(f"\nllama.cpp ({llama_cpp.__version__}) ran prebake's f32 GGUF of a tiny Llama: max |logits - "
          f"transformers'| = {err:.2e} (logits up to {float(np.abs(want).max()):.2f}); its tokenizer gave "
          f"transformers' ids for {sum(same)} of {len(same)} sentences")


SENTENCES = ["Hello world, the quick brown fox.", "  two spaces and\nnew lines\n\n", "caf\u00e9 na\u00efve \u65e5\u672c 123456",
             "<|im_start|>user\nhi<|im_end|>"]


if __name__ == "__main__":
    main()
