"""Issue 17: two tensor-parallel ranks loading the ~1.8 GB bench bake, with and without --tp-layout.

Each rank in a fresh process, cold (pages dropped first), imports before the clock: prebake's
eager load of its slices (``load_from_manifest(OUT, tp_rank=r, tp_size=2, mode="eager")``) on a
``--tp-layout 8`` bake and on a plain one, against each rank loading the whole model with
safetensors ``load_file`` and slicing it. Prints the bytes each rank read (the staged reader's
count; the whole file for ``load_file``) and the time, median of REPEAT.
"""

from __future__ import annotations

from tests.bench.common import REPEAT, WORK, big_bake, interleaved, median, python_timing, table

RANK = """import json, time, torch
from prebake.cache import load_from_manifest
from prebake.formats.tp_layout import split_dim, split_kind
from safetensors.torch import load_file
t = time.perf_counter()
{body}
print(json.dumps({{'s': time.perf_counter() - t, 'bytes': read}}))
"""
OURS = "sd = load_from_manifest({out!r}, tp_rank={r}, tp_size=2, mode='eager')\nread = sd.report.bytes"
PEER = ("import os\nsd = {{}}\nread = 0\nfor p in {shards!r}:\n    read += os.path.getsize(p)\n"
        "    for k, v in load_file(p).items():\n        d = split_dim(split_kind(k))\n"
        "        sd[k] = v if d is None else v.chunk(2, d)[{r}].clone()")


def main() -> None:
    plain, m, shards = big_bake()
    tiled = WORK / "llama-1.8g-tp8"
    if not (tiled / "manifest.json").exists():
        from prebake.convert.bake import convert
        from prebake.convert.plan import Options

        convert(plain.parent / "llama-1.8g", tiled, Options(tp_layout=8), force=True)
    cases = {"prebake, --tp-layout 8 bake": (tiled, OURS), "prebake, plain bake": (plain, OURS),
             "load_file + slice": (plain, PEER)}
    size = sum(s.size for s in m.shards)
    code = {(name, r): (RANK.format(body=body.format(out=str(bake), r=r, shards=shards)), bake)
            for name, (bake, body) in cases.items() for r in (0, 1)}
    samples = interleaved({k: (lambda c=c, b=b: python_timing(c, drop=b)) for k, (c, b) in code.items()})
    rows = []
    for (name, r), runs in samples.items():
        read = median([x["bytes"] for x in runs])
        rows.append((name, r, f"{median([x['s'] for x in runs]):.2f} s", f"{read / 2**20:.0f} MiB",
                     f"{read / size:.2f}"))
    print(table(f"rank loads of {size / 2**30:.2f} GiB, tp_size=2, cold (median of {REPEAT})", rows,
                ("loader", "rank", "time", "read", "of the model")))


if __name__ == "__main__":
    main()
