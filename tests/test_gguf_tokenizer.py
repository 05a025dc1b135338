"""Issue 13: a byte-level BPE's tokenizer files from transformers' route on a sample of the
vocabulary (:mod:`prebake.convert.gguf_tokenizer_splice`) are the whole route's, byte for byte.

The GGUF files are written by gguf-py's ``GGUFWriter`` the way llama.cpp's ``_set_vocab_gpt2``
writes them, from a byte-level BPE trained here (its 256-symbol alphabet holds ``"`` and ``\\``,
which JSON escapes). The sample is made small (16 spread tokens, 8 merges) so that most of the
vocabulary and merges are written by the splice, not by transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import transformers
from prebake.convert import gguf_tokenizer
from prebake.convert import gguf_tokenizer_splice as splice
from prebake.convert.gguf_tokenizer import tokenizer_class, tokenizer_inputs, write_tokenizer
from prebake.formats.gguf_file import open_gguf

from tests.tiny_tokenizers import LLAMA_TEMPLATE, QWEN_TEMPLATE, qwen2_tokenizer


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bpe")
    qwen2_tokenizer(folder)
    return folder


def bpe_gguf(path: Path, folder: Path, arch: str = "qwen2", pre: str = "qwen2", add_bos: bool | None = None,
             extra: tuple[str, ...] = (), template: str = QWEN_TEMPLATE, pad: bool = False) -> Path:
    """The trained BPE as llama.cpp writes it: tokens by id (added ones CONTROL if special, else
    USER_DEFINED), merges, special ids, flags, chat template; ``extra`` control tokens appended."""
    tok = json.loads((folder / "tokenizer.json").read_text())
    added = {a["id"]: a for a in tok["added_tokens"]}
    tokens = [None] * (max(len(tok["model"]["vocab"]), max(added) + 1))
    for piece, i in tok["model"]["vocab"].items():
        tokens[i] = piece
    for i, a in added.items():
        tokens[i] = a["content"]
    types = [gguf.TokenType.NORMAL if i not in added else gguf.TokenType.CONTROL if added[i]["special"]
             else gguf.TokenType.USER_DEFINED for i in range(len(tokens))]
    tokens += extra
    types += [gguf.TokenType.CONTROL] * len(extra)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([" ".join(m) for m in tok["model"]["merges"]])
    w.add_eos_token_id(tokens.index("<|endoftext|>"))
    if add_bos is not None:
        w.add_bos_token_id(tokens.index("<|im_start|>"))
        w.add_add_bos_token(add_bos)
    if pad:
        w.add_pad_token_id(tokens.index("<|im_end|>"))
    w.add_chat_template(template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return path


CASES = {  # Qwen2Tokenizer; LlamaTokenizer adding BOS (a post-processor holding ids); no split regex, a PAD
    "qwen2": dict(arch="qwen2", pre="qwen2"),
    "llama3": dict(arch="llama", pre="llama-bpe", add_bos=True, template=LLAMA_TEMPLATE),
    "default-pre": dict(arch="llama", pre="default", add_bos=False, pad=True),
}


@pytest.fixture
def small_sample(monkeypatch):
    monkeypatch.setattr(splice, "SPREAD", 16)
    monkeypatch.setattr(splice, "FIRST_MERGES", 8)


@pytest.fixture
def routes(monkeypatch) -> list[int]:
    """The vocabulary size of each run of transformers' route, in order."""
    calls, real = [], gguf_tokenizer._route
    monkeypatch.setattr(gguf_tokenizer, "_route", lambda f, a, d, *rest: calls.append(len(d["tokens"])) or
                        real(f, a, d, *rest))
    return calls


def whole_route(path: Path, config, folder: Path) -> dict[str, bytes]:
    f = open_gguf(path)
    architecture, tokenizer_dict, tokenizer_config = tokenizer_inputs(f)
    files = gguf_tokenizer._route(f, architecture, tokenizer_dict, tokenizer_config, tokenizer_class(config), folder)
    return {p.name: p.read_bytes() for p in files}


def written(path: Path, config, folder: Path) -> dict[str, bytes]:
    folder.mkdir()
    return {p.name: p.read_bytes() for p in write_tokenizer(open_gguf(path), config, folder)}


@pytest.mark.parametrize("case", CASES)
def test_sample_route_writes_the_whole_routes_bytes(tmp_path, bpe, small_sample, routes, case):
    path = bpe_gguf(tmp_path / "t.gguf", bpe, **CASES[case])
    config = transformers.AutoConfig.for_model(CASES[case]["arch"])
    n = open_gguf(path).fields["tokenizer.ggml.tokens"].count
    ours = written(path, config, tmp_path / "ours")
    assert len(routes) == 1 and routes[0] < n / 4  # transformers saw only the sample
    assert ours == whole_route(path, config, tmp_path / "whole")
    assert set(ours) >= {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    rebuilt = transformers.AutoTokenizer.from_pretrained(tmp_path / "ours")
    assert rebuilt.encode('say "hi" \\ <|im_end|> <think> naïve') == \
        transformers.AutoTokenizer.from_pretrained(tmp_path / "whole").encode('say "hi" \\ <|im_end|> <think> naïve')


def test_a_vocabulary_the_converter_respells_takes_the_whole_route(tmp_path, bpe, small_sample, routes):
    """A control token outside the byte alphabet (a llama.cpp mislabel transformers skips) is
    not spelled the way the sample route assumes: the whole vocabulary goes through transformers."""
    path = bpe_gguf(tmp_path / "t.gguf", bpe, extra=("<|fim middle|>",))
    config = transformers.Qwen2Config()
    n = open_gguf(path).fields["tokenizer.ggml.tokens"].count
    ours = written(path, config, tmp_path / "ours")
    assert routes == [n]
    assert ours == whole_route(path, config, tmp_path / "whole")


def test_a_sample_that_shows_anything_else_takes_the_whole_route(tmp_path, bpe, small_sample, routes, monkeypatch):
    path = bpe_gguf(tmp_path / "t.gguf", bpe)
    config = transformers.Qwen2Config()
    n = open_gguf(path).fields["tokenizer.ggml.tokens"].count

    def changed(text, *args):
        raise splice.NotSpliceable("the sample's vocabulary came out changed")

    monkeypatch.setattr(splice, "_tokenizer_json", changed)
    ours = written(path, config, tmp_path / "ours")
    assert len(routes) == 2 and routes[0] < n / 4 and routes[1] == n
    assert ours == whole_route(path, config, tmp_path / "whole")


def test_ids_are_mapped_back_only_where_their_meaning_is_known():
    ids = [5, 9, 40]
    assert splice._remap({"added_tokens": [{"id": 2, "content": "x"}], "special_tokens": {"x": {"ids": [0, 1]}},
                          "single": [{"Sequence": {"id": "A", "type_id": 0}}]}, ids) == \
        {"added_tokens": [{"id": 40, "content": "x"}], "special_tokens": {"x": {"ids": [5, 9]}},
         "single": [{"Sequence": {"id": "A", "type_id": 0}}]}
    assert splice._remap({"added_tokens_decoder": {"1": {"content": "x"}}}, ids) == \
        {"added_tokens_decoder": {"9": {"content": "x"}}}
    with pytest.raises(splice.NotSpliceable, match="'vocab_size'"):
        splice._remap({"vocab_size": 3}, ids)
    with pytest.raises(splice.NotSpliceable, match="id 3 is not"):
        splice._remap({"added_tokens": [{"id": 3}]}, ids)
    with pytest.raises(splice.NotSpliceable, match="layout"):
        splice._parse('{"a": 1}', indent=2, sort_keys=False, newline="")
    with pytest.raises(splice.NotSpliceable, match="merges.txt"):  # transformers 4 saved the merges there too
        splice.splice({"merges.txt": "a b\n"}, {"tokens": ["a", "b", "ab"], "merges": ["a b"]}, [0, 1, 2], [0])


def test_sections_escape_as_serde_writes(tmp_path):
    """Quotes, backslashes, controls, non-ASCII: the vocabulary and merges sections are the text
    the tokenizers library writes for them."""
    from tokenizers import Tokenizer, models

    tokens = ["a", '"', "\\", "\x01", "\t", "é", "日本", 'a"', "\\\\", "b", "ab"]
    merges = ['a "', "\\ \\", "a b"]
    vocab = {t: i for i, t in enumerate(tokens)}
    Tokenizer(models.BPE(vocab, [tuple(m.split(" ")) for m in merges])).save(str(tmp_path / "t.json"))
    model = json.loads((tmp_path / "t.json").read_text())["model"]
    text = (tmp_path / "t.json").read_text()
    assert splice._vocab(tokens, "    ") in text and model["vocab"] == vocab
    assert splice._pairs(merges, "    ") in text


def _edited_gguf(path: Path, bpe: Path, **arrays) -> Path:
    """The trained BPE's GGUF with some tokenizer arrays replaced (as a damaged or odd file holds them)."""
    src = open_gguf(bpe_gguf(path.with_suffix(".src.gguf"), bpe))
    w = gguf.GGUFWriter(str(path), "qwen2")
    for key, field in src.fields.items():
        if key.startswith("tokenizer.") and key not in arrays:
            value = field.value()
            if isinstance(value, list):
                w.add_array(key, value)
            elif isinstance(value, str):
                w.add_string(key, value)
            elif isinstance(value, bool):
                w.add_bool(key, value)
            else:
                w.add_uint32(key, value)
    for key, value in arrays.items():
        w.add_array(key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return path


def test_token_types_of_another_length_take_the_whole_route(tmp_path, bpe, small_sample, routes):
    """transformers pairs types with tokens as zip() does: a sample cut from a shorter array
    would pair them differently, so such a file takes the whole route."""
    types = open_gguf(bpe_gguf(tmp_path / "t.gguf", bpe)).fields["tokenizer.ggml.token_type"].value()
    path = _edited_gguf(tmp_path / "short.gguf", bpe, **{"tokenizer.ggml.token_type": types[:-2]})
    n = open_gguf(path).fields["tokenizer.ggml.tokens"].count
    ours = written(path, transformers.Qwen2Config(), tmp_path / "ours")
    assert routes == [n]
    assert ours == whole_route(path, transformers.Qwen2Config(), tmp_path / "whole")


def test_eligible_only_for_a_listed_byte_level_vocabulary():
    """What the sample route assumes of its input, checked before any of it is used (a GGUF can
    hold an array of any item type, and an empty merges array)."""
    good = {"tokenizer_type": "gpt2", "tokens": ["a", "b", "ab"], "merges": ["a b"], "token_type": [1, 1, 1]}
    assert splice.eligible("qwen2", good)
    odd = ["a", "b", "ab", "]", "\\", "^", "-", "Ġ["]  # in the byte alphabet, and special in a regex class
    assert splice.eligible("qwen2", {**good, "tokens": odd, "token_type": [1] * len(odd)})
    for bad in ({"tokens": [1, 2, 3], "merges": []}, {"tokens": ["a", 2], "merges": []}, {"token_type": [1, 1]},
                {"scores": [0.0]}, {"merges": None}, {"tokens": []}, {"tokenizer_type": "llama"},
                {"tokens": ["a b", "b"], "merges": []}):
        assert not splice.eligible("qwen2", {**good, **bad}), bad
    assert not splice.eligible("gemma3", {**good, "tokenizer_type": "llama"})
