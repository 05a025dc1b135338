"""A GGUF's tokenizer as Hugging Face files, built by transformers' own GGUF tokenizer converters.

transformers rebuilds a fast tokenizer from a GGUF's ``tokenizer.ggml.*`` keys
(``get_gguf_tokenizer`` / ``convert_gguf_tokenizer``: byte-level BPE, SentencePiece BPE with
Gemma's and Phi-3's variants, Unigram; special and user-defined tokens; add-BOS/EOS flags and
the chat template). prebake builds the same tokenizer class ``AutoTokenizer`` would pick for
the model's config, from the same file, and saves it: ``tokenizer.json``,
``tokenizer_config.json`` (special tokens and their flags) and ``chat_template.jinja``. The
only step skipped is ``AutoTokenizer``'s own reading of the config, which goes through gguf-py's
whole-file parse (:mod:`prebake.convert.gguf_config` says why); the config is given here.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from prebake.formats.errors import FormatError
from prebake.formats.gguf_file import GGUFFile

TOKEN_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")


def has_tokenizer(f: GGUFFile) -> bool:
    return "tokenizer.ggml.tokens" in f.fields and "tokenizer.ggml.model" in f.fields


def write_tokenizer(f: GGUFFile, config, folder: Path) -> list[Path]:
    """Saves ``f``'s tokenizer into ``folder``; returns the files written.

    The long string arrays are checked as UTF-8 by prebake's parser first, so a damaged
    vocabulary is a :class:`FormatError` naming the file, as everywhere else.
    """
    for key in TOKEN_KEYS:
        if key in f.fields:
            f.fields[key].value()  # raises FormatError on a string that is not UTF-8
    gguf = Path(f.path)
    with _quiet(), tempfile.TemporaryDirectory(dir=folder) as tmp:
        try:
            tokenizer = tokenizer_class(config).from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        except (ValueError, KeyError, IndexError) as e:
            raise FormatError(f"transformers cannot build a tokenizer from this file ({e})", f.path) from None
        written = [Path(p) for p in tokenizer.save_pretrained(tmp)]
        out = []
        for p in written:
            if p.is_file():
                p.replace(folder / p.name)
                out.append(folder / p.name)
    return out


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
