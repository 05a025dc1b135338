"""Quantization error end to end: logits cosine of baked models against their float originals.

Run ``python -m tests.bench quant_quality``. Tiny random Llamas (``save_pretrained`` of random
configs, two seeds each) are baked with ``--quant`` RECIPE, loaded with ``load_module``
(``QuantLinear`` layers) and run on the same random tokens; the figure is the cosine
similarity of all logits against the float model's. The blocks are llama.cpp's reference
blocks, so these are the errors llama.cpp's own files of these models would have.

What it shows: Q8_0 stays above 0.9998 everywhere; 4-bit types lose more with every layer and
with width, because in a random-init Llama each layer's output is as large as the residual
stream it adds to, so every layer's weight error reaches the logits and compounds.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import torch
import transformers
from prebake.cache import load_module
from prebake.convert.bake import convert
from prebake.convert.plan import Options

CONFIGS = [(256, 1, 512), (256, 2, 512), (256, 4, 768), (512, 2, 1536)]  # hidden, layers, intermediate
RECIPES = ["q8_0", "q6_k", "q4_k_m", "q4_k", "q4_0"]


def cosine(tmp: Path, hidden: int, layers: int, inter: int, seed: int, recipes: list[str]) -> list[float]:
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=inter,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    src = tmp / f"{hidden}-{layers}-{inter}-{seed}"
    model.save_pretrained(src / "src")
    x = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x).logits.flatten()
    out = []
    for recipe in recipes:
        convert(src / "src", src / recipe, Options(quant=recipe), progress=False)
        q = load_module(lambda: transformers.LlamaForCausalLM(cfg), src / recipe).eval()
        with torch.no_grad():
            out.append(float(torch.nn.functional.cosine_similarity(q(x).logits.flatten(), ref, dim=0)))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args(argv if argv is not None else [])
    logging.disable(logging.WARNING)
    transformers.utils.logging.set_verbosity_error()
    print("logits cosine against the float model (tiny random Llamas, vocab 512, 4 x 16 random tokens)")
    print("hidden layers inter seed | " + " ".join(f"{r:>7}" for r in RECIPES))
    with tempfile.TemporaryDirectory() as tmp:
        for hidden, layers, inter in CONFIGS:
            for seed in range(args.seeds):
                cos = cosine(Path(tmp), hidden, layers, inter, seed, RECIPES)
                print(f"{hidden:6} {layers:6} {inter:5} {seed:4} | " + " ".join(f"{c:7.5f}" for c in cos), flush=True)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
