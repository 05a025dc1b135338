"""--quant: policy, blocks identical to the codec, packed tensors at run time, QuantLinear."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from prebake.cache import load_from_manifest, load_module, verify
from prebake.cache.packed import PackedTensor
from prebake.cache.qlinear import QuantLinear, dequantize_all
from prebake.convert.bake import convert
from prebake.convert.plan import Options
from prebake.convert.quant_policy import QuantPolicy, choose, use_more_bits
from prebake.formats.errors import PrebakeWarning
from prebake.formats.manifest import read_manifest
from prebake.formats.quants import QTYPES, quantize
from prebake.formats.tensor import TensorInfo

from tests.conftest import save_llama

transformers = pytest.importorskip("transformers")


def info(name: str, shape, dtype="F32") -> TensorInfo:
    return TensorInfo(name, dtype, tuple(shape), 0, "x", lambda: None)


def test_policy_defaults_and_overrides():
    ts = [info("model.embed_tokens.weight", (1024, 256)), info("model.layers.0.self_attn.q_proj.weight", (256, 256)),
          info("model.layers.0.self_attn.q_proj.bias", (256,)), info("model.layers.0.input_layernorm.weight", (256,)),
          info("model.layers.0.mlp.down_proj.weight", (256, 512)), info("tiny.weight", (8, 32)),
          info("model.layers.0.odd.weight", (64, 100)), info("ids", (64, 64), "I64"),
          info("lm_head.weight", (1024, 256)), info("model.layers.0.block_sparse_moe.gate.weight", (8, 4096)),
          info("blk.0.ffn_gate_inp.weight", (8, 4096))]
    chosen, kept = choose(QuantPolicy("q8_0"), ts)
    assert chosen == {"model.layers.0.self_attn.q_proj.weight": "Q8_0", "model.layers.0.mlp.down_proj.weight": "Q8_0",
                      "lm_head.weight": "Q8_0"}
    assert "not a multiple" in kept["model.layers.0.odd.weight"]
    chosen, _ = choose(QuantPolicy("q8_0", embeddings=True, skip=("lm_head*",)), ts)
    assert "model.embed_tokens.weight" in chosen and "lm_head.weight" not in chosen
    chosen, _ = choose(QuantPolicy("q4_0", only=("*down_proj*",)), ts)
    assert list(chosen) == ["model.layers.0.mlp.down_proj.weight"]
    # as llama-quantize: the output head at Q6_K for every type but Q8_0, unless pure
    head = [info("lm_head.weight", (1024, 256))]
    assert choose(QuantPolicy("q4_0"), head)[0] == {"lm_head.weight": "Q6_K"}
    assert choose(QuantPolicy("q4_0", pure=True), head)[0] == {"lm_head.weight": "Q4_0"}
    assert choose(QuantPolicy("q4_0"), [info("lm_head.weight", (1024, 96))])[0] == {"lm_head.weight": "Q8_0"}
    assert choose(QuantPolicy("q4_k"), ts)[0]["model.layers.0.self_attn.q_proj.weight"] == "Q4_K"
    # K-quants fall back as llama.cpp does when a row is not a multiple of 256
    chosen, _ = choose(QuantPolicy("q4_k"), [info("model.layers.0.mlp.up_proj.weight", (128, 96))])
    assert chosen == {"model.layers.0.mlp.up_proj.weight": "Q5_0"}


def test_q4_k_m_mix_follows_llama_cpp():
    n = 16
    ts = [info(f"model.layers.{i}.{p}.weight", (256, 256)) for i in range(n)
          for p in ("self_attn.v_proj", "self_attn.q_proj", "mlp.down_proj")] + [info("lm_head.weight", (512, 256))]
    chosen, _ = choose(QuantPolicy("q4_k_m"), ts)
    assert chosen["lm_head.weight"] == "Q6_K"
    for i in range(n):
        more = "Q6_K" if use_more_bits(i, n) else "Q4_K"
        assert chosen[f"model.layers.{i}.self_attn.v_proj.weight"] == more
        assert chosen[f"model.layers.{i}.mlp.down_proj.weight"] == more
        assert chosen[f"model.layers.{i}.self_attn.q_proj.weight"] == "Q4_K"
    assert [i for i in range(n) if use_more_bits(i, n)] == [0, 1, 4, 7, 10, 13, 14, 15]


@pytest.mark.parametrize("qtype", sorted(QTYPES))
def test_torch_dequantize_equals_gguf(qtype):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((8, 512)) * rng.uniform(0.01, 3, (8, 1))).astype(np.float32)
    blocks = quantize(x, qtype)
    p = PackedTensor(torch.from_numpy(blocks), qtype, x.shape, torch.float32)
    ref = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[qtype]).reshape(x.shape)
    assert np.array_equal(p.dequantize().numpy(), ref)
    assert torch.equal(p.dequantize(torch.float16), torch.from_numpy(ref).to(torch.float16))
    assert np.array_equal(p.rows(3, 6).dequantize().numpy(), ref[3:6])


@pytest.mark.parametrize("qtype", sorted(QTYPES))
def test_torch_dequantize_equals_gguf_on_arbitrary_bytes(qtype):
    """Any bytes a file may hold (levels and scales never made by a quantizer), into given memory."""
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    raw = np.random.default_rng(1).integers(0, 256, (16, 4 * size), dtype=np.uint8)
    halves = raw.reshape(-1, size)
    for at in range(0, 4 if qtype in ("Q4_1", "Q5_1", "Q4_K") else 2, 2):  # finite fp16 scales
        field = halves[:, at:at + 2].copy().view(np.float16)
        field[~np.isfinite(field)] = 1.0
        halves[:, at:at + 2] = field.view(np.uint8)
    if qtype == "Q6_K":
        tail = halves[:, 208:210].copy().view(np.float16)
        tail[~np.isfinite(tail)] = 1.0
        halves[:, 208:210] = tail.view(np.uint8)
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])
    out = torch.full((16, 4 * block), float("nan"))
    p = PackedTensor(torch.from_numpy(raw), qtype, (16, 4 * block), torch.float32)
    assert p.dequantize(out=out) is out
    np.testing.assert_array_equal(out.numpy().view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_1", "Q4_K"])
def test_quant_linear_equals_linear_on_the_unpacked_weight(qtype, dtype, monkeypatch):
    import prebake.cache.qlinear as ql

    rng = np.random.default_rng(2)
    w = (rng.standard_normal((96, 512)) * 0.02).astype(np.float32)
    p = PackedTensor(torch.from_numpy(quantize(w, qtype)), qtype, w.shape, torch.float32)
    bias = torch.from_numpy(rng.standard_normal(96).astype(np.float32))
    x = torch.from_numpy(rng.standard_normal((3, 5, 512)).astype(np.float32)).to(dtype)
    x.requires_grad_(True)
    ref = F.linear(x, p.dequantize(dtype), bias.to(dtype))
    g = torch.from_numpy(rng.standard_normal(ref.shape).astype(np.float32)).to(dtype)
    (ref_grad,) = torch.autograd.grad(ref, x, g)
    lin = QuantLinear(p, bias)
    # the bias is added after the bands' products, so sums round differently: not bit-equal
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-2}
    for chunk in (1 << 20, 40 * 512 * 4):  # one band, and bands of 40 rows (the last one short)
        monkeypatch.setattr(ql, "CHUNK", chunk)
        y = lin(x)
        torch.testing.assert_close(y, ref, **tol)
        # gradients reach the input (adapters on a quantized base): bands unpacked again
        torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], ref_grad, **tol)


def test_quant_linear_layers_share_one_work_buffer(monkeypatch):
    """Every layer's bands are views of one buffer per thread and dtype, never bigger than a band:
    what keeps a packed model's memory near its packed size (a buffer per layer would add a band
    per layer, a fresh one per call leaves glibc holding freed bands)."""
    import prebake.cache.qlinear as ql

    monkeypatch.setattr(ql, "_local", __import__("threading").local())
    rng = np.random.default_rng(4)
    layers = [QuantLinear(PackedTensor(torch.from_numpy(quantize(w, "Q8_0")), "Q8_0", w.shape, torch.float32))
              for w in ((rng.standard_normal(s) * 0.02).astype(np.float32) for s in ((96, 512), (3000, 256)))]
    for dtype in (torch.float32, torch.bfloat16):
        # the bands held together: a fresh buffer per call could not reuse a freed one's address
        bands = [w for layer in layers for _ in range(2) for _, w in layer.bands(dtype, torch.device("cpu"))]
        seen = {(w.untyped_storage().data_ptr(), w.untyped_storage().nbytes()) for w in bands}
        assert len(seen) == 1 and next(iter(seen))[1] <= ql.CHUNK * dtype.itemsize // 4, seen


def test_quant_linear_modes_and_bf16_gradients(monkeypatch):
    import prebake.cache.qlinear as ql

    monkeypatch.setattr(ql, "_local", __import__("threading").local())  # fresh work buffers
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((512, 256)) * 0.02).astype(np.float32)
    p = PackedTensor(torch.from_numpy(quantize(w, "Q8_0")), "Q8_0", w.shape, torch.float32)
    lin = QuantLinear(p)
    x = torch.from_numpy(rng.standard_normal((4, 256)).astype(np.float32))
    with torch.inference_mode():  # the first call makes the work buffer: it must serve later calls too
        first = lin(x)
    with torch.no_grad():
        assert torch.equal(lin(x), first)
    # many bands (64 of 8 rows): the input gradient is summed in float32, so bf16 costs what one matmul does
    monkeypatch.setattr(ql, "CHUNK", 8 * 256 * 4)
    xb = x.to(torch.bfloat16).requires_grad_(True)
    g = torch.from_numpy(rng.standard_normal((4, 512)).astype(np.float32))
    exact = g @ p.dequantize()
    (ours,) = torch.autograd.grad(lin(xb), xb, g.to(torch.bfloat16))
    (plain,) = torch.autograd.grad(F.linear(xb, p.dequantize(torch.bfloat16)), xb, g.to(torch.bfloat16))
    err = lambda a: float((a.float() - exact).norm() / exact.norm())  # noqa: E731
    assert err(ours) <= 1.5 * err(plain) + 1e-3, (err(ours), err(plain))
    xg = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(lin(xg).sum(), xg, create_graph=True)
    with pytest.raises(RuntimeError, match="does not require grad|once_differentiable"):  # an error, not a wrong answer
        gx.sum().backward()
    with pytest.raises(ValueError, match="shape"):
        p.dequantize(out=torch.empty(256, 512))


def _random_llama(path, layers: int = 2):
    """Hidden 256: every row fits a 256-block, so q4_k really is Q4_K everywhere."""
    return save_llama(path, layers=layers, hidden=256, inter=512, vocab=512)


def _logits_cosine(model, bake) -> float:
    """Cosine of all logits of ``load_module(bake)`` against ``model``'s, on fixed random tokens."""
    q = load_module(lambda: transformers.LlamaForCausalLM(model.config), bake).eval()
    assert isinstance(q.model.layers[0].mlp.down_proj, QuantLinear)
    x = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return float(torch.nn.functional.cosine_similarity(q(x).logits.flatten(), model(x).logits.flatten(), dim=0))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qllama")
    return tmp, _random_llama(tmp / "src")


# Logits cosine measured on this model and input: q8_0 0.99992, q6_k 0.99908, q5_0 0.99545,
# q4_k_m 0.99085, q4_k 0.98828 (head at Q6_K; 0.98589 with --quant-pure). Q4_K's blocks equal
# llama.cpp's reference bit for bit; its ~7% weight error (relative RMSE on these Gaussian
# weights) compounds through random-init layers: q4_k clears 0.99 on 1-layer models (0.993) and
# falls with depth and width (0.980 at 4 layers); `python -m tests.bench quant_quality` prints
# the table.
COSINE = {"q8_0": 0.999, "q6_k": 0.998, "q5_0": 0.99, "q4_k_m": 0.99, "q4_k": 0.985}


@pytest.mark.parametrize("recipe", sorted(COSINE))
def test_quantized_llama_logits(llama, recipe):
    tmp, model = llama
    out = tmp / recipe
    m = convert(tmp / "src", out, Options(quant=recipe))
    verify(out)
    blocks = [t for t in m.tensors.values() if t.qtype]
    assert blocks and not any(t.packed for t in m.tensors.values())  # blocks only: floats dropped
    assert len(m.shards) == 1  # blocks sit in execution order among the floats
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].keys() == m.tensors.keys()
    cos = _logits_cosine(model, out)
    print(f"{recipe}: cosine {cos:.5f}")
    assert cos >= COSINE[recipe], f"{recipe}: cosine {cos:.5f}"


@pytest.mark.parametrize(("recipe", "target"), [("q8_0", 0.999), ("q4_k", 0.99)])
def test_one_layer_llama_meets_the_issue_targets(tmp_path, recipe, target):
    """The issue's targets, on a 1-layer tiny random Llama (measured: q8_0 0.99994, q4_k 0.99329).

    With more layers a random-init Llama compounds Q4_K's error (2 layers 0.988, above); a
    trained 2-layer one gives 0.9999 (``python -m tests.bench quant_quality``).
    """
    model = _random_llama(tmp_path / "src", layers=1)
    convert(tmp_path / "src", tmp_path / recipe, Options(quant=recipe))
    assert _logits_cosine(model, tmp_path / recipe) >= target


def test_baked_blocks_are_the_codec_blocks(llama):
    tmp, model = llama
    convert(tmp / "src", tmp / "blocks", Options(quant="q4_k_m", keep_float=True))
    m = read_manifest(tmp / "blocks")
    packed = load_from_manifest(tmp / "blocks", quant="q4_k_m")
    floats = load_from_manifest(tmp / "blocks")  # auto: floats where the bake has them
    assert all(isinstance(v, torch.Tensor) for v in floats.values())
    sd = model.state_dict()
    quantized = {n: t.packed for n, t in m.tensors.items() if t.packed}
    assert quantized and not any(t.qtype for t in m.tensors.values())
    for name, q in quantized.items():
        p = packed[name]
        assert isinstance(p, PackedTensor) and p.qtype == q.qtype
        assert np.array_equal(p.blocks.numpy(), quantize(sd[name].numpy(), q.qtype))
        assert p.blocks.untyped_storage().nbytes() == m.shards[q.shard].size  # a view of the map
    only_q6 = load_from_manifest(tmp / "blocks", quant="q6_k")
    assert {n for n, v in only_q6.items() if isinstance(v, PackedTensor)} == \
        {n for n, q in quantized.items() if q.qtype == "Q6_K"}
    with pytest.raises(KeyError, match="no 'q8_0' blocks"):
        load_from_manifest(tmp / "blocks", quant="q8_0")


def test_plain_tensors_on_request(llama):
    tmp, _ = llama
    convert(tmp / "src", tmp / "plain", Options(quant="q8_0"))
    plain = load_from_manifest(tmp / "plain", quant=None)
    auto = load_from_manifest(tmp / "plain")
    name = "model.layers.1.mlp.up_proj.weight"
    assert isinstance(auto[name], PackedTensor) and isinstance(plain[name], torch.Tensor)
    assert torch.equal(plain[name], auto[name].dequantize())
    assert all(isinstance(v, torch.Tensor) for v in dequantize_all(auto).values())


def test_gguf_blocks_kept_as_they_are(tmp):
    rng = np.random.default_rng(1)
    w = gguf.GGUFWriter(str(tmp / "m.gguf"), "llama")
    w.add_block_count(1)
    a = rng.standard_normal((64, 256)).astype(np.float32)
    blocks = {q: gguf.quants.quantize(a, gguf.GGMLQuantizationType[q]) for q in ("Q8_0", "Q4_0", "Q5_1")}
    for q, b in blocks.items():
        w.add_tensor(f"blk.0.{q.lower()}.weight", b, raw_dtype=gguf.GGMLQuantizationType[q])
    w.add_tensor("output_norm.weight", a[0])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    m = convert(tmp / "m.gguf", tmp / "out", Options(keep_quant=True, names="gguf"))
    assert {n for n, t in m.tensors.items() if t.qtype} == {f"blk.0.{q.lower()}.weight" for q in blocks}
    sd = load_from_manifest(tmp / "out")
    for q, b in blocks.items():
        p = sd[f"blk.0.{q.lower()}.weight"]
        assert p.qtype == q and p.shape == (64, 256)
        assert p.blocks.numpy().tobytes() == b.tobytes()  # bytes copied unchanged
        assert np.array_equal(p.dequantize(torch.float32).numpy(),
                              gguf.quants.dequantize(b, gguf.GGMLQuantizationType[q]))
    verify(tmp / "out")


def _memory_of_one_forward(src, bake) -> dict:
    """In a fresh process: what loading ``bake`` with ``load_module`` and running one forward pass
    adds to resident memory, torch's one-time set-up done before. ``total`` is the model's part:
    anonymous memory plus the bake's own mapped pages (from ``/proc/self/smaps``). Other file
    pages are left out: they are torch's and glibc's code, which differ from one CPU to the next
    (2.1-2.6 MiB here; a CI machine's pushed a whole-RssFile measure past the bound)."""
    code = textwrap.dedent(f"""
        import json, os, torch, transformers
        from prebake.cache import load_module
        from tests.test_load import mapped_resident
        def rss():
            f = dict(l.split(":") for l in open("/proc/self/status"))
            return {{"anon": int(f["RssAnon"].split()[0]) * 1024,
                     "bake": mapped_resident(os.path.realpath({str(bake)!r}) + "/")}}
        cfg = transformers.LlamaConfig.from_pretrained({str(src)!r})
        warm = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=64, hidden_size=64,
            intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)).eval()
        with torch.no_grad():
            warm(torch.randint(0, 64, (1, 8)))  # torch's one-time runtime set-up is not the model's
        del warm
        base = rss()
        model = load_module(lambda: transformers.LlamaForCausalLM(cfg), {str(bake)!r}).eval()
        loaded = rss()
        with torch.no_grad():
            model(torch.randint(0, 1024, (1, 8)))
        done = rss()
        print(json.dumps({{"total": sum(done.values()) - sum(base.values()), "bake": done["bake"],
                           "forward_anon": done["anon"] - loaded["anon"]}}))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def llama8(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llama8")
    save_llama(tmp / "src", layers=8, hidden=512, inter=1536, vocab=1024, heads=8, kv_heads=4, tie=True)
    convert(tmp / "src", tmp / "float", Options())
    # activations: what a forward pass of the plain float model allocates beyond its weights
    return tmp, _memory_of_one_forward(tmp / "src", tmp / "float")["forward_anon"]


# measured (MiB): q8_0 32.0-32.7 for 25.5 of blocks + 2.0 of floats; q4_k 20.0-20.6 for 13.5 + 2.0;
# activations 3.0; the float32 model takes 98
@pytest.mark.parametrize("recipe", ["q8_0", "q4_k"])
def test_packed_linear_stays_near_the_packed_size(llama8, recipe):
    tmp, activations = llama8
    convert(tmp / "src", tmp / recipe, Options(quant=recipe))
    # the least of two fresh processes: the anonymous part is noisy (q4_k: 4.4-5.3 MiB for the same
    # bake, measured), a retained copy of the weights would show in both
    runs = [_memory_of_one_forward(tmp / "src", tmp / recipe) for _ in range(2)]
    grown = min(r["total"] for r in runs)
    m = read_manifest(tmp / recipe)
    packed = sum(t.nbytes for t in m.tensors.values() if t.qtype)
    floats = sum(t.nbytes for t in m.tensors.values() if not t.qtype)  # embeddings (tied head) and norms
    mapped = sum(s.size + 4096 for s in m.shards)  # a page's rounding each
    assert all(packed <= r["bake"] <= mapped for r in runs), runs  # the forward read every block, the measure saw it
    # The activations' measure is an RssAnon difference, which glibc's reuse of freed memory
    # makes noisy (-0.1 to 3.5 MiB measured): the 3.5 MiB once measured is the floor.
    assert grown <= 1.3 * (packed + floats) + max(activations, 3.5 * 2**20), (grown, packed, floats, activations)
    assert grown < 0.5 * sum(t.nbytes for t in read_manifest(tmp / "float").tensors.values())


def test_gguf_blocks_requantized_on_request(tmp):
    rng = np.random.default_rng(2)
    a = rng.standard_normal((64, 256)).astype(np.float32)
    q4 = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q4_0)
    w = gguf.GGUFWriter(str(tmp / "m.gguf"), "llama")
    w.add_tensor("blk.0.ffn_up.weight", q4, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.warns(PrebakeWarning, match="quantizes the source's Q4_0 blocks again"):
        m = convert(tmp / "m.gguf", tmp / "out", Options(quant="q8_0", names="gguf"))
    q = m.tensors["blk.0.ffn_up.weight"]
    assert q.qtype == "Q8_0" and q.dtype == "F16" and q.source_dtype == "Q4_0"
    p = load_from_manifest(tmp / "out")["blk.0.ffn_up.weight"]
    deq = gguf.quants.dequantize(q4, gguf.GGMLQuantizationType.Q4_0)
    assert np.array_equal(p.blocks.numpy(), quantize(deq, "Q8_0"))
    assert p.dequantize().dtype == torch.float16
