"""Benchmark plumbing: medians, fresh-process timings, peak anonymous memory, the test checkpoint."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parents[2]
WORK = Path(os.environ.get("PREBAKE_BENCH_DIR", ROOT / "build" / "bench"))
REPEAT = int(os.environ.get("PREBAKE_BENCH_REPEAT", "5"))
K = TypeVar("K")
T = TypeVar("T")
# Child processes import from compiled bytecode, as an installed package does (these machines
# set PYTHONDONTWRITEBYTECODE, which makes every import compile its source again: 10-20 ms of
# prebake's import, more for larger packages, on every side alike).
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


# This VM hands memory the guest has freed back to its host after a second or two (free page
# reporting): the next write that needs those pages faults each one in again, in kernel time. A bake
# started a few seconds after the previous run's output was deleted ran 4x slower than one started at
# once (2.6 s against 0.6 s, same process, same file, a sleep apart). A run that must not depend on
# how long ago something was deleted touches fresh pages first, outside its clock.
TOUCH_BYTES = 3 << 30
TOUCH_SNIPPET = f"import numpy as _np\n_np.ones({TOUCH_BYTES}, _np.uint8)\n"  # touch_free_memory() in a child


def touch_free_memory() -> None:
    """Faults in (and frees at once) TOUCH_BYTES, so that the next few GB written land on pages the host backs."""
    import numpy as np

    np.ones(TOUCH_BYTES, np.uint8)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def run_timed(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """Runs a whole process; returns (wall seconds, peak RssAnon MiB sampled every 5 ms)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = [0.0]

    def sample():
        path = f"/proc/{proc.pid}/status"
        while proc.poll() is None:
            try:
                with open(path) as f:
                    for line in f:
                        if line.startswith("RssAnon:"):
                            peak[0] = max(peak[0], int(line.split()[1]) / 1024)
            except OSError:
                return
            time.sleep(0.005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - start
    t.join()
    if proc.returncode:
        raise RuntimeError(f"{cmd[:3]} failed: {err.decode()[-2000:]}")
    return wall, peak[0]


def python_timing(code: str, drop: Path | None = None) -> dict:
    """Runs ``code`` in a fresh interpreter; it must print one JSON object as its last line.
    ``drop``: a file or folder whose pages are dropped from the page cache first (a cold run)."""
    if drop is not None:
        drop_cache(drop)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def interleaved(cases: dict[K, Callable[[], T]], repeat: int = REPEAT) -> dict[K, list[T]]:
    """Each case's ``repeat`` samples, taken one of each case per round, so that the host's slow and
    fast moments fall on every case alike; each round in a rotated order, so that no case always
    follows the same one (this VM makes a run pay for what the one before it left: pages to write
    back, memory freed to the host)."""
    samples: dict[K, list[T]] = {k: [] for k in cases}
    keys = list(cases)
    for r in range(repeat):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            samples[k].append(cases[k]())
    return samples


def drop_cache(path: Path) -> None:
    """Drops a file's (or a folder's files') pages from the page cache: written back first, since
    DONTNEED leaves dirty pages cached (a bake made just before would start half warm, its
    writeback running into the timed read)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def table(title: str, rows: list[tuple], headers: tuple) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=True)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [f"\n== {title}", line.format(*headers), line.format(*("-" * w for w in widths))]
    out += [line.format(*map(str, r)) for r in rows]
    return "\n".join(out)


def llama_state_dict(layers: int, hidden: int, intermediate: int, vocab: int, dtype="bfloat16"):
    """A Llama-shaped state dict of random weights (tied embeddings), built layer by layer."""
    import torch

    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)

    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(dt)

    sd = {"model.embed_tokens.weight": w(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{n}.weight"] = w(hidden, hidden)
        sd[p + "mlp.gate_proj.weight"] = w(intermediate, hidden)
        sd[p + "mlp.up_proj.weight"] = w(intermediate, hidden)
        sd[p + "mlp.down_proj.weight"] = w(hidden, intermediate)
        sd[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=dt)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=dt)
    sd["model.norm.weight"] = torch.ones(hidden, dtype=dt)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    return sd


def big_checkpoint() -> Path:
    """A 24-layer, ~1.8 GB bfloat16 Llama-shaped ``pytorch_model.bin`` (built once, reused)."""
    path = WORK / "llama-1.8g" / "pytorch_model.bin"
    if not path.exists():
        import torch

        path.parent.mkdir(parents=True, exist_ok=True)
        sd = llama_state_dict(layers=24, hidden=2048, intermediate=2816, vocab=32000)
        tmp = path.with_suffix(".tmp")
        torch.save(sd, tmp)
        os.replace(tmp, path)
        config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
                  "intermediate_size": 2816, "num_hidden_layers": 24, "num_attention_heads": 16,
                  "num_key_value_heads": 16, "vocab_size": 32000, "tie_word_embeddings": True}
        (path.parent / "config.json").write_text(json.dumps(config))
    return path


def big_bake():
    """The bake of :func:`big_checkpoint` (made once), its manifest, and its shard paths."""
    out = WORK / "llama-1.8g-baked"
    if not (out / "manifest.json").exists():
        from prebake.convert.bake import convert

        convert(big_checkpoint(), out)
    from prebake.formats.manifest import read_manifest

    m = read_manifest(out)
    return out, m, [str(out / s.file) for s in m.shards]
