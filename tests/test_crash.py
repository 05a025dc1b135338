"""Killed at any moment, a write leaves the old output or the new one, never neither, never debris.

Each step of the swap into place has a fault point (``PREBAKE_KILL_AT``) where the process
SIGKILLs itself; the tests kill ``convert``, ``pack``, ``unpack`` and ``variant add`` there, and
at random moments, then check that OUT holds a whole bake (old or new) and that the next run
leaves no hidden ``.OUT.prebake-*`` entry behind. SIGTERM, what ``kill`` and ``timeout`` send,
is handled like Ctrl-C.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from prebake.formats.integrity import verify
from prebake.formats.manifest import read_manifest

from tests.test_bad_input import save_torch


def prebake(*args, env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "prebake.convert", *map(str, args), "-q"],
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            **kwargs)


def run(*args, env: dict | None = None) -> int:
    p = prebake(*args, env=env)
    p.communicate(timeout=120)
    return p.returncode


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".prebake-" in p.name)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("crash")
    torch.manual_seed(0)
    old = save_torch(tmp / "old.bin", {f"layers.{i}.w": torch.randn(256, 256) for i in range(4)})
    new = save_torch(tmp / "new.bin", {f"layers.{i}.w": torch.randn(256, 256) for i in range(6)})
    return old, new


def bake_of(out: Path) -> str:
    """Which source the whole, verified bake at ``out`` was made from."""
    verify(out)
    return Path(read_manifest(out).source["path"]).name


FAULTS = [("commit:exchange", {}), ("commit:remove-old", {}), ("commit:set-aside", {"PREBAKE_NO_EXCHANGE": "1"})]


@pytest.mark.parametrize(("point", "env"), FAULTS, ids=[f[0] for f in FAULTS])
def test_convert_killed_at_each_step_of_the_swap(tmp_path, sources, point, env):
    old, new = sources
    out = tmp_path / "out"
    assert run("convert", old, out) == 0
    assert run("convert", new, out, env={"PREBAKE_KILL_AT": point, **env}) == -signal.SIGKILL
    assert (out / "manifest.json").exists() or point == "commit:set-aside"
    assert run("convert", new, tmp_path / "other") == 0  # another output does not clean this one's debris
    assert hidden(tmp_path)  # something was left by the kill ...
    assert run("convert", old, out) == 0  # ... and the next conversion into OUT clears it
    assert hidden(tmp_path) == [] and bake_of(out) == "old.bin"


@pytest.mark.parametrize(("point", "env"), FAULTS, ids=[f[0] for f in FAULTS])
def test_kill_leaves_the_old_bake_or_the_new_one(tmp_path, sources, point, env):
    old, new = sources
    out = tmp_path / "out"
    assert run("convert", old, out) == 0
    run("convert", new, out, env={"PREBAKE_KILL_AT": point, **env})
    if point == "commit:set-aside":  # two renames: the old bake waits aside, put back by the next run
        assert not out.exists() and hidden(tmp_path)
        from prebake.convert.output import remove_stale

        remove_stale(out)
    assert bake_of(out) == ("new.bin" if point == "commit:remove-old" else "old.bin")


def test_unpack_and_pack_killed_in_the_swap(tmp_path, sources):
    old, new = sources
    out, archive = tmp_path / "out", tmp_path / "a.pbk"
    assert run("convert", new, tmp_path / "src-bake") == 0
    assert run("pack", tmp_path / "src-bake", archive) == 0
    assert run("convert", old, out) == 0
    assert run("unpack", archive, out, env={"PREBAKE_KILL_AT": "commit:exchange"}) == -signal.SIGKILL
    assert bake_of(out) == "old.bin"
    assert run("unpack", archive, out, env={"PREBAKE_KILL_AT": "commit:remove-old"}) == -signal.SIGKILL
    assert bake_of(out) == "new.bin"
    before = archive.read_bytes()
    assert run("pack", out, archive, "--level", "1", env={"PREBAKE_KILL_AT": "replace-file"}) == -signal.SIGKILL
    assert archive.read_bytes() == before and hidden(tmp_path)
    assert run("pack", out, archive) == 0 and run("unpack", archive, out) == 0
    assert hidden(tmp_path) == [] and bake_of(out) == "new.bin"


def test_variant_add_killed_before_the_manifest_is_replaced(tmp_path, sources):
    old, _ = sources
    out = tmp_path / "out"
    assert run("convert", old, out) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert run("variant", "add", out, "v=first=1", env={"PREBAKE_KILL_AT": "replace-file"}) == -signal.SIGKILL
    assert read_manifest(out).variants == {} and hidden(out)
    assert run("variant", "add", out, "v=first=1") == 0
    assert hidden(out) == [] and "v" in read_manifest(out).variants
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert {k: v for k, v in after.items() if k != "manifest.json"} == \
        {k: v for k, v in before.items() if k != "manifest.json"}  # the bake's own files untouched


def test_random_kills_always_leave_a_whole_bake(tmp_path, sources):
    old, new = sources
    out = tmp_path / "out"
    assert run("convert", old, out) == 0
    rng = random.Random(0)
    for _ in range(6):
        p = prebake("convert", new if rng.random() < 0.5 else old, out, "--force")
        time.sleep(rng.uniform(0.2, 1.2))
        p.send_signal(rng.choice([signal.SIGKILL, signal.SIGTERM]))
        p.communicate(timeout=120)
        assert bake_of(out) in ("old.bin", "new.bin")
    assert run("convert", old, out) == 0
    assert hidden(tmp_path) == []


def test_sigterm_at_random_moments_leaves_nothing(tmp_path):
    src = save_torch(tmp_path / "big.bin", {f"w{i}": torch.randn(4096, 1024) for i in range(24)})  # 384 MiB
    out = tmp_path / "out"
    rng = random.Random(1)
    interrupted = 0
    for _ in range(4):
        p = prebake("convert", src, out, "--dtype", "bfloat16")  # a cast: slow enough to catch mid-way
        while p.poll() is None and not hidden(tmp_path):
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.5))
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=120)
        if p.returncode == 0:
            continue
        interrupted += 1
        assert p.returncode == 128 + signal.SIGTERM, err
        assert err.count(b"\n") == 1 and b"interrupted (SIGTERM)" in err, err
        assert not out.exists() and hidden(tmp_path) == []
    assert interrupted >= 2
