"""prebake's own reader of SentencePiece ``tokenizer.model`` files agrees with the sentencepiece package."""

from __future__ import annotations

import pytest
from prebake.formats.errors import FormatError
from prebake.formats.sentencepiece_model import BPE, parse_sentencepiece, read_sentencepiece

from tests.export_models import spm_tokenizer


def test_pieces_scores_and_types_equal_sentencepiece(tmp):
    import sentencepiece

    spm_tokenizer(tmp, 400)
    model = read_sentencepiece(tmp / "tokenizer.model")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp / "tokenizer.model"))
    assert len(model.pieces) == sp.vocab_size() == 400
    assert model.model_type == BPE and model.add_dummy_prefix
    for i, p in enumerate(model.pieces):
        assert p.text == sp.IdToPiece(i) and p.score == sp.GetScore(i), i
        assert (p.type == 2) == sp.IsUnknown(i) and (p.type == 3) == sp.IsControl(i), i
        assert (p.type == 6) == sp.IsByte(i) and (p.type == 5) == sp.IsUnused(i), i
    assert [p.text for p in model.pieces if p.type == 4] == ["<start_of_turn>"]  # user-defined


@pytest.mark.parametrize("data", [b"", b"\x0a", b"\x0a\x05ab", b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
                                  b"\x0b", b"\x0a\x02\x0a\x00\x12"])
def test_malformed_files_are_one_error(tmp, data):
    path = tmp / "tokenizer.model"
    path.write_bytes(data)
    with pytest.raises(FormatError, match="not a SentencePiece model"):
        read_sentencepiece(path)


def test_piece_fields_default_as_protobuf_does():
    piece = b"\x0a\x03abc"  # only the text: score 0, type NORMAL
    model = parse_sentencepiece(b"\x0a" + bytes([len(piece)]) + piece)
    assert model.pieces[0] == ("abc", 0.0, 1)
