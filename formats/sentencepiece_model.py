"""SentencePiece ``tokenizer.model`` files, read without the ``sentencepiece`` package.

The file is one protocol-buffer message, ``ModelProto`` (sentencepiece_model.proto): field 1
is the repeated ``SentencePiece`` (``piece`` string = 1, ``score`` float = 2, ``type`` enum = 3,
NORMAL when absent), field 2 the ``TrainerSpec`` (``model_type`` = 3) and field 3 the
``NormalizerSpec`` (``add_dummy_prefix`` = 3, true when absent). Those are all a GGUF vocabulary
needs, so a ~100-line wire-format walker replaces a compiled dependency. Every length and
varint is checked against the bytes really there; a malformed file is one :class:`FormatError`.

>>> m = read_sentencepiece("tokenizer.model")  # doctest: +SKIP
>>> m.pieces[3], m.model_type  # doctest: +SKIP
(Piece(text='<0x00>', score=0.0, type=6), 2)
"""

from __future__ import annotations

import os
import struct
from collections import namedtuple
from dataclasses import dataclass

from prebake.formats.errors import FormatError

# SentencePiece.Type, as the proto numbers it (GGUF's token types use the same numbers)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE = 1, 2  # TrainerSpec.ModelType

Piece = namedtuple("Piece", "text score type")
Piece.__doc__ = "One vocabulary entry: its text, its score, its SentencePiece type."

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_MAX_VARINT = 10  # bytes of a 64-bit varint


@dataclass(frozen=True)
class SentencePieceModel:
    """What a GGUF vocabulary takes from a ``tokenizer.model``: pieces in id order and two settings."""

    pieces: list[Piece]
    model_type: int = UNIGRAM
    add_dummy_prefix: bool = True


def read_sentencepiece(path: str | os.PathLike) -> SentencePieceModel:
    """Parses the ``tokenizer.model`` at ``path``; raises :class:`FormatError` if it is not one."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise FormatError(f"cannot read ({e.strerror})", path) from None
    try:
        return parse_sentencepiece(data)
    except _Malformed as e:
        raise FormatError(f"not a SentencePiece model ({e})", path) from None


def parse_sentencepiece(data: bytes) -> SentencePieceModel:
    """The model in ``data`` (the bytes of a ``tokenizer.model``)."""
    pieces, model_type, dummy_prefix = [], UNIGRAM, True
    for field, wire, value in _fields(memoryview(data)):
        if field == 1 and wire == _LEN:
            pieces.append(_piece(value))
        elif field == 2 and wire == _LEN:
            model_type = _scalar(value, 3, model_type)
        elif field == 3 and wire == _LEN:
            dummy_prefix = bool(_scalar(value, 3, dummy_prefix))
    if not pieces:
        raise _Malformed("no pieces")
    return SentencePieceModel(pieces, model_type, dummy_prefix)


class _Malformed(Exception):
    pass


def _piece(buf: memoryview) -> Piece:
    text, score, kind = None, 0.0, NORMAL
    for field, wire, value in _fields(buf):
        if field == 1 and wire == _LEN:
            try:
                text = bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                raise _Malformed("a piece is not UTF-8") from None
        elif field == 2 and wire == _I32:
            score = struct.unpack("<f", value)[0]
        elif field == 3 and wire == _VARINT:
            kind = value
    if text is None:
        raise _Malformed("a piece has no text")
    return Piece(text, score, kind)


def _scalar(buf: memoryview, wanted: int, default: int) -> int:
    """The varint field ``wanted`` of a sub-message (its last occurrence, as protobuf reads it)."""
    for field, wire, value in _fields(buf):
        if field == wanted and wire == _VARINT:
            default = value
    return default


def _fields(buf: memoryview):
    """(field number, wire type, value) of each field: an int for varints, a view otherwise."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
        elif wire in (_I64, _I32):
            size = 8 if wire == _I64 else 4
            if pos + size > end:
                raise _Malformed("truncated fixed-size field")
            value, pos = buf[pos:pos + size], pos + size
        elif wire == _LEN:
            size, pos = _varint(buf, pos)
            if size > end - pos:
                raise _Malformed(f"field {field} claims {size} bytes, {end - pos} are left")
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise _Malformed(f"unsupported wire type {wire}")
        yield field, wire, value


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    for i in range(_MAX_VARINT):
        if pos + i >= len(buf):
            raise _Malformed("truncated varint")
        byte = buf[pos + i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos + i + 1
        shift += 7
    raise _Malformed("varint longer than 10 bytes")
