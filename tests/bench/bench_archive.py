"""``prebake pack`` / ``unpack``: archive size and speed against plain zstd and ZipNN.

For BF16, FP16 and FP32 bakes of ~256 MiB of trained-like weights (normal, std 0.02, each row
scaled by a log-normal factor), prints medians of REPEAT runs (PREBAKE_BENCH_REPEAT, default 5):
- archive bytes / raw bake bytes: prebake; plain zstd at the same level on the same 4 MiB chunks
  (the same pipeline with byte planes off); ZipNN if it is installed (the shards' bytes in memory);
- pack and unpack throughput in MB/s of raw bake bytes, 2 threads, on tmpfs so that the disk does
  not set the pace; then unpack onto the bench disk, fsync'd, against a copy of the raw bake;
- time to a usable bake through a stream throttled to 150 MB/s: unpack reading the archive
  against copying the raw bake through the same throttle.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

from tests.bench.common import REPEAT, WORK, interleaved, median, python_timing, table

DTYPES = ["bfloat16", "float16", "float32"]
SIZE = 256 << 20
THREADS = 2
LEVEL = 3
RATE = 150e6
ROWS = 4096
SHM = Path("/dev/shm") if Path("/dev/shm").is_dir() else WORK


def make_bake(dtype: str) -> Path:
    """A ~256 MiB bake of trained-like weights in ``dtype`` (built once, reused)."""
    import torch
    from prebake.convert.bake import convert
    from safetensors.torch import save_file

    folder = WORK / "archive" / dtype
    if (folder / "bake" / "manifest.json").exists():
        return folder / "bake"
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    cols = 4096
    count = SIZE // (ROWS * cols * dt.itemsize)
    sd = {}
    for i in range(count):
        scale = torch.exp(torch.randn(ROWS, 1, generator=g) * 0.3) * 0.02
        sd[f"layers.{i}.weight"] = (torch.randn(ROWS, cols, generator=g) * scale).to(dt)
        sd[f"layers.{i}.norm"] = torch.ones(cols, dtype=dt)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": dtype}))
    convert(folder, folder / "bake", force=True)
    (folder / "model.safetensors").unlink()
    return folder / "bake"


def files(bake: Path) -> list[Path]:
    return sorted(p for p in bake.rglob("*") if p.is_file())


def timed(cases: dict[str, tuple[Callable[[], object], Callable[[], object]]]) -> dict[str, tuple[float, float]]:
    """Each case's (fn, before): the median wall time and median CPU time (user + system, every
    thread) of REPEAT calls of ``fn``, each after an untimed ``before``; the cases interleaved.
    CPU time, unlike wall time, hardly moves when other processes share the machine."""

    def once(fn, before) -> tuple[float, float]:
        before()
        start, used = time.perf_counter(), _cpu()
        fn()
        return time.perf_counter() - start, _cpu() - used

    runs = interleaved({k: (lambda fn=fn, before=before: once(fn, before)) for k, (fn, before) in cases.items()})
    return {k: (median([w for w, _ in v]), median([c for _, c in v])) for k, v in runs.items()}


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def plain_zstd():
    """The same pack/unpack with byte planes off: every chunk is plain bytes at LEVEL."""
    from prebake.formats import archive

    return mock.patch.dict(archive.DTYPE_LAYOUTS, clear=True)


def bench_pipelines(bake: Path, raw: int) -> dict[str, dict]:
    """prebake's archive ("ours": byte planes) and plain zstd ("plain"), run by run side by side:
    pack and unpack on tmpfs, unpack onto the bench disk against a copy of the raw bake, and the
    time to a usable bake through the throttled stream against copying the raw bake through it."""
    from prebake.convert.pack import pack, unpack

    kinds = {"ours": contextlib.nullcontext, "plain": plain_zstd}
    arc = {k: SHM / f"prebake-bench-{k}.pbk" for k in kinds}
    out = {k: SHM / f"prebake-bench-out-{k}" for k in kinds}
    disk = {k: WORK / "archive" / f"out-{k}" for k in (*kinds, "copy")}

    def packed(k):
        with kinds[k]():
            pack(bake, arc[k], level=LEVEL, threads=THREADS)

    pack_t = timed({k: (lambda k=k: packed(k), lambda k=k: arc[k].unlink(missing_ok=True)) for k in kinds})
    unpack_t = timed({k: (lambda k=k: unpack(arc[k], out[k], threads=THREADS), lambda k=k: reset(out[k]))
                      for k in kinds})
    disk_t = timed({**{k: (lambda k=k: unpack(arc[k], disk[k], threads=THREADS), lambda k=k: reset(disk[k]))
                       for k in kinds},
                    "copy": (lambda: copy_raw(bake, disk["copy"]), lambda: reset(disk["copy"]))})
    stream_t = timed({"ours": (lambda: stream_unpack(arc["ours"], out["ours"]), lambda: reset(out["ours"])),
                      "copy": (lambda: stream_copy(bake, disk["copy"]), lambda: reset(disk["copy"]))})
    result = {k: {"ratio": arc[k].stat().st_size / raw, "pack": raw / pack_t[k][0] / 1e6,
                  "unpack": raw / unpack_t[k][0] / 1e6, "disk": raw / disk_t[k][0] / 1e6,
                  "pack_cpu": pack_t[k][1] / raw * 1e9, "unpack_cpu": unpack_t[k][1] / raw * 1e9} for k in kinds}
    result["ours"].update(stream=stream_t["ours"][0], stream_ideal=arc["ours"].stat().st_size / RATE)
    result["copy"] = {"disk": raw / disk_t["copy"][0] / 1e6, "stream": stream_t["copy"][0]}
    reset(*out.values(), *disk.values())
    for a in arc.values():
        a.unlink(missing_ok=True)
    return result


def reset(*folders: Path) -> None:
    """Removes ``folders`` (and their ``.tmp`` twins), then flushes dirty pages so runs start even."""
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(folder.with_name(folder.name + ".tmp"), ignore_errors=True)
    os.sync()


class Throttled:
    """Reads ``f`` no faster than ``rate`` bytes/s, sleeping as a slow download would keep it waiting.

    ``clock`` may be shared by several readers: they then share the one rate.
    """

    def __init__(self, f, rate: float, clock: dict | None = None):
        self.f, self.rate = f, rate
        self.clock = clock if clock is not None else {"start": time.perf_counter(), "sent": 0}

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.clock["sent"] += len(data)
        delay = self.clock["start"] + self.clock["sent"] / self.rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        return data


def stream_unpack(arc: Path, out: Path) -> None:
    from prebake.convert.pack import unpack_from

    with open(arc, "rb") as f:
        unpack_from(Throttled(f, RATE), out, threads=THREADS)


def stream_copy(bake: Path, out: Path) -> None:
    """The raw bake through the same throttle, written, fsync'd and renamed as unpack does."""
    tmp = out.with_name(out.name + ".tmp")
    clock = {"start": time.perf_counter(), "sent": 0}
    for p in files(bake):
        dst = tmp / p.relative_to(bake)
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "rb") as f, open(dst, "wb") as g:
            shutil.copyfileobj(Throttled(f, RATE, clock), g, 4 << 20)
            g.flush()
            os.fsync(g.fileno())
    os.rename(tmp, out)


def copy_raw(bake: Path, out: Path) -> None:
    shutil.copytree(bake, out)
    for p in files(out):
        fd = os.open(p, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


ZIPNN = """
import json, statistics, time
from zipnn import ZipNN
blobs = [open(p, "rb").read() for p in {paths!r}]
z = ZipNN(input_format="byte", bytearray_dtype={dtype!r}, threads={threads})
def timed(fn):
    times = []
    for _ in range({repeat}):
        start = time.perf_counter(); out = fn(); times.append(time.perf_counter() - start)
    return statistics.median(times), out
pack_s, packed = timed(lambda: [z.compress(b) for b in blobs])
unpack_s, unpacked = timed(lambda: [bytes(z.decompress(c)) for c in packed])
raw = sum(map(len, blobs))
print(json.dumps({{"ratio": sum(map(len, packed)) / raw, "pack": raw / pack_s / 1e6,
                  "unpack": raw / unpack_s / 1e6, "lossless": unpacked == blobs}}))
"""


def bench_zipnn(bake: Path, dtype: str) -> dict | None:
    """ZipNN on the shards' bytes in memory, in a child process (its C core can crash here)."""
    if not zipnn_installed():
        return None
    paths = [str(p) for p in files(bake) if p.suffix == ".safetensors"]
    try:
        return python_timing(ZIPNN.format(paths=paths, dtype=dtype, threads=THREADS, repeat=REPEAT))
    except RuntimeError as e:
        print(f"zipnn {dtype}: failed ({str(e).strip().splitlines()[-1] if str(e).strip() else 'crashed'})")
        return None


def zipnn_installed() -> bool:
    try:
        import zipnn  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> None:
    rows: dict[str, list] = {"ratio": [], "speed": [], "cpu": [], "disk": [], "stream": []}
    notes = []
    for dtype in DTYPES:
        bake = make_bake(dtype)
        raw = sum(p.stat().st_size for p in files(bake))
        measured = bench_pipelines(bake, raw)
        ours, plain, copy = measured["ours"], measured["plain"], measured["copy"]
        zn = bench_zipnn(bake, dtype)
        z = {k: (f"{zn[k]:.3f}" if k == "ratio" else f"{zn[k]:.0f}") if zn else "-" for k in ("ratio", "pack", "unpack")}
        rows["ratio"].append((dtype, f"{raw / 2**20:.0f} MiB", f"{ours['ratio']:.3f}", f"{plain['ratio']:.3f}",
                              z["ratio"]))
        rows["speed"].append((dtype, f"{ours['pack']:.0f}", f"{plain['pack']:.0f}", z["pack"],
                              f"{ours['unpack']:.0f}", f"{plain['unpack']:.0f}", z["unpack"]))
        rows["cpu"].append((dtype, f"{ours['pack_cpu']:.2f}", f"{plain['pack_cpu']:.2f}",
                            f"{ours['unpack_cpu']:.2f}", f"{plain['unpack_cpu']:.2f}"))
        rows["disk"].append((dtype, f"{ours['disk']:.0f}", f"{plain['disk']:.0f}", f"{copy['disk']:.0f}"))
        rows["stream"].append((dtype, f"{ours['stream']:.2f} s", f"{copy['stream']:.2f} s",
                               f"{copy['stream'] / ours['stream']:.2f}x", f"{ours['stream_ideal']:.2f} s",
                               f"{ours['stream'] / ours['stream_ideal']:.2f}"))
        if zn and not zn["lossless"]:
            notes.append(f"zipnn {dtype}: its round trip did NOT give the input back here (bytes differ)")
        if dtype == "bfloat16":
            notes.append(f"BF16 archive ratio {ours['ratio']:.3f} (target <= 0.68); "
                         f"unpack {ours['unpack'] / 1e3:.2f} GB/s on tmpfs (target >= 1 GB/s), "
                         f"{ours['unpack_cpu']:.2f} CPU-s per GB (<= {THREADS} allows it on {THREADS} free cores)")
    print(table(f"archive bytes / raw bake bytes (zstd level {LEVEL})", rows["ratio"],
                ("dtype", "raw", "prebake", "zstd (4 MiB chunks)", "zipnn")))
    print(table(f"throughput, MB/s of raw bytes, {THREADS} threads, tmpfs (median of {REPEAT})", rows["speed"],
                ("dtype", "pack prebake", "pack zstd", "pack zipnn", "unpack prebake", "unpack zstd",
                 "unpack zipnn")))
    print(table(f"CPU seconds per GB of raw bytes, all threads (median of {REPEAT}; steady under load)",
                rows["cpu"], ("dtype", "pack prebake", "pack zstd", "unpack prebake", "unpack zstd")))
    print(table(f"onto {WORK}, fsync'd, MB/s of raw bytes (median of {REPEAT})", rows["disk"],
                ("dtype", "unpack prebake", "unpack zstd", "copy raw bake")))
    print(table(f"time to a usable bake through a {RATE / 1e6:.0f} MB/s stream (median of {REPEAT})",
                rows["stream"], ("dtype", "unpack archive", "copy raw bake", "speedup",
                                 "archive bytes / rate", "unpack / that")))
    print("zipnn: the shards' bytes in memory (no file reads or writes), threads=2, in a child process"
          if zipnn_installed() else "zipnn: not installable here")
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
