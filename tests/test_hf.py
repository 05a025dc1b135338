"""A bake is a first-class Hugging Face checkpoint: stock ``from_pretrained(OUT)`` loads it.

On tiny random Llama, Mixtral (MoE), BERT and T5 models saved by ``save_pretrained``, for a
lossless, a ``q8_0`` and a ``q4_k_m`` bake: no missing or unexpected keys, no padding entries,
outputs equal to the source model's (lossless) or within the documented tolerance, the
quantized Linear layers packed (after ``import prebake.cache.hf``), and a clear failure
without that import.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import prebake.cache.hf  # noqa: F401  (registers the quantization method)
import pytest
import torch
import transformers
from prebake.cache.qlinear import QuantLinear
from prebake.convert.bake import convert
from prebake.convert.plan import Options
from prebake.formats.manifest import read_manifest

# documented tolerances (README, "Quantized blobs"): cosine of the outputs to the float model's
COSINE = {"q8_0": 0.999, "q4_k_m": 0.98}


def llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))


def mixtral():
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=256, hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2))


def bert():
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4))


def t5():
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=256, d_model=256, d_kv=64, d_ff=512, num_layers=2, num_heads=4))


MODELS = {"llama": llama, "mixtral": mixtral, "bert": bert, "t5": t5}


def outputs(model, kind: str) -> torch.Tensor:
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        if kind == "t5":
            return model(input_ids=x, decoder_input_ids=x[:, :6]).logits
        if kind == "bert":
            return model(x).last_hidden_state
        return model(x).logits


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for kind, make in MODELS.items():
        torch.manual_seed(0)
        model = make().eval()
        model.save_pretrained(root / kind)
        out[kind] = (root / kind, outputs(model, kind), type(model))
    return root, out


@pytest.mark.parametrize("recipe", [None, "q8_0", "q4_k_m"])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_from_pretrained_loads_a_bake(sources, kind, recipe):
    root, found = sources
    src, expected, cls = found[kind]
    out = root / f"{kind}-{recipe or 'lossless'}"
    m = convert(src, out, Options(quant=recipe))
    print(f"{kind} {recipe or 'lossless'}: {len(m.padding)} padding entries")
    assert m.padding == []
    model, info = cls.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    got = outputs(model.eval(), kind)
    if recipe is None:
        assert torch.equal(got, expected)
        return
    cos = float(torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0))
    print(f"{kind} {recipe}: cosine {cos:.5f}")
    assert cos >= COSINE[recipe]
    packed = [mod for mod in model.modules() if isinstance(mod, QuantLinear)]
    assert packed and all(p.weight.dtype == torch.uint8 for p in packed)
    blocks = {n for n, t in m.tensors.items() if t.qtype}
    linear = {f"{n}.weight" for n, mod in model.named_modules() if isinstance(mod, QuantLinear)}
    unpacked = {n for n in blocks - linear}
    if kind == "mixtral":  # transformers 5 fuses the experts into one parameter: unpacked at load
        assert unpacked and all(".experts." in n for n in unpacked)
    elif kind == "t5":  # T5 keeps `wo` in float32 (_keep_in_fp32_modules): unpacked at load
        assert unpacked and all(n.endswith(".wo.weight") for n in unpacked)
    else:
        assert unpacked == set()


def test_safe_open_lists_only_real_tensors(sources):
    from safetensors import safe_open

    root, found = sources
    out = root / "listing"
    m = convert(found["bert"][0], out, Options(quant="q8_0"))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(m.tensors)


LOAD = textwrap.dedent("""
    import json, sys, transformers
    def rss():
        f = dict(line.split(":") for line in open("/proc/self/status"))
        return sum(int(f[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile"))
    if sys.argv[2] == "import":
        import prebake.cache.hf
    import torch
    transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))  # torch's one-time set-up
    before = rss()
    model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])
    print(json.dumps({"grown": rss() - before}))
""")


@pytest.fixture(scope="module")
def big_llama(tmp_path_factory):
    """8 layers, hidden 512: big enough that memory is the weights' and not the interpreter's."""
    root = tmp_path_factory.mktemp("bigllama")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=512, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=4)).save_pretrained(root / "src")
    convert(root / "src", root / "q4", Options(quant="q4_k_m"))
    return root


def test_packed_from_pretrained_stays_near_the_packed_size(big_llama):
    run = subprocess.run([sys.executable, "-c", LOAD, str(big_llama / "q4"), "import"], capture_output=True,
                         text=True, check=True)
    grown = json.loads(run.stdout.splitlines()[-1])["grown"]
    m = read_manifest(big_llama / "q4")
    packed = sum(t.nbytes for t in m.tensors.values())
    floats = sum(4 * t.shape[0] * t.shape[1] if len(t.shape) == 2 else 0 for t in m.tensors.values())
    print(f"from_pretrained: {grown / 2**20:.1f} MiB for a {packed / 2**20:.1f} MiB bake "
          f"(float32 weights: {floats / 2**20:.1f} MiB)")
    assert grown <= 1.3 * packed + (8 << 20)


def test_without_the_import_a_quantized_bake_fails_loudly(big_llama):
    run = subprocess.run([sys.executable, "-c", LOAD, str(big_llama / "q4"), "no-import"], capture_output=True,
                         text=True)
    assert run.returncode != 0
    assert "Unknown quantization type, got prebake" in run.stderr and "size mismatch" in run.stderr
