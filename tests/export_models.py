"""Tiny transformers models with real tokenizers, saved as Hugging Face folders, for the GGUF export tests.

Tokenizers are trained on the spot: a byte-level BPE (Llama 3's split pattern, or Qwen2's) with
the ``tokenizers`` library, a SentencePiece model with ``sentencepiece``.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

TEXT = [f"the quick brown fox jumps over the lazy dog {i} times, said llama number {i * 7}." for i in range(200)]
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
CHAT = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"


def bpe_tokenizer(folder: Path, size: int = 300, split: str = LLAMA3_SPLIT) -> int:
    """A byte-level BPE ``tokenizer.json`` (+ config, chat template) in ``folder``; returns its size."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=size, special_tokens=specials,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0], eos_token=specials[1])
    fast.chat_template = CHAT
    fast.save_pretrained(folder)
    return len(fast)


def spm_tokenizer(folder: Path, size: int = 400) -> int:
    """A SentencePiece ``tokenizer.model`` (BPE, byte fallback) in ``folder``; returns its size."""
    import sentencepiece as spm

    corpus = folder / "corpus.txt"
    folder.mkdir(parents=True, exist_ok=True)
    corpus.write_text("\n".join(TEXT + ["hello wörld, 你好 🚀"] * 20))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=size,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   user_defined_symbols=["<start_of_turn>"], minloglevel=2)
    corpus.unlink()
    (folder / "tokenizer.vocab").unlink()
    return size


def save_model(kind: str, folder: Path, *, hidden: int = 64, layers: int = 2, vocab: int = 320, seed: int = 0,
               dtype: torch.dtype = torch.float32, **extra):
    """A random tiny ``kind`` model (llama, mistral, qwen2, qwen3, mixtral, qwen2moe, qwen3moe, gemma2,
    gemma3, phi3) saved with ``save_pretrained`` at ``folder``; returns it in eval mode (float32)."""
    import transformers as T

    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    moe = dict(num_experts_per_tok=2)
    configs = {
        "llama": (T.LlamaConfig, {}), "mistral": (T.MistralConfig, {}),
        "qwen2": (T.Qwen2Config, {}), "qwen3": (T.Qwen3Config, dict(head_dim=hidden // 4)),
        "mixtral": (T.MixtralConfig, dict(num_local_experts=4, **moe)),
        "qwen2moe": (T.Qwen2MoeConfig, dict(num_experts=4, moe_intermediate_size=hidden,
                                            shared_expert_intermediate_size=2 * hidden, **moe)),
        "qwen3moe": (T.Qwen3MoeConfig, dict(num_experts=4, moe_intermediate_size=hidden, head_dim=hidden // 4,
                                            norm_topk_prob=True,
                                            **moe)),
        "gemma2": (T.Gemma2Config, dict(head_dim=hidden // 4, sliding_window=64)),
        "gemma3": (T.Gemma3TextConfig, dict(head_dim=hidden // 4, sliding_window=64)),
        "phi3": (T.Phi3Config, dict(num_key_value_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    }
    classes = {"gemma3": T.Gemma3ForCausalLM}
    config_class, own = configs[kind]
    cfg = config_class(**{**common, **own, **extra})
    torch.manual_seed(seed)
    model_class = classes.get(kind) or getattr(T, config_class.__name__.replace("Config", "ForCausalLM"))
    model = model_class(cfg).eval()
    with torch.no_grad():  # norms away from their init value of 1 (or 0), so a wrong +1 shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.to(dtype).save_pretrained(folder)
    return model.float()


def read_gguf(path) -> tuple[dict, dict[str, tuple[str, np.ndarray, np.ndarray]]]:
    """(fields {key: (value, [types])}, tensors {name: (type, float32 values in PyTorch order, raw bytes)})."""
    r = gguf.GGUFReader(str(path))
    fields = {k: (f.contents(), [t.name for t in f.types]) for k, f in r.fields.items()}
    tensors = {}
    for t in r.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32) \
            if t.tensor_type.name not in ("I8", "I16", "I32", "I64") else np.asarray(t.data)
        tensors[t.name] = (t.tensor_type.name, values, np.asarray(t.data).tobytes())
    return fields, tensors
