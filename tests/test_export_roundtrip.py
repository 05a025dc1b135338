"""GGUF -> bake (``--keep-quant``) -> export gives back the file's tensor data and metadata.

Two sources: gguf-py's writer with every GGML type (test_gguf's fixture: K-quants, legacy
quants, F16/BF16/F32, I32, 3-D experts, a 1-D quantized tensor) and odd metadata types
(INT32, UINT64, BOOL, arrays); and a GGUF prebake itself exported from a q4_k_m bake of a tiny
Llama, tokenizer and all.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from prebake.convert.bake import convert
from prebake.convert.export import export_gguf
from prebake.convert.plan import Options

from tests.export_models import bpe_tokenizer, read_gguf, save_model
from tests.test_gguf import gguf_file  # noqa: F401  (the fixture)


def tensor_data(path) -> dict[str, tuple[str, tuple, bytes]]:
    import gguf

    return {t.name: (t.tensor_type.name, tuple(int(d) for d in t.shape), np.asarray(t.data).tobytes())
            for t in gguf.GGUFReader(str(path)).tensors}


def fields(path) -> dict[str, tuple]:
    import gguf

    out = {}
    for k, f in gguf.GGUFReader(str(path)).fields.items():
        out[k] = ([t.name for t in f.types], f.contents())
    return out


def test_keep_quant_bake_exports_the_source_tensors_and_keys(tmp, gguf_file):  # noqa: F811
    path, _ = gguf_file
    convert(path, tmp / "baked", Options(keep_quant=True, names="gguf"))
    export_gguf(tmp / "baked", tmp / "again.gguf")
    assert tensor_data(tmp / "again.gguf") == tensor_data(path)
    assert fields(tmp / "again.gguf") == fields(path)


def test_bakes_without_recorded_types_infer_them_as_gguf_py_writes(tmp, gguf_file):  # noqa: F811
    """Bakes made before gguf_types were recorded: integers UINT32 (INT32 if negative, UINT64 if
    large), floats FLOAT32, integer arrays INT32 -- gguf-py's own choices, so this file round-trips."""
    path, _ = gguf_file
    convert(path, tmp / "baked", Options(keep_quant=True, names="gguf"))
    manifest = tmp / "baked" / "manifest.json"
    m = json.loads(manifest.read_text())
    del m["metadata"]["gguf_types"]
    manifest.write_text(json.dumps(m))
    export_gguf(tmp / "baked", tmp / "again.gguf")
    assert fields(tmp / "again.gguf") == fields(path)


def test_dequantized_gguf_bake_exports_floats_under_the_same_names(tmp, gguf_file):  # noqa: F811
    path, _ = gguf_file
    convert(path, tmp / "baked", Options(names="gguf"))  # blocks dequantized to F16
    export_gguf(tmp / "baked", tmp / "f16.gguf")
    src, out = read_gguf(path)[1], read_gguf(tmp / "f16.gguf")[1]
    assert set(out) == set(src)
    for name, (qtype, values, _) in out.items():
        if src[name][0] not in ("F32", "F16", "BF16", "I32"):
            assert qtype == "F16"
            assert np.array_equal(values, src[name][1].astype(np.float16).astype(np.float32)), name


def test_exported_q4_k_m_gguf_round_trips_through_a_bake(tmp):
    folder = tmp / "llama"
    save_model("llama", folder, hidden=256, dtype=torch.bfloat16)
    bpe_tokenizer(folder, 300)
    convert(folder, tmp / "baked", Options(quant="q4_k_m"))
    export_gguf(tmp / "baked", tmp / "first.gguf")
    convert(tmp / "first.gguf", tmp / "rebaked", Options(keep_quant=True, names="gguf"))
    export_gguf(tmp / "rebaked", tmp / "second.gguf")
    assert tensor_data(tmp / "second.gguf") == tensor_data(tmp / "first.gguf")
    assert fields(tmp / "second.gguf") == fields(tmp / "first.gguf")
    assert {t[0] for t in tensor_data(tmp / "first.gguf").values()} == {"F32", "BF16", "Q4_K", "Q6_K"}


@pytest.mark.parametrize("outtype", ["f16", "bf16"])
def test_outtype_on_a_gguf_bake_casts_and_says_so(tmp, gguf_file, outtype):  # noqa: F811
    path, _ = gguf_file
    convert(path, tmp / "baked", Options(keep_quant=True, names="gguf"))
    export_gguf(tmp / "baked", tmp / "cast.gguf", outtype=outtype)
    src, out = tensor_data(path), tensor_data(tmp / "cast.gguf")
    for name, (qtype, shape, data) in out.items():
        if src[name][0] in ("F32", "F16", "BF16"):
            assert qtype == ("F32" if len(shape) == 1 else outtype.upper()), name
        else:
            assert (qtype, data) == src[name][::2], name  # blocks and integers as they were
    assert fields(tmp / "cast.gguf")["general.file_type"][0] == ["UINT32"]  # the source had none: now it has one


def test_quant_on_a_dequantized_gguf_bake_requantizes_its_matrices(tmp, gguf_file):  # noqa: F811
    path, _ = gguf_file
    convert(path, tmp / "baked", Options(names="gguf"))  # F16 everywhere blocks were
    result = export_gguf(tmp / "baked", tmp / "q8.gguf", quant="q8_0")
    out = tensor_data(tmp / "q8.gguf")
    assert out["blk.0.attn_q.weight"][0] == "Q8_0" and out["blk.0.ffn_norm.weight"][0] == "BF16"  # 1-D: as stored
    assert out["token_embd.weight"][0] == "F16"  # embeddings are not quantized unless asked
    assert result["file_type"] == 7 and fields(tmp / "q8.gguf")["general.file_type"] == (["UINT32"], 7)
