"""pack / unpack: byte-identical round trips, chunk plans, and damaged archives named and refused."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from prebake.convert.bake import convert
from prebake.convert.pack import SMALL, pack, plan_archive, plan_file, unpack, unpack_from
from prebake.convert.plan import Options
from prebake.formats.archive import (
    CHUNK_SIZE,
    LAYOUTS,
    ArchiveFile,
    ArchiveIndex,
    Chunk,
    header,
    merge,
    read_index,
    split,
)
from prebake.formats.errors import FormatError, OutputError, VerifyError
from safetensors.torch import save_file

from tests.conftest import check_bake

MIB = 1 << 20


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def w(*shape, dtype):
        return (torch.randn(*shape, generator=g) * 0.02).to(dtype)

    return {"big.bf16": w(1536, 1536, dtype=torch.bfloat16),  # 4.5 MiB: two chunks
            "attn.bf16": w(256, 512, dtype=torch.bfloat16), "proj.f16": w(300, 257, dtype=torch.float16),
            "head.f32": w(200, 300, dtype=torch.float32), "norm.bf16": torch.ones(64, dtype=torch.bfloat16),
            "ids.i64": torch.arange(20000), "mask.bool": torch.rand(5000, generator=g) > 0.5,
            "scale.f64": torch.randn(9000, generator=g, dtype=torch.float64)}


def make_bake(folder: Path, shard_size: int | None = None) -> Path:
    src = folder / "src"
    src.mkdir(parents=True)
    save_file(tensors(), src / "model.safetensors")
    (src / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 1536}))
    options = Options(shard_size=shard_size) if shard_size else Options()
    convert(src, folder / "bake", options)
    return folder / "bake"


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(out: Path) -> list[Path]:
    return [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("archive")
    bake = make_bake(folder)
    pack(bake, folder / "model.pbk")
    return bake, folder / "model.pbk"


# --- plans and planes, no disk ------------------------------------------------------------------

def test_plan_types_runs_and_cuts_at_element_boundaries():
    spans = [(4096, 5 * MIB + 2, "planes2"), (4096 + 5 * MIB + 2 + 6, 20 * 4096, "planes4"),
             (6 * MIB, 100, "planes2")]  # the last is small: plain bytes
    chunks = plan_file(3, 7 * MIB, spans)
    assert [c.offset for c in chunks][:1] == [0] and all(c.file == 3 for c in chunks)
    assert all(a.offset + a.length == b.offset for a, b in zip(chunks, chunks[1:], strict=False))
    assert chunks[-1].offset + chunks[-1].length == 7 * MIB
    assert [c.layout for c in chunks] == ["bytes", "planes2", "planes2", "planes4", "bytes"]
    first, second = chunks[1:3]
    assert first.offset == 4096 and first.length % 2 == 0 and first.length <= CHUNK_SIZE
    assert second.length == 5 * MIB + 2 + 6 - first.length  # the 6-byte gap joins the bf16 run
    assert chunks[3].offset == 4096 + 5 * MIB + 8 and chunks[3].length == 20 * 4096


def test_plan_archive_types_every_float_tensor(packed):
    bake, _ = packed
    index = plan_archive(bake)
    assert [f.path for f in index.files] == sorted(f.path for f in index.files)
    assert {"config.json", "manifest.json", "model.safetensors"} <= {f.path for f in index.files}
    from prebake.formats.manifest import read_manifest

    m = read_manifest(bake)
    shard = [f.path for f in index.files].index(m.shards[0].file)
    planar = [c for c in index.chunks if c.file == shard and c.layout != "bytes"]
    assert {c.layout for c in planar} == {"planes2", "planes4", "planes8"}
    for name, t in m.tensors.items():
        if t.nbytes < SMALL or t.dtype in ("I64", "BOOL"):
            continue
        inside = [c for c in planar if c.offset < t.offset + t.nbytes and t.offset < c.offset + c.length]
        assert inside, name
        assert all((c.offset - t.offset) % LAYOUTS[c.layout].itemsize == 0 for c in inside), name


@pytest.mark.parametrize("layout", ["bytes", "planes2", "planes4", "planes8"])
def test_split_then_merge_is_identity(layout):
    raw = np.random.default_rng(1).integers(0, 256, 4096 * 8, dtype=np.uint8)
    planes = split(raw, LAYOUTS[layout], np.empty_like(raw)).copy()
    out = np.empty_like(raw)
    merge(planes, LAYOUTS[layout], out)
    assert np.array_equal(out, raw)


def test_bf16_planes_are_exponent_and_sign_mantissa():
    x = torch.tensor([1.0, -2.0], dtype=torch.bfloat16).view(torch.uint16).numpy().view(np.uint8)
    lo, hi = split(x, LAYOUTS["planes2"], np.empty_like(x)).reshape(2, -1)
    assert list(hi) == [127, 128] and list(lo) == [0, 1]  # biased exponents; sign at the bottom


# --- round trips --------------------------------------------------------------------------------

def test_round_trip_is_byte_identical(packed, tmp):
    bake, archive = packed
    out = unpack(archive, tmp / "out")
    assert tree(out) == tree(bake)
    assert "config.json" in tree(out)
    check_bake(out, tensors())
    assert not leftovers(out)


def test_sharded_bake_round_trip(tmp):
    bake = make_bake(tmp, shard_size=3 * MIB)
    from prebake.formats.manifest import read_manifest

    assert len(read_manifest(bake).shards) >= 3
    (bake / "empty.txt").write_bytes(b"")  # every file goes in, even those the manifest does not know
    (bake / "extra").mkdir()
    (bake / "extra" / "notes.md").write_text("kept")
    seen = []
    report = pack(bake, tmp / "a.pbk", progress=lambda total: seen.append(total) or seen.append)
    assert report.files == len(tree(bake)) and report.archive_bytes == (tmp / "a.pbk").stat().st_size
    assert report.ratio < 0.9 and seen[0] == sum(seen[1:]) == report.raw_bytes
    unpack(tmp / "a.pbk", tmp / "out")
    assert tree(tmp / "out") == tree(bake)


def test_parallel_unpack_equals_serial_and_pack_is_deterministic(packed, tmp):
    bake, archive = packed
    pack(bake, tmp / "serial.pbk", threads=1)
    assert (tmp / "serial.pbk").read_bytes() == archive.read_bytes()
    unpack(archive, tmp / "one", threads=1)
    unpack(archive, tmp / "two", threads=2)
    assert tree(tmp / "one") == tree(tmp / "two") == tree(bake)


def test_unpack_from_a_stream_that_only_reads(packed, tmp):
    bake, archive = packed

    class Stream:  # no seek, no readinto, short reads
        def __init__(self, data: bytes):
            self.data, self.pos = data, 0

        def read(self, n: int) -> bytes:
            n = min(n, 100_000)
            self.pos += n
            return self.data[self.pos - n:self.pos]

    seen = []
    unpack_from(Stream(archive.read_bytes()), tmp / "out", progress=lambda total: seen.append(total) or seen.append)
    assert tree(tmp / "out") == tree(bake)
    assert seen[0] == sum(seen[1:]) == sum(len(b) for b in tree(bake).values())


# --- damage, refusal ----------------------------------------------------------------------------

def damaged(archive: Path, tmp: Path, where) -> tuple[Path, str]:
    with open(archive, "rb") as f:
        index = read_index(f, str(archive))
    i = next(i for i, c in enumerate(index.chunks) if c.layout == "planes2")
    c = index.chunks[i]
    data = bytearray(archive.read_bytes())
    pos = index.starts[i] + where(c.frames)
    data[pos] ^= 0x5A
    (tmp / "bad.pbk").write_bytes(data)
    return tmp / "bad.pbk", f"{index.files[c.file].path}[{c.offset}:{c.offset + c.length}]"


@pytest.mark.parametrize("where", [lambda f: f[0] // 2, lambda f: f[0] + f[1] // 2],
                         ids=["sign-mantissa plane", "exponent plane"])
def test_damaged_chunk_is_named_and_leaves_the_old_bake(packed, tmp, where):
    bake, archive = packed
    bad, label = damaged(archive, tmp, where)
    out = tmp / "out"
    unpack(archive, out)  # a finished bake is there already
    before = tree(out)
    with pytest.raises(VerifyError) as e:
        unpack(bad, out, threads=2)
    assert label in str(e.value) and str(bad) in str(e.value) and "damaged" in str(e.value)
    assert tree(out) == before and not leftovers(out)


def test_truncated_archive_is_named(packed, tmp):
    _, archive = packed
    data = archive.read_bytes()
    for cut in (len(data) // 2, 30, len(data) - 1):
        (tmp / "cut.pbk").write_bytes(data[:cut])
        with pytest.raises(FormatError, match="truncated"):
            unpack(tmp / "cut.pbk", tmp / "out")  # its size is known up front
        with pytest.raises(FormatError, match="truncated") as e:
            unpack_from(io.BytesIO(data[:cut]), tmp / "out")  # found when the stream runs dry
        if cut > 1000:
            assert f"it ends at byte {cut}, inside chunk" in str(e.value)
        assert not (tmp / "out").exists() and not leftovers(tmp / "out")


def test_trailing_bytes_are_refused(packed, tmp):
    _, archive = packed
    (tmp / "long.pbk").write_bytes(archive.read_bytes() + b"x")
    with pytest.raises(FormatError, match="after its last chunk"):
        unpack(tmp / "long.pbk", tmp / "out")
    assert not (tmp / "out").exists()


@pytest.mark.parametrize("content", [b"", b"PBK", b'{"not": "an archive"}' * 10])
def test_non_archive_is_refused(packed, tmp, content):
    bake, _ = packed
    (tmp / "x.pbk").write_bytes(content)
    with pytest.raises(FormatError, match="not a prebake archive"):
        unpack(tmp / "x.pbk", tmp / "out")
    with pytest.raises(FormatError, match="not a prebake archive"):
        unpack(bake / "model.safetensors", tmp / "out")
    assert not (tmp / "out").exists()


def test_damaged_index_is_refused(packed, tmp):
    _, archive = packed
    data = bytearray(archive.read_bytes())
    data[60] ^= 1
    (tmp / "x.pbk").write_bytes(data)
    with pytest.raises(VerifyError, match="index is damaged"):
        unpack(tmp / "x.pbk", tmp / "out")


@pytest.mark.parametrize("path", ["../evil", "/etc/evil", "a/../../evil", "./a", ""])
def test_paths_outside_the_bake_are_refused(tmp, path):
    index = ArchiveIndex([ArchiveFile(path, 0)], [])
    index.size = 40 + len(index.to_json())
    body = index.to_json()
    (tmp / "x.pbk").write_bytes(header(body) + body)
    with pytest.raises(FormatError, match="path"):
        unpack(tmp / "x.pbk", tmp / "sub" / "out")
    assert not (tmp / "evil").exists() and not (tmp / "sub" / "out").exists()


def test_chunks_must_cover_each_file(tmp):
    index = ArchiveIndex([ArchiveFile("a", 10)], [Chunk(0, 0, 5, "bytes", [0], "0" * 32)])
    index.size = 40 + len(index.to_json())
    body = index.to_json()
    (tmp / "x.pbk").write_bytes(header(body) + body)
    with pytest.raises(FormatError, match="cover 5 of the 10 bytes of a"):
        unpack(tmp / "x.pbk", tmp / "out")


def test_unpack_refuses_a_folder_of_other_files_unless_forced(packed, tmp):
    bake, archive = packed
    out = tmp / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not a prebake output"):
        unpack(archive, out)
    assert (out / "notes.txt").read_text() == "mine"
    unpack(archive, out, force=True)
    assert tree(out) == tree(bake)


def test_pack_refuses_to_replace_a_file_that_is_not_an_archive(packed, tmp):
    bake, archive = packed
    (tmp / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="not a prebake archive"):
        pack(bake, tmp / "keep.txt")
    assert (tmp / "keep.txt").read_text() == "mine"
    pack(bake, tmp / "keep.txt", force=True)
    pack(bake, tmp / "keep.txt")  # an archive may be replaced
    assert (tmp / "keep.txt").read_bytes() == archive.read_bytes()
    assert [p.name for p in tmp.iterdir()] == ["keep.txt"]


def test_pack_refuses_a_folder_that_is_not_a_bake(tmp):
    from prebake.formats.errors import ManifestError

    (tmp / "x").mkdir()
    with pytest.raises(ManifestError):
        pack(tmp / "x", tmp / "x.pbk")
    assert not (tmp / "x.pbk").exists()


def test_a_killed_packs_leftover_is_removed_by_the_next_pack(tmp_path):
    import os
    import subprocess
    import sys

    from prebake.convert.bake import convert
    from prebake.convert.pack import pack

    torch.save({"w": torch.randn(64, 64)}, tmp_path / "m.bin")
    convert(tmp_path / "m.bin", tmp_path / "bake")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f".a.pba.prebake-tmp-{dead.stdout.strip()}"
    leftover.write_bytes(b"half an archive")
    running = tmp_path / f".a.pba.prebake-tmp-{os.getppid()}"  # another pack still at work: left alone
    running.write_bytes(b"being written")
    pack(tmp_path / "bake", tmp_path / "a.pba")
    assert not leftover.exists() and running.exists() and (tmp_path / "a.pba").exists()
