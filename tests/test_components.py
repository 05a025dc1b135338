"""A folder of several models (diffusers layout) bakes into one output; each loads on its own."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from prebake.cache import load_components, load_from_manifest, verify
from prebake.convert.bake import convert
from prebake.formats.manifest import read_manifest
from safetensors.torch import save_file

from tests.conftest import check_bake

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """text_encoder: BERT as a torch .bin; vae: one safetensors file; transformer: sharded safetensors."""
    src = tmp_path_factory.mktemp("pipe") / "src"
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                          num_attention_heads=2, intermediate_size=64))
    (src / "text_encoder").mkdir(parents=True)
    torch.save(bert.state_dict(), src / "text_encoder" / "pytorch_model.bin")
    bert.config.to_json_file(src / "text_encoder" / "config.json")
    vae = {"encoder.conv_in.weight": torch.randn(16, 3, 3, 3), "decoder.conv_out.bias": torch.randn(3)}
    (src / "vae").mkdir()
    save_file(vae, str(src / "vae" / "diffusion_pytorch_model.safetensors"))
    (src / "vae" / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    blocks = {f"blocks.{i}.attn.weight": torch.randn(64, 64) for i in range(4)}
    (src / "transformer").mkdir()
    weight_map = {}
    for part in range(2):
        names = [f"blocks.{i}.attn.weight" for i in (2 * part, 2 * part + 1)]
        file = f"diffusion_pytorch_model-0000{part + 1}-of-00002.safetensors"
        save_file({n: blocks[n] for n in names}, str(src / "transformer" / file))
        weight_map.update(dict.fromkeys(names, file))
    (src / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    (src / "scheduler").mkdir()
    (src / "scheduler" / "scheduler_config.json").write_text('{"num_train_timesteps": 1000}')
    (src / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
    out = src.parent / "out"
    convert(src, out)
    return src, out, {"text_encoder": bert.state_dict(), "vae": vae, "transformer": blocks}


def test_components_bake_into_one_output(pipeline):
    src, out, expected = pipeline
    m = read_manifest(out)
    assert set(m.components) == {"text_encoder", "vae", "transformer"}
    assert {f.path for f in m.files} == {"model_index.json", "scheduler/scheduler_config.json"}
    for name, sd in expected.items():
        check_bake(out / name, {k: v for k, v in sd.items()})
        assert m.components[name]["tensors"] == len(read_manifest(out / name).tensors)
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").exists()  # diffusers file names kept
    assert (out / "text_encoder" / "model.safetensors").exists()
    assert verify(out).tensors == sum(len(sd) for sd in expected.values()) - 0


def test_load_one_component(pipeline):
    _, out, expected = pipeline
    vae = load_from_manifest(out, component="vae")
    assert set(vae) == set(expected["vae"]) and torch.equal(vae["decoder.conv_out.bias"], expected["vae"]["decoder.conv_out.bias"])
    with pytest.raises(KeyError, match="component"):
        load_from_manifest(out)


def test_lazy_access_maps_only_the_touched_component(pipeline):
    _, out, _ = pipeline
    code = textwrap.dedent(f"""
        from prebake.cache import load_components
        from tests.test_load import mappings
        parts = load_components({str(out)!r})
        before = {{f for *_, f in mappings({str(out)!r})}}
        vae = parts["vae"]
        after = sorted({{f for *_, f in mappings({str(out)!r})}})
        print(len(before), after, parts.loaded)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    n_before, rest = res.stdout.split(" ", 1)
    assert n_before == "0"
    assert rest.strip() == f"['{out}/vae/diffusion_pytorch_model.safetensors'] ['vae']"


def test_parallel_load_of_several_components(pipeline):
    _, out, expected = pipeline
    parts = load_components(out)
    loaded = parts.load(["text_encoder", "transformer"], threads=2)
    assert set(loaded) == {"text_encoder", "transformer"} and sorted(parts.loaded) == ["text_encoder", "transformer"]
    assert torch.equal(loaded["transformer"]["blocks.3.attn.weight"], expected["transformer"]["blocks.3.attn.weight"])
    assert parts["text_encoder"] is loaded["text_encoder"]  # loaded once


def test_inspect_lists_components(pipeline):
    _, out, _ = pipeline
    res = subprocess.run([sys.executable, "-m", "prebake.convert", "inspect", str(out), "--json"],
                         capture_output=True, text=True, check=True)
    info = json.loads(res.stdout)
    assert set(info["components"]) == {"text_encoder", "vae", "transformer"}
    assert info["components"]["transformer"]["bytes"] == 4 * 64 * 64 * 4


def test_dry_run_plans_every_component(pipeline, capsys):
    from prebake.convert.cli import main

    src, out, expected = pipeline
    assert main(["convert", str(src), str(out.parent / "never"), "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert set(plan["components"]) == set(expected)
    for name, tensors in expected.items():
        assert sum(s["tensors"] for s in plan["components"][name]["shards"]) == len(tensors)
    assert not (out.parent / "never").exists()
