"""Small real tokenizers, trained here with the ``tokenizers`` library (no network): a byte-level BPE
as Qwen2 ships it, and SentencePiece-style BPE vocabularies with scores, as Llama 2 and Gemma ship
them.

A SentencePiece model is pieces with scores; its Hugging Face ``tokenizer.json`` is what
transformers' converter makes of it: merges recovered from the pieces and their scores
(``generate_merges``, SentencePiece's own rule: join the pair whose result scores best). The
folders written here hold that, and ``spm_scores.json`` in place of ``tokenizer.model``, which
:mod:`tests.gguf_models` reads the way llama.cpp's converter reads the model's scores.
"""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you doing today? I'm fine, thanks.",
    "Grüße aus München: Ärger, Öl und Übermut kosten 12,50 €.",
    "日本語のテキストも少し。こんにちは世界。",
    "def bake(model):\n    return model.weights  # 1234567890",
    "Emoji 🚀 and accents: café, naïve, résumé, ﬁnance.",
    "   leading spaces, tabs\tand\nnew lines\n\n",
] * 8
SENTENCES = ["Hello world!", "Grüße aus München, café 🚀", "  two  spaces and\ttabs\n", "日本語 1234567 code()"]
CHAT = [{"role": "user", "content": "Bonjour, ça va ?"}, {"role": "assistant", "content": "Très bien, merci."}]
QWEN_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GEMMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
                  "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
LLAMA_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {{ eos_token }}{% endfor %}"


def qwen2_tokenizer(folder: Path, vocab_size: int = 400):
    """A Qwen2-style byte-level BPE (Qwen2's split regex), with its special tokens and chat template."""
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    hf = transformers.Qwen2Tokenizer(vocab=model["vocab"], merges=merges, unk_token=None,
                                     bos_token=None, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    hf.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    hf.add_tokens(["<think>"])  # user-defined: matched whole, not special
    hf.chat_template = QWEN_TEMPLATE
    hf.save_pretrained(folder)
    return hf


def spm_tokenizer(folder: Path, style: str = "llama", vocab_size: int = 600):
    """A SentencePiece-style BPE with byte fallback: Llama 2's (``LlamaTokenizer``) or Gemma's
    (``GemmaTokenizer``) pieces and specials; pieces score by rank, as SentencePiece's BPE does."""
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers.tokenization_utils_base import generate_merges

    specials = ["<unk>", "<s>", "</s>"] if style == "llama" else ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token=specials[0 if style == "llama" else 3]))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous") if style == "gemma" else None
    tok.train_from_iterator([("▁" if style == "llama" else "") + s.replace(" ", "▁") for s in CORPUS],
                            trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False))
    learned = sorted(json.loads(tok.to_str())["model"]["vocab"].items(), key=lambda kv: kv[1])
    pieces = specials + [f"<0x{b:02X}>" for b in range(256)]
    if style == "gemma":
        pieces += ["<start_of_turn>", "<end_of_turn>"]
    fixed = len(pieces)
    pieces += [p for p, _ in learned if p not in pieces]
    scores = [0.0 if i < fixed else -float(i) for i in range(len(pieces))]
    vocab = {p: i for i, p in enumerate(pieces)}
    # SentencePiece's merge rule over the pieces that can merge (specials and bytes never do)
    mergeable = {p: s for p, s in zip(pieces, scores, strict=True) if not (p.startswith("<") and p.endswith(">"))}
    merges = generate_merges(vocab, mergeable)
    if style == "llama":
        hf = transformers.LlamaTokenizer(vocab=vocab, merges=merges, unk_token="<unk>", bos_token="<s>",
                                         eos_token="</s>", add_bos_token=True, legacy=False)
        hf.chat_template = LLAMA_TEMPLATE
    else:
        hf = transformers.GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)
        hf.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
        hf.chat_template = GEMMA_TEMPLATE
    hf.save_pretrained(folder)
    (folder / "spm_scores.json").write_text(json.dumps(scores))
    return hf


def encodings(tokenizer, specials: list[str]) -> list[list[int]]:
    """What the tests compare: plain sentences, ``specials`` written out in text, and a chat."""
    out = [tokenizer.encode(s) for s in SENTENCES]
    out.append(tokenizer.encode(" then ".join(specials) + " <think> end"))
    out.append(tokenizer.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True))
    return [list(ids["input_ids"] if hasattr(ids, "keys") else ids) for ids in out]
