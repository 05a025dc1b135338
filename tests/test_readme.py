"""The README's load snippets run verbatim on a bake of a MiniLM-shaped BERT.

The checkpoint is saved the way older transformers (and sentence-transformers' all-MiniLM-L6-v2)
saved it, with ``embeddings.position_ids`` in it: a buffer the module computes itself.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers
from prebake.convert.bake import convert
from prebake.convert.plan import Options

README = Path(__file__).resolve().parent.parent / "README.md"


def snippets() -> dict[str, str]:
    """The README's python blocks marked ``<!-- tested: NAME -->``, by name."""
    text = README.read_text()
    return dict(re.findall(r"<!-- tested: (\S+) -->\n```python\n(.*?)```", text, re.S))


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    config = transformers.BertConfig(vocab_size=30522, hidden_size=384, intermediate_size=1536, num_hidden_layers=2,
                                     num_attention_heads=12)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    state = model.state_dict()
    state["embeddings.position_ids"] = torch.arange(config.max_position_embeddings).unsqueeze(0)
    (root / "src").mkdir()
    torch.save(state, root / "src" / "pytorch_model.bin")
    config.to_json_file(root / "src" / "config.json")
    convert(root / "src", root / "baked")
    convert(root / "src", root / "baked-q8_0", Options(quant="q8_0"))
    x = torch.randint(0, 30522, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x).last_hidden_state
    return root, x, expected


def test_the_snippets_are_there():
    assert set(snippets()) == {"load", "from_pretrained"}


def run(snippet: str, folder: Path, monkeypatch) -> dict:
    monkeypatch.chdir(folder)
    scope: dict = {}
    exec(compile(snippets()[snippet], f"README.md:{snippet}", "exec"), scope)
    return scope


def test_load_snippet(minilm, monkeypatch):
    root, x, expected = minilm
    scope = run("load", root, monkeypatch)
    assert "embeddings.position_ids" in scope["state"]  # the checkpoint's buffer ...
    with torch.no_grad():  # ... left to the module, which computes the same one
        assert torch.equal(scope["model"].eval()(x).last_hidden_state, expected)
    assert scope["layer0"] and all(n.startswith("encoder.layer.0.") for n in scope["layer0"])


def test_from_pretrained_snippet(minilm, monkeypatch):
    from prebake.cache.qlinear import QuantLinear

    root, x, expected = minilm
    model = run("from_pretrained", root, monkeypatch)["model"].eval()
    assert isinstance(model.encoder.layer[0].attention.self.query, QuantLinear)
    with torch.no_grad():
        got = model(x).last_hidden_state
    assert float(torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0)) >= 0.999
