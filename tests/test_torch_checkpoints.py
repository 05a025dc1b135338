"""torch.save checkpoints (zip and legacy) bake byte-exactly: every dtype, strided views,
shared storages, nested training checkpoints."""

from __future__ import annotations

import pytest
import torch
from prebake.cache.load import load_from_manifest
from prebake.convert.bake import convert
from prebake.formats.manifest import read_manifest

from tests.conftest import check_bake

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn,
          torch.float8_e5m2, torch.float8_e8m0fnu, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
          torch.bool, torch.uint16, torch.uint32, torch.uint64, torch.complex64]


def every_dtype() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for dt in DTYPES:
        base = torch.randn(5, 7, generator=g) * 100
        if dt.is_floating_point or dt.is_complex:
            out[str(dt)] = base.to(dt)
        elif dt == torch.bool:
            out[str(dt)] = base > 0
        else:
            out[str(dt)] = base.abs().to(torch.int64).to(dt)
    out["scalar"] = torch.tensor(3.5)
    out["empty"] = torch.zeros(0, 4)
    out["big"] = torch.randn(600, 1000, generator=g)  # 2.4 MB: aligned to 4096
    return out


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_every_dtype_byte_exact(tmp, zipped):
    sd = every_dtype()
    torch.save(sd, tmp / "model.pt", _use_new_zipfile_serialization=zipped)
    m = convert(tmp / "model.pt", tmp / "out")
    check_bake(tmp / "out", sd)
    assert m.source["format"] == ("torch-zip" if zipped else "torch-legacy")


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_views_and_shared_storage(tmp, zipped):
    base = torch.randn(64, 48)
    emb = torch.randn(100, 16)
    sd = {
        "embed.weight": emb, "head.weight": emb,  # tied
        "base": base, "transposed": base.t(), "rows": base[8:24], "column": base[:, 5],
        "every_other": base[::2, ::3], "expanded": torch.randn(1, 8).expand(4, 8),
        "own_slice": torch.randn(10, 10)[2:5],  # a view whose base is not saved
    }
    torch.save(sd, tmp / "model.pt", _use_new_zipfile_serialization=zipped)
    convert(tmp / "model.pt", tmp / "out")
    loaded = check_bake(tmp / "out", sd)
    m = read_manifest(tmp / "out")
    assert m.aliases["head.weight"].target == "embed.weight"
    for name in ("transposed", "rows", "column", "every_other"):
        assert m.aliases[name].target == "base", name
    assert "own_slice" in m.tensors  # stored alone, materialized
    # stored once: the alias is the same memory as its target
    assert loaded["head.weight"].data_ptr() == loaded["embed.weight"].data_ptr()
    assert loaded["transposed"].untyped_storage().data_ptr() == loaded["base"].untyped_storage().data_ptr()


def test_nested_training_checkpoint(tmp):
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3,
            "best": 0.25, "name": "run-1", "history": [1.0, 0.5]}
    torch.save(ckpt, tmp / "ckpt.pth")
    m = convert(tmp / "ckpt.pth", tmp / "out")
    loaded = load_from_manifest(tmp / "out")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded[f"model.{k}"], v)
    assert torch.equal(loaded["optimizer.state.0.exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    skipped = {s["name"]: s["kind"] for s in m.skipped}
    assert skipped["epoch"] == "int" and skipped["best"] == "float" and skipped["name"] == "str"
    assert skipped["optimizer.param_groups"] == "list"


def test_state_dict_wrapper_and_parameters(tmp):
    lin = torch.nn.Linear(3, 3)
    torch.save({"state_dict": {"w": lin.weight, "b": lin.bias}}, tmp / "m.bin")  # Parameters, not tensors
    convert(tmp / "m.bin", tmp / "out")
    check_bake(tmp / "out", {"state_dict.w": lin.weight.detach(), "state_dict.b": lin.bias.detach()})


def test_cast_matches_torch(tmp):
    sd = {"a": torch.randn(33, 17) * 1e3, "b": torch.randn(5).to(torch.bfloat16), "i": torch.arange(4)}
    torch.save(sd, tmp / "m.pt")
    from prebake.convert.plan import Options

    for code, dt in (("BF16", torch.bfloat16), ("F16", torch.float16)):
        out = tmp / f"out-{code}"
        convert(tmp / "m.pt", out, Options(dtype=code))
        expect = {k: (v.to(dt) if v.is_floating_point() else v) for k, v in sd.items()}
        check_bake(out, expect)
        assert read_manifest(out).tensors["a"].source_dtype == "F32"


def test_every_dtype_from_safetensors(tmp):
    from safetensors.torch import save_file

    sd = every_dtype()
    save_file(sd, str(tmp / "m.safetensors"))
    convert(tmp / "m.safetensors", tmp / "out")
    check_bake(tmp / "out", sd)
