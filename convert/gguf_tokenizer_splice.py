"""A byte-level BPE's tokenizer files: transformers' own route run on a sample of the vocabulary,
then the whole vocabulary written where the sample's stands.

transformers' GGUF tokenizer route (``convert_gguf_tokenizer``, the tokenizer class, then
``save_pretrained``) takes about 2.5 s and 150 MiB for a 152k-token vocabulary on this project's
2-core machines: it builds the Rust BPE model three times and serializes it twice, where the bytes
of the whole GGUF are baked in a third of a second. For a byte-level BPE (``tokenizer.ggml.model``
``gpt2``: Qwen, Llama 3, GPT-2 and their kin) what that route does to the vocabulary and the merges
is to list them: every token under its id, every merge as a pair, in the file's order. Everything
else in its output (normalizer, pre-tokenizer, decoder, post-processor, added tokens, the
tokenizer config, the chat template) depends on the file's flags and on the few tokens with a role.

So the route runs on a sample (:func:`sample_ids`): the tokens with a role (control, user-defined,
BOS/EOS/UNK/PAD), tokens spread over the whole vocabulary, and the first merges with their tokens.
prebake then checks the sample's output (:func:`splice`): its vocabulary lists the sample's
tokens unchanged in order, its merges are the sample's merges unchanged, the JSON is written the
way Python's ``json`` writes it, and a token id appears only where prebake maps ids back (an
added token's ``id``, a post-processor's ``ids``, ``added_tokens_decoder``'s keys). Only then does
the whole vocabulary take the sample's place, ids mapped back. Any other outcome raises
:class:`NotSpliceable` and the caller runs the route on the whole vocabulary: this is a
shortcut with transformers' output as its reference, never a second implementation of it
(``tests/test_gguf_tokenizer.py`` compares the two byte for byte).
"""

from __future__ import annotations

import functools
import json
import re
from json.encoder import encode_basestring

SPREAD = 256  # ordinary tokens in the sample, evenly spaced over the vocabulary
FIRST_MERGES = 64  # merges in the sample, with their tokens
ROLE_TYPES = (3, 4)  # CONTROL, USER_DEFINED: the token types transformers turns into added tokens
SPECIAL_IDS = ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id")
PER_TOKEN = ("tokens", "token_type", "scores")  # tokenizer_dict keys that hold one item per token
KEPT_INTS = frozenset({"type_id", "model_max_length"})  # integers that are not token ids
VOCAB, MERGES = "@@prebake-vocab@@", "@@prebake-merges@@"
PLAIN_FILES = frozenset({"chat_template.jinja"})  # files of the route that hold no token or id


class NotSpliceable(Exception):
    """The sample's output is not the vocabulary-independent shape this module extends."""


def eligible(architecture: str, tokenizer_dict: dict) -> bool:
    """A byte-level BPE that transformers' own dispatch builds with its byte-level builder, its
    merges given, every token a string already spelled in the byte alphabet (the builder respells
    the others: those files take the whole route), every per-token array one item per token."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.integrations.gguf import gguf_tokenizer_mapping as mapping

    tokens, merges = tokenizer_dict.get("tokens"), tokenizer_dict.get("merges")
    if tokenizer_dict.get("tokenizer_type") != "gpt2" or not isinstance(tokens, list) or not tokens \
            or not isinstance(merges, list) or set(map(type, tokens)) != {str}:
        return False
    if any(key in tokenizer_dict and not (isinstance(tokenizer_dict[key], list) and len(tokenizer_dict[key]) ==
                                          len(tokens)) for key in PER_TOKEN):
        return False  # an array of another length: transformers pairs it with the tokens as zip() does
    try:
        builder = mapping.select_tokenizer_builder(architecture, "gpt2")
    except ValueError:
        return False
    return builder is mapping.byte_level_tokenizer and _in_alphabet(tokens, "".join(bytes_to_unicode().values()))


@functools.lru_cache(maxsize=1)
def _outside(alphabet: str) -> re.Pattern:
    return re.compile(f"[^{re.escape(alphabet)}]")


def _in_alphabet(tokens: list[str], alphabet: str) -> bool:
    """Every character of every token is one of ``alphabet``'s: one regex scan of the joined
    tokens (6 ms for 152k tokens, against 45 ms for a set of their characters)."""
    return _outside(alphabet).search("".join(tokens)) is None


def sample_ids(tokenizer_dict: dict, index: dict[str, int]) -> tuple[list[int], list[int]]:
    """(token ids, merge numbers) of the sample, each sorted; ``index`` maps each token to its id."""
    tokens, types = tokenizer_dict["tokens"], tokenizer_dict.get("token_type") or ()
    ids = {i for i, kind in enumerate(types) if kind in ROLE_TYPES}
    ids |= {tokenizer_dict[k] for k in SPECIAL_IDS if isinstance(tokenizer_dict.get(k), int)}
    ids |= set(range(0, len(tokens), max(1, len(tokens) // SPREAD)))
    merges = list(range(min(FIRST_MERGES, len(tokenizer_dict["merges"]))))
    for m in merges:
        left, right = tokenizer_dict["merges"][m].split(" ")
        ids |= {index[left], index[right], index[left + right]}
    return sorted(i for i in ids if 0 <= i < len(tokens)), merges


def sample_dict(tokenizer_dict: dict, ids: list[int], merges: list[int]) -> dict:
    """``tokenizer_dict`` cut to the sample, its special ids renumbered to the sample's."""
    position = {i: j for j, i in enumerate(ids)}
    out = dict(tokenizer_dict)
    for key in PER_TOKEN:
        if key in out:  # one item per token (eligible)
            out[key] = [tokenizer_dict[key][i] for i in ids]
    out["merges"] = [tokenizer_dict["merges"][m] for m in merges]
    for key in SPECIAL_IDS:
        if isinstance(out.get(key), int) and out[key] in position:
            out[key] = position[out[key]]
    return out


def splice(files: dict[str, str], tokenizer_dict: dict, ids: list[int], merges: list[int]) -> dict[str, list[str]]:
    """The sample route's files (name -> text) with the whole vocabulary in the sample's place:
    name -> the file's text in pieces (written one after the other, so that the 10-30 MB of a
    large vocabulary are never joined into one more copy)."""
    out = {}
    for name, text in files.items():
        if name == "tokenizer.json":
            out[name] = _tokenizer_json(text, tokenizer_dict, ids, merges)
        elif name.endswith(".json"):
            out[name] = [_config_json(text, ids)]
        elif name in PLAIN_FILES:
            out[name] = [text]
        else:  # a vocabulary in another form (merges.txt, as transformers 4 saved): not this sample's to copy
            raise NotSpliceable(f"{name}: a file prebake does not know to be independent of the vocabulary")
    if "tokenizer.json" not in out:
        raise NotSpliceable("no tokenizer.json")
    return out


def _tokenizer_json(text: str, tokenizer_dict: dict, ids: list[int], merges: list[int]) -> list[str]:
    data = _parse(text, indent=2, sort_keys=False, newline="")
    model = data.get("model")
    tokens = tokenizer_dict["tokens"]
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise NotSpliceable("not a BPE model")
    if list(model.get("vocab", {}).items()) != [(tokens[i], j) for j, i in enumerate(ids)]:
        raise NotSpliceable("the sample's vocabulary came out changed")
    sampled = [tokenizer_dict["merges"][m] for m in merges]
    pairs = model.get("merges")
    if pairs == [m.split(" ") for m in sampled]:
        merges_text = _pairs
    elif pairs == sampled:
        merges_text = _strings
    else:
        raise NotSpliceable("the sample's merges came out changed")
    model["vocab"], model["merges"] = VOCAB, MERGES
    text = json.dumps(_remap(data, ids), indent=2, ensure_ascii=False)
    if not 0 <= text.find(json.dumps(VOCAB)) < text.find(json.dumps(MERGES)):
        raise NotSpliceable("the vocabulary is not written before the merges")
    pieces = []
    for marker, section in ((VOCAB, _vocab(tokens, _indent(text, VOCAB))),
                            (MERGES, merges_text(tokenizer_dict["merges"], _indent(text, MERGES)))):
        before, text = text.split(json.dumps(marker))
        pieces += [before, section]
    return pieces + [text]


def _indent(text: str, marker: str) -> str:
    """The indentation of the line that holds ``marker`` (which must be in one place)."""
    quoted = json.dumps(marker)
    if text.count(quoted) != 1:
        raise NotSpliceable(f"{marker} is not in one place")
    at = text.index(quoted)
    line = text[text.rindex("\n", 0, at) + 1:at]
    return " " * (len(line) - len(line.lstrip(" ")))


def _config_json(text: str, ids: list[int]) -> str:
    """tokenizer_config.json and the like: written by transformers with sorted keys and a newline."""
    data = _parse(text, indent=2, sort_keys=True, newline="\n")
    return json.dumps(_remap(data, ids), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _parse(text: str, *, indent: int, sort_keys: bool, newline: str):
    """``text`` as JSON, if writing it back with Python's ``json`` gives ``text`` again."""
    data = json.loads(text)
    if json.dumps(data, indent=indent, sort_keys=sort_keys, ensure_ascii=False) + newline != text:
        raise NotSpliceable("written in a layout Python's json does not reproduce")
    return data


def _remap(node, ids: list[int], key: str | None = None):
    """``node`` with every token id of the sample replaced by the vocabulary's; any other integer
    that could be an id (one prebake does not know the meaning of) raises NotSpliceable."""
    if isinstance(node, dict):
        if key == "added_tokens_decoder":
            return {str(_real(int(k), ids)): _remap(v, ids) for k, v in node.items()}
        return {k: _remap(v, ids, k) for k, v in node.items()}
    if isinstance(node, list):
        if key == "ids":
            return [_real(v, ids) for v in node]
        return [_remap(v, ids) for v in node]
    if isinstance(node, int) and not isinstance(node, bool):
        if key == "id":
            return _real(node, ids)
        if key not in KEPT_INTS:
            raise NotSpliceable(f"an integer under {key!r}")
    return node


def _real(sample_id, ids: list[int]) -> int:
    if type(sample_id) is not int or not 0 <= sample_id < len(ids):
        raise NotSpliceable(f"id {sample_id!r} is not one of the sample's")
    return ids[sample_id]


def _vocab(tokens: list[str], indent: str) -> str:
    """``{"token": id, ...}`` in id order, one per line, as serde's pretty printer writes it; the
    escaping is json's C encoder's, which writes what serde writes (tested)."""
    inner = indent + "  "
    items = map("{}: {}".format, map(encode_basestring, tokens), range(len(tokens)))
    return "{\n" + inner + (",\n" + inner).join(items) + "\n" + indent + "}"


def _pairs(merges: list[str], indent: str) -> str:
    """``[["a", "b"], ...]`` over several lines each, from merges ``"a b"``: one C-encoded list,
    its one space per merge (checked before) and its separators rewritten."""
    if not merges:
        return "[]"
    inner, item = indent + "  ", indent + "    "
    body = json.dumps(merges, ensure_ascii=False, separators=("\x00", ":"))[1:-1]  # \x00: escaped inside strings
    body = body.replace(" ", f'",\n{item}"').replace("\x00", f"\n{inner}],\n{inner}[\n{item}")
    return f"[\n{inner}[\n{item}{body}\n{inner}]\n{indent}]"


def _strings(merges: list[str], indent: str) -> str:
    """``["a b", ...]``, one per line (tokenizers before 0.20)."""
    if not merges:
        return "[]"
    inner = indent + "  "
    return "[\n" + inner + json.dumps(merges, ensure_ascii=False, separators=(",\n" + inner, ": "))[1:-1] + "\n" + \
        indent + "]"
