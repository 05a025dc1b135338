"""``prebake check``: the bake computes what its source computes, within the recipe's tolerance."""

from __future__ import annotations

import json

import pytest
from prebake.convert.bake import convert
from prebake.convert.cli import main
from prebake.convert.plan import Options
from prebake.formats.manifest import read_manifest

from tests.conftest import save_llama
from tests.test_bad_input import save_torch, small_state_dict


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    path = tmp_path_factory.mktemp("check") / "src"
    save_llama(path, layers=2, hidden=256, inter=512, vocab=256)
    return path


@pytest.mark.parametrize("options", [{}, {"dtype": "BF16"}, {"quant": "q8_0"}, {"quant": "q4_k_m"}],
                         ids=["lossless", "bf16", "q8_0", "q4_k_m"])
def test_check_passes_on_good_bakes(src, tmp_path, capsys, options):
    convert(src, tmp_path / "out", Options(**options))
    assert main(["check", str(tmp_path / "out"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["mode"] == "model"
    if not options:
        assert report["max_abs_diff"] == 0 and report["tolerance"]["exact"]
    else:
        assert report["max_abs_diff"] > 0 and report["cosine"] >= report["tolerance"]["cosine"]


def test_check_fails_on_an_edited_shard(src, tmp_path, capsys):
    out = tmp_path / "out"
    m = convert(src, out)
    t = m.tensors["model.layers.0.mlp.up_proj.weight"]
    with open(out / m.shards[t.shard].file, "r+b") as f:  # edited after conversion
        f.seek(t.offset + 4096)
        f.write(bytes([0x7F]) * 64)
    assert main(["check", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "check failed" in err[0] and "lossless bakes need equality" in err[0]


def test_check_compares_tensors_where_transformers_cannot_build(tmp_path, capsys):
    source = save_torch(tmp_path / "model.bin", small_state_dict())
    convert(source, tmp_path / "out", Options(dtype="BF16"))
    assert main(["check", str(tmp_path / "out"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mode"] == "tensors" and report["tensors"] == len(read_manifest(tmp_path / "out").tensors)


def test_check_needs_the_source(tmp_path, capsys):
    source = save_torch(tmp_path / "model.bin", small_state_dict())
    convert(source, tmp_path / "out")
    source.unlink()
    assert main(["check", str(tmp_path / "out")]) == 2
    assert "--source" in capsys.readouterr().err
