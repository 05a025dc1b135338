"""Seeds: valid inputs made by the real tools, which the mutators then damage.

- torch zip and legacy checkpoints by ``torch.save`` (with and without
  ``_use_new_zipfile_serialization``): nested dicts and lists, tied weights, views that share a
  storage (slices, a transpose, a strided view), every dtype, a scalar and an empty tensor, an
  ``OrderedDict`` of ``Parameter`` s, non-tensor leaves; and pickles carrying payloads that
  would create the sentinel file if anything ran them;
- safetensors files by ``safetensors.torch.save_file``;
- GGUF files by gguf-py's ``GGUFWriter``: tokenizer-like arrays, nested arrays, tensors
  quantized by ``gguf.quants.quantize`` and K-quant blocks; and tiny Llama and Qwen2 models
  with real tokenizers written as llama.cpp's converter writes them (``tests.gguf_models``);
- archives by ``prebake pack`` of real bakes, and bake folders (manifests) by ``prebake convert``
  (aliases, variants, a quantized bake with packed forms, a bake of components, a GGUF bake).

``python -m tests.fuzz.seeds DIR`` writes them (torch runs there, never in the campaign process
that forks the children). :func:`ensure` makes them once per :data:`VERSION`; :func:`load`
reads them back.
"""

from __future__ import annotations

import bz2
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

from tests.fuzz.mutators.base import Folder
from tests.fuzz.mutators.zip_ops import BOMB_SIZE
from tests.fuzz.sandbox import SENTINEL

VERSION = "4"
KINDS = ("torch-zip", "torch-legacy", "safetensors", "gguf", "gguf-hf", "archive", "bake")


def _state_dicts() -> dict:
    import collections

    import torch

    g = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    embed = randn(16, 8)
    base = torch.arange(64, dtype=torch.float32)
    dtypes = {str(d).split(".")[1]: randn(3, 5).to(d) for d in (
        torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
        torch.uint8, torch.bool, torch.complex64, torch.float8_e4m3fn, torch.float8_e5m2)}
    dtypes.update(scalar=torch.tensor(3.5), empty=torch.zeros(0, 4), uint16=torch.arange(6).to(torch.uint16))
    params = collections.OrderedDict(
        [("w", torch.nn.Parameter(randn(4, 4))), ("b", torch.nn.Parameter(randn(4), requires_grad=False))])
    llama = {"model.embed_tokens.weight": embed.clone(), "model.norm.weight": torch.ones(8),
             "model.layers.0.self_attn.q_proj.weight": randn(8, 8, dtype=torch.bfloat16),
             "model.layers.0.mlp.up_proj.weight": randn(16, 8, dtype=torch.float16)}
    llama["lm_head.weight"] = llama["model.embed_tokens.weight"]
    return {
        "nested": {"model": {"embed.weight": embed, "layers": [{"w": randn(8, 8, dtype=torch.float16)},
                                                               {"w": randn(8, 8, dtype=torch.bfloat16)}],
                             "head.weight": embed}, "step": 3, "opt": {"lr": 0.1, "betas": (0.9, 0.99)},
                   "names": ["a", "b"]},
        "views": {"base": base, "slice": base[8:24], "t": base.view(8, 8).t(), "strided": base[::3],
                  "row": base.view(8, 8)[3], "params": params},
        "dtypes": dtypes,
        "llama": llama,
        "big": {"w": randn(512, 512), "h": randn(300, 256, dtype=torch.bfloat16), "v": randn(7)},
    }


class _Call:
    """Pickles as ``func(*args)``: what a hostile checkpoint holds."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads() -> dict:
    import builtins
    import subprocess as sp

    import torch

    calls = {"system": _Call(os.system, (f"touch {SENTINEL}",)), "open": _Call(open, (SENTINEL, "w")),
             "eval": _Call(builtins.eval, (f"open({SENTINEL!r}, 'w')",)),
             "call": _Call(sp.call, (["touch", SENTINEL],))}
    return {f"payload-{k}": {"w": torch.zeros(2), "evil": v} for k, v in calls.items()}


def write_torch(out: Path) -> None:
    import torch

    for zipped, kind in ((True, "torch-zip"), (False, "torch-legacy")):
        (out / kind).mkdir(parents=True, exist_ok=True)
        for name, obj in {**_state_dicts(), **_payloads()}.items():
            if not zipped and name == "dtypes":
                obj = {k: v for k, v in obj.items() if not k.startswith(("float8", "uint16"))}
            torch.save(obj, out / kind / f"{name}.bin", _use_new_zipfile_serialization=zipped)


def write_safetensors(out: Path) -> None:
    from safetensors.torch import save_file

    (out / "safetensors").mkdir(parents=True, exist_ok=True)
    sd = _state_dicts()
    llama = {k: v for k, v in sd["llama"].items() if k != "lm_head.weight"}
    save_file(llama, out / "safetensors" / "llama.safetensors", metadata={"format": "pt"})
    save_file({k: v.contiguous() for k, v in sd["dtypes"].items()}, out / "safetensors" / "dtypes.safetensors")
    save_file(sd["big"], out / "safetensors" / "big.safetensors")


def write_gguf(out: Path) -> None:
    import gguf
    import numpy as np
    from gguf import GGMLQuantizationType as Q

    (out / "gguf").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def full(path: Path, alignment: int | None, n_tokens: int) -> None:
        w = gguf.GGUFWriter(str(path), "llama")
        if alignment:
            w.add_custom_alignment(alignment)
        w.add_block_count(1)
        w.add_context_length(64)
        w.add_embedding_length(64)
        w.add_head_count(4)
        w.add_string("general.name", "tiny ✓")
        w.add_array("t.nested", [[1, 2], [3], ["a", "b"]])
        w.add_float32("t.f32", 0.5)
        w.add_bool("t.yes", True)
        tokens = [f"tok{i}" if i % 5 else f"▁wörd{i}" for i in range(n_tokens)]
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores([i * 0.5 for i in range(n_tokens)])
        w.add_token_types([1 + i % 5 for i in range(n_tokens)])
        w.add_token_merges([f"{a} {b}" for a, b in zip(tokens, tokens[1:], strict=False)])
        values = rng.standard_normal((4, 64)).astype(np.float32)
        for qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.BF16):
            w.add_tensor(f"blk.0.{qtype.name.lower()}.weight", gguf.quants.quantize(values, qtype), raw_dtype=qtype)
        for qtype in (Q.Q4_K, Q.Q6_K):
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            w.add_tensor(f"blk.0.{qtype.name.lower()}.weight", rng.integers(0, 256, (2, 256 // block * size),
                                                                             dtype=np.uint8), raw_dtype=qtype)
        w.add_tensor("token_embd.weight", rng.standard_normal((n_tokens, 64)).astype(np.float16))
        w.add_tensor("output_norm.weight", np.ones(64, np.float32))
        w.add_tensor("t.i32", np.arange(7, dtype=np.int32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    full(out / "gguf" / "full.gguf", None, 80)
    full(out / "gguf" / "aligned64.gguf", 64, 8)
    w = gguf.GGUFWriter(str(out / "gguf" / "tiny.gguf"), "llama")
    w.add_tensor("a", np.arange(4, dtype=np.float32))
    w.add_tensor("b", gguf.quants.quantize(np.ones((1, 32), np.float32), Q.Q8_0), raw_dtype=Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_gguf_hf(out: Path, work: Path) -> None:
    """GGUF files of tiny Llama and Qwen2 models, as llama.cpp's converter writes them (with their
    tokenizers): the ones prebake bakes as Hugging Face folders."""
    import torch
    import transformers

    from tests.gguf_models import write_gguf
    from tests.tiny_tokenizers import qwen2_tokenizer, spm_tokenizer

    (out / "gguf-hf").mkdir(parents=True, exist_ok=True)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    for kind, qtypes in (("llama", ("Q8_0", "F16")), ("qwen2", ("Q8_0",))):
        src = work / kind
        src.mkdir(parents=True)
        if kind == "llama":
            tok = spm_tokenizer(src, "llama", vocab_size=300)
            config = transformers.LlamaConfig(vocab_size=len(tok), bos_token_id=1, eos_token_id=2, **common)
        else:
            tok = qwen2_tokenizer(src, vocab_size=300)
            config = transformers.Qwen2Config(vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                                              tie_word_embeddings=True, **common)
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(src)
        for qtype in qtypes:
            write_gguf(src, out / "gguf-hf" / f"{kind}-{qtype}.gguf", qtype)


def write_bakes(out: Path, work: Path) -> None:
    from prebake.convert.bake import convert
    from prebake.convert.pack import pack
    from prebake.convert.plan import Options

    bakes, archives = out / "bake", out / "archive"
    archives.mkdir(parents=True, exist_ok=True)
    bakes.mkdir(parents=True, exist_ok=True)
    convert(out / "torch-zip" / "nested.bin", bakes / "nested", variants=["v=first=1"])
    convert(out / "torch-zip" / "big.bin", bakes / "quant", Options(quant="q8_0", keep_float=True))
    convert(out / "gguf" / "full.gguf", bakes / "gguf", Options(names="gguf", keep_quant=True))
    parts = work / "components"
    for name, seed in (("text_encoder", "llama.safetensors"), ("vae", "dtypes.safetensors")):
        (parts / name).mkdir(parents=True)
        shutil.copy(out / "safetensors" / seed, parts / name / "model.safetensors")
        (parts / name / "config.json").write_text('{"hidden_size": 8}')
    (parts / "model_index.json").write_text('{"_class_name": "Tiny"}')
    convert(parts, bakes / "components")
    for name in ("nested", "quant", "components"):
        pack(bakes / name, archives / f"{name}.pbk")
    convert(out / "torch-zip" / "big.bin", work / "big-bake")
    pack(work / "big-bake", archives / "planes.pbk")


def write_bombs(out: Path) -> None:
    """BOMB_SIZE zero bytes as raw deflate (about 2.5 MiB) and as bzip2 (about 2 KiB)."""
    (out / "extras").mkdir(parents=True, exist_ok=True)
    zeros = bytes(64 << 20)
    for name, c in (("bomb.deflate", zlib.compressobj(9, zlib.DEFLATED, -15)), ("bomb.bzip2", bz2.BZ2Compressor(9))):
        parts = [c.compress(zeros) for _ in range(BOMB_SIZE // len(zeros))]
        (out / "extras" / name).write_bytes(b"".join(parts) + c.flush())


def write_all(out: Path) -> None:
    import tempfile

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    write_torch(out)
    write_safetensors(out)
    write_gguf(out)
    with tempfile.TemporaryDirectory() as work:
        write_bakes(out, Path(work))
    with tempfile.TemporaryDirectory() as work:
        write_gguf_hf(out, Path(work))
    write_bombs(out)
    (out / "VERSION").write_text(VERSION)


def ensure(folder: Path) -> Path:
    """The seeds in ``folder``, made first (in a fresh interpreter) if missing or stale."""
    stamp = folder / "VERSION"
    if not stamp.exists() or stamp.read_text() != VERSION:
        subprocess.run([sys.executable, "-m", "tests.fuzz.seeds", str(folder)], check=True,
                       cwd=Path(__file__).resolve().parents[2])
    return folder


def load(folder: Path) -> tuple[dict[str, list[tuple[str, object]]], dict[str, bytes]]:
    """(kind -> [(name, bytes or Folder)], extras by name) from a seeds folder."""
    seeds: dict[str, list[tuple[str, object]]] = {}
    for kind in KINDS:
        entries = sorted((folder / kind).iterdir())
        if kind == "bake":
            seeds[kind] = [(p.name, _folder(p)) for p in entries]
        else:
            seeds[kind] = [(p.name, p.read_bytes()) for p in entries]
    extras = {p.name: p.read_bytes() for p in (folder / "extras").iterdir()}
    return seeds, extras


def _folder(bake: Path) -> Folder:
    return Folder({f"bake/{p.relative_to(bake).as_posix()}": p.read_bytes()
                   for p in sorted(bake.rglob("*")) if p.is_file()})


if __name__ == "__main__":
    write_all(Path(sys.argv[1]))
