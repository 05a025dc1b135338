"""Builds the small demo checkpoint that ``make convert`` bakes when no MODEL is given.

A Llama-shaped state dict (tied embeddings, 4 layers, bfloat16) written by ``torch.save``, the
way training code writes ``pytorch_model.bin``, beside a minimal ``config.json``.
Run: ``python -m prebake.convert.demo FOLDER``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def build_demo(folder: str | Path, layers: int = 4, hidden: int = 256, vocab: int = 4096) -> Path:
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)

    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    sd = {"model.embed_tokens.weight": w(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{name}.weight"] = w(hidden, hidden)
        sd[p + "mlp.gate_proj.weight"] = w(4 * hidden, hidden)
        sd[p + "mlp.up_proj.weight"] = w(4 * hidden, hidden)
        sd[p + "mlp.down_proj.weight"] = w(hidden, 4 * hidden)
        sd[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    sd["model.norm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]  # tied: stored once in the bake
    torch.save(sd, folder / "pytorch_model.bin")
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": 4 * hidden, "num_hidden_layers": layers, "num_attention_heads": 4,
              "num_key_value_heads": 4, "vocab_size": vocab, "tie_word_embeddings": True,
              "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


if __name__ == "__main__":
    print(build_demo(sys.argv[1] if len(sys.argv) > 1 else "build/demo"))
