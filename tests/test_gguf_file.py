"""prebake's own GGUF parser (formats/gguf_file.py) and ``read_gguf`` on it.

Files are written by gguf-py's ``GGUFWriter`` as llama.cpp's converter writes them; every
decoded value and every tensor byte must equal what gguf-py's ``GGUFReader`` finds in the same
file. Hostile files are hand edits of such real files: each must be refused with a
``FormatError`` naming the key or tensor, fast, and never with another exception.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import struct
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V
from prebake.formats.errors import FormatError, PrebakeError, UnsupportedError
from prebake.formats.ggml_types import BLOCK_SIZES, TYPE_IDS
from prebake.formats.gguf_file import MAX_NESTING, VALUE_TYPES, open_gguf
from prebake.formats.gguf_reader import read_gguf

SCALARS = {  # key -> (writer method, value); float32 values exact in float32
    "t.u8": ("add_uint8", 255), "t.i8": ("add_int8", -128), "t.u16": ("add_uint16", 65535),
    "t.i16": ("add_int16", -32768), "t.u32": ("add_uint32", 4294967295), "t.i32": ("add_int32", -(1 << 31)),
    "t.f32": ("add_float32", 0.15625), "t.u64": ("add_uint64", (1 << 64) - 1), "t.i64": ("add_int64", -(1 << 63)),
    "t.f64": ("add_float64", 1e300), "t.yes": ("add_bool", True), "t.no": ("add_bool", False),
    "t.str": ("add_string", "tiny llama – ü ✓"),
}
TYPED_ARRAYS = {  # key -> (item type, values)
    "t.u8s": (V.UINT8, [0, 1, 255]), "t.i8s": (V.INT8, [-128, 0, 127]), "t.u16s": (V.UINT16, [1, 65535]),
    "t.i16s": (V.INT16, [-32768, 7]), "t.u32s": (V.UINT32, [3, 4294967295]), "t.i64s": (V.INT64, [-(1 << 63), 5]),
    "t.u64s": (V.UINT64, list(range(100))), "t.f64s": (V.FLOAT64, [0.1, -2.5e-300]),
    "t.bools": (V.BOOL, [i % 3 == 0 for i in range(100)]),  # long: decoded lazily
}
N_TOKENS = 300  # more than the 64 items decoded while parsing: the tokenizer arrays stay lazy
NESTED_MIXED = [[1, 2], ["a", "bé"], [[True, False], [True]], [[0.5]]]

# name -> (GGML type, shape in PyTorch order)
TENSORS: dict[str, tuple[Q, tuple[int, ...]]] = {
    "token_embd.weight": (Q.Q4_K, (8, 256)), "output.weight": (Q.Q6_K, (4, 256)),
    "blk.0.attn_q.weight": (Q.Q8_0, (8, 64)), "blk.0.attn_k.weight": (Q.Q4_0, (4, 64)),
    "blk.0.attn_v.weight": (Q.Q4_1, (4, 64)), "blk.0.ffn_up.weight": (Q.Q5_0, (2, 3, 64)),
    "blk.0.ffn_down.weight": (Q.Q5_1, (2, 1, 2, 32)), "blk.0.attn_norm.weight": (Q.F32, (64,)),
    "blk.0.ffn_norm.weight": (Q.F16, (3, 5)), "blk.0.ffn_gate.weight": (Q.BF16, (4, 8)),
    "blk.0.layer_types": (Q.I32, (7,)), "t.i8": (Q.I8, (3, 3)), "t.i16": (Q.I16, (5,)), "t.i64": (Q.I64, (2, 2)),
    "t.f64": (Q.F64, (2, 1, 3)), "t.scalar": (Q.F32, ()),
}


def _tensor_data(qtype: Q, shape: tuple[int, ...], rng: np.random.Generator) -> tuple[np.ndarray, Q | None]:
    """(array for GGUFWriter.add_tensor, raw_dtype): values for plain types, blocks for the rest."""
    values = rng.standard_normal(shape).astype(np.float32)
    plain = {Q.F32: np.float32, Q.F16: np.float16, Q.F64: np.float64, Q.I8: np.int8, Q.I16: np.int16,
             Q.I32: np.int32, Q.I64: np.int64}
    if qtype in plain:
        return (values * 100).astype(plain[qtype]), None
    if qtype in (Q.Q4_K, Q.Q6_K):  # gguf-py cannot make K-quants: random blocks parse the same
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        return rng.integers(0, 256, (*shape[:-1], shape[-1] // block * size), dtype=np.uint8), qtype
    return gguf.quants.quantize(values, qtype), qtype  # BF16 and the legacy quants, as uint8


def write_model(path: Path, alignment: int | None = None, n_tokens: int = N_TOKENS) -> Path:
    """A llama-style GGUF: every scalar type, typed, nested and tokenizer arrays, every tensor kind."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")  # writes general.architecture
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_block_count(1)
    for key, (method, value) in SCALARS.items():
        getattr(w, method)(key, value)
    for key, (item, values) in TYPED_ARRAYS.items():
        w.add_key_value(key, values, V.ARRAY, sub_type=item)
    w.add_array("t.ints", [3, -1, 2])
    w.add_array("t.nested", [[1, 2], [3], [4, 5, 6]])
    w.add_array("t.nested_mixed", NESTED_MIXED)
    tokens = [f"tok{i}" if i % 7 else f"▁wörd{i}" for i in range(n_tokens)]
    w.add_token_list(tokens)
    w.add_token_merges([f"{a} {b}" for a, b in zip(tokens, tokens[1:], strict=False)])
    w.add_token_scores([i * 0.25 for i in range(n_tokens)])
    w.add_token_types([1 + i % 5 for i in range(n_tokens)])
    for name, (qtype, shape) in TENSORS.items():
        data, raw = _tensor_data(qtype, shape, rng)
        w.add_tensor(name, data, raw_dtype=raw)
    return _finish(w, path)


def _finish(w: gguf.GGUFWriter, path: Path) -> Path:
    """Writes the file as llama.cpp's converter does: header, key-values, tensor data."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("gguf") / "model.gguf")


def _flat(value):
    """A nested list flattened, as gguf-py's ``ReaderField.contents`` returns arrays of arrays."""
    return [x for v in value for x in _flat(v)] if isinstance(value, list) else [value]


# ---------------------------------------------------------------------------------------------
# the same values and bytes as gguf-py


def test_tables_match_gguf_py():
    """Every type gguf-py knows, under the same id, name and block size (a newer gguf-py that
    knows more fails here: add the type to the tables)."""
    assert {t.value: t.name for t in V} == {t: name for t, (name, _) in VALUE_TYPES.items()}
    for t in Q:
        assert TYPE_IDS[t.value] == t.name and BLOCK_SIZES[t.name] == gguf.GGML_QUANT_SIZES[t], t.name
    assert set(TYPE_IDS.values()) <= set(BLOCK_SIZES)


@pytest.mark.parametrize("alignment", [None, 64, 4096])
def test_fields_and_tensors_match_gguf_reader(tmp_path, alignment):
    path = write_model(tmp_path / "model.gguf", alignment)
    ours, theirs = open_gguf(path), gguf.GGUFReader(path)
    fields = {k: f for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.fields) == list(fields)
    for name, f in fields.items():
        mine = ours.fields[name]
        assert (mine.type, mine.item_type) == (f.types[0].name, f.types[1].name if len(f.types) > 1 else None), name
        if name == "t.nested_mixed":  # gguf-py flattens arrays of arrays (strings as their bytes)
            assert mine.value() == NESTED_MIXED
        elif mine.item_type == "ARRAY":
            assert _flat(mine.value()) == f.contents(), name
        else:
            assert mine.value() == f.contents() and mine.count == len(f.data), name
    assert (ours.version, ours.alignment, ours.data_offset) == (3, alignment or 32, theirs.data_offset)
    first_key, first_tensor = next(iter(fields.values())).offset, theirs.tensors[0].field.offset
    assert ours.kv_span == (first_key, first_tensor)
    assert [t.name for t in theirs.tensors] == list(ours.tensors) == list(TENSORS)
    for t in theirs.tensors:
        mine = ours.tensors[t.name]
        assert mine.type == t.tensor_type.name and mine.shape == tuple(int(d) for d in reversed(t.shape)), t.name
        assert (mine.offset, mine.nbytes) == (t.data_offset, t.n_bytes), t.name
        assert ours.tensor_bytes(t.name).tobytes() == t.data.tobytes(), t.name


def test_long_arrays_are_lazy_views(model):
    f = open_gguf(model)
    tokens, scores = f.fields["tokenizer.ggml.tokens"], f.fields["tokenizer.ggml.scores"]
    assert (tokens.item_type, tokens.count, scores.item_type, scores.count) == ("STRING", N_TOKENS, "FLOAT32", N_TOKENS)
    assert tokens.value()[:2] == ["▁wörd0", "tok1"] and len(tokens.value()) == N_TOKENS
    view = scores.array()
    assert view.dtype == np.dtype("<f4") and not view.flags.writeable and np.shares_memory(view, f.buffer)
    assert view.tolist() == [i * 0.25 for i in range(N_TOKENS)] == scores.value()
    assert f.fields["t.bools"].array().tolist() == [int(i % 3 == 0) for i in range(100)]
    with pytest.raises(TypeError):
        tokens.array()
    short = f.metadata()  # arrays of more than 64 items left out
    assert "tokenizer.ggml.tokens" not in short and "t.u64s" not in short and short["t.ints"] == [3, -1, 2]
    assert f.metadata(max_list=None)["tokenizer.ggml.merges"][0] == "▁wörd0 tok1"
    json.dumps(f.metadata(max_list=None))


def test_read_gguf_describes_views(model):
    src = read_gguf(str(model))
    theirs = {t.name: t for t in gguf.GGUFReader(model).tensors}
    assert src.format == "gguf" and [t.name for t in src.tensors] == list(TENSORS)
    for t in src.tensors:
        qtype, shape = TENSORS[t.name]
        view = t.read()
        assert t.shape == shape and t.nbytes == view.nbytes == theirs[t.name].n_bytes, t.name
        assert t.storage.start == theirs[t.name].data_offset and t.storage.end == t.storage.start + t.nbytes
        assert not view.flags.owndata and not view.flags.writeable, t.name
        assert view.tobytes() == theirs[t.name].data.tobytes(), t.name
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        if block == 1:
            assert (t.dtype, t.qtype, view.shape, view.dtype.itemsize) == (qtype.name, None, shape, size), t.name
        else:
            rows = int(np.prod(shape[:-1]))
            assert (t.dtype, t.qtype, view.shape) == ("F32", qtype.name, (rows, shape[-1] // block * size)), t.name
    meta = src.metadata["gguf"]
    assert meta == json.loads(json.dumps(meta))  # plain JSON values
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 1
    assert all(meta[k] == v and type(meta[k]) is type(v) for k, (_, v) in SCALARS.items())
    assert len(meta["tokenizer.ggml.tokens"]) == N_TOKENS and meta["t.nested"] == [[1, 2], [3], [4, 5, 6]]


def test_parse_speed_against_gguf_reader(tmp_path):
    """A 262,144-token vocabulary with merges, scores and types (Gemma-3's size): ours parses in
    a fraction of a second; gguf-py's GGUFReader is timed on a 32k vocabulary (about 15 s on
    the full one: set PREBAKE_GGUF_PEER=1 to time that too). Printed, never asserted."""
    big = write_model(tmp_path / "big.gguf", n_tokens=262_144)
    small = write_model(tmp_path / "small.gguf", n_tokens=32_768)
    rows, counts = [], {"262k": 262_144, "32k": 32_768}
    for label, path in [("262k", big), ("32k", small)]:
        t0 = time.perf_counter()
        f = open_gguf(path)
        t1 = time.perf_counter()
        read_gguf(str(path))
        rows.append(f"{label}: open_gguf {t1 - t0:.3f} s, read_gguf (every value decoded) {time.perf_counter() - t1:.3f} s")
        assert f.fields["tokenizer.ggml.tokens"].count == counts[label]
    for label, path in [("32k", small)] + ([("262k", big)] if os.environ.get("PREBAKE_GGUF_PEER") else []):
        t0 = time.perf_counter()
        gguf.GGUFReader(path)
        rows.append(f"{label}: gguf.GGUFReader {time.perf_counter() - t0:.3f} s")
    print("\n" + "\n".join(rows))


# ---------------------------------------------------------------------------------------------
# hostile files: hand edits of real ones


@contextlib.contextmanager
def deadline(seconds: float):
    """Raises TimeoutError in the test if the block runs longer than ``seconds`` (a hang)."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def write_small(path: Path, keys: dict | None = None, names: tuple[str, ...] = ("a.weight", "b.weight"),
                alignment: int | None = None) -> Path:
    """A small real GGUF: a few keys, a short token list, an F32, a Q8_0 and an F16 tensor."""
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_block_count(1)
    w.add_string("general.name", "small")
    for key, value in (keys or {}).items():
        w.add_uint32(key, value)
    w.add_token_list(["<s>", "</s>", "hi"])
    rng = np.random.default_rng(1)
    w.add_tensor(names[0], rng.standard_normal((4, 8)).astype(np.float32))
    w.add_tensor(names[1], gguf.quants.quantize(rng.standard_normal((2, 64)).astype(np.float32), Q.Q8_0),
                 raw_dtype=Q.Q8_0)
    w.add_tensor("c.weight", rng.standard_normal(3).astype(np.float16))
    return _finish(w, path)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return write_small(tmp_path_factory.mktemp("small") / "small.gguf")


def value_at(path: Path, key: str) -> int:
    """Where ``key``'s value starts (its type tag is the 4 bytes before), found by gguf-py."""
    return gguf.GGUFReader(path).fields[key].offset + 8 + len(key.encode()) + 4


def tensor_info_at(path: Path, name: str) -> dict[str, int]:
    """Where the fields of ``name``'s tensor info record lie, found by gguf-py."""
    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == name)
    n_dims = t.field.offset + 8 + len(name.encode())
    dtype = n_dims + 4 + 8 * len(t.shape)
    return {"n_dims": n_dims, "dims": n_dims + 4, "type": dtype, "offset": dtype + 4}


def edited(src: Path, dst: Path, edits: dict[int, bytes]) -> Path:
    data = bytearray(src.read_bytes())
    for at, new in edits.items():
        data[at:at + len(new)] = new
    dst.write_bytes(bytes(data))
    return dst


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def refused(path: Path, *words: str, error=FormatError) -> str:
    """The message of the error parsing ``path`` raises (within a second), checked for ``words``."""
    with deadline(2), pytest.raises(error) as e:
        read_gguf(str(path))
    message = str(e.value)
    assert str(path) in message and all(w in message for w in words), message
    return message


# case -> ([(field, key or tensor or absolute offset, new bytes)], words the message must hold);
# a field is "abs", a key's "ktype"/"kval", or a tensor info's "n_dims"/"dims"/"type"/"offset",
# with "+N" for N bytes further on
HOSTILE = {
    "string-flipped-to-array": ([("ktype", "general.name", u32(V.ARRAY))], ["general.name"]),
    "string-length-huge": ([("kval", "general.name", u64(1 << 62))], ["general.name", "truncated"]),
    "array-length-huge": ([("kval+4", "tokenizer.ggml.tokens", u64(1 << 61))], ["tokenizer.ggml.tokens", "items"]),
    "array-length-max": ([("kval+4", "tokenizer.ggml.tokens", u64((1 << 64) - 1))], ["tokenizer.ggml.tokens"]),
    "array-string-length-huge": ([("kval+12", "tokenizer.ggml.tokens", u64(1 << 63))], ["tokenizer.ggml.tokens"]),
    "unknown-value-type": ([("ktype", "llama.block_count", u32(13))], ["llama.block_count", "value type"]),
    "unknown-item-type": ([("kval", "tokenizer.ggml.tokens", u32(99))], ["tokenizer.ggml.tokens", "item type"]),
    "key-count-huge": ([("abs", 16, u64(1 << 60))], ["key-value pairs"]),
    "tensor-count-huge": ([("abs", 8, u64(1 << 60))], ["tensors"]),
    "key-length-huge": ([("abs", 24, u64(1 << 40))], ["key #0"]),
    "key-not-utf8": ([("abs", 32, b"\xff")], ["key #0", "UTF-8"]),
    "value-not-utf8": ([("kval+8", "general.name", b"\xc3\x28")], ["general.name", "UTF-8"]),
    "token-not-utf8": ([("kval+20", "tokenizer.ggml.tokens", b"\xff")], ["tokenizer.ggml.tokens", "item 0", "UTF-8"]),
    "zero-dim": ([("dims", "a.weight", u64(0))], ["a.weight", "dim 0 is 0"]),
    "zero-rows": ([("dims+8", "b.weight", u64(0))], ["b.weight", "dim 1 is 0"]),
    "five-dims": ([("n_dims", "a.weight", u32(5))], ["a.weight", "n_dims"]),
    "elements-overflow": ([("dims", "a.weight", u64(1 << 40)), ("dims+8", "a.weight", u64(1 << 40))],
                          ["a.weight", "2**63"]),
    "unknown-ggml-type": ([("type", "a.weight", u32(1000))], ["a.weight", "GGML type 1000"]),
    "retired-ggml-type": ([("type", "a.weight", u32(4))], ["a.weight", "GGML type 4"]),
    "row-not-whole-blocks": ([("dims", "b.weight", u64(48))], ["b.weight", "Q8_0 block"]),
    "misaligned-offset": ([("offset", "b.weight", u64(8))], ["b.weight", "alignment"]),
    "offset-past-end": ([("offset", "c.weight", u64(1 << 40))], ["c.weight", "truncated"]),
    "offset-wraps": ([("offset", "c.weight", u64((1 << 64) - 32))], ["c.weight", "truncated"]),
    "overlapping-tensors": ([("offset", "c.weight", u64(0))], ["overlap", "a.weight", "c.weight"]),
    "bad-magic": ([("abs", 0, b"GGUG")], ["not a GGUF file"]),
}


def _apply(small: Path, dst: Path, edits) -> Path:
    out = {}
    for what, where, new in edits:
        base, _, plus = what.partition("+")
        if base == "abs":
            at = where
        elif base in ("ktype", "kval"):  # a key's type tag, its value
            at = value_at(small, where) - (4 if base == "ktype" else 0)
        else:
            at = tensor_info_at(small, where)[base]
        out[at + int(plus or 0)] = new
    return edited(small, dst, out)


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_edit_refused(tmp_path, small, case):
    edits, words = HOSTILE[case]
    refused(_apply(small, tmp_path / f"{case}.gguf", edits), *words)


@pytest.mark.parametrize("version, words", [(1, ["version 1"]), (4, ["version 4"]), (0x03000000, ["big-endian"])])
def test_versions_refused(tmp_path, small, version, words):
    refused(edited(small, tmp_path / "v.gguf", {4: u32(version)}), *words, error=UnsupportedError)


def test_big_endian_file_refused(tmp_path):
    path = tmp_path / "be.gguf"
    w = gguf.GGUFWriter(str(path), "llama", endianess=gguf.GGUFEndian.BIG)
    w.add_tensor("a.weight", np.ones(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    refused(path, "big-endian", error=UnsupportedError)


@pytest.mark.parametrize("value, vtype, words", [
    (48, V.UINT32, ["48", "power of two"]), (0, V.UINT32, ["0", "power of two"]),
    (64, V.INT32, ["general.alignment", "INT32", "UINT32"]),
])
def test_bad_alignment_refused(tmp_path, value, vtype, words):
    src = write_small(tmp_path / "aligned.gguf", alignment=64)
    at = value_at(src, "general.alignment")
    refused(edited(src, tmp_path / "bad.gguf", {at - 4: u32(vtype), at: u32(value)}), *words)


def test_duplicate_key_refused(tmp_path):
    src = write_small(tmp_path / "keys.gguf", {"t.aa": 1, "t.ab": 2})
    at = value_at(src, "t.ab") - 4 - len("t.ab")
    refused(edited(src, tmp_path / "dup.gguf", {at: b"t.aa"}), "'t.aa'", "twice")


def test_duplicate_tensor_name_refused(tmp_path):
    src = write_small(tmp_path / "names.gguf", names=("x.weight", "y.weight"))
    at = tensor_info_at(src, "y.weight")["n_dims"] - len("y.weight")
    refused(edited(src, tmp_path / "dup.gguf", {at: b"x.weight"}), "'x.weight'", "twice")


@pytest.mark.parametrize("depth", [MAX_NESTING, MAX_NESTING + 1])
def test_nesting_bounded(tmp_path, depth):
    deep = 1
    for _ in range(depth):
        deep = [deep]
    path = tmp_path / "deep.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_array("t.deep", deep)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if depth > MAX_NESTING:
        refused(path, "t.deep", "nested")
    else:
        assert open_gguf(path).fields["t.deep"].value() == deep


def test_every_truncation_refused(tmp_path, small):
    """Cut anywhere before the end of the last tensor's data: a FormatError, nothing else.
    (What comes after is the writer's padding: without it the file is whole.)"""
    data = small.read_bytes()
    parsed = open_gguf(small)
    end = max(t.offset + t.nbytes for t in parsed.tensors.values())
    cut = tmp_path / "cut.gguf"
    with deadline(60):
        for keep in range(1, len(data)):
            cut.write_bytes(data[:keep])
            if keep < end:
                with pytest.raises(FormatError):
                    read_gguf(str(cut))
            else:
                assert [t.name for t in read_gguf(str(cut)).tensors] == list(parsed.tensors)


def _outcome(path: Path, size: int) -> str:
    """'refused' (a PrebakeError) or 'parsed', checking a parse keeps every tensor inside the file."""
    try:
        src = read_gguf(str(path))
    except PrebakeError:
        return "refused"
    for t in src.tensors:
        assert 0 <= t.storage.start <= t.storage.end <= size, t.name
        assert t.read().nbytes == t.nbytes, t.name
    json.dumps(src.metadata)
    return "parsed"


def test_single_byte_flips(tmp_path, small):
    """Every bit of the header, key-value and tensor-info bytes flipped in turn, and every byte
    set to 0xff: each file is refused cleanly or parses with its tensors inside the file."""
    data = small.read_bytes()
    header_end = min(t.offset for t in open_gguf(small).tensors.values())
    path = tmp_path / "flip.gguf"
    outcomes = {"refused": 0, "parsed": 0}
    with deadline(120):
        for at in range(header_end):
            for new in {data[at] ^ (1 << bit) for bit in range(8)} | {0xFF}:
                path.write_bytes(data[:at] + bytes([new]) + data[at + 1:])
                outcomes[_outcome(path, len(data))] += 1
    print(f"\n{header_end} bytes flipped: {outcomes}")
    assert outcomes["refused"] and outcomes["parsed"]


def _strings_file(path: Path, tokens: list[bytes]) -> Path:
    """A GGUF whose token list is ``tokens`` as raw bytes (any bytes: written by gguf-py as given)."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_key_value("tokenizer.ggml.tokens", tokens, V.ARRAY, sub_type=V.STRING)
    return _finish(w, path)


def test_long_string_arrays_decode_like_gguf_py(tmp_path):
    """The decoder's whole-run path (64 strings or more) gives gguf-py's strings: multi-byte
    characters, empty strings, a string holding a NUL (decoded one by one) and long strings."""
    tokens = [f"tök{i}".encode() for i in range(200)] + [b"", "日本語 🚀".encode(), b"a\x00b", b"x" * 70_000, b"\n"]
    path = _strings_file(tmp_path / "strings.gguf", tokens)
    assert open_gguf(path).fields["tokenizer.ggml.tokens"].value() == [t.decode() for t in tokens]
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.tokens"].contents() == [t.decode() for t in tokens]


@pytest.mark.parametrize("at", [0, 63, 150])
def test_long_string_array_bad_utf8_names_the_item(tmp_path, at):
    tokens = [f"tok{i}".encode() for i in range(200)]
    tokens[at] = b"ok\xc3\x28"
    path = _strings_file(tmp_path / "bad.gguf", tokens)
    with pytest.raises(FormatError, match=f"'tokenizer.ggml.tokens' item {at} is not valid UTF-8"):
        open_gguf(path).fields["tokenizer.ggml.tokens"].value()
