"""Tiny random transformers models (Llama tied and untied, Mixtral MoE, BERT, T5) bake byte-exactly
from every folder layout (sharded safetensors, single and sharded .bin, legacy .bin) and load back
with identical outputs, through ``from_pretrained`` and zero-copy through ``load_module``."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
from prebake.cache.load import load_from_manifest
from prebake.cache.module import load_module
from prebake.convert.bake import convert
from prebake.convert.plan import Options
from prebake.formats.manifest import read_manifest
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    BertConfig,
    BertForMaskedLM,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from tests.conftest import check_bake

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

EXTRA_FILES = {"tokenizer.json": '{"version": "1.0", "model": {"type": "dummy"}}\n',
               "special_tokens_map.json": '{"bos_token": "<s>", "eos_token": "</s>"}\n'}


@dataclass(frozen=True)
class Spec:
    config: Callable[[], transformers.PretrainedConfig]
    model: type
    auto: type
    seq2seq: bool = False


def _llama(tied: bool, **kw) -> LlamaConfig:
    args = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                tie_word_embeddings=tied)
    return LlamaConfig(**{**args, **kw})


SPECS = {
    "llama-tied": Spec(lambda: _llama(True), LlamaForCausalLM, AutoModelForCausalLM),
    # 4096 x 64 float32 embeddings and head are 1 MiB each: the bake aligns them (padding entries)
    "llama": Spec(lambda: _llama(False, vocab_size=4096, hidden_size=64, intermediate_size=96,
                                 num_hidden_layers=3), LlamaForCausalLM, AutoModelForCausalLM),
    # 12 layers: layers.10 sorts before layers.2 as text (the HF index is alphabetical)
    "llama-deep": Spec(lambda: _llama(False, vocab_size=64, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=12, num_attention_heads=2, num_key_value_heads=1),
                       LlamaForCausalLM, AutoModelForCausalLM),
    "mixtral": Spec(lambda: MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=48,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          num_local_experts=4, num_experts_per_tok=2,
                                          max_position_embeddings=64),
                    MixtralForCausalLM, AutoModelForCausalLM),
    "bert": Spec(lambda: BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=64, max_position_embeddings=64),
                 BertForMaskedLM, AutoModelForMaskedLM),
    "t5": Spec(lambda: T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                                num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0),
               T5ForConditionalGeneration, AutoModelForSeq2SeqLM, seq2seq=True),
}
LAYOUTS = ["safetensors-sharded", "bin", "bin-sharded", "bin-legacy"]
CASES = [(m, lay) for m in ("llama-tied", "llama", "mixtral", "bert", "t5") for lay in LAYOUTS[:3]]
CASES.append(("llama-tied", "bin-legacy"))

# Logits of a bf16 bake against the float32 model, as a fraction of max |float32 logit|. bf16 keeps
# 8 significant bits (2**-8 = 0.39%). Measured max |diff| / max |ref|: llama 0.48% computing in
# float32, 0.72% in bfloat16 (max |ref| 1.03); t5 0.51% and 0.67% (max |ref| 4.96).
BF16_REL_TOL = 0.02

INPUT_IDS = torch.tensor([[1, 5, 9, 17, 33, 2, 60, 7]])
DECODER_IDS = torch.tensor([[0, 3, 8, 21, 4]])


@functools.cache
def make_model(name: str):
    torch.manual_seed(sorted(SPECS).index(name))
    model = SPECS[name].model(SPECS[name].config()).eval()
    with torch.no_grad():  # no zero biases or all-ones norms: a weight lost and re-initialised shows
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.02)
    return model


def run(name: str, model) -> torch.Tensor:
    """The model's logits for a fixed input (a fixed decoder input for T5)."""
    with torch.no_grad():
        if SPECS[name].seq2seq:
            return model(input_ids=INPUT_IDS, decoder_input_ids=DECODER_IDS).logits
        return model(input_ids=INPUT_IDS).logits


@functools.cache
def reference_logits(name: str) -> torch.Tensor:
    return run(name, make_model(name))


def _bin_shards(state: dict[str, torch.Tensor], folder: Path, n: int = 3) -> None:
    """A sharded .bin folder as older transformers wrote it: N zip files and an index."""
    names = list(state)
    per = -(-len(names) // n)
    weight_map, total = {}, 0
    for i in range(n):
        file = f"pytorch_model-{i + 1:05d}-of-{n:05d}.bin"
        part = {k: state[k] for k in names[i * per:(i + 1) * per]}
        torch.save(part, folder / file)
        weight_map.update(dict.fromkeys(part, file))
        total += sum(t.numel() * t.element_size() for t in part.values())
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def write_source(name: str, layout: str, folder: Path) -> Path:
    model = make_model(name)
    folder.mkdir(parents=True)
    if layout == "safetensors-sharded":
        model.save_pretrained(folder, max_shard_size="50KB")
        assert (folder / "model.safetensors.index.json").exists()
        assert len(list(folder.glob("model-*.safetensors"))) > 1
    else:
        model.config.save_pretrained(folder)
        state = model.state_dict()
        if layout == "bin":
            torch.save(state, folder / "pytorch_model.bin")
        elif layout == "bin-legacy":
            torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
        elif layout == "bin-sharded":
            _bin_shards(state, folder)
        else:
            raise ValueError(layout)
    for file, text in EXTRA_FILES.items():
        (folder / file).write_text(text)
    return folder


def source_tensors(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every tensor of the source folder, by file, read with the stock tools."""
    out = {}
    for f in sorted(folder.iterdir()):
        if f.suffix == ".safetensors":
            out[f.name] = load_file(f)
        elif f.suffix == ".bin":
            out[f.name] = torch.load(f, weights_only=True, map_location="cpu")
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Callable[[str, str], Path]:
    root = tmp_path_factory.mktemp("sources")
    cache: dict[tuple[str, str], Path] = {}

    def get(name: str, layout: str) -> Path:
        if (name, layout) not in cache:
            cache[name, layout] = write_source(name, layout, root / f"{name}-{layout}")
        return cache[name, layout]

    return get


@pytest.fixture(scope="module")
def bakes(sources, tmp_path_factory) -> Callable[[str, str], Path]:
    """Default-options bakes, shared by the tests that only read them."""
    root = tmp_path_factory.mktemp("bakes")
    cache: dict[tuple[str, str], Path] = {}

    def get(name: str, layout: str) -> Path:
        if (name, layout) not in cache:
            out = root / f"{name}-{layout}"
            convert(sources(name, layout), out)
            cache[name, layout] = out
        return cache[name, layout]

    return get


def _from_pretrained(name: str, folder: Path, **kw):
    model, info = SPECS[name].auto.from_pretrained(folder, output_loading_info=True, **kw)
    return model.eval(), info


@pytest.mark.parametrize(("name", "layout"), CASES, ids=[f"{m}-{lay}" for m, lay in CASES])
def test_bake_byte_exact_and_same_outputs(sources, bakes, name, layout):
    src = sources(name, layout)
    out = bakes(name, layout)
    by_file = source_tensors(src)
    expected = {k: v for part in by_file.values() for k, v in part.items()}
    assert sum(map(len, by_file.values())) == len(expected)  # no name in two files
    check_bake(out, expected)
    m = read_manifest(out)
    assert m.source["format"] == "hf-folder"
    assert sorted(f["path"] for f in m.source["files"]) == sorted(by_file)

    # tensors sharing storage within one file are stored once, the others become aliases
    for part in by_file.values():
        groups: dict[int, list[str]] = {}
        for k, v in part.items():
            groups.setdefault(v.untyped_storage().data_ptr(), []).append(k)
        for group in groups.values():
            stored = [k for k in group if k in m.tensors]
            assert len(stored) == 1, group
            assert all(m.aliases[k].target == stored[0] for k in group if k != stored[0]), group
    assert len(m.tensors) + len(m.aliases) == len(expected)

    # from_pretrained(OUT) == from_pretrained(SRC) == the model in memory, bit for bit
    baked, info = _from_pretrained(name, out)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    # the only keys transformers does not know are the bake's alignment padding entries
    assert set(info["unexpected_keys"]) <= set(m.padding), info
    from_src, _ = _from_pretrained(name, src)
    ref = reference_logits(name)
    assert torch.equal(run(name, from_src), ref)
    assert torch.equal(run(name, baked), ref)


def test_bake_pads_big_tensors_and_transformers_ignores_padding(bakes):
    """The 1 MiB head of "llama" forces a padding entry; from_pretrained still loads every weight."""
    out = bakes("llama", "safetensors-sharded")
    m = read_manifest(out)
    assert m.padding
    assert m.tensors["lm_head.weight"].nbytes == 1 << 20 and m.tensors["lm_head.weight"].offset % 4096 == 0


@pytest.mark.parametrize("layout", ["safetensors-sharded", "bin", "bin-sharded"])
def test_small_files_copied(sources, bakes, layout):
    src, out = sources("llama-tied", layout), bakes("llama-tied", layout)
    m = read_manifest(out)
    expected = {"config.json", *EXTRA_FILES}
    if layout == "safetensors-sharded":
        expected.add("generation_config.json")
    assert {f.path for f in m.files} == expected
    for f in m.files:
        assert (out / f.path).read_bytes() == (src / f.path).read_bytes(), f.path
        assert f.size == (src / f.path).stat().st_size
    # source weights and source indexes are not copied; the bake writes its own HF index
    assert not list(out.glob("*.bin")) and not (out / "pytorch_model.bin.index.json").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {k: m.shards[t.shard].file for k, t in m.tensors.items()}
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in m.tensors.values())
    assert set(p.name for p in out.iterdir()) == (
        expected | {"manifest.json", "model.safetensors.index.json"} | {s.file for s in m.shards})


def test_folder_with_both_formats_reads_safetensors(tmp):
    """HF repos often hold model.safetensors and pytorch_model.bin: safetensors is read, .bin left out."""
    src = tmp / "both"
    make_model("llama-tied").save_pretrained(src)  # one model.safetensors, no index
    torch.save(make_model("llama-tied").state_dict(), src / "pytorch_model.bin")
    m = convert(src, tmp / "out")
    assert [f["path"] for f in m.source["files"]] == ["model.safetensors"]
    check_bake(tmp / "out", load_file(src / "model.safetensors"))
    assert not (tmp / "out" / "pytorch_model.bin").exists()


def _mapped_ranges(paths: list[Path]) -> list[tuple[int, int]]:
    wanted = {str(p.resolve()) for p in paths}
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip() in wanted:
                lo, hi = parts[0].split("-")
                ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps (Linux)")
@pytest.mark.parametrize(("name", "layout"), [
    ("llama-tied", "safetensors-sharded"), ("llama-tied", "bin"), ("llama", "bin-sharded"),
    ("mixtral", "bin"),  # the .bin holds transformers 5's fused expert names, which the module has
    ("bert", "safetensors-sharded"),
    ("t5", "bin")])
def test_load_module_zero_copy(sources, tmp, name, layout):
    """load_module puts every parameter straight onto the shard memory maps, nothing copied."""
    out = tmp / "out"
    m = convert(sources(name, layout), out, Options(shard_size=64 << 10))
    assert len(m.shards) > 1
    config = make_model(name).config
    model = load_module(lambda: SPECS[name].model(config), out).eval()
    assert torch.equal(run(name, model), reference_logits(name))
    ranges = _mapped_ranges([out / s.file for s in m.shards])
    assert ranges
    params = dict(model.named_parameters(remove_duplicate=False))
    for pname, p in params.items():
        ptr, end = p.data_ptr(), p.data_ptr() + p.numel() * p.element_size()
        assert any(lo <= ptr and end <= hi for lo, hi in ranges), f"{pname} is not on a shard map"
    if name == "llama-tied":
        assert params["lm_head.weight"].data_ptr() == params["model.embed_tokens.weight"].data_ptr()
    # the module holds what load_from_manifest maps
    loaded = load_from_manifest(out)
    assert all(torch.equal(p, loaded[pname]) for pname, p in params.items() if pname in loaded)


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _rank(name: str, layers: int) -> int:
    if name == "model.embed_tokens.weight":
        return 0
    if m := _LAYER.match(name):
        return 1 + int(m.group(1))
    return {"model.norm.weight": layers + 1, "lm_head.weight": layers + 2}[name]


@pytest.mark.parametrize("name", ["llama", "llama-deep", "mixtral"])
def test_execution_order(sources, tmp, name):
    """Embeddings, layer 0, layer 1, ..., final norm, head; the shards, read in order, follow it."""
    src = sources(name, "safetensors-sharded")  # the HF index lists names alphabetically
    layers = make_model(name).config.num_hidden_layers
    m = convert(src, tmp / "out", Options(shard_size=32 << 10))
    assert len(m.shards) > 2
    names = list(m.tensors)
    ranks = [_rank(n, layers) for n in names]
    assert ranks == sorted(ranks), names
    assert set(ranks) == set(range(layers + 3))
    assert names[0] == "model.embed_tokens.weight" and names[-2:] == ["model.norm.weight", "lm_head.weight"]
    places = [(t.shard, t.offset) for t in m.tensors.values()]
    assert places == sorted(places) and len(set(places)) == len(places)
    check_bake(tmp / "out")


@pytest.mark.parametrize(("name", "layout"), [("llama", "safetensors-sharded"), ("t5", "bin")],
                         ids=["llama-safetensors", "t5-bin-tied"])
def test_cast_bf16(sources, tmp, name, layout):
    """--dtype BF16 of a float32 model: every tensor is torch's own bfloat16 rounding, byte for byte."""
    src = sources(name, layout)
    out = tmp / "out"
    m = convert(src, out, Options(dtype="BF16"))
    fp32 = {k: v for part in source_tensors(src).values() for k, v in part.items()}
    assert {v.dtype for v in fp32.values()} == {torch.float32}
    check_bake(out, {k: v.to(torch.bfloat16) for k, v in fp32.items()})  # aliases too (T5's tied embeddings)
    assert {(t.dtype, t.source_dtype) for t in m.tensors.values()} == {("BF16", "F32")}
    assert m.options["dtype"] == "BF16"
    assert bool(m.aliases) == (layout == "bin")

    # loaded as float32, the bake is exactly the float32 model with its weights rounded to bf16
    baked, info = _from_pretrained(name, out, dtype=torch.float32)
    assert not info["missing_keys"]
    got = run(name, baked)
    rounded_model = SPECS[name].model(make_model(name).config).eval()
    rounded_model.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in fp32.items()}, strict=True)
    assert torch.equal(got, run(name, rounded_model))
    ref = reference_logits(name)
    assert (got - ref).abs().max().item() <= BF16_REL_TOL * ref.abs().max().item()

    # run in bfloat16, the bake equals the source folder loaded as bfloat16
    bf16, _ = _from_pretrained(name, out, dtype=torch.bfloat16)
    src_bf16, _ = _from_pretrained(name, src, dtype=torch.bfloat16)
    got16 = run(name, bf16)
    assert got16.dtype == torch.bfloat16 and torch.equal(got16, run(name, src_bf16))
    assert (got16.float() - ref).abs().max().item() <= BF16_REL_TOL * ref.abs().max().item()
