"""The ``prebake`` command line: ``convert``, ``inspect``, ``verify``.

Every command takes ``--json`` for scripts. Errors are one line on stderr naming the file and
the problem, with a non-zero exit; only a bug shows a traceback.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

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
    q.add_argument("--quant", metavar="TYPE", choices=RECIPES,
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
                   help="GGUF input: keep its quantized blocks as they are instead of dequantizing")
    c.add_argument("--force", action="store_true", help="replace OUT even if it holds something else")
    c.add_argument("--dry-run", action="store_true", help="print the plan and write nothing")
    c.add_argument("--variant", action="append", default=[], metavar="NAME=SPEC",
                   help="add a layer/expert-pruned view (repeatable); SPEC like 'first=1', "
                   "'layers=0-3,22-23;head=no', 'experts=0,3', 'include=GLOB', 'exclude=GLOB'")
    _common(c)

    i = sub.add_parser("inspect", help="describe a bake", description="Summarise a bake: source, "
                       "shards, tensors, dtypes, aliases.")
    i.add_argument("out", help="bake folder or its manifest.json")
    i.add_argument("--tensors", action="store_true", help="list every tensor")
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
    pk.add_argument("--threads", type=int, help="compression threads (default: the usable cores)")
    pk.add_argument("--force", action="store_true", help="replace ARCHIVE even if it is not an archive")
    _common(pk)

    up = sub.add_parser("unpack", help="unpack an archive into a bake folder",
                        description="Decompress an archive (chunks in parallel, each checked against its "
                        "checksum) into OUT, byte-identical to the packed bake. A damaged chunk is named.")
    up.add_argument("archive", help="archive written by 'prebake pack'")
    up.add_argument("out", help="output folder")
    up.add_argument("--threads", type=int, help="decompression threads (default: the usable cores)")
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

    v = sub.add_parser("verify", help="re-check every checksum of a bake",
                       description="Recompute every tensor's and copied file's checksum; report the first "
                       "mismatch by name.")
    v.add_argument("out", help="bake folder or its manifest.json")
    _common(v)
    return p


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print a JSON result on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = COMMANDS[args.command](args)
    except PrebakeError as e:
        return _fail(args, str(e), e.exit_code)
    except ValueError as e:
        return _fail(args, str(e), 2)
    except KeyboardInterrupt:
        return _fail(args, "interrupted; nothing was written", 130)
    if args.json:
        print(json.dumps(result, indent=1))
    return 0


def _fail(args, message: str, code: int) -> int:
    print(f"prebake: error: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps({"error": message}))
    return code


def _progress(args, desc: str):
    def factory(total: int):
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                   disable=True if args.quiet or args.json else None, file=sys.stderr, leave=False)
        return bar.update
    return factory


def cmd_convert(args) -> dict:
    from prebake.convert.bake import convert
    from prebake.convert.plan import DTYPE_NAMES, Options

    options = Options(args.shard_size, args.align, DTYPE_NAMES[args.dtype] if args.dtype else None,
                      quant=args.quant, keep_float=args.keep_float, quant_embeddings=args.quant_embeddings,
                      quant_skip=tuple(args.quant_skip), quant_only=tuple(args.quant_only), quant_pure=args.quant_pure,
                      keep_quant=args.keep_quant)
    if args.dry_run:
        from prebake.convert.plan import plan_bake
        from prebake.convert.sources import open_source

        source = open_source(args.src)
        summary = plan_bake(source.tensors, options, source.skipped).summary()
        if not args.json:
            print(json.dumps(summary, indent=1))
        return summary
    m = convert(args.src, args.out, options, force=args.force, progress=_progress(args, "convert"),
                variants=args.variant)
    result = {"out": str(Path(args.out).resolve()), "tensors": len(m.tensors), "quantized": len(m.quantized),
              "aliases": len(m.aliases),
              "shards": len(m.shards), "bytes": m.total_bytes, "files": [f.path for f in m.files],
              "skipped": m.skipped}
    if m.components:
        result["components"] = m.components
        result["tensors"] = sum(c["tensors"] for c in m.components.values())
        result["bytes"] = sum(c["bytes"] for c in m.components.values())
        if not args.json:
            print(f"baked {len(m.components)} components ({', '.join(m.components)}): {result['tensors']} "
                  f"tensors ({_human(result['bytes'])}) at {args.out}")
    elif not args.json:
        print(f"baked {len(m.tensors)} tensors ({_human(m.total_bytes)}) into {len(m.shards)} shard(s) "
              f"at {args.out}" + (f"; {len(m.aliases)} aliases" if m.aliases else "")
              + (f"; {len(m.quantized)} quantized" if m.quantized else ""))
        for name, why in m.metadata.get("quant_kept", {}).items():
            print(f"  kept unquantized {name}: {why}")
        for s in m.skipped:
            print(f"  skipped non-tensor {s['name']} ({s['kind']})")
    return result


def cmd_inspect(args) -> dict:
    from prebake.cache.manifest import read_manifest

    m = read_manifest(args.out)
    dtypes: dict[str, int] = {}
    for t in m.tensors.values():
        dtypes[t.dtype] = dtypes.get(t.dtype, 0) + t.nbytes
    info = {"source": m.source["path"], "format": m.source["format"], "created": m.created,
            "tensors": len(m.tensors), "bytes": m.total_bytes, "dtypes": dtypes,
            "quantized": {q: sum(e.nbytes for e in m.quantized.values() if e.qtype == q)
                          for q in sorted({e.qtype for e in m.quantized.values()})},
            "shards": [{"file": s.file, "bytes": s.size} for s in m.shards],
            "aliases": {k: a.target for k, a in m.aliases.items()}, "padding_entries": len(m.padding),
            "files": [f.path for f in m.files], "skipped": m.skipped, "options": m.options,
            "variants": {k: {"spec": v["spec"], "tensors": len(v["tensors"]), "bytes": v["bytes"]}
                         for k, v in m.variants.items()},
            "components": {k: {"path": c["path"], "tensors": c["tensors"], "bytes": c["bytes"]}
                           for k, c in m.components.items()}}
    if args.tensors:
        info["tensor_list"] = {k: {"dtype": t.dtype, "shape": t.shape, "shard": t.shard, "offset": t.offset}
                               for k, t in m.tensors.items()}
    if not args.json:
        print(f"{args.out}: {info['tensors']} tensors, {_human(info['bytes'])} from {info['source']} "
              f"({info['format']}), made {info['created']}")
        print("  dtypes: " + ", ".join(f"{k} {_human(v)}" for k, v in dtypes.items()))
        if info["quantized"]:
            print("  quantized: " + ", ".join(f"{k} {_human(v)}" for k, v in info["quantized"].items()))
        for s in info["shards"]:
            print(f"  {s['file']}  {_human(s['bytes'])}")
        for k, v in info["aliases"].items():
            print(f"  alias {k} -> {v}")
        if info["files"]:
            print("  files: " + ", ".join(info["files"]))
        for k, c in info["components"].items():
            print(f"  component {k}: {c['tensors']} tensors, {_human(c['bytes'])} in {c['path']}/")
        for k, v in info["variants"].items():
            print(f"  variant {k} ({v['spec']}): {v['tensors']} tensors, {_human(v['bytes'])}")
        for k, t in info.get("tensor_list", {}).items():
            print(f"  {k}  {t['dtype']} {t['shape']}  shard {t['shard']} @ {t['offset']}")
    return info


def cmd_variant(args) -> dict:
    from prebake.convert.variants import add_variant_to_bake

    record = add_variant_to_bake(args.out, args.spec)
    name = args.spec.partition("=")[0]
    if not args.json:
        print(f"variant {name}: {len(record['tensors'])} tensors, {_human(record['bytes'])} "
              f"(layers {record['layers'] or 'none'}" + (f", experts {record['experts']}" if record["experts"] else "")
              + "); no tensor bytes copied")
    return {"variant": name, **{k: v for k, v in record.items() if k != "tensors"},
            "tensors": len(record["tensors"])}


def cmd_pack(args) -> dict:
    from prebake.convert.pack import pack

    r = pack(args.out, args.archive, level=args.level, threads=args.threads, force=args.force,
             progress=_progress(args, "pack"))
    if not args.json:
        print(f"packed {r.files} files ({_human(r.raw_bytes)}) into {args.archive}: {_human(r.archive_bytes)} "
              f"({r.archive_bytes / max(r.raw_bytes, 1):.3f} of raw), {r.chunks} chunks")
    return {"archive": str(r.archive), "files": r.files, "chunks": r.chunks, "raw_bytes": r.raw_bytes,
            "archive_bytes": r.archive_bytes}


def cmd_unpack(args) -> dict:
    from prebake.convert.pack import unpack

    out = unpack(args.archive, args.out, threads=args.threads, force=args.force, progress=_progress(args, "unpack"))
    if not args.json:
        print(f"unpacked {args.archive} into {out}")
    return {"out": str(Path(out).resolve())}


def cmd_warm(args) -> dict:
    import time

    from prebake.cache.manifest import read_manifest
    from prebake.cache.prefetch import Prefetcher, shard_ranges

    m = read_manifest(args.out)
    ranges = [r for c in m.components.values() for r in shard_ranges(read_manifest(m.root / c["path"]))]
    ranges += shard_ranges(m)
    start = time.perf_counter()
    p = Prefetcher(ranges)
    p.join()
    seconds = time.perf_counter() - start
    if not args.json:
        print(f"warmed {_human(p.done_bytes)} in {seconds:.2f} s ({p.done_bytes / max(seconds, 1e-9) / 1e9:.2f} GB/s)")
    return {"bytes": p.done_bytes, "seconds": seconds}


def cmd_cache(args) -> dict:
    from prebake.cache import store

    if args.action == "ls":
        rows = store.entries()
        if not args.json:
            print(f"{store.cache_root()}: {len(rows)} bakes, {_human(sum(e.bytes for e in rows))}")
            for e in rows:
                print(f"  {e.key}  {_human(e.bytes):>10}  {e.source}")
        return {"root": str(store.cache_root()), "entries": [
            {"key": e.key, "path": str(e.path), "source": e.source, "bytes": e.bytes, "last_used": e.last_used}
            for e in rows]}
    if args.action == "rm":
        keys = [e.key for e in store.entries()] if args.all else args.keys
        removed = [k for k in keys if store.remove(k)]
        missing = sorted(set(keys) - set(removed))
        if missing:
            raise ValueError(f"no cache entry {missing[0]!r} (see 'prebake cache ls')")
        if not args.json:
            print(f"removed {len(removed)} bake(s)")
        return {"removed": removed}
    removed = store.gc(args.max_size)
    if not args.json:
        print(f"removed {len(removed)} bake(s), {_human(sum(e.bytes for e in removed))}")
    return {"removed": [e.key for e in removed], "bytes": sum(e.bytes for e in removed)}


def cmd_verify(args) -> dict:
    from prebake.cache.integrity import verify
    from prebake.cache.manifest import read_manifest

    m = read_manifest(args.out)
    report = verify(m, _progress(args, "verify")(m.total_bytes))
    if not args.json:
        print(f"ok: {report.tensors} tensors ({_human(report.bytes)}) and {report.files} files match")
    return {"ok": True, "tensors": report.tensors, "files": report.files, "bytes": report.bytes}


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


COMMANDS = {"convert": cmd_convert, "inspect": cmd_inspect, "verify": cmd_verify, "variant": cmd_variant,
            "warm": cmd_warm, "cache": cmd_cache, "pack": cmd_pack, "unpack": cmd_unpack}

if __name__ == "__main__":
    sys.exit(main())
