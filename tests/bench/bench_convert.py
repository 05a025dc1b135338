"""Issue 2: conversion against a plain copy, its peak memory, and load time against the peers.

Prints medians of REPEAT runs (PREBAKE_BENCH_REPEAT, default 5) on a ~1.8 GB bf16 checkpoint:
- conversion throughput of the whole `prebake convert` process against `cp` of the same file,
  both ending with their data on disk (convert fsyncs; the copy is followed by `sync FILE`);
- conversion peak anonymous RSS (RssAnon, sampled every 5 ms) against the largest tensor;
- warm load time of load_from_manifest against safetensors load_file (on the baked shard),
  torch.load and torch.load(mmap=True) (on the source), each in a fresh process;
- time to the first tensor (mapped and read).
"""

from __future__ import annotations

import shutil
import sys

from tests.bench.common import (
    REPEAT,
    WORK,
    big_checkpoint,
    interleaved,
    median,
    python_timing,
    run_timed,
    table,
)

# (import, load) per loader: the import is timed apart, a one-time cost of the process
LOADERS = {
    "prebake load_from_manifest": ("from prebake.cache import load_from_manifest as f", "sd = f({out!r})"),
    "safetensors load_file": ("from safetensors.torch import load_file as f", "sd = f({shard!r})"),
    "torch.load": ("", "sd = torch.load({src!r}, weights_only=True)"),
    "torch.load(mmap=True)": ("", "sd = torch.load({src!r}, weights_only=True, mmap=True)"),
}
FIRST = {
    "prebake load_from_manifest": ("from prebake.cache import load_from_manifest as f",
                                   "x = f({out!r}, names=[{first!r}])[{first!r}]"),
    "safetensors safe_open": ("from safetensors import safe_open",
                              "with safe_open({shard!r}, 'pt') as f: x = f.get_tensor({first!r})"),
    "torch.load": ("", "x = torch.load({src!r}, weights_only=True)[{first!r}]"),
    "torch.load(mmap=True)": ("", "x = torch.load({src!r}, weights_only=True, mmap=True)[{first!r}]"),
}
TIMER = ("import json, time, torch\nt0 = time.perf_counter()\n{imp}\nt = time.perf_counter()\n{body}\n{after}\n"
         "print(json.dumps({{'import': t - t0, 's': time.perf_counter() - t}}))")


PAIRS = max(8, REPEAT)  # interleaved (convert, copy) pairs; which goes first alternates


def bench_convert(src, out, copy) -> tuple[list, dict]:
    prebake = str(shutil.which("prebake", path=str(sys.executable.rsplit("/", 1)[0])))
    conv, copies, peaks = [], [], []
    src.read_bytes()  # warm the page cache for both sides

    def one_convert():
        shutil.rmtree(out, ignore_errors=True)
        wall, peak = run_timed([prebake, "convert", str(src), str(out), "-q"])
        conv.append(wall)
        peaks.append(peak)

    def one_copy():
        copy.unlink(missing_ok=True)
        copies.append(run_timed(["sh", "-c", f'cp --reflink=never "{src}" "{copy}" && sync "{copy}"'])[0])

    for i in range(PAIRS):
        for step in ((one_convert, one_copy) if i % 2 == 0 else (one_copy, one_convert)):
            step()
    copy.unlink(missing_ok=True)
    from prebake.formats.manifest import read_manifest

    m = read_manifest(out)
    size = src.stat().st_size
    largest = max(t.nbytes for t in m.tensors.values()) / 2**20
    gbs = size / 1e9
    rows = [("prebake convert", f"{gbs / median(conv):.2f} GB/s", f"{median(conv):.2f} s", f"{median(peaks):.0f} MiB"),
            ("cp + sync", f"{gbs / median(copies):.2f} GB/s", f"{median(copies):.2f} s", "-")]
    facts = {"ratio": median(copies) / median(conv), "peak": median(peaks), "largest": largest,
             "size": size / 2**20}
    return rows, facts


def bench_load(src, out) -> tuple[list, list]:
    from prebake.formats.manifest import read_manifest

    m = read_manifest(out)
    shard, first = str(out / m.shards[0].file), next(iter(m.tensors))
    args = {"out": str(out), "shard": shard, "src": str(src), "first": first}
    for p in (src, out / m.shards[0].file):
        p.read_bytes()  # warm

    def timings(table_, after):
        code = {k: TIMER.format(imp=imp, body=body.format(**args), after=after) for k, (imp, body) in table_.items()}
        runs = interleaved({k: (lambda c=c: python_timing(c)) for k, c in code.items()})
        return {k: (median([r["s"] for r in v]), median([r["import"] for r in v])) for k, v in runs.items()}

    full = timings(LOADERS, "")
    ttft = timings(FIRST, "float(x.float().sum())")
    ours, ours_first = full["prebake load_from_manifest"][0], ttft["prebake load_from_manifest"][0]
    rows = [(k, f"{v * 1e3:.1f} ms", f"{v / ours:.1f}x", f"{imp * 1e3:.1f} ms") for k, (v, imp) in full.items()]
    first_rows = [(k, f"{v * 1e3:.1f} ms", f"{v / ours_first:.1f}x") for k, (v, _) in ttft.items()]
    return rows, first_rows


def main() -> None:
    src = big_checkpoint()
    out, copy = WORK / "llama-1.8g-baked", WORK / "copy.bin"
    rows, f = bench_convert(src, out, copy)
    print(table(f"convert {f['size']:.0f} MiB torch .bin (median of {PAIRS} interleaved pairs, whole process, "
                "data on disk)",
                rows, ("what", "throughput", "time", "peak RssAnon")))
    print(f"convert / copy throughput: {f['ratio']:.2f}x (target >= 0.9x)")
    print(f"peak RssAnon {f['peak']:.0f} MiB vs largest tensor {f['largest']:.0f} MiB + 256 MiB "
          f"(target: peak <= {f['largest'] + 256:.0f} MiB; model {f['size']:.0f} MiB)")
    rows, first_rows = bench_load(src, out)
    print(table(f"warm load, whole model (median of {REPEAT}, fresh process each; import timed apart)", rows,
                ("loader", "load call", "vs prebake", "its import")))
    print(table("time to first tensor (load + read it)", first_rows, ("loader", "time", "vs prebake")))


if __name__ == "__main__":
    main()
