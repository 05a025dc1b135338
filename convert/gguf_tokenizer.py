"""A GGUF's tokenizer as Hugging Face files, built by transformers' own GGUF tokenizer converters.

transformers rebuilds a fast tokenizer from a GGUF's ``tokenizer.ggml.*`` keys
(``get_gguf_tokenizer`` / ``convert_gguf_tokenizer``: byte-level BPE, SentencePiece BPE with
Gemma's and Phi-3's variants, Unigram; special and user-defined tokens; add-BOS/EOS flags and
the chat template). prebake builds the same tokenizer class ``AutoTokenizer`` would pick for
the model's config, from the same file, and saves it: ``tokenizer.json``,
``tokenizer_config.json`` (special tokens and their flags) and ``chat_template.jinja``. The
steps that read the file are prebake's (:func:`tokenizer_inputs` says why); the config is given.
A byte-level BPE runs that route on a sample of its vocabulary and has the whole vocabulary
written in the sample's place (:mod:`prebake.convert.gguf_tokenizer_splice`: 3.4x sooner for
152k tokens, the same bytes).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from prebake.formats.errors import FormatError
from prebake.formats.gguf_file import GGUFFile


def has_tokenizer(f: GGUFFile) -> bool:
    return "tokenizer.ggml.tokens" in f.fields and "tokenizer.ggml.model" in f.fields


def write_tokenizer(f: GGUFFile, config, folder: Path) -> list[Path]:
    """Saves ``f``'s tokenizer into ``folder``; returns the files written.

    The long string arrays are decoded (and checked as UTF-8) by prebake's parser, so a damaged
    vocabulary is a :class:`FormatError` naming the file, as everywhere else. A byte-level BPE
    takes transformers' route on a sample of its vocabulary, extended to the whole by
    :mod:`prebake.convert.gguf_tokenizer_splice` where the sample's output shows how; every other
    vocabulary, and one whose sample shows anything else, takes the route whole.
    """
    from prebake.convert import gguf_tokenizer_splice as splice

    architecture, tokenizer_dict, tokenizer_config = tokenizer_inputs(f)
    cls = tokenizer_class(config)
    with _quiet(), tempfile.TemporaryDirectory(dir=folder) as tmp:
        if splice.eligible(architecture, tokenizer_dict):
            index = {token: i for i, token in enumerate(tokenizer_dict["tokens"])}
            ids, merges = splice.sample_ids(tokenizer_dict, index)
            del index
            try:
                paths = _route(f, architecture, splice.sample_dict(tokenizer_dict, ids, merges), tokenizer_config,
                               cls, Path(tmp) / "sample")
                texts = splice.splice({p.name: p.read_text(encoding="utf-8") for p in paths}, tokenizer_dict, ids,
                                      merges)
            except (splice.NotSpliceable, FormatError):
                pass  # the whole route decides
            else:
                for name, pieces in texts.items():
                    with open(folder / name, "w", encoding="utf-8", newline="") as out:
                        out.writelines(pieces)
                return [folder / name for name in texts]
        paths = _route(f, architecture, tokenizer_dict, tokenizer_config, cls, Path(tmp) / "whole")
        for p in paths:
            p.replace(folder / p.name)
        return [folder / p.name for p in paths]


def _route(f: GGUFFile, architecture: str, tokenizer_dict: dict, tokenizer_config: dict, cls: type,
           tmp: Path) -> list[Path]:
    """transformers' GGUF tokenizer route: convert, build the class, ``save_pretrained`` into
    ``tmp``; the files it wrote."""
    from transformers.integrations.gguf import convert_gguf_tokenizer

    tmp.mkdir()
    try:
        backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
        # handed over as a file, not an object (which the class deep-copies): one copy in memory at a time
        backend.save(str(tmp / "backend.json"))
        del backend
        tokenizer = cls(tokenizer_file=str(tmp / "backend.json"), **tokenizer_config, **extra)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # transformers' and tokenizers' (Rust: a panic is a BaseException)
        # refusal of metadata no real file has; this file's, so one line, not a traceback
        raise FormatError(f"transformers cannot build a tokenizer from this file's metadata ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''}); --names gguf bakes it without one",
                          f.path) from None
    (tmp / "backend.json").unlink()
    return [p for p in map(Path, tokenizer.save_pretrained(tmp)) if p.is_file()]


def tokenizer_inputs(f: GGUFFile) -> tuple[str, dict, dict]:
    """What transformers' ``get_gguf_tokenizer`` returns for ``f``: (architecture, the tokenizer's
    keys under transformers' names, the tokenizer config).

    Built here from prebake's parse, by transformers' own table (``GGUF_TOKENIZER_MAPPING``) and
    rules: ``get_gguf_tokenizer`` reads the file again with a reader of its own that decodes each
    of the vocabulary's strings in Python (about 2 s for 152k tokens and their merges, a quarter
    of this whole bake); ``tests/test_gguf_hf.py`` checks the two agree.
    """
    from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING

    def value(key):
        return f.fields[key].value()

    grouped = {group: {name: value(f"tokenizer.{key}") for key, name in renames.items()
                       if f"tokenizer.{key}" in f.fields} for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tokenizer, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer.get("tokenizer_type") == "llama":  # llama.cpp adds BOS to a SentencePiece vocabulary unless told
        tokenizer_config.setdefault("add_bos_token", True)
    elif tokenizer.get("tokenizer_type") == "gemma4":  # its chat template writes <bos> itself
        tokenizer_config["add_bos_token"] = False
    tokens = tokenizer.get("tokens") or []
    _check_vocabulary(f, tokens, tokenizer.get("merges"))
    for name, key in SPECIAL_TOKENS.items():
        token_id = f.fields[f"tokenizer.ggml.{key}"].value() if f"tokenizer.ggml.{key}" in f.fields else None
        if token_id is not None and not (type(token_id) is int and 0 <= token_id < len(tokens)):
            raise FormatError(f"tokenizer.ggml.{key} is {token_id!r}, not a token of the {len(tokens)}-token vocabulary",
                              f.path)
        tokenizer_config[name] = tokens[token_id] if token_id is not None else None
    return value("general.architecture"), tokenizer, tokenizer_config


def _check_vocabulary(f: GGUFFile, tokens: list, merges: list | None) -> None:
    """What the tokenizers library assumes of a vocabulary and would otherwise panic on (a Rust
    panic prints its own message before any error can be caught): distinct tokens, and merges
    of two tokens of the vocabulary whose join is one too."""
    vocab = set(tokens)
    if len(vocab) != len(tokens):
        raise FormatError(f"the vocabulary lists {len(tokens) - len(vocab)} token(s) twice", f.path)
    # one pass, stopping at the first bad merge: 0.06 s for 151k merges, where whole-list string
    # operations (join, split, issuperset) took 0.10 s (measured side by side on fresh strings)
    for i, merge in enumerate(merges or ()):
        parts = merge.split(" ") if isinstance(merge, str) else ()
        if len(parts) != 2 or parts[0] not in vocab or parts[1] not in vocab or parts[0] + parts[1] not in vocab:
            raise FormatError(f"tokenizer.ggml.merges[{i}] ({merge!r}) is not a merge of two tokens of the "
                              "vocabulary into a third", f.path)


SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                  "pad_token": "padding_token_id"}  # transformers' _SPECIAL_TOKENS (private there)


def tokenizer_class(config) -> type:
    """The tokenizer class ``AutoTokenizer`` picks for ``config`` (its fast backend by default)."""
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    return TOKENIZER_MAPPING.get(type(config), TokenizersBackend) or TokenizersBackend


class _quiet:
    """transformers logs at INFO/WARNING while it converts a vocabulary: keep the bake's output to
    prebake's own lines."""

    def __enter__(self):
        self.logger = logging.getLogger("transformers")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)
