"""Variants: layer- and expert-pruned views over a bake's shards; no tensor byte is duplicated."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from prebake.cache.load import load_from_manifest
from prebake.convert.bake import convert
from prebake.convert.plan import Options
from prebake.convert.variants import SpecError, parse_spec, plan_variant
from prebake.formats.manifest import read_manifest

from tests.conftest import save_llama

transformers = pytest.importorskip("transformers")


def folder_bytes(path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_size for p in path.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llama8")
    model = save_llama(tmp / "src", layers=8, hidden=32, inter=64, vocab=128)
    convert(tmp / "src", tmp / "out")
    return tmp, model


def test_first_layer_variant_loads_strictly_and_matches_the_first_layer(llama):
    tmp, full = llama
    out = tmp / "out"
    before = folder_bytes(out)
    res = subprocess.run([sys.executable, "-m", "prebake.convert", "variant", "add", str(out), "one=first=1"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    after = folder_bytes(out)
    # no shard grew and none was added: the variant is a manifest entry plus its config
    assert {k: v for k, v in after.items() if k.endswith(".safetensors")} == \
        {k: v for k, v in before.items() if k.endswith(".safetensors")}
    assert set(after) - set(before) == {"variants/one/config.json"}
    assert after["manifest.json"] - before["manifest.json"] < 8192

    cfg = transformers.AutoConfig.from_pretrained(out / "variants" / "one")
    assert cfg.num_hidden_layers == 1
    small = transformers.LlamaForCausalLM(cfg).eval()
    sd = load_from_manifest(out, variant="one")
    assert set(sd) == set(small.state_dict())
    small.load_state_dict(sd, strict=True)

    reference = transformers.LlamaForCausalLM(full.config).eval()
    reference.load_state_dict(full.state_dict())
    reference.model.layers = reference.model.layers[:1]  # the full model's first layer, then norm and head
    reference.config.num_hidden_layers = 1
    x = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        assert torch.equal(small(x).logits, reference(x).logits)


def test_layer_ranges_renumber_and_leave_the_head_out(llama):
    tmp, full = llama
    convert(tmp / "src", tmp / "ranges", variants=["mid=layers=2-3,6;head=no"])
    m = read_manifest(tmp / "ranges")
    v = m.variants["mid"]
    assert v["layers"] == [2, 3, 6]
    sd = load_from_manifest(tmp / "ranges", variant="mid")
    assert "lm_head.weight" not in sd
    assert torch.equal(sd["model.layers.2.mlp.up_proj.weight"], full.model.layers[6].mlp.up_proj.weight)
    assert torch.equal(sd["model.layers.0.self_attn.q_proj.weight"], full.model.layers[2].self_attn.q_proj.weight)
    assert json.loads((tmp / "ranges" / v["config"]).read_text())["num_hidden_layers"] == 3
    # a view, not a copy
    whole = load_from_manifest(tmp / "ranges")
    assert sd["model.norm.weight"].data_ptr() != 0 and torch.equal(sd["model.norm.weight"], whole["model.norm.weight"])


def test_mixtral_expert_subset_builds_and_runs(tmp):
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2)
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(cfg).save_pretrained(tmp / "src")
    convert(tmp / "src", tmp / "out", variants=["e03=experts=0,3", "e12=experts=1-2"])
    from safetensors.torch import load_file

    source = load_file(str(tmp / "src" / "model.safetensors"))
    for name, kept in (("e03", [0, 3]), ("e12", [1, 2])):
        vcfg = transformers.AutoConfig.from_pretrained(tmp / "out" / "variants" / name)
        assert vcfg.num_local_experts == 2 and vcfg.num_experts_per_tok == 2
        sd = load_from_manifest(tmp / "out", variant=name)
        router = "model.layers.1.block_sparse_moe.gate.weight"
        assert torch.equal(sd[router], source[router][kept])
        assert torch.equal(sd["model.layers.0.block_sparse_moe.experts.1.w2.weight"],
                           source[f"model.layers.0.block_sparse_moe.experts.{kept[1]}.w2.weight"])
        assert not any(".experts.2." in k or ".experts.3." in k for k in sd)
        model = transformers.MixtralForCausalLM.from_pretrained(None, config=vcfg, state_dict=sd).eval()
        with torch.no_grad():
            logits = model(torch.randint(0, 64, (1, 7))).logits
        assert logits.shape == (1, 7, 64) and torch.isfinite(logits).all()
    # contiguous expert rows stay a view of the mapped router
    e12 = load_from_manifest(tmp / "out", variant="e12")
    m = read_manifest(tmp / "out")
    r = "model.layers.0.block_sparse_moe.gate.weight"
    assert e12[r].untyped_storage().nbytes() == m.shards[0].size  # the shard's mapping, not a copy
    assert e12[r].storage_offset() * 4 == m.tensors[r].offset + 1 * 32 * 4


@pytest.mark.parametrize("names", [
    ("model.layers.", "transformer.h.", "encoder.layer.", "decoder.block.", "blk.", "layers.",
     "double_blocks.", "single_blocks."),
])
def test_layer_naming_schemes(names):
    for prefix in names:
        shapes = {"embed.weight": [4, 2], f"{prefix}0.w": [2], f"{prefix}1.w": [2], f"{prefix}2.w": [2], "norm.weight": [2]}
        v = plan_variant("v", parse_spec("layers=1-2"), shapes)
        assert v.tensors == {"embed.weight": {"source": "embed.weight"}, f"{prefix}0.w": {"source": f"{prefix}1.w"},
                             f"{prefix}1.w": {"source": f"{prefix}2.w"}, "norm.weight": {"source": "norm.weight"}}


def test_stacked_gguf_experts_and_two_stacks():
    shapes = {"token_embd.weight": [8, 4], "blk.0.ffn_gate_exps.weight": [4, 6, 4],
              "blk.0.ffn_gate_inp.weight": [4, 4], "blk.0.attn_q.weight": [4, 4], "output.weight": [8, 4]}
    v = plan_variant("v", parse_spec("experts=1,2"), shapes, {"num_local_experts": 4})
    assert v.tensors["blk.0.ffn_gate_exps.weight"] == {"source": "blk.0.ffn_gate_exps.weight", "rows": [1, 2]}
    assert v.tensors["blk.0.ffn_gate_inp.weight"]["rows"] == [1, 2]
    assert "rows" not in v.tensors["blk.0.attn_q.weight"]
    flux = {"double_blocks.0.a": [1], "double_blocks.1.a": [1], "single_blocks.0.a": [1], "single_blocks.1.a": [1],
            "single_blocks.2.a": [1]}
    v = plan_variant("v", parse_spec("first=1"), flux, {"num_layers": 2, "num_single_layers": 3})
    assert set(v.tensors) == {"double_blocks.0.a", "single_blocks.0.a"}
    assert v.config == {"num_layers": 1, "num_single_layers": 1}


def test_include_exclude_and_bad_specs():
    shapes = {"model.layers.0.mlp.w": [2], "model.layers.0.attn.w": [2], "model.norm.weight": [2]}
    v = plan_variant("v", parse_spec("include=*mlp*,*norm*;exclude=*norm*"), shapes)
    assert list(v.tensors) == ["model.layers.0.mlp.w"]
    for bad in ("layers=5", "layers=x", "first=1;layers=0", "bogus=1", "experts=0", "include=nothing*"):
        with pytest.raises(SpecError):
            plan_variant("v", parse_spec(bad), shapes)


def test_bad_variant_on_the_command_line_is_one_clean_error(llama):
    tmp, _ = llama
    res = subprocess.run([sys.executable, "-m", "prebake.convert", "variant", "add", str(tmp / "out"), "x=layers=99"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.startswith("prebake: error:") and "Traceback" not in res.stderr


def test_gguf_variant_cuts_stacked_experts_and_its_metadata(tmp):
    import gguf
    import numpy as np

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(tmp / "moe.gguf"), "llama")
    w.add_block_count(3)
    w.add_expert_count(4)
    w.add_expert_used_count(2)
    exps = {i: rng.standard_normal((4, 16, 32)).astype(np.float32) for i in range(3)}
    w.add_tensor("token_embd.weight", rng.standard_normal((64, 32)).astype(np.float32))
    for i in range(3):
        w.add_tensor(f"blk.{i}.ffn_gate_exps.weight", exps[i])
        w.add_tensor(f"blk.{i}.ffn_gate_inp.weight", rng.standard_normal((4, 32)).astype(np.float32))
    w.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    m = convert(tmp / "moe.gguf", tmp / "out", Options(names="gguf"), variants=["v=first=2;experts=1,3"])
    meta = json.loads((tmp / "out" / m.variants["v"]["config"]).read_text())
    assert meta == {"llama.block_count": 2, "llama.expert_count": 2, "llama.expert_used_count": 2}
    sd = load_from_manifest(tmp / "out", variant="v")
    assert set(sd) == {"token_embd.weight", "output_norm.weight", *(f"blk.{i}.ffn_gate_{k}.weight"
                                                                    for i in range(2) for k in ("exps", "inp"))}
    assert np.array_equal(sd["blk.1.ffn_gate_exps.weight"].numpy(), exps[1][[1, 3]])
