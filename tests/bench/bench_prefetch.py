"""Issue 5: a cold start from a slow disk, with and without prefetch.

The ~1.8 GB bake of tests/bench/common.big_checkpoint, its pages dropped before each run
(posix_fadvise(DONTNEED)), every run in a fresh process inside a blkio group that caps reads at
150 MB/s and 500 requests/s (see tests/bench/throttle.py). Each loader touches every tensor in execution order
(one element per 4 KiB page, so the time is the I/O, not arithmetic):
- load_from_manifest(prefetch=True) against load_from_manifest() (page faults and the kernel's
  readahead), against safetensors load_file, and against a plain sequential read of the same
  bytes (target: prefetch within 1.1x of the sequential read).
Twice: with this disk's own readahead (read_ahead_kb), and with Linux's default of 128 KiB,
which is what HDDs and most volumes run with (set for the run, then restored).
"""

from __future__ import annotations

import os

from tests.bench.common import big_bake, interleaved, median, python_timing, table
from tests.bench.throttle import enter_code, make, readahead

BPS = 150 * 10**6
IOPS = 500  # an HDD or network volume: small requests cost a round trip each
REPEAT = int(os.environ.get("PREBAKE_BENCH_COLD_REPEAT", "3"))
TOUCH = """
def touch(sd):
    for t in sd.values():
        t.reshape(-1)[::4096 // t.element_size()].sum()
"""
RUNS = {
    "sequential read (8 MiB blocks)": "buf = bytearray(8 << 20)\nfor p in {shards!r}:\n"
                                      "    with open(p, 'rb', buffering=0) as f:\n"
                                      "        while f.readinto(buf):\n            pass\n",
    "prebake prefetch=True": "from prebake.cache import load_from_manifest\n"
                             "touch(load_from_manifest({out!r}, prefetch=True))\n",
    "prebake (page faults)": "from prebake.cache import load_from_manifest\ntouch(load_from_manifest({out!r}))\n",
    "safetensors load_file": "from safetensors.torch import load_file\n"
                             "for p in {shards!r}:\n    touch(load_file(p))\n",
}


def main() -> None:
    out, m, shards = big_bake()
    group = make(out, BPS, IOPS)
    note = f"blkio throttle {BPS // 10**6} MB/s, {IOPS} IOPS" if group else "NO throttle (needs root and cgroup v1 blkio): memory-speed reads"
    own = readahead(out, 0).file
    own_kb = own.read_text().strip() if own else "?"
    scenario(out, m, shards, group, f"{note}, read_ahead_kb={own_kb}")
    with readahead(out, 128) as changed:
        if changed:
            scenario(out, m, shards, group, f"{note}, read_ahead_kb=128 (Linux default)")


def scenario(out, m, shards, group, note: str) -> None:
    code = {k: (f"import json, time, torch\n{enter_code(group)}{TOUCH}t = time.perf_counter()\n"
                f"{body.format(out=str(out), shards=shards)}print(json.dumps({{'s': time.perf_counter() - t}}))")
            for k, body in RUNS.items()}
    runs = interleaved({k: (lambda c=c: python_timing(c, drop=out)["s"]) for k, c in code.items()}, REPEAT)
    times = {k: median(v) for k, v in runs.items()}
    seq = times["sequential read (8 MiB blocks)"]
    size = sum(s.size for s in m.shards)
    rows = [(k, f"{v:.2f} s", f"{size / v / 1e6:.0f} MB/s", f"{v / seq:.2f}x") for k, v in times.items()]
    print(table(f"cold load + touch every tensor, {size / 2**30:.2f} GiB, {note} (median of {REPEAT})", rows,
                ("loader", "time", "throughput", "vs sequential read")))
    print(f"prefetch / sequential read: {times['prebake prefetch=True'] / seq:.2f}x (target <= 1.1x); "
          f"prefetch speed-up over page faults: {times['prebake (page faults)'] / times['prebake prefetch=True']:.2f}x")


if __name__ == "__main__":
    main()
