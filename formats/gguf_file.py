"""GGUF files parsed by prebake itself: one read-only memory map, every number checked first.

A GGUF file is a header (magic, version, tensor count, key-value count), the key-value
metadata, one info record per tensor (name, dims innermost first, GGML type, offset), padding
to ``general.alignment``, and the tensor data. Every count, length, dim and offset read here is
checked against the bytes really left in the file before anything is built from it, so a
hostile file costs time and memory in proportion to its size, whatever it claims, and every
violation is a :class:`FormatError` naming the key or tensor and the field.

Large arrays (a tokenizer's 262k tokens, its merges and scores) are walked once to find where
they end, then kept as byte spans: :meth:`Field.value` decodes them when asked, and numeric
arrays come out of :meth:`Field.array` as views of the map. Scalars and short arrays are
decoded while parsing.

>>> f = open_gguf("model.gguf")  # doctest: +SKIP
>>> f.fields["tokenizer.ggml.tokens"].count, f.tensors["token_embd.weight"].shape  # doctest: +SKIP
(262144, (262144, 640))
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field

import numpy as np
from prebake.formats.errors import FormatError, UnsupportedError
from prebake.formats.ggml_types import BLOCK_SIZES, TYPE_IDS

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 65535  # the spec's bound on a key's length; used for tensor names too
MAX_NESTING = 8  # arrays of arrays of ... at most this deep
SHORT_ARRAY = 64  # arrays of at most this many items, and
EAGER_BYTES = 1 << 16  # of at most this many bytes, are decoded while parsing
MAX_ELEMENTS = (1 << 63) - 1  # a tensor's element count must fit an int64, as llama.cpp checks

# GGUF value type id -> (name, struct code of one item; "" for STRING and ARRAY)
VALUE_TYPES: dict[int, tuple[str, str]] = {
    0: ("UINT8", "B"), 1: ("INT8", "b"), 2: ("UINT16", "H"), 3: ("INT16", "h"), 4: ("UINT32", "I"),
    5: ("INT32", "i"), 6: ("FLOAT32", "f"), 7: ("BOOL", "?"), 8: ("STRING", ""), 9: ("ARRAY", ""),
    10: ("UINT64", "Q"), 11: ("INT64", "q"), 12: ("FLOAT64", "d"),
}
STRING, ARRAY = 8, 9
_TYPE_IDS = {name: t for t, (name, _) in VALUE_TYPES.items()}
# the fewest bytes one item of each type takes: bounds an array's count before walking it
_MIN_ITEM = {t: struct.calcsize("<" + code) if code else 8 for t, (_, code) in VALUE_TYPES.items()}
_MIN_ITEM[ARRAY] = 12  # item type (4) + count (8)

_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
_LAZY = object()


@dataclass(frozen=True, eq=False)
class Field:
    """One key-value pair: its GGUF type, and where its value lies in the file.

    ``type`` is the GGUF value type name (``"UINT32"``, ``"STRING"``, ``"ARRAY"``...);
    ``item_type`` the items' type for arrays (``None`` otherwise); ``count`` the number of
    items (1 for a scalar). ``start``/``end`` bound the value's bytes: a scalar as stored (a
    string with its length), an array's items after its item type and count.
    """

    name: str
    type: str
    item_type: str | None
    count: int
    start: int
    end: int
    _buffer: np.ndarray = field(repr=False)
    _path: str = field(repr=False)
    _value: object = field(default=_LAZY, repr=False)

    def value(self):
        """The value as plain Python: int, float, bool, str, or a (nested) list of them.

        Short values were decoded while parsing; a long array is decoded on each call (its
        strings checked as UTF-8 then), so keep the result rather than asking twice.
        """
        if self._value is not _LAZY:
            return self._value
        return _decode(self._buffer, self.start - 12, ARRAY, f"key {self.name!r}", self._path)[0]  # an array

    def array(self) -> np.ndarray:
        """A numeric array's items as a read-only numpy view of the map (no copy).

        BOOL items come as their ``uint8`` bytes (any non-zero byte is true).
        """
        code = VALUE_TYPES[_TYPE_IDS[self.item_type]][1] if self.item_type else ""
        if not code:
            raise TypeError(f"key {self.name!r} is {self.type} of {self.item_type}, not a numeric array")
        dtype = np.dtype("u1" if code == "?" else "<" + code)
        return self._buffer[self.start:self.end].view(dtype)


@dataclass(frozen=True)
class GGUFTensor:
    """A tensor's record: GGML type name, shape in PyTorch order (GGUF's dims reversed),
    absolute offset of its data in the file, and its size in bytes."""

    name: str
    type: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def block(self) -> tuple[int, int]:
        """(elements, bytes) of one block of ``type``; (1, item size) for plain types."""
        return BLOCK_SIZES[self.type]


@dataclass(frozen=True, eq=False)
class GGUFFile:
    """A parsed GGUF file; ``buffer`` is the read-only map of all of it (a ``uint8`` array).

    ``fields`` and ``tensors`` are in file order. ``kv_span`` is the byte range of the
    key-value section (to copy it verbatim); ``data_offset`` where the tensor data begins.
    """

    path: str
    version: int
    alignment: int
    fields: dict[str, Field]
    tensors: dict[str, GGUFTensor]
    kv_span: tuple[int, int]
    data_offset: int
    buffer: np.ndarray = field(repr=False)

    def metadata(self, max_list: int | None = SHORT_ARRAY) -> dict:
        """Every key's value as JSON-ready Python; arrays of more than ``max_list`` items are
        left out (``None``: nothing is left out, long arrays are decoded)."""
        return {name: f.value() for name, f in self.fields.items()
                if max_list is None or f.item_type is None or f.count <= max_list}

    def tensor_bytes(self, name: str) -> np.ndarray:
        """A tensor's bytes as a read-only ``uint8`` view of the map."""
        t = self.tensors[name]
        return self.buffer[t.offset:t.offset + t.nbytes]


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Maps and parses the GGUF file at ``path``; raises :class:`FormatError` if it is not one."""
    path = str(path)
    buffer = _map(path)
    r = _Reader(buffer, path)
    version, n_tensors, n_kv = _read_header(r)
    kv_start = r.pos
    fields: dict[str, Field] = {}
    for i in range(n_kv):
        f = _read_field(r, i)
        if f.name in fields:
            raise FormatError(f"key {f.name!r} appears twice", path)
        fields[f.name] = f
    kv_span = (kv_start, r.pos)
    infos = [_read_tensor_info(r, i) for i in range(n_tensors)]
    alignment = _alignment(fields, path)
    data_offset = -(-r.pos // alignment) * alignment
    tensors = _place_tensors(infos, data_offset, alignment, len(buffer), path)
    return GGUFFile(path, version, alignment, fields, tensors, kv_span, data_offset, buffer)


def _map(path: str) -> np.ndarray:
    """The whole file as a read-only ``uint8`` array over one ``mmap``."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise FormatError("file is empty", path)
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(mm, dtype=np.uint8)


class _Reader:
    """Little-endian reads at a moving position, each checked against the bytes left."""

    __slots__ = ("buffer", "view", "pos", "end", "path")

    def __init__(self, buffer: np.ndarray, path: str):
        self.buffer, self.view, self.pos, self.end, self.path = buffer, memoryview(buffer), 0, len(buffer), path

    def need(self, n: int, what: str) -> int:
        """Claims ``n`` bytes for ``what`` and returns where they start."""
        if n > self.end - self.pos:
            raise FormatError(f"{what} needs {n} bytes at offset {self.pos} but the file ends at "
                              f"{self.end} (truncated or corrupt)", self.path)
        self.pos += n
        return self.pos - n

    def u32(self, what: str) -> int:
        return _U32.unpack_from(self.view, self.need(4, what))[0]

    def u64(self, what: str) -> int:
        return _U64.unpack_from(self.view, self.need(8, what))[0]

    def name(self, what: str) -> str:
        """A key or tensor name: a string of at most MAX_NAME bytes of UTF-8."""
        n = self.u64(f"{what} length")
        if n > MAX_NAME:
            raise FormatError(f"{what} is {n} bytes long (at most {MAX_NAME})", self.path)
        start = self.need(n, what)
        return _utf8(self.view[start:start + n], what, self.path)


def _read_header(r: _Reader) -> tuple[int, int, int]:
    """(version, tensor count, key-value count), refusing what prebake cannot read."""
    if bytes(r.view[:4]) != MAGIC:
        raise FormatError("not a GGUF file (the first four bytes are not 'GGUF')", r.path)
    r.pos = 4
    version = r.u32("header: version")
    if version not in VERSIONS:
        if version & 0xFFFF == 0:
            raise UnsupportedError(f"GGUF version reads as {version:#x}: a big-endian file, which prebake "
                                   "does not read", r.path)
        raise UnsupportedError(f"GGUF version {version} (prebake reads versions 2 and 3)", r.path)
    n_tensors, n_kv = r.u64("header: tensor count"), r.u64("header: key-value count")
    # each key-value pair takes at least 13 bytes, each tensor info at least 24
    if 13 * n_kv + 24 * n_tensors > r.end - r.pos:
        raise FormatError(f"header claims {n_kv} key-value pairs and {n_tensors} tensors, more than the "
                          f"{r.end - r.pos} bytes left can hold (truncated or corrupt)", r.path)
    return version, n_tensors, n_kv


def _read_field(r: _Reader, index: int) -> Field:
    """One key-value pair, its value checked (and decoded when short)."""
    name = r.name(f"key #{index}")
    what = f"key {name!r}"
    type_id = _value_type(r, f"{what}: value type")
    if type_id != ARRAY:
        start = r.pos
        _skip(r, type_id, 1, what, 0)
        value = _decode(r.buffer, start, type_id, what, r.path)[0]
        return Field(name, VALUE_TYPES[type_id][0], None, 1, start, r.pos, r.buffer, r.path, value)
    item_id = _value_type(r, f"{what}: array item type")
    count = r.u64(f"{what}: array length")
    start = r.pos
    _skip(r, item_id, count, what, 1)
    short = count <= SHORT_ARRAY and r.pos - start <= EAGER_BYTES
    value = _decode(r.buffer, start - 12, ARRAY, what, r.path)[0] if short else _LAZY
    return Field(name, "ARRAY", VALUE_TYPES[item_id][0], count, start, r.pos, r.buffer, r.path, value)


def _value_type(r: _Reader, what: str) -> int:
    type_id = r.u32(what)
    if type_id not in VALUE_TYPES:
        raise FormatError(f"{what} is {type_id}, not a GGUF value type (0-12)", r.path)
    return type_id


def _skip(r: _Reader, type_id: int, count: int, what: str, depth: int) -> None:
    """Moves past ``count`` items of ``type_id``, checking every length they hold."""
    if count > (r.end - r.pos) // _MIN_ITEM[type_id]:
        raise FormatError(f"{what}: {count} items of {VALUE_TYPES[type_id][0]} cannot fit in the "
                          f"{r.end - r.pos} bytes left (truncated or corrupt)", r.path)
    if type_id == STRING:
        r.pos = _skip_strings(r, count, what)
    elif type_id == ARRAY:
        if depth >= MAX_NESTING:
            raise FormatError(f"{what}: arrays nested more than {MAX_NESTING} deep", r.path)
        for i in range(count):
            item_id = _value_type(r, f"{what} item {i}: array item type")
            _skip(r, item_id, r.u64(f"{what} item {i}: array length"), f"{what} item {i}", depth + 1)
    else:
        r.pos += count * _MIN_ITEM[type_id]  # fixed-size items: checked above


def _skip_strings(r: _Reader, count: int, what: str) -> int:
    """The end of ``count`` strings (u64 length, bytes) from ``r.pos``: the one loop that runs
    once per token of a vocabulary, so it is kept tight (about 0.15 us a string)."""
    view, pos, last, unpack = r.view, r.pos, r.end - 8, _U64.unpack_from
    for _ in range(count):
        if pos > last:
            break
        pos += 8 + unpack(view, pos)[0]
    else:
        if pos <= r.end:
            return pos
    raise FormatError(f"{what}: a string runs past the end of the file (truncated or corrupt)", r.path)


def _decode(buffer: np.ndarray, pos: int, type_id: int, what: str, path: str) -> tuple[object, int]:
    """(value, end) of one checked value at ``pos``; an array starts at its item type."""
    view = memoryview(buffer)
    if type_id == STRING:
        n = _U64.unpack_from(view, pos)[0]
        return _utf8(view[pos + 8:pos + 8 + n], what, path), pos + 8 + n
    if type_id != ARRAY:
        code = VALUE_TYPES[type_id][1]
        return struct.unpack_from("<" + code, view, pos)[0], pos + _MIN_ITEM[type_id]
    item_id, count = _U32.unpack_from(view, pos)[0], _U64.unpack_from(view, pos + 4)[0]
    pos += 12
    code = VALUE_TYPES[item_id][1]
    if code:  # fixed-size items: one numpy view, one conversion
        end = pos + count * _MIN_ITEM[item_id]
        items = buffer[pos:end].view(np.dtype("u1" if code == "?" else "<" + code))
        return (items != 0 if code == "?" else items).tolist(), end
    if item_id == STRING:
        return _decode_strings(view, pos, count, what, path)
    out = []
    for i in range(count):
        value, pos = _decode(buffer, pos, ARRAY, f"{what} item {i}", path)
        out.append(value)
    return out, pos


def _decode_strings(view: memoryview, pos: int, count: int, what: str, path: str) -> tuple[list[str], int]:
    """``count`` checked strings from ``pos`` as ``str``, and where they end.

    A vocabulary is 100k-300k strings: decoded one by one that is 1 us each. Here the lengths are
    walked (0.15 us each), each length field is replaced by one NUL, and the whole run decodes and
    splits at C speed. A string holding a NUL of its own (valid UTF-8, never seen in a vocabulary)
    splits into one piece too many, and invalid UTF-8 fails to decode: either way the strings are
    decoded one by one, which names the bad item.
    """
    starts, unpack = [], _U64.unpack_from
    append, end = starts.append, pos
    for _ in range(count):
        append(end)
        end += 8 + unpack(view, end)[0]
    if count >= 64:
        run = np.frombuffer(view, np.uint8, end - pos, pos).copy()
        at = np.asarray(starts, np.int64) - pos
        edges = np.zeros(len(run) + 1, np.int8)  # +1 where a length field starts, -1 seven bytes on
        edges[at], edges[at + 7] = 1, -1
        keep = np.cumsum(edges[:-1], dtype=np.int8) == 0  # a byte per byte of the run, whatever the count
        run[at + 7] = 0
        try:
            pieces = run[keep].tobytes().decode("utf-8").split("\x00")
        except UnicodeDecodeError:
            pieces = []
        if len(pieces) == count + 1:
            return pieces[1:], end
    return _decode_each(view, starts, end, what, path)


def _decode_each(view: memoryview, starts: list[int], end: int, what: str, path: str) -> tuple[list[str], int]:
    """The strings whose length fields are at ``starts``, one by one: the first bad one is named."""
    out, unpack = [], _U64.unpack_from
    append = out.append
    try:
        for at in starts:
            append(str(view[at + 8:at + 8 + unpack(view, at)[0]], "utf-8"))
    except UnicodeDecodeError:
        raise FormatError(f"{what} item {len(out)} is not valid UTF-8", path) from None
    return out, end


def _utf8(data: memoryview, what: str, path: str) -> str:
    try:
        return str(data, "utf-8")
    except UnicodeDecodeError:
        raise FormatError(f"{what} is not valid UTF-8", path) from None


def _read_tensor_info(r: _Reader, index: int) -> tuple[str, str, tuple[int, ...], int]:
    """(name, GGML type name, dims in GGUF order, offset from the data section) of one tensor."""
    name = r.name(f"tensor #{index} name")
    what = f"tensor {name!r}"
    n_dims = r.u32(f"{what}: n_dims")
    if n_dims > MAX_DIMS:
        raise FormatError(f"{what}: n_dims is {n_dims} (at most {MAX_DIMS})", r.path)
    dims = struct.unpack_from(f"<{n_dims}Q", r.view, r.need(8 * n_dims, f"{what}: dims"))
    for axis, d in enumerate(dims):
        if d < 1:  # llama.cpp lets 0 through, then divides by it; nothing real has an empty axis
            raise FormatError(f"{what}: dim {axis} is {d} (every dim must be at least 1)", r.path)
    type_id = r.u32(f"{what}: GGML type")
    if type_id not in TYPE_IDS:
        raise FormatError(f"{what}: GGML type {type_id} is not one GGUF defines", r.path)
    return name, TYPE_IDS[type_id], dims, r.u64(f"{what}: data offset")


def _alignment(fields: dict[str, Field], path: str) -> int:
    """``general.alignment`` (a UINT32 power of two, as llama.cpp requires), else 32."""
    f = fields.get("general.alignment")
    if f is None:
        return DEFAULT_ALIGNMENT
    if f.type != "UINT32":
        raise FormatError(f"key 'general.alignment' is {f.type}, not UINT32", path)
    value = f.value()
    if value == 0 or value & (value - 1):
        raise FormatError(f"key 'general.alignment' is {value}, not a power of two", path)
    return value


def _place_tensors(infos, data_offset: int, alignment: int, size: int, path: str) -> dict[str, GGUFTensor]:
    """Checks each tensor's size, alignment and place in the file; no two may share a byte."""
    tensors: dict[str, GGUFTensor] = {}
    for name, qtype, dims, rel in infos:
        what = f"tensor {name!r}"
        if name in tensors:
            raise FormatError(f"{what} appears twice", path)
        elements, (block, type_size) = 1, BLOCK_SIZES[qtype]
        for d in dims:
            elements *= d
        if elements > MAX_ELEMENTS:
            raise FormatError(f"{what}: dims {list(dims)} hold more than 2**63 elements", path)
        row = dims[0] if dims else 1
        if row % block:
            raise FormatError(f"{what}: row of {row} is not a multiple of the {qtype} block ({block})", path)
        if rel % alignment:
            raise FormatError(f"{what}: data offset {rel} is not a multiple of the alignment ({alignment})", path)
        nbytes, offset = elements // block * type_size, data_offset + rel
        if offset + nbytes > size:
            raise FormatError(f"{what}: data at {offset}..{offset + nbytes} runs past the end of the file "
                              f"({size} bytes): truncated", path)
        tensors[name] = GGUFTensor(name, qtype, tuple(reversed(dims)), offset, nbytes)
    placed = sorted(tensors.values(), key=lambda t: t.offset)
    for a, b in zip(placed, placed[1:], strict=False):
        if a.offset + a.nbytes > b.offset:
            raise FormatError(f"tensors {a.name!r} and {b.name!r} overlap", path)
    return tensors
