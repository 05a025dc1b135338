"""The local cache (ensure: convert once, reuse, never stale) and prefetch."""

from __future__ import annotations

import ctypes
import gc as pygc
import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from prebake.cache import load_from_manifest, verify
from prebake.cache.prefetch import Prefetcher, bake_ranges, coalesce
from prebake.cache.store import _ensure, entries, gc, remove
from prebake.formats.manifest import read_manifest


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("PREBAKE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def save(path, n=4, size=256):
    g = torch.Generator().manual_seed(n)
    sd = {f"layers.{i}.w": torch.randn(size, size, generator=g) for i in range(n)}
    torch.save(sd, path)
    return sd


def test_first_use_converts_then_reuses(tmp_path, root):
    sd = save(tmp_path / "m.bin")
    path, converted = _ensure(tmp_path / "m.bin")
    assert converted and path.parent == root
    again, converted = _ensure(tmp_path / "m.bin")
    assert again == path and not converted
    loaded = load_from_manifest(path)
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())


def test_options_are_part_of_the_key(tmp_path, root):
    save(tmp_path / "m.bin")
    plain, _ = _ensure(tmp_path / "m.bin")
    bf16, converted = _ensure(tmp_path / "m.bin", dtype="BF16")
    assert converted and bf16 != plain
    assert read_manifest(bf16).tensors["layers.0.w"].dtype == "BF16"
    assert _ensure(tmp_path / "m.bin", dtype="BF16") == (bf16, False)


def test_a_changed_source_is_rebaked_never_served_stale(tmp_path, root):
    save(tmp_path / "m.bin", n=2)
    old, _ = _ensure(tmp_path / "m.bin")
    time.sleep(0.01)
    sd = save(tmp_path / "m.bin", n=3)
    new, converted = _ensure(tmp_path / "m.bin")
    assert converted and new != old
    assert set(load_from_manifest(new)) == set(sd)


def test_strict_catches_a_change_that_keeps_size_and_mtime(tmp_path, root):
    src = tmp_path / "m.bin"
    save(src, n=16, size=256)  # 4 MiB: the middle is not sampled
    st = src.stat()
    path, _ = _ensure(src, strict=True)
    data = bytearray(src.read_bytes())
    middle = len(data) // 2
    data[middle] ^= 0xFF
    src.write_bytes(bytes(data))
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _ensure(src)[0] == _ensure(src)[0]  # the sampled fingerprint cannot see it...
    assert _ensure(src, strict=True)[0] != path  # ...the full hash does


def test_two_processes_convert_once(tmp_path, root):
    save(tmp_path / "m.bin", n=8, size=512)
    code = textwrap.dedent(f"""
        import json, sys
        from prebake.cache.store import _ensure
        sys.stdin.readline()
        path, converted = _ensure({str(tmp_path / "m.bin")!r})
        print(json.dumps([str(path), converted]))
    """)
    env = {**os.environ, "PREBAKE_CACHE": str(root)}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    for p in procs:  # both ready (imports done): start together
        p.stdin.write("go\n")
        p.stdin.flush()
    results = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert results[0][0] == results[1][0]
    assert sorted(r[1] for r in results) == [False, True]
    verify(results[0][0])


def test_a_crash_mid_conversion_leaves_nothing_and_the_next_call_converts(tmp_path, root):
    save(tmp_path / "m.bin", n=8, size=512)
    code = textwrap.dedent(f"""
        import os
        from prebake.cache.store import _ensure
        def progress(total):
            def update(n):
                os._exit(3)  # killed half way: no cleanup runs
            return update
        _ensure({str(tmp_path / "m.bin")!r}, progress=progress)
    """)
    res = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PREBAKE_CACHE": str(root)})
    assert res.returncode == 3
    assert entries(root) == []
    path, converted = _ensure(tmp_path / "m.bin")
    assert converted
    verify(path)
    assert not [p for p in root.iterdir() if "prebake-tmp" in p.name]  # the dead run's folder is gone


def test_gc_keeps_the_most_recently_used(tmp_path, root):
    save(tmp_path / "m.bin")
    made = []
    for dtype in (None, "F16", "BF16"):
        opts = {"dtype": dtype} if dtype else {}
        made.append(_ensure(tmp_path / "m.bin", **opts)[0])
        time.sleep(0.02)
    _ensure(tmp_path / "m.bin")  # the first is now the most recent
    sizes = {e.path: e.bytes for e in entries(root)}
    removed = gc(sizes[made[0]] + 1, root)
    assert {e.path for e in removed} == set(made[1:])
    assert [e.path for e in entries(root)] == [made[0]]
    assert remove(made[0].name, root) and entries(root) == []


def test_cache_cli(tmp_path, root):
    save(tmp_path / "m.bin")
    path, _ = _ensure(tmp_path / "m.bin")
    env = {**os.environ, "PREBAKE_CACHE": str(root)}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "prebake.convert", *args], capture_output=True, text=True,
                              env=env)

    listed = json.loads(cli("cache", "ls", "--json").stdout)
    assert [e["key"] for e in listed["entries"]] == [path.name]
    assert cli("cache", "gc", "--max-size", "1GiB").returncode == 0 and path.exists()
    assert cli("cache", "rm", "nope").returncode == 2
    assert cli("cache", "rm", path.name).returncode == 0 and not path.exists()


# ---------------------------------------------------------------------------------------------
# prefetch

_libc = ctypes.CDLL(None, use_errno=True)
PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_fraction(path) -> float:
    """How much of a file is in the page cache (mincore over a fresh mapping)."""
    size = os.path.getsize(path)
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    pages = (size + PAGE - 1) // PAGE
    vec = (ctypes.c_ubyte * pages)()
    assert _libc.mincore(ctypes.c_void_p(storage.data_ptr()), ctypes.c_size_t(size), vec) == 0
    return sum(v & 1 for v in vec) / pages


def drop(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


@pytest.fixture
def bake(tmp_path):
    save(tmp_path / "m.bin", n=8, size=512)
    from prebake.convert.bake import convert

    convert(tmp_path / "m.bin", tmp_path / "out")
    return tmp_path / "out"


def prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "prebake-prefetch"]


def test_prefetch_reads_the_bake_into_the_page_cache(bake):
    shard = bake / read_manifest(bake).shards[0].file
    drop(shard)
    if resident_fraction(shard) > 0.5:
        pytest.skip("this filesystem keeps pages resident after POSIX_FADV_DONTNEED")
    sd = load_from_manifest(bake, prefetch=True)
    for t in prefetch_threads():
        t.join(30)
    assert resident_fraction(shard) > 0.95
    assert len(sd) == 8


def test_prefetch_stops_when_the_tensors_are_gone(bake):
    m = read_manifest(bake)
    owner = torch.empty(1)
    p = Prefetcher(bake_ranges(m) * 200, owners=[owner], block=4096)
    del owner
    pygc.collect()
    assert p.join(30)
    assert p.done_bytes < 200 * m.total_bytes


def test_prefetch_covers_only_the_wanted_tensors(bake):
    m = read_manifest(bake)
    t = m.tensors["layers.3.w"]
    ranges = coalesce([(t.shard, t.offset, t.nbytes)], m.shard_path)
    assert ranges == [(m.shard_path(t.shard), t.offset, t.offset + t.nbytes)]
    p = Prefetcher(ranges)
    assert p.join(30) and p.done_bytes == t.nbytes


def test_warm_cli(bake):
    res = subprocess.run([sys.executable, "-m", "prebake.convert", "warm", str(bake), "--json"],
                         capture_output=True, text=True, check=True)
    assert json.loads(res.stdout)["bytes"] == read_manifest(bake).total_bytes


def test_ensure_unpacks_an_archive_into_the_cache(tmp_path, root):
    from prebake.convert.bake import convert
    from prebake.convert.pack import pack

    sd = save(tmp_path / "m.bin")
    convert(tmp_path / "m.bin", tmp_path / "bake")
    pack(tmp_path / "bake", tmp_path / "m.pba")
    path, converted = _ensure(tmp_path / "m.pba")
    assert converted and path.parent == root
    assert {p.name: p.read_bytes() for p in path.iterdir()} == \
        {p.name: p.read_bytes() for p in (tmp_path / "bake").iterdir()}
    assert _ensure(tmp_path / "m.pba") == (path, False)
    assert all(torch.equal(load_from_manifest(path)[k], v) for k, v in sd.items())


def test_pack_and_unpack_on_the_command_line(bake, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "prebake.convert", *map(str, args)], capture_output=True,
                              text=True)

    res = cli("pack", bake, tmp_path / "a.pba", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["archive_bytes"] < json.loads(res.stdout)["raw_bytes"]
    assert cli("unpack", tmp_path / "a.pba", tmp_path / "back").returncode == 0
    assert cli("verify", tmp_path / "back").returncode == 0
    bad = tmp_path / "bad.pba"
    bad.write_bytes((tmp_path / "a.pba").read_bytes()[:-100])
    res = cli("unpack", bad, tmp_path / "never")
    assert res.returncode != 0 and res.stderr.startswith("prebake: error:") and "Traceback" not in res.stderr
    assert not (tmp_path / "never").exists()
