"""``prebake export``: tiny transformers models, baked float and quantized, exported to GGUF.

Each exported file is read back with gguf-py's ``GGUFReader`` and checked against the bake
through this file's own table of llama.cpp's names and layout (not the exporter's): the tensor
names, the metadata keys llama.cpp's loader reads, and every tensor's values, dequantized and
with the Q/K permutation undone, the experts unstacked and Gemma's +1 taken off, equal to the
bake's. Blocks are checked byte for byte (copied, never re-encoded).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict

import numpy as np
import pytest
import torch
from prebake.cache.load import load_from_manifest
from prebake.convert.bake import convert
from prebake.convert.bake_source import bake_tensors
from prebake.convert.export import export_gguf, plan_export
from prebake.convert.plan import Options
from prebake.formats.manifest import read_manifest

from tests.export_models import LLAMA3_SPLIT, QWEN2_SPLIT, bpe_tokenizer, read_gguf, save_model, spm_tokenizer
from tests.ggml_reference import gguf_logits

ARCHS = {  # test model -> (general.architecture, tokenizer, Q/K permuted, norms +1)
    "llama": ("llama", "bpe", True, False), "mistral": ("llama", "spm", True, False),
    "mixtral": ("llama", "bpe", True, False), "qwen2": ("qwen2", "qwen", False, False),
    "qwen2moe": ("qwen2moe", "qwen", False, False), "qwen3": ("qwen3", "qwen", False, False),
    "qwen3moe": ("qwen3moe", "qwen", False, False), "gemma2": ("gemma2", "spm", False, True),
    "gemma3": ("gemma3", "spm", False, True), "phi3": ("phi3", "spm", False, False),
}
# transformers' layer tensors -> llama.cpp's (convert_hf_to_gguf.py / gguf-py's constants)
LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.qkv_proj": "attn_qkv", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "input_layernorm": "attn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.gate_up_proj": "ffn_up",
    "block_sparse_moe.gate": "ffn_gate_inp", "mlp.gate": "ffn_gate_inp",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp", "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp", "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
}
EXPERT_NAMES = {"w1": "ffn_gate_exps", "w2": "ffn_down_exps", "w3": "ffn_up_exps", "gate_proj": "ffn_gate_exps",
                "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}
REQUIRED = {"general.architecture": "STRING", "{a}.context_length": "UINT32", "{a}.embedding_length": "UINT32",
            "{a}.block_count": "UINT32", "{a}.feed_forward_length": "UINT32", "{a}.attention.head_count": "UINT32",
            "{a}.attention.head_count_kv": "UINT32", "{a}.attention.layer_norm_rms_epsilon": "FLOAT32",
            "general.file_type": "UINT32", "general.quantization_version": "UINT32",
            "tokenizer.ggml.model": "STRING", "tokenizer.ggml.tokens": "ARRAY"}
REQUIRED_MOE = {"{a}.expert_count": "UINT32", "{a}.expert_used_count": "UINT32"}
REQUIRED_ARCH = {"llama": {"{a}.rope.dimension_count": "UINT32", "{a}.vocab_size": "UINT32"},
                 "qwen2moe": {"{a}.expert_feed_forward_length": "UINT32",
                              "{a}.expert_shared_feed_forward_length": "UINT32"},
                 "qwen3moe": {"{a}.expert_feed_forward_length": "UINT32"},
                 "gemma2": {"{a}.attention.sliding_window": "UINT32", "{a}.attn_logit_softcapping": "FLOAT32",
                            "{a}.final_logit_softcapping": "FLOAT32"},
                 "gemma3": {"{a}.attention.sliding_window": "UINT32", "{a}.attention.key_length": "UINT32"},
                 "phi3": {"{a}.rope.dimension_count": "UINT32"}}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """kind -> a bfloat16 model folder (hidden 256, so K-quants fit), made on first use."""
    root, made = tmp_path_factory.mktemp("export-models"), {}

    def get(kind: str):
        if kind not in made:
            folder = root / kind
            save_model(kind, folder, hidden=256, dtype=torch.bfloat16)
            _tokenizer(kind, folder)
            made[kind] = folder
        return made[kind]
    return get


def _tokenizer(kind: str, folder) -> None:
    tok = ARCHS[kind][1]
    if tok == "spm":
        spm_tokenizer(folder, 320)
        (folder / "tokenizer_config.json").write_text(json.dumps({
            "added_tokens_decoder": {"3": {"content": "<start_of_turn>", "special": True}},
            "chat_template": "{{ messages }}"}))
    else:
        bpe_tokenizer(folder, 300, QWEN2_SPLIT if tok == "qwen" else LLAMA3_SPLIT)


def _gguf_name(name: str, post_norms: bool) -> tuple[str, int | None]:
    """llama.cpp's name of a transformers tensor, and its expert number (None outside experts).
    ``post_norms``: Gemma's layers, where post_attention_layernorm follows attention."""
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if name in top:
        return top[name], None
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
    layer, inner, suffix = int(m[1]), m[2], m[3]
    e = re.fullmatch(r"(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)", inner)
    if e:
        return f"blk.{layer}.{EXPERT_NAMES[e[2]]}.{suffix}", int(e[1])
    if inner == "post_attention_layernorm":
        return f"blk.{layer}.{'post_attention_norm' if post_norms else 'ffn_norm'}.{suffix}", None
    return f"blk.{layer}.{LAYER_NAMES[inner]}.{suffix}", None


def _permute(a: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute, written out with numpy."""
    return a.reshape(heads, 2, a.shape[0] // heads // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


def expected_tensors(bake, kind: str) -> dict[str, np.ndarray]:
    """The GGUF tensors llama.cpp's layout makes of the bake, as float32 values."""
    arch, _, permute, plus_one = ARCHS[kind]
    config = json.loads((bake / "config.json").read_text())
    state = {k: (v.float() if isinstance(v, torch.Tensor) else v.dequantize(torch.float32)).numpy()
             for k, v in load_from_manifest(bake).items()}  # blocks unpacked in float32, as gguf-py does
    post_norms = any("pre_feedforward_layernorm" in n for n in state)
    aliases = read_manifest(bake).aliases
    out, experts = {}, defaultdict(dict)
    for name, a in state.items():
        gname, expert = _gguf_name(name, post_norms)
        if gname == "output.weight" and (arch == "gemma2" or name in aliases):
            continue  # Gemma 2's head and tied heads: llama.cpp reads token_embd
        if permute and re.search(r"\.(q_proj|k_proj)\.weight$", name):
            a = _permute(a, config["num_attention_heads"] if "q_proj" in name else config["num_key_value_heads"])
        if plus_one and name.endswith("norm.weight"):
            a = a + np.float32(1)
        if expert is None:
            out[gname] = a
        else:
            experts[gname][expert] = a
    out.update({g: np.stack([d[i] for i in sorted(d)]) for g, d in experts.items()})
    return out


@pytest.mark.parametrize("recipe", [None, "q8_0", "q4_k_m"])
@pytest.mark.parametrize("kind", list(ARCHS))
def test_export_matches_the_bake(tmp, models, kind, recipe):
    folder = models(kind)
    bake = tmp / "baked"
    convert(folder, bake, Options(quant=recipe))
    result = export_gguf(bake, tmp / "model.gguf")
    fields, tensors = read_gguf(tmp / "model.gguf")
    arch = ARCHS[kind][0]
    assert fields["general.architecture"][0] == arch == result["arch"]
    required = {**REQUIRED, **(REQUIRED_MOE if "moe" in kind or kind == "mixtral" else {}),
                **REQUIRED_ARCH.get(arch, {})}
    for key, kind_of in required.items():
        key = key.format(a=arch)
        assert key in fields and fields[key][1][0] == kind_of, key
    expected = expected_tensors(bake, kind)
    assert set(tensors) == set(expected)
    stored = bake_tensors(read_manifest(bake))
    for name, want in expected.items():
        qtype, got, _ = tensors[name]
        assert got.shape == want.shape, name
        assert np.array_equal(got, want), name
        if want.ndim == 1 or name.endswith("_norm.weight") or "ffn_gate_inp" in name:
            assert qtype == "F32", name
    blocks = {t.qtype for t in stored.values() if t.qtype}
    exported = {t[0] for t in tensors.values()} - {"F32", "BF16"}
    assert exported == blocks  # every block type of the bake, and no other, is in the file
    assert fields["tokenizer.ggml.tokens"][0].__len__() == tensors["token_embd.weight"][1].shape[0]


def test_blocks_are_copied_whole_rows_permuted(tmp, models):
    """attn_q of a q8_0 bake: the file's bytes are the bake's block rows in llama.cpp's order."""
    bake = tmp / "baked"
    convert(models("llama"), bake, Options(quant="q8_0"))
    export_gguf(bake, tmp / "model.gguf")
    _, tensors = read_gguf(tmp / "model.gguf")
    blocks = bake_tensors(read_manifest(bake))["model.layers.0.self_attn.q_proj.weight"].read()
    order = _permute(np.arange(blocks.shape[0]), 4)
    assert tensors["blk.0.attn_q.weight"][2] == np.ascontiguousarray(blocks[order]).tobytes()


@pytest.mark.parametrize("recipe", ["q8_0", "q4_k_m"])
def test_quantizing_at_export_equals_quantizing_the_bake(tmp, models, recipe):
    """export --quant of a float bake writes the bytes a --quant bake exports (same codecs, same policy)."""
    folder = models("qwen2moe")
    convert(folder, tmp / "float", Options())
    convert(folder, tmp / "quant", Options(quant=recipe))
    export_gguf(tmp / "float", tmp / "a.gguf", quant=recipe)
    export_gguf(tmp / "quant", tmp / "b.gguf")
    a, b = read_gguf(tmp / "a.gguf")[1], read_gguf(tmp / "b.gguf")[1]
    assert {k: (v[0], v[2]) for k, v in a.items()} == {k: (v[0], v[2]) for k, v in b.items()}


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16"])
def test_outtype_casts_matrices_and_keeps_vectors_f32(tmp, models, outtype):
    bake = tmp / "baked"
    convert(models("llama"), bake, Options())
    export_gguf(bake, tmp / "model.gguf", outtype=outtype)
    _, tensors = read_gguf(tmp / "model.gguf")
    expected = expected_tensors(bake, "llama")
    for name, (qtype, got, _) in tensors.items():
        want = "F32" if got.ndim == 1 else outtype.upper()
        assert qtype == want, name
        cast = torch.from_numpy(expected[name]).to(getattr(torch, {"F32": "float32", "F16": "float16",
                                                                   "BF16": "bfloat16"}[want])).float().numpy()
        assert np.array_equal(got, cast), name


@pytest.mark.parametrize("kind", ["llama", "mixtral", "qwen2", "qwen2moe", "qwen3", "qwen3moe"])
def test_logits_in_llamacpp_conventions_match_transformers(tmp, kind):
    """A numpy forward pass that reads the GGUF as llama.cpp does (GGML rope modes, the file's
    metadata) gives transformers' logits: the layout and the keys mean what they should."""
    folder = tmp / kind
    model = save_model(kind, folder, hidden=64)
    bpe_tokenizer(folder, 300)
    convert(folder, tmp / "baked", Options())
    export_gguf(tmp / "baked", tmp / "model.gguf")
    tokens = [5, 17, 99, 3, 250, 11, 42, 7, 100, 64]
    with torch.no_grad():
        want = model(torch.tensor([tokens])).logits[0].numpy()
    got = gguf_logits(tmp / "model.gguf", tokens)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def test_fused_experts_of_transformers_5_export_like_per_expert_ones(tmp):
    """transformers 5 keeps Mixtral's experts fused in memory (gate_up_proj (E, 2I, H)); a
    checkpoint saved that way exports the same ffn_*_exps as save_pretrained's per-expert one."""
    from safetensors.torch import save_file

    folder = tmp / "per-expert"
    model = save_model("mixtral", folder, hidden=64)
    bpe_tokenizer(folder, 300)
    fused = tmp / "fused"
    fused.mkdir()
    for f in folder.iterdir():
        if f.suffix != ".safetensors":
            (fused / f.name).write_bytes(f.read_bytes())
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    save_file(state, fused / "model.safetensors")
    for name in ("per-expert", "fused"):
        convert(tmp / name, tmp / f"{name}-baked", Options())
        export_gguf(tmp / f"{name}-baked", tmp / f"{name}.gguf")
    a, b = read_gguf(tmp / "per-expert.gguf")[1], read_gguf(tmp / "fused.gguf")[1]
    assert {k: v[2] for k, v in a.items()} == {k: v[2] for k, v in b.items()}


def test_tokenizers_as_llamacpp_writes_them(tmp, models):
    import sentencepiece

    bake = tmp / "baked"
    convert(models("gemma2"), bake, Options())
    export_gguf(bake, tmp / "spm.gguf")
    fields, _ = read_gguf(tmp / "spm.gguf")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(bake / "tokenizer.model"))
    tokens, scores, types = (fields[f"tokenizer.ggml.{k}"][0] for k in ("tokens", "scores", "token_type"))
    assert fields["tokenizer.ggml.model"][0] == "llama" and fields["tokenizer.ggml.add_space_prefix"][0] is False
    assert tokens[:sp.vocab_size()] == [sp.IdToPiece(i) for i in range(sp.vocab_size())]
    assert scores[5] == pytest.approx(sp.GetScore(5)) and types[3] == 3  # <start_of_turn>: special -> CONTROL
    assert types[0] == 2 and types[1] == 3 and types[10] == 6  # <unk>, <s>, a byte piece
    assert fields["tokenizer.chat_template"][0] == "{{ messages }}"

    convert(models("qwen2"), tmp / "qwen", Options())
    export_gguf(tmp / "qwen", tmp / "bpe.gguf")
    fields, _ = read_gguf(tmp / "bpe.gguf")
    tok = json.loads((tmp / "qwen" / "tokenizer.json").read_text())
    assert fields["tokenizer.ggml.model"][0] == "gpt2" and fields["tokenizer.ggml.pre"][0] == "qwen2"
    vocab = {i: t for t, i in tok["model"]["vocab"].items()}
    assert fields["tokenizer.ggml.tokens"][0][4:300] == [vocab[i] for i in range(4, 300)]
    assert fields["tokenizer.ggml.tokens"][0][300:] == [f"[PAD{i}]" for i in range(300, 320)]
    assert fields["tokenizer.ggml.merges"][0][:3] == [" ".join(m) for m in tok["model"]["merges"][:3]]
    assert fields["tokenizer.ggml.bos_token_id"][0] == 0 and fields["tokenizer.ggml.eos_token_id"][0] == 1
    assert fields["tokenizer.ggml.token_type"][0][:5] == [3, 3, 3, 3, 1]


def test_dry_run_plans_without_writing(tmp, models):
    convert(models("mixtral"), tmp / "baked", Options(quant="q4_k_m"))
    plan = plan_export(tmp / "baked")
    stacked = next(t for t in plan.tensors if t.name == "blk.1.ffn_down_exps.weight")  # use_more_bits(1, 2)
    assert stacked.shape == (4, 256, 512) and stacked.qtype == "Q6_K" and "4 experts stacked" in stacked.note
    assert plan.file_type == 15 and not (tmp / "model.gguf").exists()
