"""Issue 13: a GGUF bakes into a Hugging Face model folder that stock ``from_pretrained`` loads.

Tiny random Llama, Qwen2, Qwen2-MoE and Gemma 3 models are written as GGUF files the way
llama.cpp's converter writes them (:mod:`tests.gguf_models`: its names, keys, Q/K permutation,
stacked experts, Gemma's norm offset, a byte-level BPE or a SentencePiece vocabulary), then baked:

- F32 files give the original model's logits exactly, F16 files the original's with its
  matrices rounded to half, and the config is the one transformers' own GGUF loader builds;
- Q8_0 and Q4_K files give the logits of transformers' ``from_pretrained(folder, gguf_file=...)``
  (the same dequantized weights), dequantized (float32 by default, as that route) and packed
  (``--keep-quant`` through ``import prebake.cache.hf``; Gemma's scaled, tied embeddings too).
  transformers' route cannot load a Qwen2-MoE GGUF whose expert width is not its config class's
  default (its table lacks the key), so the MoE is checked against the original model with each
  quantized weight replaced by gguf-py's dequantization of its blocks;
- the rebuilt tokenizer encodes sentences, special tokens and a chat like the original;
- GGUF names stay in the manifest; every metadata key in ``prebake inspect --gguf``;
  ``--names gguf`` and unknown architectures keep the GGUF's names.
"""

from __future__ import annotations

import json
import warnings

import gguf
import numpy as np
import prebake.cache.hf  # noqa: F401  (registers the quantization method)
import pytest
import torch
import transformers
from prebake.cache.qlinear import QuantEmbedding, QuantLinear
from prebake.convert.bake import convert
from prebake.convert.cli import main
from prebake.convert.gguf_config import EXTRA_CONFIG_KEYS, hf_config
from prebake.convert.plan import Options
from prebake.formats.errors import PrebakeWarning
from prebake.formats.gguf_file import open_gguf
from prebake.formats.manifest import read_manifest

from tests.gguf_models import write_gguf
from tests.tiny_tokenizers import encodings, qwen2_tokenizer, spm_tokenizer

transformers.utils.logging.disable_progress_bar()
COMMON = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)


def _config(kind: str, tok):
    if kind == "llama":
        return transformers.LlamaConfig(vocab_size=len(tok), bos_token_id=1, eos_token_id=2, **COMMON)
    if kind == "qwen2":
        return transformers.Qwen2Config(vocab_size=len(tok), eos_token_id=tok.eos_token_id, tie_word_embeddings=True,
                                        **COMMON)
    if kind == "qwen2moe":
        return transformers.Qwen2MoeConfig(vocab_size=len(tok), moe_intermediate_size=256, num_experts=4,
                                           shared_expert_intermediate_size=512, num_experts_per_tok=2,
                                           eos_token_id=tok.eos_token_id, **COMMON)
    if kind == "qwen3":  # transformers' table has no key for head_dim: the class's default (128) it is
        return transformers.Qwen3Config(vocab_size=len(tok), head_dim=128, eos_token_id=tok.eos_token_id, **COMMON)
    if kind == "qwen3moe":  # norm_topk_prob: what transformers' GGUF defaults say llama.cpp computes
        return transformers.Qwen3MoeConfig(vocab_size=len(tok), head_dim=64, moe_intermediate_size=256, num_experts=4,
                                           num_experts_per_tok=2, norm_topk_prob=True, eos_token_id=tok.eos_token_id,
                                           **COMMON)
    if kind == "phi3":
        return transformers.Phi3Config(vocab_size=len(tok), bos_token_id=1, eos_token_id=2, pad_token_id=2, **COMMON)
    gemma = transformers.Gemma2Config if kind == "gemma2" else transformers.Gemma3TextConfig
    return gemma(vocab_size=len(tok), head_dim=64, sliding_window=64, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                 **COMMON)


TOKENIZERS = {"llama": lambda p: spm_tokenizer(p, "llama"), "qwen2": qwen2_tokenizer, "qwen2moe": qwen2_tokenizer,
              "gemma3": lambda p: spm_tokenizer(p, "gemma"), "qwen3": qwen2_tokenizer, "qwen3moe": qwen2_tokenizer,
              "gemma2": lambda p: spm_tokenizer(p, "gemma"), "phi3": lambda p: spm_tokenizer(p, "llama")}


class Zoo:
    """The tiny source models (built once), their GGUF files and bakes (made on first use)."""

    def __init__(self, root):
        self.root, self.models, self.files, self.bakes = root, {}, {}, {}

    def model(self, kind: str):
        if kind not in self.models:
            src = self.root / kind
            src.mkdir()
            tok = TOKENIZERS[kind](src)
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(_config(kind, tok)).eval()
            model.save_pretrained(src)
            self.models[kind] = (src, model)
        return self.models[kind]

    def gguf(self, kind: str, qtype: str):
        if (kind, qtype) not in self.files:
            src, _ = self.model(kind)
            self.files[kind, qtype] = write_gguf(src, self.root / f"{kind}-{qtype}.gguf", qtype)
        return self.files[kind, qtype]

    def bake(self, kind: str, qtype: str, keep: bool = False):
        if (kind, qtype, keep) not in self.bakes:
            out = self.root / f"{kind}-{qtype}-{'keep' if keep else 'float'}"
            with warnings.catch_warnings():
                warnings.simplefilter("error", PrebakeWarning)  # a Hugging Face folder, nothing to warn of
                convert(self.gguf(kind, qtype), out, Options(keep_quant=keep))
            self.bakes[kind, qtype, keep] = out
        return self.bakes[kind, qtype, keep]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return Zoo(tmp_path_factory.mktemp("gguf_hf"))


def logits(model, vocab: int) -> torch.Tensor:
    x = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model(x).logits


def load(folder, **kw):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, **kw)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen2moe", "gemma3", "qwen3", "qwen3moe", "gemma2", "phi3"])
def test_f32_gguf_bakes_to_the_original_model(zoo, kind):
    src, model = zoo.model(kind)
    out = zoo.bake(kind, "F32")
    assert torch.equal(logits(load(out), model.vocab_size), logits(model, model.vocab_size))
    # the checkpoint names save_pretrained writes, each with the GGUF name it came from
    from safetensors import safe_open

    with safe_open(str(src / "model.safetensors"), "pt") as f:
        assert set(read_manifest(out).tensors) == set(f.keys())
    m = read_manifest(out)
    assert all(t.source_name and t.source_name.startswith(("blk.", "token_embd", "output")) for t in m.tensors.values())
    if kind == "qwen2moe":  # per-expert tensors, each a run of rows of the stacked GGUF tensor
        assert m.tensors["model.layers.1.mlp.experts.3.up_proj.weight"].source_name == "blk.1.ffn_up_exps.weight"
    if kind in ("qwen2", "gemma3"):  # tied: no head stored, as save_pretrained writes it
        assert "lm_head.weight" not in m.tensors
    # config.json is the config transformers' GGUF loader builds (plus the keys its table lacks)
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = zoo.gguf(kind, "F32")
    theirs, ours = load_gguf_checkpoint(str(path), return_tensors=False)["config"], hf_config(open_gguf(path))
    extra = set(EXTRA_CONFIG_KEYS.get(ours["model_type"], {}).values())
    assert {k: v for k, v in ours.items() if k not in extra} == theirs
    saved = json.loads((out / "config.json").read_text())
    assert saved["architectures"] == [type(model).__name__] and saved["dtype"] == "float32"
    assert (out / "generation_config.json").exists()


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_f16_gguf_bakes_to_the_original_model_rounded_to_half(zoo, kind):
    _, model = zoo.model(kind)
    rounded = type(model)(model.config).eval()
    sd = {k: v.half().float() if v.ndim > 1 else v for k, v in model.state_dict().items()}  # llama.cpp: 1-D in F32
    rounded.load_state_dict(sd)
    out = zoo.bake(kind, "F16")
    assert read_manifest(out).tensors["model.layers.0.mlp.up_proj.weight"].dtype == "F16"  # copied as stored
    assert torch.equal(logits(load(out, dtype=torch.float32), model.vocab_size), logits(rounded, model.vocab_size))


QUANTIZED = [("llama", "Q8_0"), ("llama", "Q4_K"), ("qwen2", "Q8_0"), ("gemma3", "Q4_K")]


@pytest.mark.parametrize(("kind", "qtype"), QUANTIZED)
def test_quantized_gguf_gives_transformers_gguf_route_logits(zoo, kind, qtype):
    path = zoo.gguf(kind, qtype)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    vocab = theirs.config.vocab_size
    expected = logits(theirs, vocab)
    assert torch.equal(logits(load(zoo.bake(kind, qtype)), vocab), expected)  # dequantized: the same floats
    packed = load(zoo.bake(kind, qtype, keep=True))
    layers = [m for m in packed.modules() if isinstance(m, (QuantLinear, QuantEmbedding))]
    assert len(layers) >= 2 * 7 + 1 and all(m.weight.dtype == torch.uint8 for m in layers)
    if packed.config.tie_word_embeddings:  # the head shares the embeddings' blocks
        assert packed.lm_head.weight.data_ptr() == packed.model.embed_tokens.weight.data_ptr()
    got = logits(packed, vocab)
    print(f"{kind} {qtype} packed: max |diff| {float((got - expected).abs().max()):.2e}")
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_quantized_moe_gives_the_dequantized_original(zoo):
    _, model = zoo.model("qwen2moe")
    reference = type(model)(model.config).eval()
    q8 = gguf.GGMLQuantizationType.Q8_0
    sd = {}
    for k, v in model.state_dict().items():  # what llama.cpp quantizes: matrices but the routers
        quantized = v.ndim > 1 and ".mlp.gate." not in k and "shared_expert_gate" not in k
        sd[k] = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(v.numpy(), q8), q8)) if quantized else v
    reference.load_state_dict(sd)
    expected = logits(reference, model.vocab_size)
    assert torch.equal(logits(load(zoo.bake("qwen2moe", "Q8_0")), model.vocab_size), expected)
    packed = load(zoo.bake("qwen2moe", "Q8_0", keep=True))
    assert isinstance(packed.model.layers[0].mlp.shared_expert.up_proj, QuantLinear)
    torch.testing.assert_close(logits(packed, model.vocab_size), expected, rtol=1e-4, atol=1e-4)


def test_row_permutation_moves_whole_block_rows(zoo):
    """--keep-quant: undoing llama.cpp's Q/K permutation reorders the GGUF's block rows, no block re-encoded."""
    path = zoo.gguf("llama", "Q4_K")
    out = zoo.bake("llama", "Q4_K", keep=True)
    from prebake.cache.load import load_from_manifest

    stored = load_from_manifest(out)["model.layers.0.self_attn.k_proj.weight"].blocks.numpy()
    source = open_gguf(path).tensor_bytes("blk.0.attn_k.weight").reshape(stored.shape)
    heads, rows = 2, stored.shape[0]
    order = np.arange(rows).reshape(heads, rows // heads // 2, 2).swapaxes(1, 2).reshape(-1)
    assert np.array_equal(stored, source[order]) and not np.array_equal(stored, source)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
def test_tokenizer_encodes_like_the_original(zoo, kind):
    src, _ = zoo.model(kind)
    original = transformers.AutoTokenizer.from_pretrained(src)
    rebuilt = transformers.AutoTokenizer.from_pretrained(zoo.bake(kind, "Q8_0" if kind != "gemma3" else "Q4_K"))
    specials = [t for t in original.all_special_tokens if t]
    assert encodings(rebuilt, specials) == encodings(original, specials)
    assert rebuilt.chat_template == original.chat_template


def test_inspect_gguf_prints_every_key(zoo, capsys):
    out = zoo.bake("qwen2", "Q8_0")
    assert main(["inspect", str(out), "--gguf", "--json"]) == 0
    keys = json.loads(capsys.readouterr().out)["gguf"]
    assert keys == open_gguf(zoo.gguf("qwen2", "Q8_0")).metadata(max_list=None)
    assert main(["inspect", str(out), "--gguf"]) == 0
    text = capsys.readouterr().out
    assert f"tokenizer.ggml.tokens = [{len(keys['tokenizer.ggml.tokens'])} x STRING]" in text
    assert "qwen2.block_count = 2" in text


def test_names_gguf_keeps_todays_bake(zoo, tmp_path):
    m = convert(zoo.gguf("llama", "Q8_0"), tmp_path / "out", Options(names="gguf"))
    assert "blk.0.attn_q.weight" in m.tensors and not (tmp_path / "out" / "config.json").exists()
    assert m.tensors["blk.0.attn_q.weight"].dtype == "F16" and m.tensors["blk.0.attn_q.weight"].source_name is None
    assert m.options["names"] == "gguf"


def test_an_architecture_transformers_cannot_build_keeps_gguf_names(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "notamodel")
    w.add_block_count(1)
    w.add_embedding_length(32)
    w.add_tensor("blk.0.attn_q.weight", np.ones((32, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.warns(PrebakeWarning, match=r"x.gguf: transformers cannot load GGUF architecture 'notamodel'; "
                                            r"baked under its GGUF names$"):
        m = convert(tmp_path / "x.gguf", tmp_path / "out")
    assert list(m.tensors) == ["blk.0.attn_q.weight"] and (tmp_path / "out" / "gguf_metadata.gguf").exists()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
def test_tokenizer_inputs_are_transformers_own(zoo, kind):
    """prebake reads the tokenizer's keys itself (transformers' reader takes seconds on a big
    vocabulary); what it hands transformers' converter is what transformers' reader would."""
    from prebake.convert.gguf_tokenizer import tokenizer_inputs
    from transformers.integrations.gguf import get_gguf_tokenizer

    path = zoo.gguf(kind, "F32")
    assert tokenizer_inputs(open_gguf(path)) == get_gguf_tokenizer(str(path))
