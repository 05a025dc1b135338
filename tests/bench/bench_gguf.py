"""Issue 13: a GGUF baked into a Hugging Face folder, against a plain copy and against transformers' GGUF route.

On a Qwen2-shaped Q8_0 GGUF of ~620 MB with a 152k-entry byte-level BPE vocabulary (merges,
token types, chat template), built here once (``build/bench/gguf``) the way llama.cpp writes one:
- bake time of ``prebake convert --keep-quant`` (whole process, data on disk) against ``cp`` +
  ``sync`` of the file (target >= 0.9x), and of the dequantizing bake (float32, what
  transformers' route yields); peak anonymous memory of each;
- the same bake as a ``convert()`` call in a process that imported its modules before the clock
  (the guide's rule for every side), Hugging Face and GGUF names: what is left once imports are
  a cost of the process, not of the bake;
- planning time (parse, name map, plan: what passes before the progress bar counts bytes);
- the tokenizer files by transformers' route on a sample of the vocabulary spliced to the whole
  (the bake's) against the route on the whole vocabulary: time, and the files byte for byte;
- ``from_pretrained(OUT)`` (float bake; packed bake through ``import prebake.cache.hf``) against
  ``from_pretrained(folder, gguf_file=...)`` on the same file, fresh process each, the call alone
  timed (imports and transformers' lazy module loading apart: a tiny model of the class is built
  first); the tokenizer likewise (target: the model >= 50x sooner).

Every call timed in a process of its own, and ``cp``, starts on memory the VM backs
(:func:`~tests.bench.common.touch_free_memory`); a whole ``prebake`` process cannot, and pays for
the pages the VM took back while it imported.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np

from tests.bench.common import (
    REPEAT,
    TOUCH_SNIPPET,
    WORK,
    interleaved,
    median,
    python_timing,
    run_timed,
    table,
    touch_free_memory,
)

VOCAB, HIDDEN, LAYERS, INTER, HEADS, KV_HEADS = 152_064, 1024, 24, 2816, 8, 2
BENCH = WORK / "gguf"
GGUF = BENCH / "model" / "qwen2-q8_0.gguf"


def build() -> None:
    """The GGUF file (once): random Q8_0 matrices, F32 norms, a synthetic 152k BPE vocabulary."""
    if GGUF.exists():
        return
    import gguf
    from prebake.formats.quants import quantize

    GGUF.parent.mkdir(parents=True, exist_ok=True)
    tmp = GGUF.with_suffix(".tmp")
    w = gguf.GGUFWriter(str(tmp), "qwen2")
    for key, value in (("block_count", LAYERS), ("context_length", 4096), ("embedding_length", HIDDEN),
                       ("feed_forward_length", INTER), ("attention.head_count", HEADS),
                       ("attention.head_count_kv", KV_HEADS)):
        w.add_uint32(f"qwen2.{key}", value)
    w.add_float32("qwen2.rope.freq_base", 1e6)
    w.add_float32("qwen2.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_file_type(7)
    _vocab(w)
    rng = np.random.default_rng(0)
    q8 = gguf.GGMLQuantizationType.Q8_0

    def matrix(name, rows, cols):
        w.add_tensor(name, quantize(rng.standard_normal((rows, cols), dtype=np.float32) * 0.02, "Q8_0"), raw_dtype=q8)

    matrix("token_embd.weight", VOCAB, HIDDEN)
    kv = HIDDEN // HEADS * KV_HEADS
    for i in range(LAYERS):
        for name, rows, cols in (("attn_q", HIDDEN, HIDDEN), ("attn_k", kv, HIDDEN), ("attn_v", kv, HIDDEN),
                                 ("attn_output", HIDDEN, HIDDEN), ("ffn_gate", INTER, HIDDEN),
                                 ("ffn_up", INTER, HIDDEN), ("ffn_down", HIDDEN, INTER)):
            matrix(f"blk.{i}.{name}.weight", rows, cols)
        for name, n in (("attn_q", HIDDEN), ("attn_k", kv), ("attn_v", kv)):
            w.add_tensor(f"blk.{i}.{name}.bias", rng.standard_normal(n, dtype=np.float32) * 0.02)
        for name in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{name}.weight", np.ones(HIDDEN, np.float32))
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    matrix("output.weight", VOCAB, HIDDEN)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.rename(GGUF)


def _vocab(w) -> None:
    """A byte-level BPE of VOCAB entries: the 256-symbol alphabet, merges of earlier tokens, specials."""
    from tokenizers.pre_tokenizers import ByteLevel

    tokens = sorted(ByteLevel.alphabet())
    seen, merges = set(tokens), []
    rng = np.random.default_rng(1)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    while len(tokens) < VOCAB - len(specials):
        a, b = tokens[int(rng.integers(len(tokens)) ** 0.5 * len(tokens) ** 0.5)], tokens[int(rng.integers(256))]
        if a + b not in seen and len(a + b) < 16:
            seen.add(a + b)
            tokens.append(a + b)
            merges.append(f"{a} {b}")
    tokens += specials
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - len(specials)) + [3] * len(specials))
    w.add_token_merges(merges)
    w.add_eos_token_id(len(tokens) - 3)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}")


def bench_bake() -> tuple[list, dict]:
    prebake = str(shutil.which("prebake", path=str(sys.executable.rsplit("/", 1)[0])))
    copy = BENCH / "copy.gguf"
    GGUF.read_bytes()  # warm the page cache for every side
    rows, facts = [], {}

    def run(kind: str) -> tuple[float, float]:
        # each run starts with no dirty pages of the one before it waiting to be written: os.sync()
        # outside the clock, before every side alike
        copy.unlink(missing_ok=True)
        shutil.rmtree(BENCH / f"baked-{kind.removesuffix('-gguf')}", ignore_errors=True)
        os.sync()
        if kind == "copy":
            touch_free_memory()  # as the calls do before their clock (LOAD)
            return run_timed(["sh", "-c", f'cp --reflink=never "{GGUF}" "{copy}" && sync "{copy}"'])
        if kind.startswith("inproc"):
            # the bake as a call, its modules imported first as for the loads (LOAD): what is left is
            # parsing, mapping, the tokenizer and the bytes
            code = LOAD.format(imp="from prebake.convert.bake import convert\nfrom prebake.convert.plan import Options\n"
                                   "import transformers.integrations.gguf, transformers.convert_slow_tokenizer\n"
                                   "import transformers.models.qwen2.tokenization_qwen2",
                               body=f"convert({str(GGUF)!r}, {str(BENCH / 'baked-inproc')!r}, "
                                    f"Options(keep_quant=True, names={'gguf' if kind.endswith('gguf') else 'hf'!r}))")
            return python_timing(code)["s"], 0
        extra = {"keep": ["--keep-quant"], "gguf": ["--keep-quant", "--names", "gguf"], "float": []}[kind]
        return run_timed([prebake, "convert", str(GGUF), str(BENCH / f"baked-{kind}"), "-q", *extra])

    # the compared runs interleaved in rotated rounds; the float bake (2.4 GB written) in rounds of
    # its own after them
    runs = interleaved({kind: (lambda k=kind: run(k)) for kind in ("copy", "keep", "gguf", "inproc", "inproc-gguf")})
    runs["float"] = [run("float") for _ in range(REPEAT)]
    copy.unlink(missing_ok=True)
    size = GGUF.stat().st_size / 1e9
    for kind, label in (("copy", "cp + sync"), ("keep", "prebake convert --keep-quant"),
                        ("gguf", "  the same, --names gguf (no transformers)"),
                        ("float", "prebake convert (dequantize to float32)"),
                        ("inproc", "convert(keep_quant) call, modules imported before the clock"),
                        ("inproc-gguf", "  the same call, names='gguf'")):
        wall, peak = median([r[0] for r in runs[kind]]), median([r[1] for r in runs[kind]])
        facts[kind] = wall
        rows.append((label, f"{wall:.2f} s", f"{size / wall:.2f} GB/s",
                     f"{peak:.0f} MiB" if kind not in ("copy", "inproc", "inproc-gguf") else "-"))
    shutil.rmtree(BENCH / "baked-inproc", ignore_errors=True)
    plan = python_timing("import json, time\nt = time.perf_counter()\nfrom prebake.convert.bake import prepare\n"
                         f"p = prepare({str(GGUF)!r}, __import__('prebake.convert.plan').convert.plan.Options())\n"
                         "print(json.dumps({'s': time.perf_counter() - t, 'n': len(p.plans[''].order)}))")
    facts["plan"] = plan["s"]
    return rows, facts


# Imports and transformers' lazy module loading are a one-time cost of the process, not of the load:
# a tiny model of the same class is built first (every side gets that), then the call is timed.
LOAD = ("import json, time, torch, transformers\n{imp}\n"
        "transformers.AutoModelForCausalLM.from_config(transformers.Qwen2Config(vocab_size=64, hidden_size=64, "
        "intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))\n"
        + TOUCH_SNIPPET + "start = time.perf_counter()\n{body}\nprint(json.dumps({{'s': time.perf_counter() - start}}))")
LOADERS = {
    "prebake bake: from_pretrained(OUT)": ("", "m = transformers.AutoModelForCausalLM.from_pretrained({out!r})"),
    "prebake --keep-quant bake, packed": ("import prebake.cache.hf",
                                          "m = transformers.AutoModelForCausalLM.from_pretrained({keep!r})"),
    "transformers from_pretrained(gguf_file=)": (
        "", "m = transformers.AutoModelForCausalLM.from_pretrained({folder!r}, gguf_file={name!r})"),
    "prebake bake: AutoTokenizer(OUT)": ("", "t = transformers.AutoTokenizer.from_pretrained({out!r})"),
    "transformers AutoTokenizer(gguf_file=)": (
        "", "t = transformers.AutoTokenizer.from_pretrained({folder!r}, gguf_file={name!r})"),
}


def bench_load() -> tuple[list, dict]:
    args = {"out": str(BENCH / "baked-float"), "keep": str(BENCH / "baked-keep"), "folder": str(GGUF.parent),
            "name": GGUF.name}
    times = {}
    for label, (imp, body) in LOADERS.items():
        repeat = 1 if "gguf_file" in body else REPEAT  # transformers' route dequantizes for a minute: once
        times[label] = median([python_timing(LOAD.format(imp=imp, body=body.format(**args)))["s"]
                               for _ in range(repeat)])
    rows = [(k, f"{v:.2f} s") for k, v in times.items()]
    return rows, times


def bench_tokenizer() -> tuple[list, dict]:
    """The tokenizer files two ways, interleaved, in this process (modules imported first): transformers'
    route on a sample of the vocabulary spliced to the whole (what a bake does), and the route on the
    whole vocabulary. Their files are compared byte for byte."""
    import tempfile
    import time
    from pathlib import Path

    import transformers
    from prebake.convert import gguf_tokenizer
    from prebake.formats.gguf_file import open_gguf

    config = transformers.Qwen2Config()
    times: dict[str, list[float]] = {"sample": [], "whole": []}
    same = True
    for _ in range(REPEAT):
        with tempfile.TemporaryDirectory(dir=BENCH) as tmp:
            files = {}
            for kind in times:
                f, folder = open_gguf(GGUF), Path(tmp) / kind
                folder.mkdir()
                start = time.perf_counter()
                if kind == "sample":
                    paths = gguf_tokenizer.write_tokenizer(f, config, folder)
                else:
                    architecture, tokens, tokenizer_config = gguf_tokenizer.tokenizer_inputs(f)
                    paths = gguf_tokenizer._route(f, architecture, tokens, tokenizer_config,
                                                  gguf_tokenizer.tokenizer_class(config), folder / "whole")
                times[kind].append(time.perf_counter() - start)
                files[kind] = {p.name: p.read_bytes() for p in paths}
            same = same and files["sample"] == files["whole"]
    t = {k: median(v) for k, v in times.items()}
    rows = [("transformers' route on a sample, spliced to the whole (the bake's)", f"{t['sample']:.2f} s"),
            ("transformers' route on the whole vocabulary", f"{t['whole']:.2f} s"),
            ("the files of the two byte-equal", str(same))]
    return rows, {**t, "same": same}


def main() -> None:
    build()
    size = GGUF.stat().st_size / 2**20
    from prebake.formats.gguf_file import open_gguf

    vocab = open_gguf(GGUF).fields["tokenizer.ggml.tokens"].count
    rows, f = bench_bake()
    print(table(f"bake a {size:.0f} MiB Q8_0 GGUF, {vocab} tokens (median of {REPEAT}, whole process, data on disk)",
                rows, ("what", "time", "throughput", "peak RssAnon")))
    print(f"--keep-quant bake / copy throughput: {f['copy'] / f['keep']:.2f}x (target >= 0.9x; --names gguf "
          f"{f['copy'] / f['gguf']:.2f}x; the call with its modules imported {f['copy'] / f['inproc']:.2f}x, "
          f"names='gguf' {f['copy'] / f['inproc-gguf']:.2f}x); "
          f"planning (imports, parse, map, plan) {f['plan']:.2f} s")
    rows, k = bench_tokenizer()
    print(table(f"tokenizer files of the {vocab}-token vocabulary (median of {REPEAT}, in process)", rows,
                ("route", "time")))
    print(f"sample route vs whole route: {k['whole'] / k['sample']:.1f}x sooner; byte-equal: {k['same']}")
    rows, t = bench_load()
    print(table("load (fresh process each; the call alone, imports apart)", rows, ("loader", "time")))
    ours = t["prebake bake: from_pretrained(OUT)"]
    theirs = t["transformers from_pretrained(gguf_file=)"]
    print(f"from_pretrained(OUT) vs transformers' gguf_file route: {theirs / ours:.0f}x sooner (goal >= 50x); packed "
          f"{theirs / t['prebake --keep-quant bake, packed']:.0f}x; tokenizer "
          f"{t['transformers AutoTokenizer(gguf_file=)'] / t['prebake bake: AutoTokenizer(OUT)']:.0f}x")
    print(json.dumps({"bake": f, "tokenizer": k, "load": t}))


if __name__ == "__main__":
    main()
