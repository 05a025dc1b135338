"""numba's kernel cache is dropped when what the kernels were compiled from changes (formats/jit_cache.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("numba")

from prebake.formats import jit_cache  # noqa: E402


def _cache_files(folder):
    names = ["quants_jit.quantize_q8_0-134.py311.nbi", "quants_jit.quantize_q8_0-134.py311.1.nbc",
             "quants_k_jit.q4_k_rows-40.py311.nbi", "elsewhere.kernel-1.py311.nbi"]
    for name in names:
        (folder / name).write_bytes(b"cached")
    return names


def test_a_changed_fingerprint_drops_the_kernels_cache_and_only_it(tmp_path):
    names = _cache_files(tmp_path)
    (tmp_path / jit_cache.STAMP).write_text("compiled from other sources")
    assert jit_cache.drop_stale(tmp_path, "now")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names[-1], jit_cache.STAMP])
    assert (tmp_path / jit_cache.STAMP).read_text() == "now"
    _cache_files(tmp_path)  # compiled again under the new stamp: kept from now on
    assert not jit_cache.drop_stale(tmp_path, "now")
    assert all((tmp_path / n).exists() for n in names)


def test_cache_files_without_a_stamp_are_dropped(tmp_path):
    _cache_files(tmp_path)
    assert jit_cache.drop_stale(tmp_path, "now")
    assert not list(tmp_path.glob("quants_jit.*"))


def test_the_fingerprint_follows_the_flags_and_the_sources(monkeypatch, tmp_path):
    from prebake.formats.jit_bits import JIT

    base = jit_cache.fingerprint(JIT)
    assert base == jit_cache.fingerprint(dict(JIT))
    assert jit_cache.fingerprint({**JIT, "nogil": False}) != base  # the change numba's own cache missed
    for name in jit_cache.SOURCES:
        (tmp_path / f"{name}.py").write_bytes((jit_cache.HERE / f"{name}.py").read_bytes())
    monkeypatch.setattr(jit_cache, "HERE", tmp_path)
    assert jit_cache.fingerprint(JIT) == base
    with open(tmp_path / "jit_bits.py", "a") as f:
        f.write("\n# an intrinsic changed\n")
    assert jit_cache.fingerprint(JIT) != base


def test_importing_the_kernels_stamps_numbas_cache_folders(monkeypatch, tmp_path):
    from prebake.formats.jit_bits import JIT

    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    folders = jit_cache.cache_dirs()
    assert folders[0] == jit_cache.HERE / "__pycache__" and folders[1].parent == tmp_path
    jit_cache.check(JIT)
    assert (folders[1] / jit_cache.STAMP).read_text() == jit_cache.fingerprint(JIT)
