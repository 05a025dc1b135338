"""Issue 16: the staged reader against its peers, each in a fresh process, imports before the clock.

1. Many small tensors: a bake of a 10,240-tensor bf16 MoE-shaped checkpoint (40 layers x 64
   experts x 4 projections), warm: ``load_from_manifest`` against safetensors ``load_file`` on
   the source and on the bake's shard (goal >= 3x).
2. Cold eager load of the ~1.8 GB bench bake from a disk throttled to 400 MB/s (a blkio cgroup,
   needs root; tests/bench/throttle.py), pages dropped before each run: ``mode="eager"`` and with
   ``verify=True`` against a plain sequential read of the shards (goal >= 0.95x its throughput),
   ``load_file`` followed by a copy, and a mapped load that touches every page.
3. Where a GPU is present: cold and warm loads to the GPU against ``load_file(device="cuda")``,
   ``load_file`` + ``.to("cuda")`` and fastsafetensors if it imports, in GB/s and as a fraction
   of the host-to-device bandwidth of a plain pinned ``copy_`` (goal >= 0.8x warm).
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.bench.common import (
    REPEAT,
    WORK,
    big_bake,
    interleaved,
    median,
    python_timing,
    table,
)
from tests.bench.throttle import enter_code, make

BPS = 400 * 10**6
COLD_REPEAT = int(os.environ.get("PREBAKE_BENCH_COLD_REPEAT", "3"))
TIMER = "import json, time, torch\n{imp}\n{enter}t = time.perf_counter()\n{body}\nprint(json.dumps({{'s': time.perf_counter() - t}}))"


def small_tensors() -> tuple:
    """The MoE-shaped checkpoint (built once) and its bake."""
    src = WORK / "moe-small" / "model.safetensors"
    out = WORK / "moe-small-baked"
    if not src.exists():
        import torch
        from safetensors.torch import save_file

        g = torch.Generator().manual_seed(0)
        sd = {}
        for layer in range(40):
            for e in range(64):
                for p, shape in (("w1", (32, 64)), ("w2", (64, 32)), ("w3", (32, 64)), ("w4", (32, 64))):
                    sd[f"model.layers.{layer}.mlp.experts.{e}.{p}.weight"] = torch.randn(shape, generator=g).bfloat16()
        src.parent.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(src))
    if not (out / "manifest.json").exists():
        from prebake.convert.bake import convert

        convert(src, out, force=True)
    return src, out


def timed(cases: dict[str, tuple[str, str]], group=None, drop=None, repeat: int = REPEAT) -> dict[str, float]:
    """Median seconds of each case's body, each run in a fresh process; the cases interleaved
    (one run of each per round), pages of ``drop`` dropped before every run."""
    code = {k: TIMER.format(imp=imp, body=body, enter=enter_code(group)) for k, (imp, body) in cases.items()}
    samples = interleaved({k: (lambda c=c: python_timing(c, drop=drop)["s"]) for k, c in code.items()}, repeat)
    return {k: median(v) for k, v in samples.items()}


def bench_small() -> None:
    src, out = small_tensors()
    from prebake.formats.manifest import read_manifest

    m = read_manifest(out)
    shard = str(out / m.shards[0].file)
    for p in (src, shard):
        Path(p).read_bytes()
    cases = {"prebake load_from_manifest": ("from prebake.cache import load_from_manifest as f", f"sd = f({str(out)!r})"),
             "load_file (source)": ("from safetensors.torch import load_file as f", f"sd = f({str(src)!r})"),
             "load_file (bake's shard)": ("from safetensors.torch import load_file as f", f"sd = f({shard!r})")}
    times = timed(cases, repeat=max(REPEAT, 5))
    ours = times["prebake load_from_manifest"]
    rows = [(k, f"{v * 1e3:.1f} ms", f"{v / ours:.2f}x") for k, v in times.items()]
    print(table(f"warm load of {len(m.tensors)} small tensors ({sum(t.nbytes for t in m.tensors.values()) / 2**20:.0f}"
                f" MiB), fresh process, imports before the clock (median of {max(REPEAT, 5)})", rows,
                ("loader", "load call", "vs prebake")))
    print("goal: load_file / prebake >= 3x")


def bench_cold_eager() -> None:
    out, m, shards = big_bake()
    group = make(out, BPS)
    note = f"reads throttled to {BPS // 10**6} MB/s" if group else "NO throttle (needs root and cgroup v1 blkio)"
    touch = "for x in sd.values():\n    x.reshape(-1)[::4096 // x.element_size()].sum()"  # not t: the clock
    cases = {
        "sequential read (8 MiB blocks)": ("", "buf = bytearray(8 << 20)\nfor p in {s!r}:\n    with open(p, 'rb', "
                                               "buffering=0) as f:\n        while f.readinto(buf):\n            pass"),
        "prebake eager": ("from prebake.cache import load_from_manifest as f", "sd = f({o!r}, mode='eager')"),
        "prebake eager, verify=True": ("from prebake.cache import load_from_manifest as f",
                                       "sd = f({o!r}, mode='eager', verify=True)"),
        "load_file + copy": ("from safetensors.torch import load_file as f",
                             "sd = {{k: v.clone() for p in {s!r} for k, v in f(p).items()}}"),
        "mapped load + touch": ("from prebake.cache import load_from_manifest as f", "sd = f({o!r})\n" + touch),
    }
    times = timed({k: (imp, body.format(s=shards, o=str(out))) for k, (imp, body) in cases.items()}, group, out,
                  COLD_REPEAT)
    seq = times["sequential read (8 MiB blocks)"]
    size = sum(s.size for s in m.shards)
    rows = [(k, f"{v:.2f} s", f"{size / v / 1e6:.0f} MB/s", f"{seq / v:.2f}x") for k, v in times.items()]
    print(table(f"cold load of {size / 2**30:.2f} GiB, {note} (median of {COLD_REPEAT})", rows,
                ("loader", "time", "throughput", "of sequential read's throughput")))
    print("goals: eager >= 0.95x the sequential read; verify=True no slower than eager")


def main() -> None:
    bench_small()
    bench_cold_eager()
    try:
        import torch

        if torch.cuda.is_available():
            from tests.bench.bench_gpu import main as gpu

            gpu()
        else:
            print("\n(no GPU here: the GPU load figures come from tests/bench/bench_gpu.py on a machine with one)")
    except ImportError:
        pass


if __name__ == "__main__":
    main()
