"""Broken and hostile inputs: one clear error naming the file and the problem, a non-zero exit,
nothing that looks like a finished bake left behind, and no code from a pickle ever run.

Every bad source is tried twice: through the library (``convert`` raises a ``PrebakeError``
whose message names the file) and through the command line as a real subprocess (one
``prebake: error:`` line on stderr, no traceback).
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import gguf
import numpy as np
import prebake.convert.work as shard_writer
import pytest
import torch
from prebake.cache.load import load_from_manifest
from prebake.convert.bake import convert
from prebake.convert.cli import main
from prebake.convert.plan import Options
from prebake.formats.errors import (
    FormatError,
    ManifestError,
    OutputError,
    PrebakeError,
    UnsafePickleError,
    VerifyError,
)
from prebake.formats.integrity import verify
from prebake.formats.manifest import read_manifest
from safetensors.torch import save_file

from tests.conftest import check_bake

# ---------------------------------------------------------------------------------------------
# helpers


def cli(*args: object) -> subprocess.CompletedProcess:
    """``python -m prebake.convert ARGS`` as a real process."""
    return subprocess.run([sys.executable, "-m", "prebake.convert", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def one_error_line(proc: subprocess.CompletedProcess, *names: object) -> str:
    """Checks a failed run printed exactly one ``prebake: error:`` line naming ``names``."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("prebake: error:"), lines[0]
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes] | None:
    """Every file under ``folder`` (relative path -> bytes), or None when it does not exist."""
    if not folder.exists():
        return None
    if folder.is_file():
        return {"": folder.read_bytes()}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def manifests(root: Path) -> set[Path]:
    return set(root.rglob("manifest.json"))


def assert_left_as_it_was(out: Path, before: dict | None, manifests_before: set[Path]) -> None:
    """OUT is absent (or unchanged), no new manifest anywhere, no temporary folders left."""
    assert snapshot(out) == before
    assert manifests(out.parent) == manifests_before
    leftovers = [p.name for p in out.parent.glob(f".{out.name}.prebake-*")]
    assert not leftovers, leftovers


def refused(src: Path, out: Path, error: type[PrebakeError] = PrebakeError, *,
            names: tuple = ()) -> tuple[str, str]:
    """Converts ``src`` through the library and the CLI; both must fail cleanly.

    Returns (library message, CLI error line).
    """
    before, seen = snapshot(out), manifests(out.parent)
    with pytest.raises(error) as info:
        convert(src, out)
    message = str(info.value)
    assert str(src) in message, message
    for name in names:
        assert str(name) in message, (name, message)
    assert_left_as_it_was(out, before, seen)
    line = one_error_line(cli("convert", src, out), src, *names)
    assert_left_as_it_was(out, before, seen)
    return message, line


def save_torch(path: Path, obj, zipped: bool = True) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=zipped)
    return path


def small_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"layer.weight": torch.randn(64, 64, generator=g), "layer.bias": torch.randn(64, generator=g),
            "head.weight": torch.randn(16, 64, generator=g)}


def rewrite_zip(src: Path, dst: Path, *, drop: str | None = None, cut: str | None = None,
                replace: dict[str, bytes] | None = None, compression: int = zipfile.ZIP_STORED) -> Path:
    """Copies a torch zip member by member: ``drop`` leaves a member out, ``cut`` halves one,
    ``replace`` swaps a member's bytes. Members are matched by their path after the archive folder.
    """
    replace = replace or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression) as zout:
        for info in zin.infolist():
            member = info.filename.split("/", 1)[1]
            data = zin.read(info)
            if member == drop:
                continue
            if member == cut:
                data = data[:len(data) // 2]
            zout.writestr(info.filename, replace.get(member, data))
    return dst


def write_gguf(path: Path) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.random((64, 64), dtype=np.float32))
    w.add_tensor("output.weight", rng.random((256, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def truncate(src: Path, dst: Path, keep: int) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])
    return dst


# ---------------------------------------------------------------------------------------------
# truncated and corrupt files of every format


def make_zip_half(tmp: Path) -> Path:
    full = save_torch(tmp / "full.bin", small_state_dict())
    return truncate(full, tmp / "half.bin", full.stat().st_size // 2)


def make_zip_short_storage(tmp: Path) -> Path:
    full = save_torch(tmp / "full.bin", small_state_dict())
    return rewrite_zip(full, tmp / "short.bin", cut="data/0")


def make_legacy_cut(tmp: Path) -> Path:
    full = save_torch(tmp / "full.pt", small_state_dict(), zipped=False)
    return truncate(full, tmp / "cut.pt", -1000)  # the last storage holds 4 KiB: cut inside it


def make_safetensors_cut_data(tmp: Path) -> Path:
    save_file(small_state_dict(), tmp / "full.safetensors")
    return truncate(tmp / "full.safetensors", tmp / "cut.safetensors", -1000)


def make_safetensors_cut_header(tmp: Path) -> Path:
    save_file(small_state_dict(), tmp / "full.safetensors")
    return truncate(tmp / "full.safetensors", tmp / "cut.safetensors", 40)


def make_gguf_cut(tmp: Path) -> Path:
    full = write_gguf(tmp / "full.gguf")
    return truncate(full, tmp / "cut.gguf", -4096)


def make_random(suffix: str):
    def make(tmp: Path) -> Path:
        path = tmp / f"model{suffix}"
        path.write_bytes(random.Random(suffix).randbytes(8192))
        return path
    return make


def make_empty(tmp: Path) -> Path:
    path = tmp / "model.bin"
    path.write_bytes(b"")
    return path


def make_text(tmp: Path) -> Path:
    path = tmp / "notes.txt"
    path.write_text("remember to convert the model before friday\n")
    return path


def make_text_as_weights(tmp: Path) -> Path:
    path = tmp / "model.safetensors"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    return path


def make_foreign_zip(tmp: Path) -> Path:
    path = tmp / "model.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("README.txt", "not a checkpoint")
        z.writestr("weights/array.npy", b"\x93NUMPY" + bytes(100))
    return path


def make_zip_missing_storage(tmp: Path) -> Path:
    full = save_torch(tmp / "full.bin", small_state_dict())
    return rewrite_zip(full, tmp / "missing.bin", drop="data/0")


def make_zip_compressed(tmp: Path) -> Path:
    full = save_torch(tmp / "full.bin", small_state_dict())
    return rewrite_zip(full, tmp / "deflated.bin", compression=zipfile.ZIP_DEFLATED)


BROKEN = {
    "zip-cut-in-half": (make_zip_half, FormatError, "not a readable torch zip"),
    "zip-storage-member-short": (make_zip_short_storage, FormatError, "truncated"),
    "legacy-cut-in-storage": (make_legacy_cut, FormatError, "truncated"),
    "safetensors-cut-in-data": (make_safetensors_cut_data, FormatError, "truncated"),
    "safetensors-cut-in-header": (make_safetensors_cut_header, FormatError, ""),
    "gguf-cut-in-tensor": (make_gguf_cut, FormatError, "truncated"),
    "random.bin": (make_random(".bin"), FormatError, "not a recognised checkpoint"),
    "random.safetensors": (make_random(".safetensors"), FormatError, "not a recognised checkpoint"),
    "random.gguf": (make_random(".gguf"), FormatError, "not a recognised checkpoint"),
    "empty-file": (make_empty, FormatError, "empty"),
    "notes.txt": (make_text, FormatError, "not a recognised checkpoint"),
    "lfs-pointer.safetensors": (make_text_as_weights, FormatError, "not a recognised checkpoint"),
    "zip-not-torch": (make_foreign_zip, FormatError, "not a torch checkpoint"),
    "zip-missing-storage": (make_zip_missing_storage, FormatError, "missing storage"),
    "zip-compressed": (make_zip_compressed, FormatError, "compressed"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_file_fails_cleanly(tmp_path, case):
    make, error, problem = BROKEN[case]
    src = make(tmp_path)
    message, line = refused(src, tmp_path / "out", error)
    assert problem in message and problem in line


def test_safetensors_cut_in_header_says_truncated(tmp_path):
    src = make_safetensors_cut_header(tmp_path)
    with pytest.raises(FormatError, match="truncated"):
        convert(src, tmp_path / "out")


def write_safetensors(path: Path, header, data: bytes = bytes(16)) -> Path:
    """A safetensors file with a hand-written header (``header`` as JSON text or an object)."""
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return path


def entry(**fields) -> dict:
    return {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16], **fields}}


HOSTILE_HEADERS = [
    pytest.param("[1, 2]", id="not-an-object"),
    pytest.param('{"w": {"dtype": "F32", ', id="not-json"),
    pytest.param(entry(dtype="F128"), id="unknown-dtype"),
    pytest.param(entry(data_offsets=None), id="offsets-null"),
    pytest.param(entry(data_offsets=[0, 1 << 40]), id="offsets-past-end"),
    pytest.param(entry(data_offsets=[16, 0]), id="offsets-reversed"),
    pytest.param(entry(shape=[-2, -2]), id="negative-dims"),
    pytest.param(entry(shape=[1e400]), id="infinite-dim"),
    pytest.param(entry(dtype=["F32"]), id="dtype-a-list"),
    pytest.param(entry(data_offsets=["0", "16"]), id="offsets-strings"),
    pytest.param(entry(data_offsets=[0.0, 16.0]), id="offsets-floats"),
]


@pytest.mark.parametrize("header", HOSTILE_HEADERS)
def test_hostile_safetensors_header(tmp_path, header):
    src = write_safetensors(tmp_path / "model.safetensors", header)
    refused(src, tmp_path / "out", FormatError)


def test_failure_keeps_an_existing_bake(tmp_path):
    good = save_torch(tmp_path / "good.bin", small_state_dict())
    out = tmp_path / "out"
    convert(good, out)
    refused(make_zip_short_storage(tmp_path), out, FormatError)
    refused(make_gguf_cut(tmp_path), out, FormatError)
    verify(out)
    check_bake(out, small_state_dict())


# ---------------------------------------------------------------------------------------------
# hostile pickles: refused before anything is looked up, let alone run


class Evil:
    """Pickles as a call ``func(*args)``: what a hostile checkpoint does on ``torch.load``."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def evil_payloads(sentinel: Path) -> dict[str, Evil]:
    return {
        "os.system": Evil(os.system, (f"touch {sentinel}",)),
        "open": Evil(open, (str(sentinel), "w")),
        "builtins.eval": Evil(builtins.eval, (f"open({str(sentinel)!r}, 'w')",)),
        "subprocess.call": Evil(subprocess.call, (["touch", str(sentinel)],)),
    }


# how each callable is spelled in the refusal
EVIL_NAMES = {"os.system": "system", "open": "open", "builtins.eval": "eval", "subprocess.call": "call"}


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("payload", list(EVIL_NAMES))
def test_malicious_pickle_is_refused_and_never_run(tmp_path, payload, zipped):
    sentinel = tmp_path / "SENTINEL"
    evil = evil_payloads(sentinel)[payload]
    src = save_torch(tmp_path / "model.bin", {"w": torch.zeros(2), "evil": evil}, zipped)
    assert not sentinel.exists()
    message, line = refused(src, tmp_path / "out", UnsafePickleError)
    for text in (message, line):
        problem = text.split(str(src), 1)[1]  # the path may hold any word
        assert "refus" in problem and EVIL_NAMES[payload] in problem, text
    assert not sentinel.exists()


def test_malicious_protocol_4_pickle_is_refused(tmp_path):
    """A hand-made data.pkl in a newer pickle protocol (STACK_GLOBAL) is refused the same way."""
    import pickle

    sentinel = tmp_path / "SENTINEL"
    good = save_torch(tmp_path / "good.bin", small_state_dict())
    payload = pickle.dumps({"w": evil_payloads(sentinel)["os.system"]}, protocol=4)
    src = rewrite_zip(good, tmp_path / "model.bin", replace={"data.pkl": payload})
    message, _ = refused(src, tmp_path / "out", UnsafePickleError)
    assert f"{os.system.__module__}.system" in message
    assert not sentinel.exists()


@pytest.mark.parametrize("payload", ["builtins.eval", "subprocess.call"])
def test_refusal_names_the_callable_as_python_3_does(tmp_path, payload):
    src = save_torch(tmp_path / "model.bin", {"evil": evil_payloads(tmp_path / "SENTINEL")[payload]})
    with pytest.raises(UnsafePickleError) as info:
        convert(src, tmp_path / "out")
    assert payload in str(info.value)


def test_harmless_builtins_in_a_checkpoint_are_not_refused(tmp_path):
    src = save_torch(tmp_path / "model.bin", {"w": torch.ones(3), "tags": {"a", "b"}, "z": complex(1, 2)})
    m = convert(src, tmp_path / "out")
    assert {s["name"] for s in m.skipped} == {"tags", "z"}


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_whole_module_pickle_asks_for_state_dict(tmp_path, zipped):
    src = save_torch(tmp_path / "model.pt", torch.nn.Linear(4, 2), zipped)
    message, line = refused(src, tmp_path / "out", UnsafePickleError)
    for text in (message, line):
        assert "torch.nn.modules.linear.Linear" in text and "state_dict()" in text


# ---------------------------------------------------------------------------------------------
# model folders


def sharded_folder(tmp: Path, weight_map: dict[str, str] | None = None) -> Path:
    folder = tmp / "model"
    folder.mkdir()
    save_file({"a": torch.ones(4), "b": torch.zeros(4)}, folder / "model-00001-of-00002.safetensors")
    save_file({"c": torch.arange(4.0)}, folder / "model-00002-of-00002.safetensors")
    weight_map = weight_map or {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
                                "c": "model-00002-of-00002.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text("{}")
    return folder


def test_folder_without_checkpoints(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "README.md").write_text("# a model card, but no weights\n")
    message, _ = refused(folder, tmp_path / "out", FormatError)
    assert "no checkpoint files" in message


def test_index_names_a_missing_shard(tmp_path):
    folder = sharded_folder(tmp_path)
    (folder / "model-00002-of-00002.safetensors").unlink()
    message, _ = refused(folder, tmp_path / "out", FormatError,
                         names=("model.safetensors.index.json", "model-00002-of-00002.safetensors"))
    assert "not in the folder" in message


def test_index_disagrees_with_shards(tmp_path):
    folder = sharded_folder(tmp_path, {"a": "model-00002-of-00002.safetensors",
                                       "b": "model-00001-of-00002.safetensors",
                                       "c": "model-00002-of-00002.safetensors"})
    message, _ = refused(folder, tmp_path / "out", FormatError, names=("model.safetensors.index.json", "'a'"))
    assert "not there" in message


def test_folder_with_a_corrupt_shard_names_the_shard(tmp_path):
    folder = sharded_folder(tmp_path)
    shard = folder / "model-00002-of-00002.safetensors"
    truncate(shard, shard, -8)
    refused(folder, tmp_path / "out", FormatError, names=(shard,))


# ---------------------------------------------------------------------------------------------
# a full disk


class FullDisk:
    """Stands in for the ``os`` module of the shard writer: ``pwrite`` fails after ``room`` bytes."""

    def __init__(self, room: int):
        self.room = room

    def __getattr__(self, name):
        return getattr(os, name)

    def pwrite(self, fd, data, offset):
        n = min(len(memoryview(data).cast("B")), self.room)
        if n == 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= n
        return os.pwrite(fd, memoryview(data).cast("B")[:n], offset)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("room", [0, 3000, 20000], ids=["in-header", "in-first-tensor", "later"])
def test_disk_full_while_writing(tmp_path, monkeypatch, room):
    src = save_torch(tmp_path / "model.bin", small_state_dict())
    out = tmp_path / "out"
    seen = manifests(tmp_path)
    monkeypatch.setattr(shard_writer, "os", FullDisk(room))
    with pytest.raises(OutputError, match="no space left") as info:
        convert(src, out)
    assert out.name in str(info.value)
    assert_left_as_it_was(out, None, seen)


def test_disk_full_in_header_closes_the_shard(tmp_path, monkeypatch):
    src = save_torch(tmp_path / "model.bin", small_state_dict())
    fds = open_fds()
    monkeypatch.setattr(shard_writer, "os", FullDisk(0))
    with pytest.raises(OutputError):
        convert(src, tmp_path / "out")
    assert open_fds() <= fds  # nothing left open (a descriptor an earlier test held may have closed)


def test_disk_full_from_the_cli(tmp_path, monkeypatch, capsys):
    src = save_torch(tmp_path / "model.bin", small_state_dict())
    out = tmp_path / "out"
    monkeypatch.setattr(shard_writer, "os", FullDisk(5000))
    assert main(["convert", str(src), str(out)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("prebake: error:") and "no space left" in err[0]
    assert_left_as_it_was(out, None, set())


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 256 KiB tmpfs, or a skip where mounting is not allowed."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                           capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot mount a tmpfs: {e}")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=20)


def test_disk_really_full(tmp_path, tiny_tmpfs):
    # too big from the start: refused before a byte is written
    src = save_torch(tmp_path / "model.bin", {"big": torch.zeros(512, 1024)})  # 2 MiB > 256 KiB
    out = tiny_tmpfs / "out"
    with pytest.raises(OutputError, match="is free"):
        convert(src, out)
    assert os.listdir(tiny_tmpfs) == []
    line = one_error_line(cli("convert", src, out), out.name)
    assert "is free" in line
    assert os.listdir(tiny_tmpfs) == []
    # fits the free space, but not with the header, index and manifest: fills up while writing
    src = save_torch(tmp_path / "fits.bin", {"w": torch.zeros(250 * 256)})  # 250 KiB
    with pytest.raises(OutputError, match="no space left"):
        convert(src, out)
    assert os.listdir(tiny_tmpfs) == []


# ---------------------------------------------------------------------------------------------
# interrupted conversions and occupied outputs


def interrupt_half_way(total: int):
    done = 0

    def update(n: int) -> None:
        nonlocal done
        done += n
        if done >= total // 2:
            raise KeyboardInterrupt
    return update


class _InterruptingProgress:
    """The CLI's progress factory (called with the total; ``stop()``), interrupting half way."""

    def __call__(self, total: int):
        return interrupt_half_way(total)

    def stop(self) -> None:
        pass


def many_tensors() -> dict[str, torch.Tensor]:
    return {f"layer{i}.weight": torch.full((32, 32), float(i)) for i in range(8)}


def test_interrupted_conversion_leaves_nothing(tmp_path):
    src = save_torch(tmp_path / "model.bin", many_tensors())
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert(src, out, progress=interrupt_half_way)
    assert_left_as_it_was(out, None, set())


def test_interrupted_reconversion_keeps_the_old_bake(tmp_path):
    old = small_state_dict()
    out = tmp_path / "out"
    convert(save_torch(tmp_path / "old.bin", old), out)
    before, seen = snapshot(out), manifests(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        convert(save_torch(tmp_path / "new.bin", many_tensors()), out, Options(shard_size=10_000),
                progress=interrupt_half_way)
    assert_left_as_it_was(out, before, seen)
    verify(out)
    check_bake(out, old)


def test_stale_temp_folder_of_a_killed_run_is_removed(tmp_path):
    src = save_torch(tmp_path / "model.bin", small_state_dict())
    killed = subprocess.Popen([sys.executable, "-c", "pass"])
    killed.wait()
    stale = tmp_path / f".out.prebake-tmp-{killed.pid}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half a shard")
    convert(src, tmp_path / "out")
    assert not stale.exists()
    check_bake(tmp_path / "out", small_state_dict())


def test_interrupted_cli_says_nothing_was_written(tmp_path, monkeypatch, capsys):
    import prebake.convert.commands as commands_module

    src = save_torch(tmp_path / "model.bin", many_tensors())
    out = tmp_path / "out"
    monkeypatch.setattr(commands_module, "_progress", lambda args, desc, first=None: _InterruptingProgress())
    assert main(["convert", str(src), str(out)]) == 130
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "interrupted" in err[0]
    assert_left_as_it_was(out, None, set())


def test_occupied_output_is_refused_without_force(tmp_path):
    src = save_torch(tmp_path / "model.bin", small_state_dict())
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    (out / "data").mkdir()
    (out / "data" / "results.csv").write_text("1,2,3\n")
    before = snapshot(out)
    with pytest.raises(OutputError, match="--force") as info:
        convert(src, out)
    assert str(out) in str(info.value)
    assert_left_as_it_was(out, before, set())
    one_error_line(cli("convert", src, out), out, "--force")
    assert_left_as_it_was(out, before, set())

    proc = cli("convert", src, out, "--force")
    assert proc.returncode == 0, proc.stderr
    assert not (out / "thesis.tex").exists() and not (out / "data").exists()
    check_bake(out, small_state_dict())
    assert not list(tmp_path.glob(".out.prebake-*"))


def test_output_that_is_a_file_is_refused(tmp_path):
    src = save_torch(tmp_path / "model.bin", small_state_dict())
    out = tmp_path / "out"
    out.write_text("not a folder")
    one_error_line(cli("convert", src, out), out)
    assert out.read_text() == "not a folder"


# ---------------------------------------------------------------------------------------------
# damaged bakes: verify and load name what is wrong


@pytest.fixture
def bake(tmp_path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    save_file(small_state_dict(), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"hidden_size": 64}))
    out = tmp_path / "baked"
    convert(folder, out)
    verify(out)
    return out


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_verify_names_a_corrupted_tensor(bake):
    m = read_manifest(bake)
    t = m.tensors["layer.bias"]
    flip_byte(m.shard_path(t.shard), t.offset + t.nbytes // 2)
    with pytest.raises(VerifyError, match="'layer.bias'"):
        verify(bake)
    proc = cli("verify", bake)
    assert proc.returncode == 1
    assert "checksum" in one_error_line(proc, "layer.bias", m.shards[t.shard].file)


def test_verify_truncated_shard(bake):
    shard = read_manifest(bake).shard_path(0)
    truncate(shard, shard, -100)
    proc = cli("verify", bake)
    assert proc.returncode == 1
    assert "bytes" in one_error_line(proc, shard)


def test_verify_missing_shard(bake):
    shard = read_manifest(bake).shard_path(0)
    shard.unlink()
    assert "missing" in one_error_line(cli("verify", bake), shard)


def test_verify_modified_copied_file(bake):
    (bake / "config.json").write_text(json.dumps({"hidden_size": 65}))
    proc = cli("verify", bake)
    assert proc.returncode == 1
    assert "checksum" in one_error_line(proc, bake / "config.json")


def test_verify_without_manifest(bake):
    (bake / "manifest.json").unlink()
    proc = cli("verify", bake)
    assert proc.returncode == 1
    assert "no manifest.json" in one_error_line(proc, bake)
    with pytest.raises(ManifestError):
        verify(bake)


def test_verify_corrupt_manifest(bake):
    (bake / "manifest.json").write_text('{"format": "prebake", "version": 1, "shards": [')
    assert "cannot read manifest" in one_error_line(cli("verify", bake), bake / "manifest.json")


def test_load_refuses_a_shard_of_the_wrong_size(bake):
    shard = read_manifest(bake).shard_path(0)
    with open(shard, "ab") as f:
        f.write(b"\0" * 16)
    with pytest.raises(ManifestError, match="bytes, the manifest says") as info:
        load_from_manifest(bake)
    assert str(shard) in str(info.value) and "verify" in str(info.value)


def test_a_tensor_under_a_reserved_name_is_refused(tmp_path):
    """Before: a checkpoint tensor named __prebake_pad__* was dropped silently (zeros written)."""
    src = save_torch(tmp_path / "model.bin", {"__prebake_pad__.0.0": torch.ones(4), "w": torch.ones(4)})
    with pytest.raises(FormatError, match="reserves"):
        convert(src, tmp_path / "out")
    one_error_line(cli("convert", src, tmp_path / "out"), "__prebake_pad__.0.0")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("metadata", [[], "", 0, False, {"k": 1}, None, {}, {"format": "pt"}])
def test_safetensors_metadata_as_the_reference_reads_it(tmp_path, metadata):
    """``__metadata__`` is null or an object of strings; anything else the reference refuses, and so does prebake."""
    from safetensors.torch import load_file

    header = json.dumps({"__metadata__": metadata, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
    src = tmp_path / "model.safetensors"
    src.write_bytes(len(header).to_bytes(8, "little") + header.encode() + bytes(4))
    try:
        load_file(src)
    except Exception:  # noqa: BLE001  the reference refuses: prebake must too
        with pytest.raises(FormatError, match="__metadata__"):
            convert(src, tmp_path / "out")
        return
    convert(src, tmp_path / "out")
    assert load_from_manifest(tmp_path / "out")["a"].tolist() == [0.0]
