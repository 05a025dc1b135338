"""The staged reader: eager loads into memory the process owns, verified as they pass; GPU loads.

Eager loads give the same bytes as mapped loads (lossless, quantized, a variant, a component),
stay valid once the shard files are gone, catch a flipped byte and name its tensor, use
O_DIRECT where the bytes are not cached and fall back cleanly where the filesystem refuses it.
A bake on a network filesystem loads eagerly by itself, and says so. GPU tests run only where
CUDA is present.
"""

from __future__ import annotations

import errno
import os
import shutil

import pytest
import torch
from prebake.cache.load import load_from_manifest
from prebake.cache.packed import PackedTensor
from prebake.convert.bake import convert
from prebake.convert.plan import Options
from prebake.formats.errors import VerifyError
from prebake.formats.manifest import read_manifest

from tests.conftest import raw_bytes, save_llama
from tests.test_bad_input import save_torch

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def bakes(tmp_path_factory):
    root = tmp_path_factory.mktemp("staged")
    save_llama(root / "llama", layers=2, hidden=256, inter=512, vocab=1024, tie=True)
    torch.manual_seed(0)
    big = save_torch(root / "big.bin", {"embed.weight": torch.randn(2048, 512), "layers.0.w": torch.randn(640, 512),
                                        "layers.0.b": torch.randn(512)})
    convert(big, root / "lossless")
    convert(root / "llama", root / "q8", Options(quant="q8_0"), variants=["first1=first=1"])
    return root


def drop_cache(folder):
    for p in folder.rglob("*.safetensors"):
        fd = os.open(p, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        x, y = a[name], b[name]
        if isinstance(x, PackedTensor):
            assert isinstance(y, PackedTensor) and x.qtype == y.qtype and torch.equal(x.blocks, y.blocks), name
        else:
            assert x.dtype == y.dtype and x.shape == y.shape and raw_bytes(x) == raw_bytes(y), name


@pytest.mark.parametrize(("bake", "kwargs"), [("lossless", {}), ("q8", {}), ("q8", {"quant": None}),
                                             ("q8", {"variant": "first1"})])
def test_eager_equals_mapped(bakes, bake, kwargs):
    mapped = load_from_manifest(bakes / bake, mode="mmap", **kwargs)
    eager = load_from_manifest(bakes / bake, mode="eager", **kwargs)
    same(mapped, eager)
    assert mapped.report.mode == "mmap" and eager.report.mode == "eager"
    assert eager.report.bytes >= sum(t.nbytes for t in read_manifest(bakes / bake).tensors.values()
                                     if not kwargs.get("variant")) * 0.5


def test_eager_of_a_component(tmp_path, bakes):
    (tmp_path / "src" / "a").mkdir(parents=True)
    shutil.copy(bakes / "big.bin", tmp_path / "src" / "a" / "pytorch_model.bin")
    convert(tmp_path / "src", tmp_path / "out")
    same(load_from_manifest(tmp_path / "out", component="a", mode="mmap"),
         load_from_manifest(tmp_path / "out", component="a", mode="eager"))


def test_eager_tensors_outlive_the_files(tmp_path, bakes):
    shutil.copytree(bakes / "lossless", tmp_path / "bake")
    mapped = {k: v.clone() for k, v in load_from_manifest(tmp_path / "bake").items()}
    eager = load_from_manifest(tmp_path / "bake", mode="eager")
    shutil.rmtree(tmp_path / "bake")
    same(mapped, eager)
    eager["layers.0.w"].add_(1)  # memory of our own, writable


def test_verify_names_a_flipped_byte(tmp_path, bakes):
    shutil.copytree(bakes / "lossless", tmp_path / "bake")
    m = read_manifest(tmp_path / "bake")
    t = m.tensors["layers.0.w"]
    with open(tmp_path / "bake" / m.shards[t.shard].file, "r+b") as f:
        f.seek(t.offset + t.nbytes // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(VerifyError, match="layers.0.w"):
        load_from_manifest(tmp_path / "bake", verify=True)
    ok = load_from_manifest(bakes / "lossless", verify=True)
    assert ok.report.mode == "eager" and ok.report.verified == len(m.tensors)


def test_o_direct_is_used_for_bytes_not_in_the_page_cache(tmp_path, bakes):
    shutil.copytree(bakes / "lossless", tmp_path / "bake")
    drop_cache(tmp_path / "bake")
    cold = load_from_manifest(tmp_path / "bake", mode="eager")
    assert cold.report.direct, cold.report
    warm = load_from_manifest(tmp_path / "bake", mode="eager")  # cached now? O_DIRECT left them out:
    assert warm.report.mode == "eager"  # either way the same bytes
    same(cold, warm)


@pytest.mark.parametrize("where", ["open", "read"])
def test_a_filesystem_that_refuses_o_direct_falls_back(tmp_path, bakes, monkeypatch, where):
    import prebake.cache.reader as reader

    shutil.copytree(bakes / "lossless", tmp_path / "bake")
    drop_cache(tmp_path / "bake")
    real_open, real_preadv, direct_fds = os.open, os.preadv, set()

    def refusing_open(path, flags, *args):
        if flags & os.O_DIRECT and where == "open":
            raise OSError(errno.EINVAL, "Invalid argument")
        fd = real_open(path, flags, *args)
        if flags & os.O_DIRECT:
            direct_fds.add(fd)
        return fd

    def refusing_preadv(fd, buffers, offset):
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(reader.os, "open", refusing_open)
    monkeypatch.setattr(reader.os, "preadv", refusing_preadv)
    got = load_from_manifest(tmp_path / "bake", mode="eager")
    assert not got.report.direct and any("O_DIRECT" in n for n in got.report.notes)
    same(load_from_manifest(bakes / "lossless", mode="mmap"), got)


def test_a_bake_on_a_network_filesystem_loads_eagerly(bakes, monkeypatch):
    import prebake.cache.mounts as mounts

    monkeypatch.setattr(mounts, "network_filesystem", lambda path: "nfs4")
    got = load_from_manifest(bakes / "lossless")
    assert got.report.mode == "eager" and "nfs4" in got.report.notes[0]


def test_network_filesystem_reads_mountinfo(tmp_path):
    from prebake.cache.mounts import network_filesystem

    assert network_filesystem(tmp_path) is None  # a local disk


@cuda
def test_gpu_load_is_byte_equal_and_keeps_aliases_tied(bakes):
    for name in ("lossless", "q8"):
        cpu = load_from_manifest(bakes / name, mode="mmap")
        gpu = load_from_manifest(bakes / name, device="cuda")
        assert gpu.report.mode == "cuda"
        for k, v in gpu.items():
            if isinstance(v, PackedTensor):
                assert v.blocks.is_cuda and torch.equal(v.blocks.cpu(), cpu[k].blocks)
            else:
                assert v.is_cuda and raw_bytes(v) == raw_bytes(cpu[k]), k
    tied = load_from_manifest(bakes / "q8", device="cuda")
    assert tied["lm_head.weight"].data_ptr() == tied["model.embed_tokens.weight"].data_ptr()


@cuda
def test_gpu_loads_do_not_grow_pinned_memory(bakes):
    import prebake.cache.staged as staged

    load_from_manifest(bakes / "lossless", device="cuda", verify=True)
    rings = {k: [slot[0].data_ptr() for slot in ring] for k, ring in staged._rings.items()}
    for _ in range(3):
        load_from_manifest(bakes / "lossless", device="cuda", verify=True)
    assert {k: [slot[0].data_ptr() for slot in ring] for k, ring in staged._rings.items()} == rings
