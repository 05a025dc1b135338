"""A manifest is input too: one that points outside its bake, or lies, is refused everywhere.

``load_from_manifest``, ``verify``, ``warm``, ``unpack`` and ``ensure`` all read a manifest
through ``read_manifest``'s checks, so each refuses the same things with one line naming the
entry; and ``verify`` passes only what ``load_from_manifest`` loads.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from prebake.cache import store
from prebake.cache.load import load_from_manifest
from prebake.convert.bake import convert
from prebake.convert.cli import main
from prebake.convert.pack import pack, unpack
from prebake.formats.errors import ManifestError, PrebakeError
from prebake.formats.integrity import verify
from prebake.formats.manifest import read_manifest
from prebake.formats.manifest_records import REQUIRED

from tests.test_bad_input import save_torch


@pytest.fixture
def bake(tmp_path) -> Path:
    torch.manual_seed(0)
    sd = {"embed.weight": torch.randn(64, 32), "layers.0.w": torch.randn(32, 32), "layers.0.b": torch.randn(32),
          "head.weight": torch.randn(64, 32)}
    sd["tied.weight"] = sd["embed.weight"]
    convert(save_torch(tmp_path / "model.bin", sd), tmp_path / "bake", variants=["v=first=1"])
    return tmp_path / "bake"


def edit(bake: Path, change) -> None:
    d = json.loads((bake / "manifest.json").read_text())
    change(d)
    (bake / "manifest.json").write_text(json.dumps(d))


def refused_everywhere(bake: Path, capsys, *words: str) -> None:
    """load, verify and warm (and their CLI forms) refuse the bake with one line naming ``words``."""
    for fn in (load_from_manifest, verify):
        with pytest.raises(ManifestError) as info:
            fn(bake)
        for w in words:
            assert w in str(info.value), (w, str(info.value))
    for command in ("warm", "verify", "inspect"):
        assert main([command, str(bake)]) == 1
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and all(w in err[0] for w in words), err


def test_a_shard_outside_the_bake(bake, capsys):
    size = os.path.getsize("/etc/passwd")
    edit(bake, lambda d: d["shards"][0].update(file="../../../../../../etc/passwd", size=size))
    refused_everywhere(bake, capsys, "shards[0]", "plain relative path")


def test_a_symlink_out_of_the_bake(bake, capsys):
    shard = bake / "model.safetensors"
    shard.unlink()
    shard.symlink_to("/etc/passwd")
    edit(bake, lambda d: d["shards"][0].update(size=os.path.getsize("/etc/passwd")))
    refused_everywhere(bake, capsys, "shards[0]", "points outside the bake")


def test_a_copied_file_outside_the_bake(bake, capsys):
    edit(bake, lambda d: d["files"].append({"path": "../secret", "size": 1, "checksum": "0" * 32}))
    refused_everywhere(bake, capsys, "files[", "plain relative path")


@pytest.mark.parametrize("path", [".", "", "/", "a/../..", "sub/."])
def test_a_component_path_that_is_not_a_sub_folder(bake, capsys, path):
    edit(bake, lambda d: d.update(components={"c": {"path": path}}))
    refused_everywhere(bake, capsys, "component 'c'")


@pytest.mark.parametrize(("field", "value", "says"), [
    ("offset", -8, "not inside shard"), ("offset", 10**12, "not inside shard"), ("nbytes", 4, "nbytes"),
    ("shape", [-1, 32], "shape"), ("shape", [64, 32, 1.5], "shape"), ("dtype", "F128", "dtype"),
    ("shard", 7, "shard"), ("shard", True, "shard"), ("checksum", None, "checksum"), ("qtype", "Q9_9", "qtype"),
    ("offset", 4097, "multiple of the item size"),
])
def test_a_tensor_record_that_lies(bake, capsys, field, value, says):
    def change(d):
        table = d["tensors"]
        row = table["name"].index("layers.0.w")
        table.setdefault(field, [None] * len(table["name"]))[row] = value

    edit(bake, change)
    refused_everywhere(bake, capsys, "tensor 'layers.0.w'", says)


@pytest.mark.parametrize(("change", "says"), [
    ({"target": "nope"}, "target"), ({"storage_offset": 10**6}, "past its target"),
    ({"shape": [64, 32], "strides": [32]}, "differ in length"),
])
def test_an_alias_outside_its_target(bake, capsys, change, says):
    edit(bake, lambda d: d["aliases"]["tied.weight"].update(change))
    refused_everywhere(bake, capsys, "alias 'tied.weight'", says)


def test_a_variant_naming_what_is_not_stored(bake, capsys):
    edit(bake, lambda d: d["variants"]["v"]["tensors"].update({"x": {"source": "nope"}}))
    refused_everywhere(bake, capsys, "variant 'v'", "does not hold")


@pytest.mark.parametrize(("field", "value", "says"), [
    ("bytes", {}, "bytes is not an integer"), ("spec", 3, "spec is not a string"),
    ("layers", "0-3", "layers is not a list"),
])
def test_a_variant_with_fields_of_the_wrong_type(bake, capsys, field, value, says):
    """inspect prints these fields: a wrong type is one line, not a TypeError (found by the fuzz harness)."""
    edit(bake, lambda d: d["variants"]["v"].update({field: value}))
    refused_everywhere(bake, capsys, "variant 'v'", says)


def test_a_nested_component_is_refused(tmp_path, bake):
    outer = tmp_path / "outer"
    outer.mkdir()
    shutil.copytree(bake, outer / "c")
    edit(outer / "c", lambda d: d.update(components={"d": {"path": "model.safetensors", "tensors": 1, "bytes": 4}}))
    (outer / "manifest.json").write_text(json.dumps({**json.loads((bake / "manifest.json").read_text()),
                                                     "shards": [], "tensors": {c: [] for c in REQUIRED},
                                                     "aliases": {}, "variants": {},
                                                     "files": [], "components": {"c": {"path": "c", "tensors": 1,
                                                                                       "bytes": 4}}}))
    with pytest.raises(ManifestError, match="nests one level only"):
        load_from_manifest(outer, component="c")


def hostile_archive(bake: Path, tmp_path: Path, monkeypatch) -> Path:
    """An archive of ``bake`` whose manifest names a file outside the bake (packed without checks)."""
    import prebake.convert.pack as pack_module

    edit(bake, lambda d: d["files"].append({"path": "../../../../../../etc/passwd",
                                            "size": os.path.getsize("/etc/passwd"), "checksum": "0" * 32}))
    with monkeypatch.context() as m:
        m.setattr(pack_module, "_manifests", lambda folder: iter(()))  # an attacker's packer checks nothing
        pack(bake, tmp_path / "evil.pbk")
    return tmp_path / "evil.pbk"


def test_unpack_and_ensure_refuse_an_archive_pointing_outside(bake, tmp_path, monkeypatch, capsys):
    archive = hostile_archive(bake, tmp_path, monkeypatch)
    with pytest.raises(ManifestError, match="files"):
        unpack(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.prebake-*"))
    assert main(["unpack", str(archive), str(tmp_path / "out")]) == 1
    assert "plain relative path" in capsys.readouterr().err
    with pytest.raises(ManifestError):
        store.ensure(archive, root=tmp_path / "cache")
    assert [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")] == []


def mutate(value, rng: random.Random, depth: int = 0):
    """One random change somewhere in a JSON tree: a value replaced, a key dropped, a type swapped."""
    if isinstance(value, dict) and value and rng.random() < 0.8:
        key = rng.choice(sorted(value))
        out = dict(value)
        if rng.random() < 0.1:
            del out[key]
        else:
            out[key] = mutate(value[key], rng, depth + 1)
        return out
    if isinstance(value, list) and value and rng.random() < 0.8:
        i = rng.randrange(len(value))
        return [*value[:i], mutate(value[i], rng, depth + 1), *value[i + 1:]]
    return rng.choice([None, True, -1, 0, 1, 7, 2**63, 1.5, "", ".", "..", "../x", "/etc/passwd", "F32", "U8",
                       "Q4_K", [], {}, [1, 2], {"a": 1}, "x" * 40, -(2**40), 4096, 8])


def outcome(fn) -> bool:
    """True if ``fn()`` returned, False if it raised a PrebakeError; anything else fails the test."""
    try:
        fn()
    except PrebakeError:
        return False
    return True


def test_mutated_manifests_are_refused_or_load(bake):
    """Each mutation of a real manifest is refused with one PrebakeError or loads; never another
    exception, and never a manifest that verifies but does not load."""
    original = json.loads((bake / "manifest.json").read_text())
    rng = random.Random(0)
    counts = {"loads": 0, "refused": 0, "verifies": 0}
    for _ in range(400):
        (bake / "manifest.json").write_text(json.dumps(mutate(original, rng)))
        loads = outcome(lambda: [load_from_manifest(bake, variant=v) for v in [None, *read_manifest(bake).variants]])
        verifies = outcome(lambda: verify(bake))
        assert loads or not verifies, "verify passed a manifest load_from_manifest refuses"
        counts["loads" if loads else "refused"] += 1
        counts["verifies"] += verifies
    print(counts)
    assert counts["refused"] > 100 and counts["loads"] > 10
