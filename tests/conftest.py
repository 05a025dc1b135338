"""Shared fixtures and checks: every test that bakes something checks it the same way."""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path

import pytest
import torch
from prebake.cache.load import TORCH_DTYPES, load_from_manifest
from prebake.formats.manifest import read_manifest
from prebake.formats.safetensors_writer import BIG_TENSOR, is_padding

warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")


def raw_bytes(t: torch.Tensor) -> bytes:
    """A tensor's bytes in C order, whatever its dtype (bool, fp8 and complex included)."""
    t = t.detach().contiguous().cpu()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def check_bake(out: str | Path, expected: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Checks a bake inside out and returns what it loads.

    - every shard parses with the stock ``safetensors.safe_open`` and its header agrees with
      the manifest (dtype, shape, absolute offset);
    - the alignment rule holds for every tensor: a multiple of ``align`` from 1 MiB up, of the
      item size always;
    - with ``expected``: the same names, and every tensor byte-identical (dtype and shape too).
    """
    from safetensors import safe_open

    m = read_manifest(out)
    align = m.options["align"]
    for index, shard in enumerate(m.shards):
        path = Path(out) / shard.file
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        assert 8 + n == shard.data_offset and shard.data_offset % align == 0
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            assert name in keys
            if is_padding(name):
                assert name in m.padding
                continue
            t = m.tensors[name]
            assert t.shard == index and t.dtype == entry["dtype"] and t.shape == entry["shape"]
            assert t.offset == shard.data_offset + entry["data_offsets"][0]
    for name, t in m.tensors.items():
        itemsize = TORCH_DTYPES[t.dtype].itemsize
        assert t.offset % itemsize == 0, name
        if t.nbytes >= BIG_TENSOR:
            assert t.offset % align == 0, name
    loaded = load_from_manifest(out)
    if expected is not None:
        assert set(loaded) == set(expected), set(loaded) ^ set(expected)
        for name, ref in expected.items():
            got = loaded[name]
            assert got.dtype == ref.dtype and tuple(got.shape) == tuple(ref.shape), name
            assert raw_bytes(got) == raw_bytes(ref), f"{name} differs"
    return loaded


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


def save_llama(path: Path, *, layers: int, hidden: int, inter: int, vocab: int, heads: int = 4, kv_heads: int = 2,
               tie: bool = False, seed: int = 0):
    """A random ``LlamaForCausalLM`` saved with ``save_pretrained`` at ``path``; returns it in eval mode."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                   tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return model
