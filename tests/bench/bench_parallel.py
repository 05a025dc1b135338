"""Issue 15: a q4_k_m bake of the ~1.8 GB bench checkpoint on 1 and 2 workers, and on a local Ray.

Prints, for each, the median wall time of the whole ``prebake convert`` process (REPEAT runs,
interleaved), the throughput in MB/s of the source, the speed-up over one worker, and the peak
anonymous memory against the bound N x (largest tensor's work) + 256 MiB. A local Ray with
``--num-cpus 2`` is started for the Ray case (``ray start --head``), and stopped at the end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from tests.bench.common import WORK, big_checkpoint, median, run_timed, table

REPEAT = int(os.environ.get("PREBAKE_BENCH_PARALLEL_REPEAT", "3"))  # a single-worker q4_k_m bake takes a minute

CASES = {"1 worker": ["--workers", "1"], "2 workers": ["--workers", "2"], "Ray, 2 CPUs": ["--ray", "auto"]}


def main() -> None:
    src = big_checkpoint()
    prebake = str(shutil.which("prebake", path=str(sys.executable.rsplit("/", 1)[0])))
    ray = str(shutil.which("ray", path=str(sys.executable.rsplit("/", 1)[0])) or "")
    if ray:
        subprocess.run([ray, "start", "--head", "--num-cpus", "2", "--include-dashboard", "false"], check=True,
                       capture_output=True)
    cases = {k: v for k, v in CASES.items() if ray or "--ray" not in v}
    times: dict[str, list[float]] = {k: [] for k in cases}
    peaks: dict[str, list[float]] = {k: [] for k in cases}
    out = WORK / "parallel-out"
    src.read_bytes()
    try:
        for i in range(REPEAT):
            for name in (list(cases) if i % 2 == 0 else list(reversed(cases))):
                shutil.rmtree(out, ignore_errors=True)
                wall, peak = run_timed([prebake, "convert", str(src.parent), str(out), "--quant", "q4_k_m", "-q",
                                        *cases[name]])
                times[name].append(wall)
                peaks[name].append(peak)
    finally:
        if ray:
            subprocess.run([ray, "stop"], capture_output=True)
    size = src.stat().st_size / 1e6
    one = median(times["1 worker"])
    largest_work = 2816 * 2048 * (4 + 2) / 2**20  # the largest tensor as float32 plus its bf16 source, MiB
    rows = [(k, f"{median(v):.1f} s", f"{size / median(v):.0f} MB/s", f"{one / median(v):.2f}x",
             f"{median(peaks[k]):.0f} MiB") for k, v in times.items()]
    print(table(f"q4_k_m bake of {size:.0f} MB (median of {REPEAT}, whole process)", rows,
                ("workers", "time", "throughput", "vs 1 worker", "peak RssAnon")))
    print(f"goals on 2 cores: 2 workers >= 1.8x, Ray >= 1.6x; peak <= N x {largest_work:.0f} MiB + 256 MiB")


if __name__ == "__main__":
    main()
