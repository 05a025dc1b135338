"""The ``prebake`` command line: the parser and ``main``; each command is in :mod:`prebake.convert.commands`.

Every command takes ``--json`` for scripts. Errors are one line on stderr naming the file and
the problem, with a non-zero exit; only a bug shows a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import warnings
from contextlib import contextmanager

from prebake.convert.quant_policy import RECIPES
from prebake.formats.errors import PrebakeError

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1 << 10, "m": 1e6, "mb": 1e6, "mib": 1 << 20,
          "g": 1e9, "gb": 1e9, "gib": 1 << 30, "t": 1e12, "tb": 1e12, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """``"2GiB"`` -> 2147483648; ``"500MB"`` -> 500000000; plain numbers are bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 2GiB, 500MB or a byte count)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prebake", description=(
        "Bake model checkpoints once into aligned, mmap-friendly safetensors shards plus a "
        "manifest, so every later load is a zero-copy memory map."))
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("convert", help="bake a checkpoint (file or model folder) into OUT",
                       description="Convert a PyTorch .bin/.pth/.pt (zip or legacy), safetensors or GGUF "
                       "checkpoint, or a Hugging Face model folder, into aligned safetensors shards and "
                       "a manifest. No code from the checkpoint is ever run.")
    c.add_argument("src", help="checkpoint file or model folder")
    c.add_argument("out", help="output folder (created; replaced only if it holds a bake, or with --force)")
    c.add_argument("--shard-size", type=parse_size, default="2GiB", help="largest shard (default 2GiB)")
    c.add_argument("--align", type=int, default=4096,
                   help="byte alignment of tensors of 1 MiB or more (default 4096)")
    c.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="cast floating tensors (and dequantized GGUF tensors; default float16 for those)")
    q = c.add_argument_group("quantization (GGML block layouts, bit-identical to gguf-py / llama.cpp)")
    q.add_argument("--quant", metavar="TYPE", choices=RECIPES, type=str.lower,
                   help=f"bake quantized blocks of the linear layers' weights: {', '.join(RECIPES)} "
                   "(q4_k_m: llama.cpp's mix of Q4_K and Q6_K)")
    q.add_argument("--keep-float", action="store_true", help="with --quant: keep the float tensors too")
    q.add_argument("--quant-embeddings", action="store_true", help="with --quant: quantize embeddings too")
    q.add_argument("--quant-skip", action="append", default=[], metavar="GLOB",
                   help="with --quant: never quantize tensors matching GLOB (repeatable)")
    q.add_argument("--quant-only", action="append", default=[], metavar="GLOB",
                   help="with --quant: quantize only tensors matching GLOB (repeatable)")
    q.add_argument("--quant-pure", action="store_true",
                   help="with --quant TYPE: TYPE for every tensor (default, as llama-quantize: the output "
                        "head at Q6_K unless TYPE is q8_0)")
    q.add_argument("--keep-quant", action="store_true",
                   help="GGUF input: keep its quantized blocks as they are instead of dequantizing (to --dtype; "
                   "default float32 for a Hugging Face folder, as transformers' GGUF loader, float16 with "
                   "--names gguf)")
    g = c.add_argument_group("GGUF input")
    g.add_argument("--names", choices=["hf", "gguf"], default="hf",
                   help="hf (default): a Hugging Face model folder under transformers' tensor names, with "
                   "config.json, generation_config.json and tokenizer files rebuilt from the metadata, as "
                   "transformers' own GGUF loader reads it; gguf: the file's own tensor names")
    g.add_argument("--gguf-metadata", action="store_true",
                   help="also write every metadata key as gguf_metadata.json (they are always kept, byte for "
                   "byte, in gguf_metadata.gguf: see 'prebake inspect --gguf')")
    c.add_argument("--force", action="store_true", help="replace OUT even if it holds something else")
    c.add_argument("--dry-run", action="store_true", help="print the plan and write nothing")
    c.add_argument("--tp-layout", type=int, metavar="N",
                   help="store row-parallel weights (o_proj, down_proj, ...) as N column blocks, so that each "
                   "tensor-parallel rank of any degree dividing N reads only its own bytes "
                   "(load_from_manifest(OUT, tp_rank=r, tp_size=k)); N a power of two, e.g. 8")
    c.add_argument("--workers", type=int, metavar="N",
                   help="threads doing the work (default: the cores this process may use); the bake's bytes do "
                   "not depend on N")
    c.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS",
                   help="do the work as tasks on a Ray cluster (ADDRESS, or a local one when no cluster runs); "
                   "SRC and OUT must be on storage every node sees (needs prebake[ray])")
    c.add_argument("--variant", action="append", default=[], metavar="NAME=SPEC",
                   help="add a layer/expert-pruned view (repeatable); SPEC like 'first=1', "
                   "'layers=0-3,22-23;head=no', 'experts=0,3', 'include=GLOB', 'exclude=GLOB'")
    _common(c)

    _export_parser(sub)

    i = sub.add_parser("inspect", help="describe a bake", description="Summarise a bake: source, "
                       "shards, tensors, dtypes, aliases.")
    i.add_argument("out", help="bake folder or its manifest.json")
    i.add_argument("--tensors", action="store_true", help="list every tensor")
    i.add_argument("--gguf", action="store_true", help="print every key-value pair of the GGUF it was baked from")
    _common(i)

    va = sub.add_parser("variant", help="add a layer/expert-pruned view to an existing bake",
                        description="Variants are named views over a bake's shards: no tensor bytes are "
                        "copied. SPEC items, joined by ';': first=N, layers=0-3,22-23, experts=0,3, "
                        "head=no, include=GLOB,..., exclude=GLOB,...")
    va_sub = va.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = va_sub.add_parser("add", help="add NAME=SPEC to the bake OUT")
    add.add_argument("out", help="bake folder")
    add.add_argument("spec", metavar="NAME=SPEC")
    _common(add)

    pk = sub.add_parser("pack", help="write a compressed archive of a bake",
                        description="Compress a bake for transfer or slow disks: floating-point tensors are split "
                        "into byte planes (exponents apart from mantissas) and each compressed with zstandard, "
                        "in independent checksummed chunks of a few MiB. Lossless.")
    pk.add_argument("out", help="bake folder")
    pk.add_argument("archive", help="archive file to write")
    pk.add_argument("--level", type=int, default=3,
                    help="zstd level of plain bytes (headers, integers, files); float planes use "
                    "entropy-coding settings of their own (default 3)")
    pk.add_argument("--workers", "--threads", dest="threads", type=int, metavar="N",
                    help="compression threads (default: the cores this process may use)")
    pk.add_argument("--force", action="store_true", help="replace ARCHIVE even if it is not an archive")
    _common(pk)

    up = sub.add_parser("unpack", help="unpack an archive into a bake folder",
                        description="Decompress an archive (chunks in parallel, each checked against its "
                        "checksum) into OUT, byte-identical to the packed bake. A damaged chunk is named.")
    up.add_argument("archive", help="archive written by 'prebake pack'")
    up.add_argument("out", help="output folder")
    up.add_argument("--workers", "--threads", dest="threads", type=int, metavar="N",
                    help="decompression threads (default: the cores this process may use)")
    up.add_argument("--force", action="store_true", help="replace OUT even if it holds something else")
    _common(up)

    w = sub.add_parser("warm", help="read a bake into the page cache, in layout order",
                       description="Read every shard of a bake front to back in large blocks (the vmtouch-style "
                       "warm-up), so the next start maps pages that are already in memory.")
    w.add_argument("out", help="bake folder or its manifest.json")
    _common(w)

    ca = sub.add_parser("cache", help="the local cache of bakes (prebake.cache.ensure)",
                        description="Bakes made by prebake.cache.ensure() live in $PREBAKE_CACHE "
                        "(default ~/.cache/prebake), one folder per source and options.")
    ca_sub = ca.add_subparsers(dest="action", required=True, metavar="ACTION")
    _common(ca_sub.add_parser("ls", help="list cached bakes, most recently used first"))
    rm = ca_sub.add_parser("rm", help="remove cached bakes")
    rm.add_argument("keys", nargs="*", metavar="KEY", help="entries to remove (see 'cache ls')")
    rm.add_argument("--all", action="store_true", help="remove every entry")
    _common(rm)
    gc = ca_sub.add_parser("gc", help="remove least recently used bakes down to a size")
    gc.add_argument("--max-size", type=parse_size, required=True, help="keep at most this much, e.g. 50GiB")
    _common(gc)

    ck = sub.add_parser("check", help="run the bake and its source on one input and compare their outputs",
                        description="Load the source and the bake as transformers models (the bake as a user "
                        "would: from_pretrained, packed where quantized), run both on one fixed input, and "
                        "compare the outputs: largest absolute difference, cosine, top-1 agreement. Passes when "
                        "a lossless bake's outputs are equal bit for bit, a quantized or cast bake's within its "
                        "recipe's tolerance (q8_0 and casts: cosine >= 0.999; q6_k 0.998; q5_*: 0.99; "
                        "4-bit: 0.98). Where transformers cannot build the model, compares the tensors one by "
                        "one instead. Exit status 1 when it fails.")
    ck.add_argument("out", help="bake folder")
    ck.add_argument("--source", help="the checkpoint the bake was made from (default: the path the manifest names)")
    ck.add_argument("--tensors", action="store_true", help="compare tensors one by one, not model outputs")
    _common(ck)

    v = sub.add_parser("verify", help="re-check every checksum of a bake",
                       description="Recompute every tensor's and copied file's checksum; report the first "
                       "mismatch by name.")
    v.add_argument("out", help="bake folder or its manifest.json")
    _common(v)
    return p


def _export_parser(sub) -> None:
    e = sub.add_parser(
        "export", help="write a bake as one GGUF file for llama.cpp (and Ollama, LM Studio, ...)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write the bake OUT as the GGUF file FILE, laid out as llama.cpp's convert_hf_to_gguf.py "
        "lays it out: GGUF tensor names, the llama family's Q/K rows permuted for GGML's rope, MoE experts "
        "stacked, Gemma's norms +1, a tied head left to token_embd, the hyperparameters and the tokenizer.\n\n"
        "Quantized blocks in the bake go in as they are (no second rounding); float matrices go in as stored "
        "(--outtype casts them; norms, biases and 1-D tensors are F32, as llama.cpp writes them). A bake "
        "without blocks can be quantized on the way with --quant, by the same codecs and policy as "
        "'prebake convert --quant'. A bake of a GGUF made with --keep-quant gives back its tensors, names and "
        "metadata as they were.\n\n"
        "Architectures: Llama, Mistral, Mixtral, Qwen2, Qwen2-MoE, Qwen3, Qwen3-MoE, Gemma, Gemma 2, "
        "Gemma 3, Phi-3. Tensor data streams from the bake's memory maps, 16 MiB windows at a time: "
        "memory stays flat whatever the model's size (34 MiB peak for a 1.8 GB Llama's Q4_K_M bake).",
        epilog="examples:\n"
        "  prebake convert ./Llama-3.2-1B baked --quant q4_k_m && prebake export baked llama-q4_k_m.gguf\n"
        "  prebake export baked llama-f16.gguf --outtype f16\n"
        "  prebake export baked llama-q8_0.gguf --quant q8_0      # a float bake, quantized on the way\n"
        "  prebake export baked llama.gguf --dry-run --json       # the tensors and types, nothing written")
    e.add_argument("out", help="bake folder (or its manifest.json)")
    e.add_argument("file", metavar="FILE.gguf", help="GGUF file to write (replaced only if it is a GGUF file)")
    e.add_argument("--outtype", choices=["f32", "f16", "bf16"], type=str.lower,
                   help="cast float matrices to this type (default: as stored in the bake)")
    q = e.add_argument_group("quantization of a float bake (as 'prebake convert --quant')")
    q.add_argument("--quant", metavar="TYPE", choices=RECIPES, type=str.lower,
                   help=f"quantize the linear layers' weights: {', '.join(RECIPES)}")
    q.add_argument("--quant-embeddings", action="store_true", help="with --quant: quantize token_embd too")
    q.add_argument("--quant-skip", action="append", default=[], metavar="GLOB",
                   help="with --quant: never quantize tensors matching GLOB (the bake's names; repeatable)")
    q.add_argument("--quant-pure", action="store_true",
                   help="with --quant TYPE: TYPE for every tensor (default: the output head at Q6_K)")
    e.add_argument("--tokenizer-pre", metavar="NAME",
                   help="llama.cpp's name of a BPE pre-tokenizer prebake does not recognize (llama-bpe, qwen2, "
                   "gpt-2, ...)")
    e.add_argument("--force", action="store_true", help="replace FILE even if it is not a GGUF file")
    e.add_argument("--dry-run", action="store_true", help="print the tensors, their types and notes; write nothing")
    _common(e)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print a JSON result on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def main(argv: list[str] | None = None) -> int:
    """Runs one command; returns the exit status (0, 1 for bad input or output, 2 for bad
    arguments, 128 + the signal's number when interrupted)."""
    args = build_parser().parse_args(argv)
    from prebake.convert.commands import COMMANDS

    _warnings_as_lines()
    try:
        with _signals_interrupt():
            result = COMMANDS[args.command](args)
            if args.json:
                print(json.dumps(result, indent=1))
            sys.stdout.flush()
    except PrebakeError as e:
        return _fail(args, str(e), e.exit_code)
    except Interrupted as e:
        return _fail(args, f"interrupted ({e.name}); no output was left behind", 128 + e.signum)
    except KeyboardInterrupt:
        return _fail(args, "interrupted; no output was left behind", 130)
    except BrokenPipeError:  # `prebake inspect OUT | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


def _warnings_as_lines() -> None:
    """Each PrebakeWarning is one ``prebake: warning:`` line on stderr, every time."""
    from prebake.formats.errors import PrebakeWarning

    show = warnings.showwarning

    def one_line(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, PrebakeWarning):
            print(f"prebake: warning: {message}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    warnings.showwarning = one_line
    warnings.simplefilter("always", PrebakeWarning)


class Interrupted(BaseException):
    """SIGTERM or SIGHUP arrived: unwinds like Ctrl-C, so temporary files are removed."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum, self.name = signum, signal.Signals(signum).name


@contextmanager
def _signals_interrupt():
    """While a command runs, SIGTERM and SIGHUP (what ``kill``, ``timeout`` and job schedulers
    send, and a closed terminal) interrupt it the way Ctrl-C does."""
    def interrupt(signum, _frame):
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _fail(args, message: str, code: int) -> int:
    print(f"prebake: error: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps({"error": message}))
    return code



if __name__ == "__main__":
    sys.exit(main())
