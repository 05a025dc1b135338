"""The tokenizer of a bake as llama.cpp's converter writes it into a GGUF (``tokenizer.ggml.*``).

Routes, tried in the order the architecture's row lists them (:mod:`prebake.convert.gguf_arch`),
as ``convert_hf_to_gguf.py`` tries them:

- ``spm``: a SentencePiece ``tokenizer.model`` (read by :mod:`prebake.formats.sentencepiece_model`,
  no ``sentencepiece`` package needed): pieces, scores and types, then the added tokens of
  ``added_tokens.json`` and ``tokenizer_config.json``; model ``llama``;
- ``llama_hf``: a ``tokenizer.json`` BPE with byte fallback (a SentencePiece model converted to
  the fast format), through gguf-py's ``LlamaHfVocab`` (which needs transformers); model ``llama``;
- ``bpe`` (and ``gpt2_class``, ``bpe`` only when ``tokenizer_config.json`` names GPT2Tokenizer):
  a byte-level BPE ``tokenizer.json``; model ``gpt2``, with merges and the pre-tokenizer's name.

Special token ids, add-BOS/EOS flags, merges and the chat template come from gguf-py's
``SpecialVocab``, as llama.cpp's converter takes them. The token list is padded with
``[PADn]`` entries (type UNUSED) up to the embedding's rows, as llama.cpp pads it to
``vocab_size``.

llama.cpp names a BPE pre-tokenizer by hashing how the tokenizer splits a test string, a table
its maintainers regenerate; prebake reads the pre-tokenizer's split pattern from
``tokenizer.json`` instead (:data:`PRE_TOKENIZERS`), and ``pre=`` names one it does not know.
"""

from __future__ import annotations

import json
from pathlib import Path

from prebake.formats.errors import UnsupportedError

# SentencePiece / GGUF token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# tokenizer.json split patterns -> llama.cpp's pre-tokenizer names (LLAMA_VOCAB_PRE_TYPE_*): the
# patterns llama-vocab.cpp quotes as "original regex from tokenizer.json" for each
_WORDS = r"|[^\r\n\p{L}\p{N}]?\p{L}+"
_TAIL = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
PRE_TOKENIZERS = {
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)" + _WORDS + r"|\p{N}{1,3}" + _TAIL: "llama-bpe",
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)" + _WORDS + r"|\p{N}" + _TAIL: "qwen2",
}
GPT2_PATTERN = "gpt-2"  # ByteLevel(use_regex=True): GPT-2's own split


def add_vocab(w, folder: Path, routes: tuple[str, ...], n_vocab: int, pre: str | None = None,
              space_prefix: bool | None = None) -> str:
    """Writes the tokenizer found in ``folder`` by the first route that applies; returns its name.

    ``n_vocab``: the embedding's rows (the token list is padded to it). Raises
    :class:`UnsupportedError` when no route finds its files.
    """
    import gguf

    for route in routes:
        if not _available(route, folder):
            continue
        if route == "spm":
            _spm(w, folder, n_vocab)
        elif route == "llama_hf":
            _llama_hf(w, folder, gguf)
        else:
            _bpe(w, folder, n_vocab, pre)
        if space_prefix is not None:
            w.add_add_space_prefix(space_prefix)
        else:
            _add_prefix_space(w, folder)
        gguf.SpecialVocab(folder, load_merges=route in ("bpe", "gpt2_class"),
                          n_vocab=n_vocab).add_to_gguf(w, quiet=True)
        return route
    wanted = {"spm": "tokenizer.model", "llama_hf": "tokenizer.json", "bpe": "tokenizer.json",
              "gpt2_class": "tokenizer.json"}
    files = " or ".join(dict.fromkeys(wanted[r] for r in routes))
    raise UnsupportedError(f"no tokenizer to export: llama.cpp needs {files} beside the weights "
                           "(bake the model's folder, tokenizer files included)", folder)


def _available(route: str, folder: Path) -> bool:
    if route == "spm":
        return (folder / "tokenizer.model").is_file()
    tok = _json(folder / "tokenizer.json")
    if tok is None or tok.get("model", {}).get("type") != "BPE":
        return False
    fallback = bool(tok["model"].get("byte_fallback"))
    if route == "llama_hf":
        return fallback and (tok.get("decoder") or {}).get("type") == "Sequence"
    if route == "gpt2_class":
        return (_json(folder / "tokenizer_config.json") or {}).get("tokenizer_class") == "GPT2Tokenizer"
    return True


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _add_prefix_space(w, folder: Path) -> None:
    value = (_json(folder / "tokenizer_config.json") or {}).get("add_prefix_space")
    if isinstance(value, bool):
        w.add_add_space_prefix(value)


def looks_special(text: str) -> bool:
    """Added tokens llama.cpp's converter treats as control tokens even when not marked special."""
    return text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (text.startswith("<|") and text.endswith("|>")) \
        or (text.startswith("<｜") and text.endswith("｜>")) or (text.startswith("<unused") and text.endswith(">"))


def _spm(w, folder: Path, n_vocab: int) -> None:
    from prebake.formats.sentencepiece_model import read_sentencepiece

    model = read_sentencepiece(folder / "tokenizer.model")
    size = n_vocab  # pieces past the embedding's rows are dropped, as llama.cpp's converter drops them
    tokens = [f"[PAD{i}]" for i in range(size)]
    scores, types = [-10000.0] * size, [UNUSED] * size
    for i, p in enumerate(model.pieces[:size]):
        # llama.cpp's converter asks IsUnknown/IsControl/IsUnused/IsByte: user-defined pieces read NORMAL
        tokens[i], scores[i] = p.text, p.score
        types[i] = p.type if p.type in (UNKNOWN, CONTROL, UNUSED, BYTE) else NORMAL
    for text, i in (_json(folder / "added_tokens.json") or {}).items():
        if isinstance(i, int) and 0 <= i < size:
            tokens[i], scores[i], types[i] = text, -1000.0, USER_DEFINED
    decoder = (_json(folder / "tokenizer_config.json") or {}).get("added_tokens_decoder") or {}
    for key, entry in decoder.items():
        i, text = int(key), entry.get("content", "")
        if not 0 <= i < size:
            continue
        special = entry.get("special") or looks_special(text)
        tokens[i] = text if special else text.replace("\u2581", " ")  # llama.cpp wants them pre-normalized
        scores[i], types[i] = -1000.0, CONTROL if special else USER_DEFINED
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)


def _llama_hf(w, folder: Path, gguf) -> None:
    try:
        vocab = gguf.LlamaHfVocab(folder)
    except ImportError:
        raise UnsupportedError("this tokenizer.json (BPE with byte fallback) is read through transformers, which "
                               "is not installed: pip install transformers", folder) from None
    tokens, scores, types = zip(*vocab.all_tokens(), strict=True)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(list(tokens))
    w.add_token_scores(list(scores))
    w.add_token_types(list(types))


def _bpe(w, folder: Path, n_vocab: int, pre: str | None) -> None:
    tok = _json(folder / "tokenizer.json")
    vocab = {i: text for text, i in tok["model"]["vocab"].items()}
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    size = n_vocab
    beyond = max([*vocab, *added]) if vocab or added else -1
    if beyond >= size:
        raise UnsupportedError(f"tokenizer.json has token id {beyond}, but the embedding has {size} rows", folder)
    tokens, types = [], []
    for i in range(size):
        if i in added:
            text = added[i]["content"]
            special = added[i].get("special") or looks_special(text)
            tokens.append(text if special else text.replace("\u2581", " "))
            types.append(CONTROL if special else USER_DEFINED)
        elif i in vocab:
            tokens.append(vocab[i])
            types.append(NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre or pre_tokenizer(tok, folder))
    w.add_token_list(tokens)
    w.add_token_types(types)


def pre_tokenizer(tok: dict, folder: Path) -> str:
    """llama.cpp's name for the pre-tokenizer of ``tokenizer.json`` (``tok``), from its split pattern."""
    steps = _steps(tok.get("pre_tokenizer") or {})
    for step in steps:
        if step.get("type") == "Split":
            pattern = (step.get("pattern") or {}).get("Regex")
            if pattern in PRE_TOKENIZERS:
                return PRE_TOKENIZERS[pattern]
            raise UnsupportedError(f"tokenizer.json splits text with {pattern!r}, a pre-tokenizer prebake does not "
                                   "name; pass the name llama.cpp gives it (--tokenizer-pre, e.g. llama-bpe, qwen2, "
                                   "gpt-2)", folder)
    if any(s.get("type") == "ByteLevel" and s.get("use_regex", True) for s in steps):
        return GPT2_PATTERN
    raise UnsupportedError("tokenizer.json has no pre-tokenizer prebake can name; pass --tokenizer-pre "
                           "(llama.cpp's name for it, e.g. llama-bpe, qwen2, gpt-2)", folder)


def _steps(pre: dict) -> list[dict]:
    if pre.get("type") == "Sequence":
        return [s for p in pre.get("pretokenizers", []) for s in _steps(p)]
    return [pre] if pre else []
