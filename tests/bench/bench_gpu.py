"""Issue 16, GPU part: the ~1.8 GB bench bake onto a GPU, warm and cold, against its peers.

Each case in a fresh process, imports and CUDA start-up before the clock, the clock stopped
after ``torch.cuda.synchronize()``: prebake ``load_from_manifest(device="cuda")``, safetensors
``load_file(device="cuda")``, ``load_file`` + ``.to("cuda")``, fastsafetensors where it imports,
and the host-to-device bandwidth of a plain pinned ``copy_`` of the same size (the ceiling).
Prints GB/s and the fraction of that ceiling (goal: prebake >= 0.8x warm).
"""

from __future__ import annotations

from pathlib import Path

from tests.bench.common import (
    REPEAT,
    big_bake,
    drop_cache,
    median,
    python_timing,
    table,
)

PRELUDE = "import json, time, torch\ntorch.zeros(1, device='cuda'); torch.cuda.synchronize()\n{imp}\n"
CLOCK = "t = time.perf_counter()\n{body}\ntorch.cuda.synchronize()\nprint(json.dumps({{'s': time.perf_counter() - t}}))"
FASTSAFE = ("from fastsafetensors import fastsafe_open as f",
            "with f(filenames={s!r}, nogds=True, device='cuda:0') as fo:\n"
            "    sd = {{k: fo.get_tensor(k) for k in fo.get_keys()}}")


def main() -> None:
    out, m, shards = big_bake()
    size = sum(s.size for s in m.shards)
    cases = {
        "pinned copy_ (ceiling)": ("h = torch.empty({n}, dtype=torch.uint8, pin_memory=True)\n"
                                   "d = torch.empty({n}, dtype=torch.uint8, device='cuda')", "d.copy_(h, non_blocking=True)"),
        "prebake load_from_manifest(device='cuda')": ("from prebake.cache import load_from_manifest as f",
                                                      "sd = f({o!r}, device='cuda')"),
        "safetensors load_file(device='cuda')": ("from safetensors.torch import load_file as f",
                                                 "sd = {{k: v for p in {s!r} for k, v in f(p, device='cuda').items()}}"),
        "load_file + .to('cuda')": ("from safetensors.torch import load_file as f",
                                    "sd = {{k: v.to('cuda') for p in {s!r} for k, v in f(p).items()}}"),
        "fastsafetensors": FASTSAFE,
    }
    for state in ("warm", "cold"):
        times = {}
        for name, (imp, body) in cases.items():
            code = PRELUDE.format(imp=imp.format(n=size)) + CLOCK.format(body=body.format(s=shards, o=str(out)))
            samples = []
            for _ in range(REPEAT):
                if state == "cold":
                    drop_cache(out)
                else:
                    for p in shards:
                        Path(p).read_bytes()
                try:
                    samples.append(python_timing(code)["s"])
                except RuntimeError as e:  # fastsafetensors not installed, ...
                    samples = []
                    print(f"{name}: skipped ({str(e).strip().splitlines()[-1][:120]})")
                    break
            if samples:
                times[name] = median(samples)
        ceiling = size / times["pinned copy_ (ceiling)"] / 1e9
        rows = [(k, f"{v:.3f} s", f"{size / v / 1e9:.2f} GB/s", f"{size / v / 1e9 / ceiling:.2f}")
                for k, v in times.items()]
        print(table(f"{state} load of {size / 2**30:.2f} GiB onto the GPU (median of {REPEAT})", rows,
                    ("loader", "time", "GB/s", "of pinned copy_")))


if __name__ == "__main__":
    main()
