"""load_from_manifest: zero-copy views of shared, private memory maps; subsets map nothing else."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from prebake.cache.load import load_from_manifest
from prebake.convert.bake import convert
from prebake.convert.plan import Options
from prebake.formats.integrity import verify
from prebake.formats.manifest import read_manifest
from safetensors.torch import save_file

MIB = 1 << 20


def mappings(path_part: str) -> list[tuple[int, int, str]]:
    """(start, end, file) of this process's memory mappings whose file path contains ``path_part``."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and path_part in fields[5]:
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                out.append((lo, hi, fields[5]))
    return out


def rss_mib() -> dict[str, float]:
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) / 1024 for k, v in (line.split(":") for line in f) if k.startswith("Rss")}


@pytest.fixture(scope="module")
def bake(tmp_path_factory):
    """A 64 MiB float32 model in 4 shards."""
    tmp = tmp_path_factory.mktemp("load")
    g = torch.Generator().manual_seed(0)
    sd = {"embed.weight": torch.randn(512, 1024, generator=g)}
    for i in range(7):
        sd[f"layers.{i}.w"] = torch.randn(2048, 1024, generator=g)
        sd[f"layers.{i}.norm"] = torch.randn(1024, generator=g)
    sd["head.weight"] = sd["embed.weight"]
    torch.save(sd, tmp / "model.bin")
    convert(tmp / "model.bin", tmp / "out", Options(shard_size=20 * MIB))
    return tmp / "out", sd


def test_every_tensor_is_a_view_into_its_shard_mapping(bake):
    out, sd = bake
    loaded = load_from_manifest(out)
    maps = mappings(str(out))
    m = read_manifest(out)
    assert len(m.shards) >= 3 and {f for *_, f in maps} == {str(out / s.file) for s in m.shards}
    for name, t in loaded.items():
        shard = out / m.shards[m.tensors[m.aliases[name].target if name in m.aliases else name].shard].file
        ptr = t.data_ptr()
        assert any(lo <= ptr and ptr + t.nbytes <= hi for lo, hi, f in maps if f == str(shard)), name
        assert torch.equal(t, sd[name])
    assert loaded["head.weight"].data_ptr() == loaded["embed.weight"].data_ptr()


def mapped_resident(path_part: str, field: str = "Rss") -> int:
    """Bytes of ``field`` (Rss, Shared_Clean, ...) in this process's mappings of files under ``path_part``."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and ":" not in head[0]:  # a mapping's first line
                inside = len(head) >= 6 and path_part in head[5]
            elif inside and line.startswith(field + ":"):
                total += int(head[1]) * 1024
    return total


def test_loading_reads_nothing_until_touched(bake):
    # A fresh process, so the counters see only this load. Measured on the bake's own mappings
    # (code pages of libraries touched for the first time are not the model).
    out, _ = bake
    code = textwrap.dedent(f"""
        import torch
        from prebake.cache.load import load_from_manifest
        from tests.test_load import mapped_resident, rss_mib
        sd = load_from_manifest({str(out)!r})
        loaded, anon = mapped_resident({str(out)!r}), rss_mib()["RssAnon"]
        total = sum(t.nbytes for k, t in sd.items() if k != "head.weight")
        for t in sd.values():
            t.sum()
        print(loaded, mapped_resident({str(out)!r}), anon, rss_mib()["RssAnon"], total)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded, touched, anon1, anon2, total = map(float, res.stdout.split())
    assert loaded < 1 << 20, "mapping the bake read its pages"
    assert touched > 0.95 * total, "touching every tensor should fault in the whole model"
    assert anon2 - anon1 < 0.1 * total / 2**20, "touching copied tensors into anonymous memory"


def test_pages_are_shared_between_processes(bake):
    out, _ = bake
    child = textwrap.dedent(f"""
        import sys
        from prebake.cache.load import load_from_manifest
        sd = load_from_manifest({str(out)!r})
        for t in sd.values():
            t.sum()
        print("ready", flush=True)
        sys.stdin.read()
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        sd = load_from_manifest(out)
        for t in sd.values():
            t.sum()
        shared = mapped_resident(str(out), "Shared_Clean")
        total = sum(t.nbytes for k, t in sd.items() if k != "head.weight")
        assert shared > 0.9 * total
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def test_writes_stay_private_and_the_bake_never_changes(bake):
    out, sd = bake
    loaded = load_from_manifest(out)
    loaded["layers.0.w"].mul_(0)  # copy-on-write: this process only
    again = load_from_manifest(out)
    assert torch.equal(again["layers.0.w"], sd["layers.0.w"])
    verify(out)


def test_subset_maps_only_the_shards_it_needs(bake):
    out, sd = bake
    m = read_manifest(out)
    code = textwrap.dedent(f"""
        from prebake.cache.load import load_from_manifest
        from tests.test_load import mappings
        sd = load_from_manifest({str(out)!r}, names=lambda n: n.startswith("layers.6."))
        print(sorted(sd), sorted({{f for *_, f in mappings({str(out)!r})}}))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    names, files = res.stdout.strip().split("] [")
    assert names == "['layers.6.norm', 'layers.6.w'"
    expected = {str(out / m.shards[m.tensors[n].shard].file) for n in ("layers.6.w", "layers.6.norm")}
    assert eval("[" + files) == sorted(expected) and len(expected) < len(m.shards)
    loaded = load_from_manifest(out, names=["layers.6.w"])
    assert list(loaded) == ["layers.6.w"] and torch.equal(loaded["layers.6.w"], sd["layers.6.w"])


def test_alias_alone_loads_its_target_view(bake):
    out, sd = bake
    loaded = load_from_manifest(out, names=["head.weight"])
    assert list(loaded) == ["head.weight"] and torch.equal(loaded["head.weight"], sd["embed.weight"])


def test_unknown_name_is_a_clear_error(bake):
    with pytest.raises(KeyError, match="not in the bake"):
        load_from_manifest(bake[0], names=["nope"])


def test_other_device_copies_once_and_keeps_ties(bake):
    out, _ = bake
    loaded = load_from_manifest(out, device="meta")
    assert all(t.is_meta for t in loaded.values())
    assert loaded["head.weight"].untyped_storage() is not None


def test_safetensors_source_round_trip(tmp):
    sd = {"a": torch.randn(300, 1000), "b": torch.arange(7, dtype=torch.int16)}
    save_file(sd, str(tmp / "m.safetensors"), metadata={"k": "v"})
    m = convert(tmp / "m.safetensors", tmp / "out")
    from tests.conftest import check_bake

    check_bake(tmp / "out", sd)
    assert m.metadata["safetensors"] == {"k": "v"}
    assert verify(tmp / "out").tensors == 2


def test_views_made_in_bulk_are_the_tensors(tmp_path):
    """A MoE's experts (runs of one shape a fixed step apart) come from one as_strided and an unbind:
    each must be exactly its own tensor, contiguous, a view of the map."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    sd = {}
    for e in range(9):
        sd[f"layers.0.experts.{e}.w1.weight"] = torch.randn(8, 16)
        sd[f"layers.0.experts.{e}.w2.weight"] = torch.randn(16, 8)
        if e % 3 == 0:  # breaks the step now and then
            sd[f"layers.0.experts.{e}.extra"] = torch.randn(3)
    save_file(sd, str(tmp_path / "moe.safetensors"))
    convert(tmp_path / "moe.safetensors", tmp_path / "out")
    got = load_from_manifest(tmp_path / "out")
    ref = load_file(str(tmp_path / "moe.safetensors"))
    assert list(got) == list(read_manifest(tmp_path / "out").tensors)  # execution order kept
    for name, t in ref.items():
        assert torch.equal(got[name], t) and got[name].is_contiguous(), name
