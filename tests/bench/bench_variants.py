"""Issue 4: a layer-pruned variant against the full model; three components in parallel.

On the 24-layer ~1.8 GB bf16 checkpoint (tests/bench/common.big_checkpoint):
- time and resident memory (the bake's resident pages + RssAnon growth, fresh process each) of loading and
  touching the `first=1;head=no` variant (embeddings, layer 0, final norm) against the full model,
  touching as a forward pass does: 128 embedding rows, every page of every other tensor. The
  bake is dropped from the page cache and read back whole first, so every run starts from the
  same state: read back that way, the kernel (6.18 here) caches the file in large folios and a
  fault maps the whole folio, so each touched embedding row brings up to MiBs around it (0.096
  of the full model; 0.045 when the page cache still holds the pages the converter wrote);
- three components (the model's layers split in three, baked as one multi-component output):
  wall time of loading (prefetch=True) and touching them in parallel threads against one after
  another, from a cold page cache (pages dropped with posix_fadvise(DONTNEED)).
"""

from __future__ import annotations

import shutil

import torch

from tests.bench.common import (
    REPEAT,
    WORK,
    big_checkpoint,
    drop_cache,
    interleaved,
    median,
    python_timing,
    table,
)

TOUCH = """
def touch(sd):
    for name, t in sd.items():
        if "embed" in name:
            t.index_select(0, torch.arange(0, t.shape[0], t.shape[0] // 128)[:128]).sum()
        else:
            t.reshape(-1)[::2048].sum()  # one element per 4 KiB page: faults every page in
"""
# The model's memory: the bake's own resident pages plus anonymous growth (library code pages
# that torch faults in the first time a kernel runs are not the model's).
RSS = ("from tests.test_load import mapped_resident\n"
       "def rss():\n    f = dict(l.split(':') for l in open('/proc/self/status'))\n"
       "    return mapped_resident({out!r}) + int(f['RssAnon'].split()[0]) * 1024\n")


def variant_run(out, variant) -> dict:
    code = (f"import json, time, torch\nfrom prebake.cache import load_from_manifest\n{TOUCH}{RSS.format(out=str(out))}"
            f"base = rss()\nt = time.perf_counter()\n"
            f"sd = load_from_manifest({str(out)!r}, variant={variant!r})\ntouch(sd)\n"
            f"print(json.dumps({{'s': time.perf_counter() - t, 'rss': rss() - base}}))")
    return python_timing(code)


def components(src_bin) -> object:
    """The big checkpoint's layers in three components (torch .bin each), baked once."""
    out = WORK / "three-components-baked"
    if (out / "manifest.json").exists():
        return out
    src = WORK / "three-components"
    sd = torch.load(src_bin, weights_only=True, mmap=True)
    for i, name in enumerate(("text_encoder", "transformer", "transformer_2")):
        part = {k: v for k, v in sd.items() if any(f"layers.{n}." in k for n in range(8 * i, 8 * i + 8))}
        (src / name).mkdir(parents=True, exist_ok=True)
        torch.save(part, src / name / "pytorch_model.bin")
    from prebake.convert.bake import convert

    convert(src, out, force=True)
    shutil.rmtree(src)
    return out


def components_run(out, parallel: bool) -> float:
    body = ("parts = load_components({out!r}, prefetch=True)\n"
            "with ThreadPoolExecutor(3) as pool:\n    list(pool.map(lambda n: touch(parts[n]), list(parts)))\n"
            if parallel else
            "parts = load_components({out!r}, prefetch=True)\nfor n in parts:\n    touch(parts[n])\n").format(out=str(out))
    code = (f"import json, time, torch\nfrom concurrent.futures import ThreadPoolExecutor\n"
            f"from prebake.cache import load_components\n{TOUCH}t = time.perf_counter()\n{body}"
            f"print(json.dumps({{'s': time.perf_counter() - t}}))")
    return python_timing(code, drop=out)["s"]  # cold


def main() -> None:
    src = big_checkpoint()
    out = WORK / "llama-1.8g-baked"
    if not (out / "manifest.json").exists():
        from prebake.convert.bake import convert

        convert(src, out)
    from prebake.convert.variants import add_variant_to_bake
    from prebake.formats.manifest import read_manifest

    if "first1" not in read_manifest(out).variants:
        add_variant_to_bake(out, "first1=first=1;head=no")  # embeddings, layer 0, final norm
    out.joinpath("manifest.json").read_bytes()
    drop_cache(out)
    for p in out.glob("*.safetensors"):
        p.read_bytes()  # warm, the same way on every run
    runs = interleaved({"first=1;head=no variant": lambda: variant_run(out, "first1"),
                        "full model": lambda: variant_run(out, None)})
    med = {k: (median([r["s"] for r in v]), median([r["rss"] for r in v])) for k, v in runs.items()}
    full_s, full_rss = med["full model"]
    rows = [(k, f"{s * 1e3:.0f} ms", f"{rss / 2**20:.0f} MiB", f"{rss / full_rss:.3f}", f"{s / full_s:.3f}")
            for k, (s, rss) in med.items()]
    print(table(f"load + touch, warm (median of {REPEAT}, fresh process each)", rows,
                ("what", "time", "resident growth", "memory vs full", "time vs full")))
    ratio = med["first=1;head=no variant"][1] / full_rss
    print(f"first=1;head=no resident memory / full model: {ratio:.3f} (target <= 0.1)")

    comp = components(src)
    runs = interleaved({parallel: (lambda p=parallel: components_run(comp, p)) for parallel in (False, True)})
    times = {k: median(v) for k, v in runs.items()}
    rows = [("one after another", f"{times[False] * 1e3:.0f} ms", "1.00x"),
            ("parallel threads (3)", f"{times[True] * 1e3:.0f} ms", f"{times[False] / times[True]:.2f}x")]
    print(table(f"three components, cold load + touch (median of {REPEAT})", rows, ("how", "wall time", "speed-up")))


if __name__ == "__main__":
    main()
