"""One record per tensor, one error family, one front end: what issue #10 asked the house to show.

- A variant of a quantized bake keeps its blocks (q8_0, q4_k_m, a GGUF's own blocks), and a
  1-layer model built from it computes what the full bake's first layer computes.
- ``inspect --tensors`` lists every tensor, whatever form its bytes take.
- Version-1 bakes (made by prebake 0.1.0, kept in ``tests/fixtures``) still load and verify.
- A full disk at ``fsync`` is one line and exit 1, with nothing left behind; a bug is a traceback.
- The cache: two processes racing ``ensure()`` while a third removes the entry never convert it
  at the same time; the cache root follows ``PREBAKE_CACHE``, then ``XDG_CACHE_HOME``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import gguf
import numpy as np
import prebake.convert.execute as execute
import pytest
import torch
import transformers
from prebake.cache import store
from prebake.cache.load import load_from_manifest
from prebake.cache.module import load_module
from prebake.cache.packed import PackedTensor
from prebake.convert.bake import convert
from prebake.convert.cli import main
from prebake.convert.plan import Options
from prebake.formats.integrity import verify
from prebake.formats.manifest import read_manifest

from tests.conftest import save_llama
from tests.test_bad_input import assert_left_as_it_was, save_torch, small_state_dict

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A 2-layer random Llama, hidden 256 so every row fits a 256-block."""
    tmp = tmp_path_factory.mktemp("house")
    save_llama(tmp / "src", layers=2, hidden=256, inter=512, vocab=256)
    return tmp


def one_layer(bake: Path, **load) -> torch.Tensor:
    """Logits of a 1-layer Llama loaded from ``bake`` with ``load`` (load_module's selection)."""
    cfg = transformers.LlamaConfig.from_pretrained(bake / "variants" / "first1")
    assert cfg.num_hidden_layers == 1
    model = load_module(lambda: transformers.LlamaForCausalLM(cfg), bake, **load).eval()
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("recipe", ["q8_0", "q4_k_m"])
def test_a_variant_of_a_quantized_bake_keeps_its_blocks(llama, recipe):
    out = llama / recipe
    m = convert(llama / "src", out, Options(quant=recipe), variants=["first1=first=1"])
    variant = load_from_manifest(out, variant="first1")
    layer0 = {n: t for n, t in m.tensors.items() if ".layers.0." in n}
    assert {n for n in variant if ".layers." in n} == set(layer0)
    packed = {n for n, t in layer0.items() if t.qtype}
    assert packed and {n for n, v in variant.items() if isinstance(v, PackedTensor) and n in layer0} == packed
    full = load_from_manifest(out)
    for n in packed:
        assert torch.equal(variant[n].blocks, full[n].blocks)
    # the variant's 1-layer model computes what the full bake's layer 0 alone computes
    first = one_layer(out, variant="first1")
    alone = one_layer(out, names=lambda n: ".layers.1." not in n)
    assert torch.equal(first, alone)


def test_a_variant_of_a_gguf_keeps_its_blocks(tmp_path):
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    w.add_block_count(2)
    for i in range(2):
        a = rng.standard_normal((64, 256)).astype(np.float32)
        w.add_tensor(f"blk.{i}.attn_q.weight", gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q4_0),
                     raw_dtype=gguf.GGMLQuantizationType.Q4_0)
        w.add_tensor(f"blk.{i}.attn_norm.weight", a[0])
    w.add_tensor("output_norm.weight", a[1])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    convert(tmp_path / "m.gguf", tmp_path / "out", Options(keep_quant=True, names="gguf"), variants=["first1=first=1"])
    variant = load_from_manifest(tmp_path / "out", variant="first1")
    assert set(variant) == {"blk.0.attn_q.weight", "blk.0.attn_norm.weight", "output_norm.weight"}
    q = variant["blk.0.attn_q.weight"]
    assert isinstance(q, PackedTensor) and q.qtype == "Q4_0"
    assert torch.equal(q.blocks, load_from_manifest(tmp_path / "out")["blk.0.attn_q.weight"].blocks)


def test_inspect_lists_every_tensor_of_a_quantized_bake(llama, capsys):
    convert(llama / "src", llama / "inspect", Options(quant="q4_k_m"))
    assert main(["inspect", str(llama / "inspect"), "--tensors", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["tensor_list"]
    source = transformers.LlamaForCausalLM.from_pretrained(llama / "src").state_dict()
    assert set(listed) == set(source)
    assert {t["qtype"] for t in listed.values() if "qtype" in t} == {"Q4_K", "Q6_K"}


@pytest.mark.parametrize("name", ["v1-q8_0", "v1-keep-float"])
def test_version_1_bakes_still_load_and_verify(tmp_path, name):
    from safetensors import safe_open

    bake = tmp_path / name
    shutil.copytree(FIXTURES / name, bake)
    report = verify(bake)
    assert report.tensors == 8
    m = read_manifest(bake)
    assert list(m.tensors)[0] == "model.embed_tokens.weight"
    sd = load_from_manifest(bake, quant="packed")
    assert sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()  # the alias
    q = sd["model.layers.1.self_attn.q_proj.weight"]
    assert isinstance(q, PackedTensor) and q.qtype == "Q8_0" and q.shape == (64, 64)
    blocks_file = next(s.file for s in m.shards if "q8_0" in s.file)
    with safe_open(str(bake / blocks_file), "pt") as f:  # the stock reader's bytes
        assert torch.equal(q.blocks, f.get_tensor("model.layers.1.self_attn.q_proj.weight"))
    with safe_open(str(bake / "model.safetensors"), "pt") as f:
        assert torch.equal(sd["model.norm.weight"], f.get_tensor("model.norm.weight"))
    if name == "v1-q8_0":  # (made by 0.1.0, whose variants left the blocks out: the bug #10 fixed)
        variant = load_from_manifest(bake, variant="first1")
        assert torch.equal(variant["model.layers.0.input_layernorm.weight"], sd["model.layers.0.input_layernorm.weight"])


class FsyncFull:
    """``os`` for the shard writer, whose ``fsync`` finds the disk full (the data was cached)."""

    def __getattr__(self, name):
        return getattr(os, name)

    def fsync(self, fd):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_at_fsync_is_one_line(tmp_path, monkeypatch, capsys):
    src = save_torch(tmp_path / "model.bin", small_state_dict())
    out = tmp_path / "out"
    fds = set(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(execute, "os", FsyncFull())
    assert main(["convert", str(src), str(out)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "no space left" in err[0] and str(out / "model.safetensors") in err[0], err
    assert_left_as_it_was(out, None, set())
    assert set(os.listdir("/proc/self/fd")) == fds  # every descriptor closed once


def test_a_bug_in_a_transform_is_a_traceback_not_bad_input(tmp_path, monkeypatch):
    import prebake.convert.work as work

    def broken(data):
        raise ValueError("a bug")

    monkeypatch.setattr(work, "piece_digest", broken)
    src = save_torch(tmp_path / "model.bin", small_state_dict())
    with pytest.raises(ValueError, match="a bug"):
        main(["convert", str(src), str(tmp_path / "out")])
    assert_left_as_it_was(tmp_path / "out", None, set())


def test_cache_root_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("PREBAKE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert store.cache_root() == tmp_path / "xdg" / "prebake"
    monkeypatch.setenv("PREBAKE_CACHE", str(tmp_path / "mine"))
    assert store.cache_root() == tmp_path / "mine"


ENSURE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import prebake.convert.bake as bake
    from prebake.cache import store

    convert, log = bake.convert, Path(sys.argv[3])

    def logged(*args, **kwargs):  # every conversion, with its start and end
        start = time.time()
        (log.parent / "converting").touch()
        time.sleep(1.0)
        result = convert(*args, **kwargs)
        with open(log, "a") as f:
            f.write(f"{start} {time.time()}\\n")
        return result

    bake.convert = logged
    store.ensure(sys.argv[1], root=sys.argv[2])
""")
# removes the entry, then holds its lock a while longer (as a slow disk would)
REMOVE = textwrap.dedent("""
    import shutil, sys, time
    from pathlib import Path
    from prebake.cache import store

    rmtree = shutil.rmtree

    def slow(path, *args, **kwargs):
        rmtree(path, *args, **kwargs)
        Path(sys.argv[3]).touch()
        time.sleep(1.0)

    shutil.rmtree = slow
    assert store.remove(sys.argv[2], root=sys.argv[1])
""")


def wait_for(path: Path, timeout: float = 60) -> None:
    end = time.time() + timeout
    while not path.exists():
        assert time.time() < end, f"{path} never appeared"
        time.sleep(0.02)


def test_racing_ensure_and_remove_never_convert_at_once(tmp_path):
    """A waits for the entry's lock while R removes the entry; B comes while A converts.

    Had R deleted the lock file (as prebake 0.1 did), B would lock a new file and convert beside A.
    """
    src = save_torch(tmp_path / "model.bin", small_state_dict())
    root, log = tmp_path / "cache", tmp_path / "conversions.log"
    key = store.cache_key(store.source_fingerprint(src), {})

    def ensure():
        return subprocess.Popen([sys.executable, "-c", ENSURE, str(src), str(root), str(log)])

    assert ensure().wait(120) == 0  # the entry exists
    (tmp_path / "converting").unlink()
    remover = subprocess.Popen([sys.executable, "-c", REMOVE, str(root), key, str(tmp_path / "removed")])
    wait_for(tmp_path / "removed")
    a = ensure()  # waits for the remover's lock, then converts
    wait_for(tmp_path / "converting")
    b = ensure()  # comes while A converts
    for p in (remover, a, b):
        assert p.wait(120) == 0
    spans = sorted(tuple(map(float, line.split())) for line in log.read_text().splitlines())
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert start >= end, f"two conversions of one entry overlapped: {spans}"
    assert len(spans) == 2  # the first call and A; B found A's bake
