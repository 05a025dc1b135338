"""The ``prebake`` command line: help, ``--json`` results, shard size and alignment options,
both entry points, and a converter that never imports torch for a lossless bake."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from prebake.convert.cli import main
from prebake.formats.manifest import read_manifest
from safetensors.torch import save_file

from tests.conftest import check_bake

CONSOLE_SCRIPT = Path(sys.executable).parent / "prebake"
ENTRY_POINTS = {"console-script": [str(CONSOLE_SCRIPT)],
                "python-m": [sys.executable, "-m", "prebake.convert"]}


def run(*args: object, entry: str = "python-m") -> subprocess.CompletedProcess:
    return subprocess.run([*ENTRY_POINTS[entry], *map(str, args)], capture_output=True, text=True, timeout=120)


def run_json(capsys, *args: object) -> dict:
    """``main(ARGS + --json)`` in this process; its stdout must be one JSON document."""
    assert main([*map(str, args), "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"embed.weight": torch.randn(50, 16, generator=g), "norm.weight": torch.ones(16),
            "layer.0.weight": torch.randn(16, 16, generator=g).to(torch.bfloat16),
            "step": torch.tensor(7)}


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    path = tmp_path / "pytorch_model.bin"
    torch.save(state_dict(), path)
    return path


# ---------------------------------------------------------------------------------------------
# help

HELP = {
    (): ["convert", "inspect", "verify"],
    ("convert",): ["--shard-size", "--align", "--dtype", "--json", "--force", "--dry-run"],
    ("inspect",): ["--json", "--tensors"],
    ("verify",): ["--json"],
}


@pytest.mark.parametrize("command", HELP, ids=lambda c: " ".join(c) or "prebake")
def test_help(capsys, command):
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for word in HELP[command]:
        assert word in out, word


# ---------------------------------------------------------------------------------------------
# --json and --dry-run


def test_convert_inspect_verify_json(tmp_path, capsys, checkpoint):
    out = tmp_path / "out"
    result = run_json(capsys, "convert", checkpoint, out)
    m = read_manifest(out)
    assert result["tensors"] == len(m.tensors) == 4
    assert result["shards"] == len(m.shards) == 1
    assert result["bytes"] == m.total_bytes == sum(t.nbytes for t in m.tensors.values())
    assert Path(result["out"]) == out.resolve()

    info = run_json(capsys, "inspect", out, "--tensors")
    assert info["tensors"] == 4 and info["bytes"] == result["bytes"] and info["format"] == "torch-zip"
    assert [s["file"] for s in info["shards"]] == ["model.safetensors"]
    assert info["tensor_list"]["layer.0.weight"]["dtype"] == "BF16"
    assert info["skipped"] == []

    report = run_json(capsys, "verify", out)
    assert report == {"ok": True, "tensors": 4, "files": 0, "bytes": result["bytes"]}
    check_bake(out, state_dict())


def test_dry_run_json_writes_nothing(tmp_path, capsys, checkpoint):
    out = tmp_path / "out"
    plan = run_json(capsys, "convert", checkpoint, out, "--dry-run")
    assert sum(s["tensors"] for s in plan["shards"]) == 4
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint.name]


def test_json_error_is_json_too(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "missing.bin"), str(tmp_path / "out"), "--json"]) == 1
    captured = capsys.readouterr()
    assert "no such file" in json.loads(captured.out)["error"]
    assert captured.err.startswith("prebake: error:") and len(captured.err.splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# shard size and alignment


def test_shard_size(tmp_path, capsys):
    sd = {f"layer.{i}.weight": torch.full((100, 100), float(i)) for i in range(10)}  # 40 kB each
    sd["huge"] = torch.zeros(200, 200)  # 160 kB: more than a shard, alone in its own
    torch.save(sd, tmp_path / "model.bin")
    out = tmp_path / "out"
    result = run_json(capsys, "convert", tmp_path / "model.bin", out, "--shard-size", "100KB")
    m = read_manifest(out)
    assert result["shards"] == len(m.shards) >= 5
    biggest = max(t.nbytes for t in m.tensors.values())
    for index, shard in enumerate(m.shards):
        held = [t.nbytes for t in m.tensors.values() if t.shard == index]
        assert sum(held) <= 100_000 or len(held) == 1, (shard.file, held)
        assert sum(held) <= 100_000 + biggest
        assert shard.file == f"model-{index + 1:05d}-of-{len(m.shards):05d}.safetensors"
    check_bake(out, sd)


def test_align(tmp_path, capsys):
    sd = {"tiny": torch.ones(3), "big.0": torch.randn(300, 1024), "odd": torch.ones(5, dtype=torch.int8),
          "big.1": torch.randn(257, 1024)}  # the big ones are over 1 MiB
    save_file(sd, tmp_path / "model.safetensors")
    out = tmp_path / "out"
    run_json(capsys, "convert", tmp_path / "model.safetensors", out, "--align", "65536")
    m = read_manifest(out)
    assert m.options["align"] == 65536
    assert m.tensors["big.0"].offset % 65536 == 0 and m.tensors["big.1"].offset % 65536 == 0
    check_bake(out, sd)  # checks the alignment rule for every tensor


@pytest.mark.parametrize("args", [["--align", "1000"], ["--align", "4"], ["--shard-size", "0"]],
                         ids=["align-1000", "align-4", "shard-size-0"])
def test_invalid_option_is_a_clean_error(tmp_path, checkpoint, args):
    out = tmp_path / "out"
    proc = run("convert", checkpoint, out, *args)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("prebake: error:") and args[0] in lines[0], proc.stderr
    assert not out.exists()


def test_unreadable_size_is_a_usage_error(tmp_path, checkpoint):
    proc = run("convert", checkpoint, tmp_path / "out", "--shard-size", "lots")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "not a size" in proc.stderr


# ---------------------------------------------------------------------------------------------
# entry points


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_entry_point(tmp_path, checkpoint, entry):
    out = tmp_path / "out"
    proc = run("convert", checkpoint, out, entry=entry)
    assert proc.returncode == 0, proc.stderr
    assert "baked 4 tensors" in proc.stdout
    check_bake(out, state_dict())
    proc = run("inspect", out, entry=entry)
    assert proc.returncode == 0 and "4 tensors" in proc.stdout and "model.safetensors" in proc.stdout
    proc = run("verify", out, entry=entry)
    assert proc.returncode == 0 and proc.stdout.startswith("ok: 4 tensors")
    assert proc.stderr == ""


def test_missing_command_is_a_usage_error():
    proc = run()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "usage:" in proc.stderr


# ---------------------------------------------------------------------------------------------
# no torch in the converter

NO_TORCH = """
import sys
from prebake.convert.cli import main
assert main(sys.argv[1:]) == 0
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
assert not loaded, loaded
"""


def torch_zip(path: Path) -> None:
    torch.save(state_dict(), path)


def torch_legacy(path: Path) -> None:
    torch.save(state_dict(), path, _use_new_zipfile_serialization=False)


def safetensors(path: Path) -> None:
    save_file(state_dict(), path)


@pytest.mark.parametrize("make", [torch_zip, torch_legacy, safetensors], ids=lambda f: f.__name__)
def test_lossless_convert_never_imports_torch(tmp_path, make):
    src = tmp_path / ("model.safetensors" if make is safetensors else "model.bin")
    make(src)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, "convert", str(src), str(out), "-q"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    check_bake(out, state_dict())


# ---------------------------------------------------------------------------------------------
# re-baking a bake


def test_rebake_a_bake_with_another_shard_size(tmp_path, checkpoint):
    first, second = tmp_path / "baked", tmp_path / "rebaked"
    assert run("convert", checkpoint, first).returncode == 0
    proc = run("convert", first, second, "--shard-size", "2KB")
    assert proc.returncode == 0, proc.stderr
    check_bake(second, state_dict())
    proc = run("verify", second)
    assert proc.returncode == 0, proc.stderr


def test_inspect_and_verify_survive_a_closed_pipe(tmp_path, checkpoint):
    out = tmp_path / "out"
    assert main(["convert", str(checkpoint), str(out), "-q"]) == 0
    for command in ("inspect", "verify"):
        cmd = f"{sys.executable} -m prebake.convert {command} {out} {'--tensors' if command == 'inspect' else ''} | head -1"
        res = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and "Traceback" not in res.stderr and res.stderr == "", res.stderr


def test_cache_ls_shows_source_options_and_size(tmp_path, capsys, checkpoint, monkeypatch):
    from prebake.cache import store

    monkeypatch.setenv("PREBAKE_CACHE", str(tmp_path / "cache"))
    store.ensure(checkpoint)
    store.ensure(checkpoint, dtype="BF16")
    assert main(["cache", "ls", "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)["entries"]
    assert len(entries) == 2 and {e["options"]["dtype"] for e in entries} == {None, "BF16"}
    assert all(e["source"].endswith(checkpoint.name) and e["bytes"] > 0 for e in entries)
    assert main(["cache", "ls"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any("--dtype BF16" in line for line in lines) and any("(defaults)" in line for line in lines)


class _Terminal:
    """A stand-in for a terminal's stderr: tqdm draws on it (it says it is a TTY, 80 columns)."""

    def __init__(self):
        self.text = []

    def isatty(self):
        return True

    def write(self, s):
        self.text.append(s)

    def flush(self):
        pass


def test_progress_clock_ticks_while_planning(monkeypatch):
    """Planning a GGUF through transformers takes seconds before the total is known: the early
    bar is redrawn (its clock moving) until then, and no more after."""
    import time
    from types import SimpleNamespace

    from prebake.convert.commands import _progress

    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setenv("COLUMNS", "80")
    factory = _progress(SimpleNamespace(quiet=False, json=False), "convert", "reading")
    time.sleep(1.3)
    draws = sum("reading" in s for s in terminal.text)
    assert draws >= 3, terminal.text
    update = factory(100)
    update(50)
    time.sleep(0.7)
    after = len(terminal.text)
    time.sleep(0.7)
    assert len(terminal.text) == after and any("convert" in s for s in terminal.text)
