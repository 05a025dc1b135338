"""Conversion on every core and on Ray: the same bytes whoever does the work.

A lossless, a ``--dtype bfloat16``, a ``q4_k_m`` and a GGUF-dequantizing bake of small models,
made with 1 worker, 2 workers and a local Ray of 2 CPUs, are byte-identical (shards and
manifests but the creation time). The checksum piece is made small (64 KiB) so that every
tensor is cut into many pieces, done by different workers. A Ray worker killed on its first
item is retried and the result is still identical; a worker that dies every time fails the bake
cleanly, and nothing is left.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from prebake.convert.bake import convert
from prebake.convert.plan import Options
from prebake.formats.errors import FormatError, OutputError
from prebake.formats.quants import quantize

from tests.conftest import save_llama
from tests.test_bad_input import save_torch

ray = pytest.importorskip("ray", reason="prebake[ray] is not installed")
PIECE = 1 << 16


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    faults = tmp_path_factory.mktemp("faults")
    env = {"PREBAKE_RAY_KILL_ONCE": str(faults / "killed-once"), "PREBAKE_RAY_KILL_WHILE": str(faults / "kill")}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    yield faults
    ray.shutdown()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    torch.manual_seed(0)
    sd = {f"layers.{i}.w": torch.randn(512, 384) for i in range(3)}
    sd["layers.0.b"] = torch.randn(384)
    bin_ = save_torch(root / "model.bin", sd)
    save_llama(root / "llama", layers=2, hidden=256, inter=512, vocab=256)
    w = gguf.GGUFWriter(str(root / "m.gguf"), "llama")
    rng = np.random.default_rng(0)
    for i, q in enumerate(("Q8_0", "Q4_K", "Q6_K")):
        a = rng.standard_normal((256, 512)).astype(np.float32)
        w.add_tensor(f"blk.{i}.ffn_up.weight", quantize(a, q), raw_dtype=gguf.GGMLQuantizationType[q])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"lossless": (bin_, {}), "bf16": (bin_, {"dtype": "BF16"}), "q4_k_m": (root / "llama", {"quant": "q4_k_m"}),
            "gguf": (root / "m.gguf", {})}


def bake_bytes(out: Path) -> dict[str, bytes]:
    files = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    manifest = json.loads(files.pop("manifest.json"))
    manifest.pop("created")
    files["manifest.json"] = json.dumps(manifest, sort_keys=True).encode()
    return files


@pytest.mark.parametrize("kind", ["lossless", "bf16", "q4_k_m", "gguf"])
def test_workers_and_ray_make_the_same_bytes(sources, tmp_path, kind, local_ray):
    src, options = sources[kind]
    opts = Options(piece=PIECE, **options)
    one = bake_bytes(convert(src, tmp_path / "one", opts, workers=1).root)
    two = bake_bytes(convert(src, tmp_path / "two", opts, workers=2).root)
    on_ray = bake_bytes(convert(src, tmp_path / "ray", opts, ray=True).root)
    assert one == two == on_ray
    assert (local_ray / "killed-once").exists()  # the first Ray bake lost a worker, and was retried


def test_a_ray_worker_that_always_dies_fails_the_bake_cleanly(sources, tmp_path, local_ray):
    src, options = sources["lossless"]
    (local_ray / "kill").touch()
    try:
        with pytest.raises(OutputError, match="a Ray task failed"):
            convert(src, tmp_path / "out", Options(), ray=True)  # one task: it dies 4 times
    finally:
        (local_ray / "kill").unlink()
    assert list(tmp_path.iterdir()) == []


def test_a_local_worker_that_fails_leaves_no_output(sources, tmp_path, monkeypatch):
    import prebake.convert.work as work

    real = work.produce

    def flaky(p, lo, hi):
        if p.name == "layers.2.w" and lo > 0:
            raise OSError(5, "Input/output error")
        return real(p, lo, hi)

    monkeypatch.setattr(work, "produce", flaky)
    src, _ = sources["lossless"]
    with pytest.raises(FormatError, match="layers.2.w"):  # a cast: every piece goes through produce
        convert(src, tmp_path / "out", Options(piece=PIECE, dtype="BF16"), workers=2)
    assert list(tmp_path.iterdir()) == []
