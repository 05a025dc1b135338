"""GGUF files written by gguf-py's ``GGUFWriter`` bake correctly under their GGUF names
(``--names gguf``): plain tensors byte for byte, block-quantized tensors as gguf-py's own
dequantization (cast to the asked dtype, F16 by default), shapes in PyTorch order, key-value
metadata in the manifest and, byte for byte, in ``gguf_metadata.gguf``, execution order.
(Bakes as Hugging Face folders: ``test_gguf_hf.py``.)"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from prebake.convert.bake import convert
from prebake.convert.gguf_source import METADATA_GGUF, METADATA_JSON
from prebake.convert.plan import Options
from prebake.formats.gguf_file import SHORT_ARRAY, open_gguf
from prebake.formats.manifest import read_manifest

from tests.conftest import check_bake

PLAIN = {Q.F32, Q.F16, Q.BF16, Q.I32}
# GGML types gguf-py can quantize itself (from float32 data).
QUANTIZABLE = {Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1}
# K-quants gguf-py cannot make: random blocks whose fp16 scale fields (byte offsets inside
# each block) are set to small positive values, so every dequantized value is finite and modest.
K_SCALE_FIELDS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}

N_EMBD, N_FF, N_VOCAB, N_EXPERT = 256, 512, 2048, 4

# name -> (GGML type, shape in PyTorch order: the numpy array's shape). Written out of
# execution order on purpose (output first, blk.1 before blk.0) to show the bake reorders.
LAYOUT: dict[str, tuple[Q, tuple[int, ...]]] = {
    "output.weight": (Q.Q6_K, (N_VOCAB, N_EMBD)),  # dequantized to 1 MiB of F16: aligned
    "output_norm.weight": (Q.F32, (N_EMBD,)),
    "blk.1.attn_norm.weight": (Q.F32, (N_EMBD,)),
    "blk.1.attn_q.weight": (Q.Q2_K, (N_EMBD, N_EMBD)),
    "blk.1.attn_k.weight": (Q.Q3_K, (64, N_EMBD)),
    "blk.1.attn_v.weight": (Q.Q5_K, (64, N_EMBD)),
    "blk.1.attn_output.weight": (Q.Q4_K, (N_EMBD, N_EMBD)),
    "blk.1.ffn_norm.weight": (Q.F16, (N_EMBD,)),
    "blk.1.ffn_gate_inp.weight": (Q.F32, (N_EXPERT, N_EMBD)),
    "blk.1.ffn_gate_exps.weight": (Q.Q8_0, (N_EXPERT, 64, N_EMBD)),  # 3-D, quantized
    "blk.1.ffn_up_exps.weight": (Q.Q4_K, (N_EXPERT, 64, N_EMBD)),  # 3-D, K-quant
    "blk.1.ffn_down_exps.weight": (Q.F32, (N_EXPERT, N_EMBD, 64)),  # 3-D, plain
    "blk.0.attn_norm.weight": (Q.F32, (N_EMBD,)),
    "blk.0.attn_q.weight": (Q.Q8_0, (N_EMBD, N_EMBD)),
    "blk.0.attn_q.bias": (Q.Q8_0, (N_EMBD,)),  # 1-D, quantized
    "blk.0.attn_k.weight": (Q.Q4_0, (64, N_EMBD)),
    "blk.0.attn_v.weight": (Q.Q4_1, (64, N_EMBD)),
    "blk.0.attn_output.weight": (Q.Q5_0, (N_EMBD, N_EMBD)),
    "blk.0.ffn_norm.weight": (Q.BF16, (N_EMBD,)),
    "blk.0.ffn_gate.weight": (Q.Q5_1, (N_FF, N_EMBD)),
    "blk.0.ffn_up.weight": (Q.F16, (N_FF, N_EMBD)),
    "blk.0.ffn_down.weight": (Q.BF16, (N_EMBD, N_FF)),
    "blk.0.layer_types": (Q.I32, (8,)),
    "token_embd.weight": (Q.Q4_K, (N_VOCAB, N_EMBD)),  # dequantized to 1 MiB of F16: aligned
}
EXECUTION_ORDER = (["token_embd.weight"]
                   + [n for n in LAYOUT if n.startswith("blk.0.")]
                   + [n for n in LAYOUT if n.startswith("blk.1.")]
                   + ["output_norm.weight", "output.weight"])

METADATA = {
    "general.architecture": "llama",
    "llama.block_count": 2,
    "llama.embedding_length": N_EMBD,
    "general.name": "tiny llama – ü",
    "llama.rope.dimension_count": -64,
    "llama.attention.layer_norm_rms_epsilon": 1e-5,
    "llama.use_parallel_residual": True,
    "general.file_type_is_fake": False,
    "llama.big": 1 << 40,
    "llama.feed_forward_lengths": [N_FF, N_FF, 3],
    "general.tags": ["<s>", "</s>", "hello", "wörld"],
    # long arrays, as a tokenizer has: kept in full in the side file
    "tokenizer.ggml.tokens": [f"tok{i}" for i in range(300)],
    "tokenizer.ggml.scores": [i * 0.25 for i in range(300)],  # exact in float32
}


def _kquant_blocks(qtype: Q, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (*shape[:-1], shape[-1] // block, type_size), dtype=np.uint8)
    for offset in K_SCALE_FIELDS[qtype]:
        scale = rng.uniform(1e-3, 1e-2, blocks.shape[:-1]).astype(np.float16)
        blocks[..., offset:offset + 2] = scale[..., None].view(np.uint8)
    return blocks.reshape(*shape[:-1], -1)


def _make(qtype: Q, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """The array handed to GGUFWriter.add_tensor: values for plain types, blocks for the rest."""
    if qtype == Q.I32:
        return rng.integers(-1000, 1000, shape, dtype=np.int32)
    values = rng.standard_normal(shape).astype(np.float32)
    if qtype == Q.F32:
        return values
    if qtype == Q.F16:
        return values.astype(np.float16)
    if qtype == Q.BF16 or qtype in QUANTIZABLE:
        return gguf.quants.quantize(values, qtype)  # uint8 bytes (BF16 as its raw bytes)
    return _kquant_blocks(qtype, shape, rng)


def _plain_torch(qtype: Q, data: np.ndarray) -> torch.Tensor:
    """A plain GGUF tensor as torch sees it (BF16 from its raw bytes)."""
    if qtype == Q.BF16:
        return torch.from_numpy(data.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(data.copy())


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    """(path, {name: (type, array written)}): one llama-style GGUF with every type."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(METADATA["llama.block_count"])
    writer.add_uint32("llama.embedding_length", METADATA["llama.embedding_length"])
    writer.add_string("general.name", METADATA["general.name"])
    writer.add_int32("llama.rope.dimension_count", METADATA["llama.rope.dimension_count"])
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", METADATA["llama.attention.layer_norm_rms_epsilon"])
    writer.add_bool("llama.use_parallel_residual", True)
    writer.add_bool("general.file_type_is_fake", False)
    writer.add_uint64("llama.big", METADATA["llama.big"])
    writer.add_array("llama.feed_forward_lengths", METADATA["llama.feed_forward_lengths"])
    for key in ("general.tags", "tokenizer.ggml.tokens", "tokenizer.ggml.scores"):
        writer.add_array(key, METADATA[key])
    written = {}
    for name, (qtype, shape) in LAYOUT.items():
        data = _make(qtype, shape, rng)
        raw = qtype if data.dtype == np.uint8 else None
        writer.add_tensor(name, data, raw_dtype=raw)
        written[name] = (qtype, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    # the file holds what we meant: the types and the GGUF (innermost-first) shapes
    reader = gguf.GGUFReader(str(path))
    assert {t.name: (t.tensor_type, tuple(int(d) for d in t.shape)) for t in reader.tensors} == {
        name: (qtype, tuple(reversed(shape))) for name, (qtype, shape) in LAYOUT.items()}
    return path, written


def _expected(written: dict, dtype: str | None) -> dict[str, torch.Tensor]:
    """What a bake with ``Options(dtype=dtype)`` must hold, computed with gguf-py and torch alone."""
    cast = {None: None, "F32": torch.float32, "BF16": torch.bfloat16}[dtype]
    out = {}
    for name, (qtype, data) in written.items():
        if qtype in PLAIN:
            t = _plain_torch(qtype, data)
            out[name] = t.to(cast) if cast is not None and t.is_floating_point() else t
        else:
            deq = gguf.quants.dequantize(data, qtype)
            assert deq.dtype == np.float32 and np.isfinite(deq).all(), name
            out[name] = torch.from_numpy(deq).to(cast or torch.float16)
    return out


@pytest.mark.parametrize("dtype", [None, "F32", "BF16"], ids=["default", "F32", "BF16"])
def test_gguf_bake_matches_gguf_py(tmp, gguf_file, dtype):
    path, written = gguf_file
    m = convert(path, tmp / "out", Options(dtype=dtype, names="gguf"))
    expected = _expected(written, dtype)
    check_bake(tmp / "out", expected)  # alignment, stock readability, every byte
    assert m.source["format"] == "gguf"
    for name, (qtype, data) in written.items():
        entry = m.tensors[name]
        if qtype in PLAIN:
            stored = dtype if dtype and qtype != Q.I32 else qtype.name
            assert entry.dtype == stored, name
            if stored == qtype.name:  # copied as it is: the GGUF's own bytes
                assert entry.source_dtype is None and entry.nbytes == data.nbytes, name
            else:
                assert entry.source_dtype == qtype.name, name
        else:
            assert (entry.dtype, entry.source_dtype) == (dtype or "F16", qtype.name), name


def test_gguf_dequantization_agrees_with_float32_route(tmp, gguf_file):
    """The F16 bake of a quantized tensor is the F32 bake rounded once (no double rounding)."""
    path, written = gguf_file
    convert(path, tmp / "f16", Options(names="gguf"))
    convert(path, tmp / "f32", Options(dtype="F32", names="gguf"))
    f16, f32 = check_bake(tmp / "f16"), check_bake(tmp / "f32")
    for name, (qtype, _) in written.items():
        if qtype not in PLAIN:
            assert torch.equal(f16[name], f32[name].to(torch.float16)), name


def test_gguf_shapes_in_pytorch_order(tmp, gguf_file):
    path, _ = gguf_file
    m = convert(path, tmp / "out", Options(names="gguf"))
    reader = gguf.GGUFReader(str(path))
    ne = {t.name: [int(d) for d in t.shape] for t in reader.tensors}
    for name, (_, shape) in LAYOUT.items():
        assert m.tensors[name].shape == list(shape) == ne[name][::-1], name
    assert m.tensors["token_embd.weight"].shape == [N_VOCAB, N_EMBD]  # ne = [n_embd, n_vocab]
    assert m.tensors["blk.1.ffn_gate_exps.weight"].shape == [N_EXPERT, 64, N_EMBD]
    assert m.tensors["output_norm.weight"].shape == [N_EMBD]


def test_gguf_metadata_in_manifest(tmp, gguf_file):
    path, _ = gguf_file
    m = convert(path, tmp / "out", Options(names="gguf"))
    expected = dict(METADATA)
    expected["llama.attention.layer_norm_rms_epsilon"] = float(np.float32(METADATA["llama.attention.layer_norm_rms_epsilon"]))
    # every key-value pair, long arrays included, byte for byte in a GGUF file of no tensors
    kept = open_gguf(tmp / "out" / METADATA_GGUF)
    assert kept.metadata(max_list=None) == expected and not kept.tensors
    source = open_gguf(path)
    assert kept.buffer[slice(*kept.kv_span)].tobytes() == source.buffer[slice(*source.kv_span)].tobytes()
    assert {t.name for t in gguf.GGUFReader(tmp / "out" / METADATA_GGUF).tensors} == set()
    assert METADATA_GGUF in {f.path for f in m.files} and not (tmp / "out" / METADATA_JSON).exists()
    # as JSON only when asked
    m = convert(path, tmp / "json", Options(names="gguf", gguf_metadata=True))
    assert json.loads((tmp / "json" / METADATA_JSON).read_text()) == expected
    assert METADATA_JSON in {f.path for f in m.files}
    # the manifest holds every key but the long arrays, with the same values and JSON types
    meta = read_manifest(tmp / "out").metadata["gguf"]
    assert not any(k.startswith("GGUF.") for k in meta)  # header fields are not metadata
    short = {k: v for k, v in expected.items() if not isinstance(v, list) or len(v) <= SHORT_ARRAY}
    assert meta == short
    assert "general.tags" in meta and "tokenizer.ggml.tokens" not in meta
    for key in ("llama.use_parallel_residual", "general.file_type_is_fake"):
        assert type(meta[key]) is bool, key
    assert type(meta["llama.block_count"]) is int and type(meta["llama.big"]) is int


def test_gguf_execution_order_and_sharding(tmp, gguf_file):
    path, _ = gguf_file
    m = convert(path, tmp / "out", Options(shard_size=1 << 20, names="gguf"))
    check_bake(tmp / "out")
    assert len(m.shards) > 2
    assert list(m.tensors) == EXECUTION_ORDER
    places = [(t.shard, t.offset) for t in m.tensors.values()]
    assert places == sorted(places) and len(set(places)) == len(places)
    # the 1 MiB tensors start on an `align` boundary of their shard
    for name in ("token_embd.weight", "output.weight"):
        assert m.tensors[name].nbytes == 1 << 20 and m.tensors[name].offset % 4096 == 0
