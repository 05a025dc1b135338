"""What each ``prebake`` command does: ``cmd_NAME(args) -> dict``, the dict being the ``--json`` result.

The parser and the error handling are in :mod:`prebake.convert.cli`.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

from prebake.formats.errors import UsageError


def _progress(args, desc: str, first: str | None = None):
    """A progress factory: called with the total bytes, it returns the bar's ``update``.

    With ``first``, the bar shows at once under that description (reading and planning a
    source, before the total is known: seconds, for a GGUF mapped through transformers), its
    clock ticking, and counts bytes under ``desc`` once it is. ``factory.stop()`` stops the
    ticking should the total never come (an error).
    """
    from tqdm import tqdm

    def bar(total, what):
        return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=what,
                    disable=True if args.quiet or args.json else None, file=sys.stderr, leave=False)

    early = bar(None, first) if first else None
    known = threading.Event()
    if early is not None and not early.disable:
        threading.Thread(target=_tick, args=(early, known), daemon=True).start()

    def factory(total: int):
        known.set()
        if early is None:
            return bar(total, desc).update
        early.set_description(desc, refresh=False)
        early.reset(total=total)
        return early.update
    factory.stop = known.set
    return factory


def _tick(early, known: threading.Event) -> None:
    """Redraws the bar (its elapsed time) twice a second until the total is known: tqdm redraws
    only when it is updated, and planning updates nothing."""
    while not known.wait(0.5):
        early.refresh()


def cmd_convert(args) -> dict:
    from prebake.convert.bake import convert
    from prebake.convert.plan import DTYPE_NAMES, Options

    options = Options(args.shard_size, args.align, DTYPE_NAMES[args.dtype] if args.dtype else None,
                      quant=args.quant, keep_float=args.keep_float, quant_embeddings=args.quant_embeddings,
                      quant_skip=tuple(args.quant_skip), quant_only=tuple(args.quant_only), quant_pure=args.quant_pure,
                      keep_quant=args.keep_quant, tp_layout=args.tp_layout, names=args.names,
                      gguf_metadata=args.gguf_metadata)
    if args.dry_run:
        from prebake.convert.prepare import prepare

        summary = prepare(args.src, options, args.variant).summary()
        if not args.json:
            print(json.dumps(summary, indent=1))
        return summary
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be at least 1, not {args.workers}")
    progress = _progress(args, "convert", "reading")
    try:
        m = convert(args.src, args.out, options, force=args.force, progress=progress, variants=args.variant,
                    workers=args.workers, ray=args.ray)
    finally:
        progress.stop()
    quantized = sum(1 for t in m.tensors.values() if t.qtype or t.packed)
    result = {"out": str(Path(args.out).resolve()), "tensors": len(m.tensors), "quantized": quantized,
              "aliases": len(m.aliases),
              "shards": len(m.shards), "bytes": m.total_bytes, "files": [f.path for f in m.files],
              "skipped": m.skipped, "quant_notes": m.metadata.get("quant_notes", {})}
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
              + (f"; {quantized} quantized" if quantized else ""))
        for name, what in m.metadata.get("quant_notes", {}).items():
            print(f"  {name}: {what}")
        for s in m.skipped:
            print(f"  skipped non-tensor {s['name']} ({s['kind']})")
        if m.metadata.get("gguf_unused"):
            print(f"  left out, as transformers' GGUF loader does: {', '.join(m.metadata['gguf_unused'])}")
    return result


def cmd_export(args) -> dict:
    from prebake.convert.export import export_gguf, plan_export
    from prebake.convert.quant_policy import SINGLE, QuantPolicy

    if args.quant_pure and args.quant not in SINGLE:
        raise UsageError(f"--quant-pure needs --quant with a single type, not {args.quant or 'none'}")
    policy = args.quant and QuantPolicy(args.quant, args.quant_embeddings, tuple(args.quant_skip), (), args.quant_pure)
    if args.dry_run:
        plan = plan_export(args.out, args.outtype, policy or None, args.tokenizer_pre)
        summary = {**plan.summary(), "tensor_list": {t.name: {"type": t.qtype, "shape": list(t.shape),
                                                              "from": t.sources} for t in plan.tensors}}
        if not args.json:
            print(json.dumps(summary, indent=1))
        return summary
    r = export_gguf(args.out, args.file, args.outtype, policy or None, _progress(args, "export"),
                    tokenizer_pre=args.tokenizer_pre, force=args.force)
    if not args.json:
        types = ", ".join(f"{k} {v}" for k, v in sorted(r["types"].items()))
        print(f"exported {r['tensors']} tensors ({_human(r['bytes'])}; {types}) as {r['arch']} to {args.file}")
        for name, what in r["quant_notes"].items():
            print(f"  {name}: {what}")
    return r


def cmd_inspect(args) -> dict:
    from prebake.formats.manifest import read_manifest

    m = read_manifest(args.out)
    dtypes: dict[str, int] = {}
    quantized: dict[str, int] = {}
    for _, b in m.blobs():
        if b.qtype:
            quantized[b.qtype] = quantized.get(b.qtype, 0) + b.nbytes
        else:
            dtypes[b.dtype] = dtypes.get(b.dtype, 0) + b.nbytes
    info = {"source": m.source["path"], "format": m.source["format"], "created": m.created,
            "tensors": len(m.tensors), "bytes": m.total_bytes, "dtypes": dtypes,
            "quantized": dict(sorted(quantized.items())),
            "shards": [{"file": s.file, "bytes": s.size} for s in m.shards],
            "aliases": {k: a.target for k, a in m.aliases.items()}, "padding_entries": len(m.padding),
            "files": [f.path for f in m.files], "skipped": m.skipped, "options": m.options,
            "variants": {k: {"spec": v["spec"], "tensors": len(v["tensors"]), "bytes": v["bytes"]}
                         for k, v in m.variants.items()},
            "components": {k: {"path": c["path"], "tensors": c["tensors"], "bytes": c["bytes"]}
                           for k, c in m.components.items()}}
    if args.tensors:
        info["tensor_list"] = {k: _tensor_record(t) for k, t in m.tensors.items()}
    if args.gguf:
        return _inspect_gguf(m, args)
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
            form = f"{t['qtype']} blocks of {t['dtype']}" if t.get("qtype") else t["dtype"]
            also = f" (+ {t['packed']['qtype']} blocks in shard {t['packed']['shard']})" if t.get("packed") else ""
            was = f"  (was {t['source_name']})" if t.get("source_name") else ""
            print(f"  {k}  {form} {t['shape']}  shard {t['shard']} @ {t['offset']}{also}{was}")
    return info


def _inspect_gguf(m, args) -> dict:
    """Every key-value pair of the GGUF a bake was made from (kept in its gguf_metadata.gguf)."""
    from prebake.convert.gguf_source import METADATA_GGUF
    from prebake.formats.errors import NotInBakeError
    from prebake.formats.gguf_file import SHORT_ARRAY, open_gguf

    path = m.root / METADATA_GGUF
    if not any(f.path == METADATA_GGUF for f in m.files) or not path.is_file():
        raise NotInBakeError("the bake keeps no GGUF metadata file (not baked from a GGUF, or by an older prebake: "
                             "see its gguf_metadata.json or the manifest's metadata)", m.root)
    f = open_gguf(path)
    if not args.json:
        for key, field in f.fields.items():
            if field.item_type is None or field.count <= SHORT_ARRAY:
                print(f"{key} = {field.value()!r}")
                continue
            head = field.value()[:3] if field.item_type in ("STRING", "ARRAY") else field.array()[:3].tolist()
            print(f"{key} = [{field.count} x {field.item_type}] {', '.join(map(repr, head))}, ...")
    return {"gguf": f.metadata(max_list=None)}


def _tensor_record(t) -> dict:
    d = {"dtype": t.dtype, "shape": t.shape, "shard": t.shard, "offset": t.offset, "nbytes": t.nbytes}
    if t.qtype:
        d["qtype"] = t.qtype
    if t.packed:
        d["packed"] = {"qtype": t.packed.qtype, "shard": t.packed.shard, "offset": t.packed.offset}
    if t.source_name:
        d["source_name"] = t.source_name
    return d


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

    from prebake.cache.prefetch import Prefetcher, bake_ranges
    from prebake.formats.manifest import read_component, read_manifest

    m = read_manifest(args.out)
    ranges = [r for c in m.components for r in bake_ranges(read_component(m, c))]
    ranges += bake_ranges(m)
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
                print(f"  {e.key}  {_human(e.bytes):>10}  {e.source}  {_options_text(e.options)}")
        return {"root": str(store.cache_root()), "entries": [
            {"key": e.key, "path": str(e.path), "source": e.source, "options": e.options, "bytes": e.bytes,
             "last_used": e.last_used} for e in rows]}
    if args.action == "rm":
        keys = [e.key for e in store.entries()] if args.all else args.keys
        removed = [k for k in keys if store.remove(k)]
        missing = sorted(set(keys) - set(removed))
        if missing:
            raise UsageError(f"no cache entry {missing[0]!r} (see 'prebake cache ls')")
        if not args.json:
            print(f"removed {len(removed)} bake(s)")
        return {"removed": removed}
    removed = store.gc(args.max_size)
    if not args.json:
        print(f"removed {len(removed)} bake(s), {_human(sum(e.bytes for e in removed))}")
    return {"removed": [e.key for e in removed], "bytes": sum(e.bytes for e in removed)}


def cmd_check(args) -> dict:
    from prebake.cache import check
    from prebake.formats.errors import CheckError
    from prebake.formats.manifest import read_manifest

    m = read_manifest(args.out)
    source = args.source or m.source.get("path")
    if not source or not Path(source).exists():
        raise UsageError(f"the bake's source {source!r} is not here; name it with --source", args.out)
    if not args.tensors and check.can_build(source) and check.can_build(m.root):
        report = check.check_models(m.root, source)
    else:
        report = check.check_tensors(m, _source_tensors(source))
        report.notes.append("transformers cannot build this model (or --tensors): tensors compared one by one")
    result = {"out": str(m.root), "source": str(source), **report.as_dict()}
    line = _check_line(report)
    if not report.ok:
        raise CheckError(f"check failed: {line}", m.root)
    if not args.json:
        print(f"ok: {line}" + "".join(f"\n  {n}" for n in report.notes))
    return result


def _check_line(r) -> str:
    what = f"{r.tensors} tensors, " if r.mode == "tensors" else "outputs "
    if r.max_abs_diff == 0:
        text = f"{what}equal bit for bit"
    else:
        text = f"{what}cosine {r.cosine:.6f}, max abs diff {r.max_abs_diff:.4g}"
        if r.top1 is not None:
            text += f", top-1 agreement {100 * r.top1:.1f}%"
        if r.worst:
            text += f" (furthest: {r.worst})"
    need = "equality" if r.tolerance.get("exact") else f"cosine >= {r.tolerance['cosine']}"
    return f"{text}; {r.tolerance['why']} bakes need {need}"


def _source_tensors(source) -> dict:
    """The source checkpoint's tensors as torch tensors (GGML blocks unpacked), by name."""
    import numpy as np
    import torch
    from prebake.cache.load import TORCH_DTYPES
    from prebake.convert.sources import open_source
    from prebake.formats.quants import dequantize

    out = {}
    for t in open_source(source).tensors:
        if t.qtype:
            out[t.name] = torch.from_numpy(dequantize(t.read(), t.qtype).reshape(t.shape))
        else:  # a copy: the source's map is read-only, and torch wants memory it may write
            raw = np.array(t.read()).view(np.uint8).reshape(-1)
            out[t.name] = torch.from_numpy(raw).view(TORCH_DTYPES[t.dtype]).reshape(t.shape)
    return out


def _options_text(options: dict) -> str:
    """The options that differ from the defaults, as the command line would spell them."""
    defaults = {"shard_size": 2 << 30, "align": 4096}
    parts = [f"--{k.replace('_', '-')} {v}" if v is not True else f"--{k.replace('_', '-')}"
             for k, v in options.items() if v not in (None, False, [], ()) and defaults.get(k) != v]
    return " ".join(parts) or "(defaults)"


def cmd_verify(args) -> dict:
    from prebake.formats.integrity import verify
    from prebake.formats.manifest import read_manifest

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


COMMANDS = {"check": cmd_check, "convert": cmd_convert, "inspect": cmd_inspect, "verify": cmd_verify,
            "variant": cmd_variant, "warm": cmd_warm, "cache": cmd_cache, "pack": cmd_pack, "unpack": cmd_unpack,
            "export": cmd_export}
