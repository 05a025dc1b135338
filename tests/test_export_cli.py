"""``prebake export`` from the shell, what it refuses (naming the thing), and how it writes:
atomically, and in bounded memory."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
import torch
from prebake.convert import gguf_stream
from prebake.convert.bake import convert
from prebake.convert.cli import main
from prebake.convert.export import export_gguf
from prebake.convert.plan import Options
from prebake.formats.errors import OutputError, UnsupportedError, UsageError

from tests.export_models import bpe_tokenizer, read_gguf, save_model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A float bake and a q8_0 bake of one tiny Llama (with its tokenizer)."""
    root = tmp_path_factory.mktemp("cli")
    save_model("llama", root / "model", hidden=64)
    bpe_tokenizer(root / "model", 300)
    convert(root / "model", root / "float", Options())
    convert(root / "model", root / "q8", Options(quant="q8_0"))
    return root


def test_cli_json_and_dry_run(tmp, llama, capsys):
    assert main(["export", str(llama / "float"), str(tmp / "m.gguf"), "--quant", "q8_0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["arch"] == "llama" and result["file_type"] == 7 and result["types"]["Q8_0"] == 11
    assert read_gguf(tmp / "m.gguf")[1]["blk.0.ffn_up.weight"][0] == "Q8_0"
    assert main(["export", str(llama / "float"), str(tmp / "n.gguf"), "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["tensor_list"]["blk.0.attn_q.weight"]["from"] == ["model.layers.0.self_attn.q_proj.weight"]
    assert not (tmp / "n.gguf").exists()
    assert main(["export", str(llama / "q8"), str(tmp / "m.gguf"), "-q"]) == 0  # replaces a GGUF file
    assert "exported 21 tensors" in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp, llama, capsys):
    assert main(["export", str(llama / "q8"), str(tmp / "m.gguf"), "--quant", "q4_k"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Q8_0 blocks already" in err
    (tmp / "notes.txt").write_text("mine")
    assert main(["export", str(llama / "float"), str(tmp / "notes.txt")]) == 1
    assert "not a GGUF file" in capsys.readouterr().err and (tmp / "notes.txt").read_text() == "mine"
    assert main(["export", str(llama / "float"), str(tmp / "notes.txt"), "--force", "-q"]) == 0
    assert main(["export", str(llama / "float"), str(tmp)]) == 1
    assert "is a folder" in capsys.readouterr().err
    assert main(["export", str(llama / "float"), str(tmp / "x.gguf"), "--quant", "q4_k_m", "--quant-pure"]) == 2


def test_unmapped_architecture_and_tensor_are_named(tmp, llama):
    import transformers

    gpt2 = tmp / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)) \
        .save_pretrained(gpt2)
    convert(gpt2, tmp / "gpt2-baked", Options())
    with pytest.raises(UnsupportedError, match="architecture 'GPT2LMHeadModel'"):
        export_gguf(tmp / "gpt2-baked", tmp / "x.gguf")
    from safetensors.torch import load_file, save_file

    extra = tmp / "extra"
    extra.mkdir()
    for f in (llama / "model").iterdir():
        (extra / f.name).write_bytes(f.read_bytes())
    state = load_file(extra / "model.safetensors")
    state["model.layers.0.self_attn.rotary_gate.weight"] = torch.zeros(4, 4)
    save_file(state, extra / "model.safetensors")
    convert(extra, tmp / "extra-baked", Options())
    with pytest.raises(UnsupportedError, match="'model.layers.0.self_attn.rotary_gate.weight' has no GGUF counterpart"):
        export_gguf(tmp / "extra-baked", tmp / "x.gguf")
    assert not (tmp / "x.gguf").exists()


def test_what_cannot_be_exported_is_refused(tmp, llama):
    convert(llama / "model" / "model.safetensors", tmp / "bare", Options())
    with pytest.raises(UnsupportedError, match="no config.json"):
        export_gguf(tmp / "bare", tmp / "x.gguf")
    no_tok = tmp / "no-tokenizer"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tok / name).write_bytes((llama / "model" / name).read_bytes())
    convert(no_tok, tmp / "no-tok-baked", Options())
    with pytest.raises(UnsupportedError, match="no tokenizer to export"):
        export_gguf(tmp / "no-tok-baked", tmp / "x.gguf")
    with pytest.raises(UsageError, match="--outtype 'f8'"):
        export_gguf(llama / "float", tmp / "x.gguf", outtype="f8")


def test_unknown_pre_tokenizer_needs_its_name(tmp, llama):
    odd = tmp / "odd"
    save_model("llama", odd, hidden=64)
    bpe_tokenizer(odd, 300, split=r"\p{L}+|\s+|.")
    convert(odd, tmp / "baked", Options())
    with pytest.raises(UnsupportedError, match="--tokenizer-pre"):
        export_gguf(tmp / "baked", tmp / "x.gguf")
    export_gguf(tmp / "baked", tmp / "x.gguf", tokenizer_pre="llama-bpe")
    assert read_gguf(tmp / "x.gguf")[0]["tokenizer.ggml.pre"][0] == "llama-bpe"


def test_a_failed_export_leaves_nothing(tmp, llama, monkeypatch):
    export_gguf(llama / "float", tmp / "m.gguf")
    before = (tmp / "m.gguf").read_bytes()

    def broken(self, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf_stream.TensorStream, "tofile", broken)
    with pytest.raises(OutputError, match="no space left"):
        export_gguf(llama / "q8", tmp / "m.gguf")
    assert (tmp / "m.gguf").read_bytes() == before
    assert sorted(p.name for p in tmp.iterdir()) == ["m.gguf"]


def test_memory_stays_within_a_window(tmp, monkeypatch):
    """A 64 MiB embedding exported in 1 MiB windows, cast and quantized on the way: numpy never
    holds more than a few windows."""
    folder = tmp / "big"
    save_model("llama", folder, hidden=1024, layers=1, vocab=16384)
    bpe_tokenizer(folder, 300)
    convert(folder, tmp / "baked", Options())
    monkeypatch.setattr(gguf_stream, "CHUNK", 1 << 20)
    tracemalloc.start()
    try:
        export_gguf(tmp / "baked", tmp / "m.gguf", outtype="f16", quant="q8_0")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 24 << 20, f"{peak / 2**20:.1f} MiB"
    tensors = read_gguf(tmp / "m.gguf")[1]
    assert tensors["token_embd.weight"][0] == "F16" and tensors["output.weight"][0] == "Q8_0"
    assert np.isfinite(tensors["output.weight"][1]).all()


def test_missing_experts_are_named(tmp):
    from safetensors.torch import load_file, save_file

    folder = tmp / "mixtral"
    save_model("mixtral", folder, hidden=64)
    bpe_tokenizer(folder, 300)
    state = load_file(folder / "model.safetensors")
    del state["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(state, folder / "model.safetensors")
    convert(folder, tmp / "baked", Options())
    with pytest.raises(UnsupportedError, match=r"experts \[3\] of model.layers.1.block_sparse_moe.experts.\*.w2"):
        export_gguf(tmp / "baked", tmp / "x.gguf")
