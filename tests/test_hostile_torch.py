"""Hostile and corrupt torch checkpoints (issue #11): what the fuzz campaign and hand-built files found.

Every case is a real ``torch.save`` file plus the smallest hand edit: a pickle rewritten with
one field changed (through a ``pickle.Pickler`` that writes torch's own opcodes), a zip member
added, renamed or patched in place. Each must either bake exactly what
``torch.load(weights_only=True)`` returns, or fail with one ``PrebakeError`` naming the file
and the problem; none may run code, loop, or allocate far beyond the file's size.
"""

from __future__ import annotations

import collections
import io
import pickle
import pickletools
import struct
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import pytest
import torch
from prebake.convert.bake import convert
from prebake.formats.errors import FormatError, PrebakeError, UnsafePickleError, UnsupportedError
from prebake.formats.pickle_scan import scan
from prebake.formats.torch_legacy import read_torch_legacy
from prebake.formats.torch_zip import read_torch_zip

from tests.conftest import check_bake
from tests.test_bad_input import cli, one_error_line

# ---------------------------------------------------------------------------------------------
# helpers: pickles written the way torch writes them, zips edited member by member


class Storage:
    """Pickles as the persistent id of a storage (as ``torch.save`` writes it)."""

    def __init__(self, key="0", numel=16, kind=torch.FloatStorage, view=()):
        self.pid = ("storage", kind, key, "cpu", numel, *view)


class Call:
    """Pickles as ``func(*args)``: a rebuilt tensor, an allowed builtin, a crafted call."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def tensor(offset=0, size=(16,), stride=(1,), storage=None, *rest):
    """What ``torch.save`` writes for a float tensor over storage '0' (16 floats)."""
    return Call(torch._utils._rebuild_tensor_v2, storage or Storage(), offset, size, stride, False,
                collections.OrderedDict(), *rest)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, Storage) else None


def dumps(obj) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def ops(obj) -> bytes:
    """The opcodes that build ``obj``, to splice into a hand-made pickle (no PROTO, no STOP)."""
    return dumps(obj)[2:-1]


def saved(tmp: Path, obj=None, zipped: bool = True, name: str = "base.pt") -> Path:
    path = tmp / name
    torch.save({"w": torch.arange(16.0)} if obj is None else obj, path, _use_new_zipfile_serialization=zipped)
    return path


def rewrite(src: Path, dst: Path, *, replace: dict | None = None, extra=(), drop=(), rename=None,
            deflate=()) -> Path:
    """Copies a torch zip member by member (matched after its folder), with the given edits."""
    replace = replace or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            folder, member = info.filename.split("/", 1)
            if member in drop:
                continue
            method = zipfile.ZIP_DEFLATED if member in deflate else zipfile.ZIP_STORED
            name = f"{rename or folder}/{member}"
            zout.writestr(name, replace.get(member, zin.read(info)), compress_type=method)
        for name, data in extra:
            zout.writestr(name, data)
    return dst


def with_pickle(tmp: Path, data, name: str = "bad.pt") -> Path:
    """The base checkpoint ({"w": 16 floats}) with data.pkl replaced by ``data`` (bytes or an object)."""
    return rewrite(saved(tmp), tmp / name, replace={"data.pkl": data if isinstance(data, bytes) else dumps(data)})


def headers(path: Path) -> dict[str, tuple[int, int]]:
    """Member name -> (offset of its central directory entry, offset of its local header)."""
    data = path.read_bytes()
    eocd = data.rindex(b"PK\x05\x06")
    count, _, start = struct.unpack_from("<HII", data, eocd + 10)
    found, pos = {}, start
    for _ in range(count):
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, pos + 28)
        name = data[pos + 46:pos + 46 + name_len].decode()
        found[name] = (pos, struct.unpack_from("<I", data, pos + 42)[0])
        pos += 46 + name_len + extra_len + comment_len
    return found


def patch(path: Path, offset: int, fmt: str, value) -> Path:
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    path.write_bytes(bytes(data))
    return path


def member(path: Path, suffix: str) -> str:
    return next(n for n in headers(path) if n.endswith(suffix))


def torch_load(path: Path):
    """What ``torch.load(weights_only=True)`` returns, or None when it refuses the file."""
    try:
        return torch.load(path, weights_only=True)
    except Exception:
        return None


def refused(src: Path, tmp: Path, *words: str, error: type[PrebakeError] = FormatError) -> str:
    """Converts ``src``; it must fail with ``error`` naming the file and every word."""
    with pytest.raises(error) as info:
        convert(src, tmp / "out")
    message = str(info.value)
    assert message.startswith(f"{src}: "), message
    for word in words:
        assert word in message, (word, message)
    assert not (tmp / "out").exists()
    return message


def bakes_like_torch(src: Path, tmp: Path) -> dict[str, torch.Tensor]:
    expected = torch_load(src)
    assert expected is not None, "torch.load refuses it"
    convert(src, tmp / "out")
    return check_bake(tmp / "out", dict(dict.items(expected)))  # its .items may be shadowed


def peak_memory(fn) -> int:
    """Peak bytes the Python allocators (the C unpickler's memo and bytes included) held in ``fn``."""
    tracemalloc.start()
    try:
        fn()
    except PrebakeError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


# ---------------------------------------------------------------------------------------------
# silent wrong results: tensors torch refuses or reads differently


@pytest.mark.parametrize(("fields", "words"), [
    ({"offset": -8}, ("storage offset", "negative")),  # only the end used to be checked
    ({"offset": -8, "size": (0,)}, ("storage offset", "negative")),
    ({"size": (-1, 4), "stride": (4, 1)}, ("size[0]", "negative")),
    ({"offset": 8, "stride": (-1,), "size": (4,)}, ("stride[0]", "negative")),
    ({"size": (17,)}, ("reaches past its storage",)),
    ({"size": ("4",)}, ("size[0]", "not an integer")),  # TypeError before
    ({"size": (4.0,)}, ("size[0] is 4.0", "not an integer")),
    ({"offset": 2.0, "size": (4,)}, ("storage offset is 2.0", "not an integer")),
    ({"size": (2, 2), "stride": (2 ** 70, 1)}, ("stride[0]", "overflows int64")),  # OverflowError
    ({"size": (1, 2), "stride": (2 ** 62, 1)}, ("stride", "overflows int64")),
    ({"size": (4,), "stride": (1, 1)}, ("1 dimensions but 2 strides",)),
    ({"size": 4}, ("size is 4",)),
])
def test_bad_tensor_fields_are_refused_under_the_tensor_name(tmp_path, fields, words):
    src = with_pickle(tmp_path, {"w": tensor(**fields)})
    refused(src, tmp_path, "tensor 'w'", *words)
    if fields.get("size") != (1, 2):  # torch accepts a huge stride on a size-1 dimension
        assert torch_load(src) is None


def test_bad_tensor_in_a_skipped_value_is_refused_too(tmp_path):
    """torch.load fails on it wherever it sits, so the file cannot bake."""
    import argparse

    src = with_pickle(tmp_path, {"w": tensor(), "tags": (tensor(offset=-8), "x", {1})})
    refused(src, tmp_path, "tensor 'tags.0'", "negative")
    hidden = with_pickle(tmp_path, {"w": tensor(), "args": argparse.Namespace(t=tensor(offset=-8))}, "hidden.pt")
    refused(hidden, tmp_path, "skipped value", "storage '0'", "negative")


def test_tensor_given_to_a_skipped_type_is_refused(tmp_path):
    """numpy.dtype(tensor, ...) fails in torch.load; prebake must not skip the tensor and bake."""
    import numpy

    src = with_pickle(tmp_path, {"w": tensor(), "odd": Call(numpy.dtype, tensor(), False, True)})
    with pytest.raises(ValueError, match="NumPy dtype"):
        torch.load(src, weights_only=False)
    refused(src, tmp_path, "numpy.dtype(", "refuse")


def test_v3_rebuild_that_requires_grad_is_refused(tmp_path):
    """torch.save writes float8 through _rebuild_tensor_v3; with requires_grad set, torch.load
    fails (it makes the tensor requiring grad, then set_() on it): prebake refuses it too."""
    base = saved(tmp_path, {"f8": torch.zeros(4, dtype=torch.float8_e4m3fn)})
    with zipfile.ZipFile(base) as z:
        pkl = z.read(member(base, "data.pkl"))
    ops = [pos for op, _, pos in pickletools.genops(pkl) if op.name == "NEWFALSE"]
    assert len(ops) == 1
    flipped = pkl[:ops[0]] + b"\x88" + pkl[ops[0] + 1:]  # NEWTRUE: requires_grad=True
    src = rewrite(base, tmp_path / "grad.pt", replace={"data.pkl": flipped})
    with pytest.raises(RuntimeError, match="in-place"):
        torch.load(src)
    refused(src, tmp_path, "'f8'", "requires_grad")


def test_a_checkpoint_that_is_no_container_is_refused(tmp_path):
    """A pickle whose result is a function (or any value that is not a dict, list, tuple or tensor)."""
    src = rewrite(saved(tmp_path, {}), tmp_path / "bad.pt", replace={"data.pkl": dumps(torch._utils._rebuild_tensor_v2)})
    refused(src, tmp_path, "torch._utils._rebuild_tensor_v2", "nothing to bake")


def test_untyped_storage_spelled_as_torch_save_never_does(tmp_path):
    src = with_pickle(tmp_path, {"w": tensor(storage=Storage(kind=torch.UntypedStorage, numel=64))})
    data = src.read_bytes()
    assert b"torch.storage\nUntypedStorage" in data  # how pickle spells the class: rewrite it
    spelled = with_pickle(tmp_path, dumps({"w": tensor(storage=Storage(kind=torch.UntypedStorage, numel=64))})
                          .replace(b"ctorch.storage\nUntypedStorage", b"ctorch\nUntypedStorage"), "spelled.pt")
    refused(spelled, tmp_path, "torch.UntypedStorage", "weights_only")


def test_skipped_type_called_as_it_cannot_be_is_refused(tmp_path):
    """argparse.Namespace(1, 2): torch.load fails on the call; the file must not bake."""
    import argparse

    src = with_pickle(tmp_path, {"w": tensor(), "args": Call(argparse.Namespace, 1, 2)})
    with pytest.raises(TypeError):
        torch.load(src, weights_only=False)
    refused(src, tmp_path, "argparse.Namespace() with 2 arguments")


@pytest.mark.parametrize("args", [("PWNED", "w"), ("cuda:0", 1), ("nope",), ("cuda", -1)])
def test_torch_device_called_as_torch_refuses_is_refused(tmp_path, args):
    """torch.device('PWNED', 'w') (found by the fuzz campaign, seed 1): torch.load fails on it."""
    src = with_pickle(tmp_path, {"w": tensor(), "where": Call(torch.device, *args)})
    with pytest.raises((TypeError, RuntimeError)):
        torch.load(src, weights_only=True)
    refused(src, tmp_path, "torch.device(", "torch refuses")


def test_torch_device_and_version_as_torch_builds_them_bake(tmp_path):
    """TorchVersion is a skipped value type (torch.load needs it allowed: safe_globals)."""
    from torch.torch_version import TorchVersion

    src = with_pickle(tmp_path, {"w": tensor(), "where": torch.device("cuda", 1),
                                 "cpu": Call(torch.device, "cpu", None)})
    assert torch_load(src) is not None
    convert(src, tmp_path / "devices")
    good = with_pickle(tmp_path, {"w": tensor(), "v": TorchVersion("2.1")}, "good.pt")
    bad = with_pickle(tmp_path, {"w": tensor(), "v": Call(TorchVersion, 1, "utf-8")}, "bad.pt")
    with torch.serialization.safe_globals([TorchVersion]):
        torch.load(good, weights_only=True)
        with pytest.raises(TypeError):
            torch.load(bad, weights_only=True)
    convert(good, tmp_path / "good")
    refused(bad, tmp_path, "TorchVersion(", "torch refuses")


def test_more_dimensions_than_a_manifest_holds_are_refused_before_baking(tmp_path):
    """torch takes 17 dimensions; a bake's manifest holds 16: refused up front, not baked unloadable."""
    src = tmp_path / "deep.pt"
    torch.save({"w": torch.zeros([1] * 17)}, src)
    with pytest.raises(UnsupportedError, match="17 dimensions"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_one_byte_pickle_opcode_is_not_a_checkpoint(tmp_path):
    src = tmp_path / "one.pt"
    src.write_bytes(b"\x80")
    with pytest.raises(UnsupportedError, match="not a recognised checkpoint"):
        convert(src, tmp_path / "out")


def test_zip_with_bytes_after_its_end_record_is_refused(tmp_path):
    """torch's reader fails on some archive comments and appended bytes; torch.save writes neither."""
    base = saved(tmp_path)
    for name, extra in (("comment.pt", None), ("appended.pt", b"x" * 5000)):
        data = base.read_bytes()
        if extra is None:  # an archive comment: its length goes in the end record's last field
            data = data[:-2] + struct.pack("<H", 30000) + b"c" * 30000
        else:
            data += extra
        src = tmp_path / name
        src.write_bytes(data)
        with pytest.raises(OSError):
            torch.load(src)
        refused(src, tmp_path, "after its end record")


def test_empty_tensor_may_point_anywhere_in_its_storage(tmp_path):
    """torch accepts any non-negative offset for an empty tensor: so does prebake."""
    src = with_pickle(tmp_path, {"w": tensor(), "empty": tensor(offset=100, size=(0, 3), stride=(3, 1))})
    loaded = bakes_like_torch(src, tmp_path)
    assert loaded["empty"].shape == (0, 3)


def test_list_sizes_and_int_keys_bake_like_torch(tmp_path):
    src = with_pickle(tmp_path, {"w": tensor(offset=4, size=[2, 3], stride=[3, 1], storage=Storage(key=0))})
    bakes_like_torch(src, tmp_path)


def test_ordered_dict_state_cannot_hide_its_tensors(tmp_path):
    """BUILD {"items": ...} on an OrderedDict sets an attribute, as torch does; the mapping stays."""
    class Shadowing(collections.OrderedDict):
        def __reduce__(self):
            return collections.OrderedDict, (), {"items": 5, "keys": 1, "values": 2}, None, iter(self.items())

    src = with_pickle(tmp_path, Shadowing(w=tensor(), b=tensor(offset=8, size=(8,))))
    loaded = bakes_like_torch(src, tmp_path)
    assert set(loaded) == {"w", "b"}


def test_ordered_dict_state_torch_refuses_is_refused(tmp_path):
    class BadState(collections.OrderedDict):
        def __reduce__(self):
            return collections.OrderedDict, (), 7, None, iter(self.items())

    src = with_pickle(tmp_path, BadState(w=tensor()))
    refused(src, tmp_path, "OrderedDict", "not a mapping")
    assert torch_load(src) is None


def test_ordered_dict_with_arguments_is_refused(tmp_path):
    """Pickle writes OrderedDict() and SETITEMS; OrderedDict(list) could copy one list again and again."""
    src = with_pickle(tmp_path, {"w": tensor(), "od": Call(collections.OrderedDict, [("a", 1)])})
    refused(src, tmp_path, "OrderedDict() with arguments", error=UnsupportedError)


def test_build_on_a_tensor_or_a_callable_is_refused(tmp_path):
    class Stateful(Call):
        def __reduce__(self):
            return self.func, self.args, {"shape": (1000,)}

    src = with_pickle(tmp_path, {"w": Stateful(torch._utils._rebuild_tensor_v2, Storage(), 0, (16,), (1,), False,
                                                collections.OrderedDict())})
    refused(src, tmp_path, "BUILD", "tensor", error=UnsupportedError)
    # BUILD on a global itself cannot set attributes on prebake's functions either
    glob = b"ctorch._utils\n_rebuild_tensor_v2\n}X\x0c\x00\x00\x00__defaults__Nsb0"
    poisoned = dumps({"w": tensor()})[:-1] + glob + b"."
    refused(with_pickle(tmp_path, poisoned, "global.pt"), tmp_path, "BUILD", "_rebuild_tensor_v2",
            error=UnsupportedError)


@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_duplicate_member_names_are_refused(tmp_path):
    """zipfile reads the last copy, torch the first: the bytes would differ."""
    base = saved(tmp_path)
    prefix = member(base, "data.pkl").split("/")[0]
    seven = torch.full((16,), 7.0).numpy().tobytes()
    src = rewrite(base, tmp_path / "dup.pt", extra=[(f"{prefix}/data/0", seven)])
    assert torch.equal(torch_load(src)["w"], torch.arange(16.0))  # torch: the first copy
    refused(src, tmp_path, f"{prefix}/data/0", "appears twice")
    pkl = rewrite(base, tmp_path / "dup-pkl.pt", extra=[(f"{prefix}/data.pkl", dumps({"x": tensor(size=(2,))}))])
    refused(pkl, tmp_path, "data.pkl", "appears twice")


def test_storage_member_of_the_wrong_size_is_refused(tmp_path):
    """torch needs a storage record of exactly the size its persistent id declares."""
    src = with_pickle(tmp_path, {"w": tensor(storage=Storage(numel=8), size=(8,))})
    refused(src, tmp_path, "data/0", "holds 64 bytes, not the 32")
    assert torch_load(src) is None


@pytest.mark.parametrize("bits", [{"conj": True}, {"neg": True}])
def test_conjugate_and_negative_bits_are_refused(tmp_path, bits):
    """torch.load returns these tensors conjugated or negated; their bytes are not."""
    src = with_pickle(tmp_path, {"w": tensor(0, (16,), (1,), None, bits)})
    refused(src, tmp_path, "tensor 'w'", f"{next(iter(bits))} bit")
    x = torch.randn(3, dtype=torch.complex64)
    real = saved(tmp_path, {"c": x.conj()}, name="conj.pt")
    refused(real, tmp_path, "tensor 'c'", "conj bit")


def test_gradient_on_integers_is_refused(tmp_path):
    src = with_pickle(tmp_path, {"w": Call(torch._utils._rebuild_tensor_v2, Storage(kind=torch.IntStorage), 0,
                                           (16,), (1,), True, collections.OrderedDict())})
    refused(src, tmp_path, "tensor 'w'", "requires grad")
    assert torch_load(src) is None


def test_rebuild_v3_with_a_non_dtype_is_refused(tmp_path):
    """The dtype argument must be a torch dtype: a string or number used to raise KeyError."""
    for dtype in ("F32", 7):
        src = with_pickle(tmp_path, {"w": Call(torch._utils._rebuild_tensor_v3, Storage(kind=torch.UntypedStorage,
                                               numel=64), 0, (16,), (1,), False, collections.OrderedDict(),
                                               dtype)}, f"v3-{dtype}.pt")
        refused(src, tmp_path, "tensor 'w'", "not a torch dtype")
        assert torch_load(src) is None
    good = with_pickle(tmp_path, {"w": Call(torch._utils._rebuild_tensor_v3, Storage(kind=torch.UntypedStorage,
                                            numel=64), 0, (16,), (1,), False, collections.OrderedDict(),
                                            torch.float32)}, "v3.pt")
    bakes_like_torch(good, tmp_path)


def test_storage_location_must_look_like_a_device(tmp_path):
    """The device a storage was saved from is not needed to read its bytes, but must be a name."""
    cpu = b"X\x03\x00\x00\x00cpu"
    cuda = with_pickle(tmp_path, dumps({"w": tensor()}).replace(cpu, b"X\x06\x00\x00\x00cuda:1"), "cuda.pt")
    convert(cuda, tmp_path / "out")  # saved on a GPU: bakes on this machine all the same
    check_bake(tmp_path / "out", {"w": torch.load(cuda, weights_only=True, map_location="cpu")["w"]})
    odd = with_pickle(tmp_path, dumps({"w": tensor()}).replace(cpu, b")"), "odd.pt")  # an empty tuple
    refused(odd, tmp_path / "x", "location", "not a device name")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
def test_standard_opcodes_bake_as_a_full_torch_load_reads_them(tmp_path):
    """torch.save(..., pickle_protocol=4) writes opcodes torch's weights_only unpickler lacks
    (it refuses the file); their meaning is standard pickle's, as torch.load(weights_only=False)
    reads it, and that is what bakes."""
    src = tmp_path / "p4.pt"
    sd = {"w": torch.arange(4.0), "nested": {"b": torch.ones(2, 2)}}
    torch.save(sd, src, pickle_protocol=4)
    assert torch_load(src) is None
    convert(src, tmp_path / "out")
    check_bake(tmp_path / "out", {"w": sd["w"], "nested.b": sd["nested"]["b"]})


def test_tensors_under_odd_keys(tmp_path):
    """A dtype key names its tensor as torch's str() does; a key whose text would differ from
    torch's (an object, a function: str() gives an address) is refused where a tensor sits under it."""
    src = with_pickle(tmp_path, {torch.float32: tensor(), 3: tensor(offset=8, size=(8,)), "w": tensor()})
    assert sorted(t.name for t in read_torch_zip(str(src)).tensors) == ["3", "torch.float32", "w"]
    for i, key in enumerate((torch.device("cpu"), torch._utils._rebuild_tensor_v2, (1, 2))):
        src = with_pickle(tmp_path, {"w": tensor(), "layers": {key: {"x": tensor(offset=8, size=(8,))}}},
                          f"odd{i}.pt")
        refused(src, tmp_path, "sits under a dict key", "layers.")
    src = with_pickle(tmp_path, {"w": tensor(), "meta": {torch.device("cpu"): "kept"}}, "meta.pt")
    assert [t.name for t in read_torch_zip(str(src)).tensors] == ["w"]  # no tensor under it: fine


# ---------------------------------------------------------------------------------------------
# the zip container: one line instead of a traceback, and only torch.save's own layout


def test_undecodable_member_name(tmp_path):
    base = saved(tmp_path)
    prefix = member(base, "data.pkl").split("/")[0]
    src = rewrite(base, tmp_path / "names.pt", extra=[(f"{prefix}/QZJX", b"")])
    cd, lh = headers(src)[f"{prefix}/QZJX"]
    patch(src, cd + 8, "<H", 0x800)  # the name claims to be UTF-8 ...
    patch(src, lh + 6, "<H", 0x800)
    src.write_bytes(src.read_bytes().replace(b"QZJX", b"\xff\xfe\xfd\xfc"))  # ... and is not
    refused(src, tmp_path, "not a readable torch zip", "UnicodeDecodeError")


@pytest.mark.parametrize(("central", "local", "value", "words"), [  # header field offsets, new value
    pytest.param(10, 8, 99, ("compression method 99",), id="compression"),  # NotImplementedError before
    pytest.param(6, 4, 99, ("not a readable torch zip",), id="version-needed"),  # NotImplementedError
    pytest.param(8, 6, 0x809, ("encrypted",), id="encrypted"),  # RuntimeError (password required)
])
def test_unreadable_data_pkl(tmp_path, central, local, value, words):
    src = rewrite(saved(tmp_path), tmp_path / "bad.pt")
    name = member(src, "data.pkl")
    cd, lh = headers(src)[name]
    patch(src, cd + central, "<H", value)
    patch(src, lh + local, "<H", value)
    refused(src, tmp_path, *words, error=PrebakeError)


def test_encrypted_storage_is_refused(tmp_path):
    """The storage bytes used to be mapped as they are: the cipher text would have been baked."""
    src = rewrite(saved(tmp_path), tmp_path / "bad.pt")
    cd, lh = headers(src)[member(src, "data/0")]
    patch(src, cd + 8, "<H", 1)
    patch(src, lh + 6, "<H", 1)
    refused(src, tmp_path, "data/0", "encrypted", error=UnsupportedError)


def test_member_marked_as_a_folder_is_refused(tmp_path):
    """miniz extracts a member with the MS-DOS folder attribute as nothing: torch's tensor would
    hold whatever memory it got, prebake's the file's bytes."""
    src = rewrite(saved(tmp_path), tmp_path / "folder.pt")
    cd, _ = headers(src)[member(src, "data/0")]
    patch(src, cd + 38, "<I", 0x10)  # external attributes
    loaded = torch_load(src)
    assert loaded is None or not torch.equal(loaded["w"], torch.arange(16.0))
    refused(src, tmp_path, "data/0", "marked as a folder")


def end_records(path: Path) -> tuple[int, int]:
    """Offsets of the zip64 end locator and of the zip64 end record before it."""
    eocd = path.read_bytes().rindex(b"PK\x05\x06")
    return eocd - 20, eocd - 20 - 56


@pytest.mark.parametrize(("where", "fmt", "value", "words"), [
    pytest.param("central+34", "<H", 2, ("data/0", "disk 2"), id="member-on-disk-2"),
    pytest.param("central+8", "<H", 0x20, ("data/0", "flags 0x0020"), id="patched-data"),
    pytest.param("central+8", "<H", 0x40, ("data/0", "flags 0x0040"), id="strong-encryption"),
    pytest.param("central+20", "<I", 63, ("data/0", "63 stored, 64 unpacked"), id="stored-sizes-differ"),
    pytest.param("end64+16", "<L", 1, ("several disks",), id="zip64-disk-number"),
    pytest.param("end64+24", "<Q", 99, ("counts 99",), id="zip64-entry-count"),
    pytest.param("last+30", "<H", 40, ("last entry", "runs past its end"), id="last-entry-extra-length"),
    pytest.param("locator+8", "<Q", 1 << 40, ("locator points past",), id="zip64-locator-offset"),
    pytest.param("locator+16", "<L", 2, ("multiple disks",), id="zip64-locator-disks"),
])
def test_archive_fields_torch_refuses_are_refused(tmp_path, where, fmt, value, words):
    """What miniz (torch's zip reader) refuses and Python's zipfile lets through."""
    src = saved(tmp_path)
    cd, _ = headers(src)[member(src, "data/0")]
    locator, end64 = end_records(src)
    last = max(central for central, _ in headers(src).values())
    base = {"central": cd, "end64": end64, "locator": locator, "last": last}[where.split("+")[0]]
    patch(src, base + int(where.split("+")[1]), fmt, value)
    assert torch_load(src) is None
    refused(src, tmp_path, *words, error=PrebakeError)


def test_zip64_record_out_of_place_is_refused(tmp_path):
    """zipfile reads the zip64 end record just before its locator, miniz where the locator
    points: a file where they differ could hold two central directories."""
    src = saved(tmp_path)
    patch(src, end_records(src)[0] + 8, "<Q", 0)  # miniz looks for the record at byte 0, finds none
    refused(src, tmp_path, "not where its locator points")
    broken = saved(tmp_path, name="broken.pt")
    patch(broken, end_records(broken)[1], "<I", 0)  # no record anywhere: zipfile's fallback misplaces the directory
    refused(broken, tmp_path, "not a readable torch zip")


def test_bytes_before_the_archive_are_refused(tmp_path):
    """zipfile shifts every offset past bytes prepended to a zip; torch's reader may not."""
    plain = rewrite(saved(tmp_path), tmp_path / "plain.pt")  # no zip64 records
    shifted = tmp_path / "shifted.pt"
    shifted.write_bytes(b"PK\x03\x04" + bytes(60) + plain.read_bytes())
    refused(shifted, tmp_path, "64 bytes before its first member")
    shifted.write_bytes(b"PK\x03\x04" + bytes(60) + saved(tmp_path).read_bytes())  # the locator no longer fits
    refused(shifted, tmp_path, "not where its locator points")


def test_serialization_id_that_is_not_utf8_is_refused(tmp_path):
    src = rewrite(saved(tmp_path), tmp_path / "id.pt", replace={".data/serialization_id": b"\xff" * 40})
    assert torch_load(src) is None
    refused(src, tmp_path, "serialization_id", "UTF-8")


def test_corrupt_deflated_data_pkl(tmp_path):
    src = rewrite(saved(tmp_path), tmp_path / "deflated.pt", deflate=("data.pkl",))
    bakes_like_torch(src, tmp_path)  # torch inflates a deflated data.pkl: so does prebake
    name = member(src, "data.pkl")
    _, lh = headers(src)[name]
    start = lh + 30 + len(name)
    patch(src, start, "<I", 0xFFFFFFFF)  # zlib.error before
    refused(src, tmp_path / "x", f"member {name}", "Error")


def test_local_header_past_the_end(tmp_path):
    src = rewrite(saved(tmp_path), tmp_path / "bad.pt")
    cd, _ = headers(src)[member(src, "data/0")]
    patch(src, cd + 42, "<I", src.stat().st_size - 10)  # struct.error before
    refused(src, tmp_path, "data/0", f"at byte {src.stat().st_size - 10}", "do not fit the file")
    inside = rewrite(saved(tmp_path), tmp_path / "inside.pt")  # a header offset into the directory
    cd, _ = headers(inside)[member(inside, "data/0")]
    patch(inside, cd + 42, "<I", min(offset for offset, _ in headers(inside).values()))
    refused(inside, tmp_path, "data/0", "local header")


def test_storage_bytes_may_not_run_into_the_next_header(tmp_path):
    """A crafted extra length moves a storage's start; its bytes must still lie in its member."""
    base = saved(tmp_path, {"a": torch.arange(16.0), "b": torch.ones(16)})
    src = rewrite(base, tmp_path / "extra.pt")
    _, lh = headers(src)[member(src, "data/0")]
    patch(src, lh + 28, "<H", 40)
    refused(src, tmp_path, "data/0", "next zip header")
    named = rewrite(base, tmp_path / "named.pt")
    _, lh = headers(named)[member(named, "data/1")]
    patch(named, lh + 30, "B", ord("X"))  # the local name no longer matches the directory's
    refused(named, tmp_path, "bad zip local header", "data/1")


def test_nul_in_a_member_name_is_refused(tmp_path):
    """zipfile cuts a name at a NUL byte, torch does not: both would read different members."""
    base = saved(tmp_path)
    prefix = member(base, "data.pkl").split("/")[0]
    src = rewrite(base, tmp_path / "nul.pt", extra=[(f"{prefix}/versionQx", b"3\n")])
    src.write_bytes(src.read_bytes().replace(b"versionQx", b"version\0x"))
    refused(src, tmp_path, "NUL")


@pytest.mark.parametrize(("edit", "words"), [
    ({"extra": [("{p}/evil.py", b"import os")]}, ("{p}/evil.py", "not part of a torch.save checkpoint")),
    ({"extra": [("other/data.pkl", b"")]}, ("other/data.pkl", "not part of")),
    ({"extra": [("{p}/data/1", b"x" * 8)]}, ("{p}/data/1", "pickle does not name")),
    ({"drop": ("version",)}, ("missing", "version")),
    ({"replace": {"version": b"99\n"}}, ("file format version", "99")),
    ({"replace": {"version": b"x\n"}}, ("file format version",)),
    ({"replace": {".storage_alignment": b"x"}}, (".storage_alignment", "not a number")),
    ({"replace": {"byteorder": b"middle"}}, ("byteorder", "neither little nor big")),
])
def test_members_outside_torch_layout_are_refused(tmp_path, edit, words):
    base = saved(tmp_path)
    prefix = member(base, "data.pkl").split("/")[0]
    edit = {k: [(n.format(p=prefix), d) for n, d in v] if k == "extra" else v for k, v in edit.items()}
    src = rewrite(base, tmp_path / "bad.pt", **edit)
    refused(src, tmp_path, *(w.format(p=prefix) for w in words), error=PrebakeError)


def test_older_torch_layouts_still_bake(tmp_path):
    """torch 1.6 wrote archive/data.pkl, archive/data/<key> and archive/version, nothing else."""
    base = saved(tmp_path, {"w": torch.arange(16.0), "b": torch.ones(2, 3)})
    old = rewrite(base, tmp_path / "old.pt", rename="archive",
                  drop=("byteorder", ".format_version", ".storage_alignment", ".data/serialization_id"))
    bakes_like_torch(old, tmp_path)
    data_version = rewrite(base, tmp_path / "dv.pt", drop=("version",),
                           extra=[(member(base, "/version").replace("/version", "/.data/version"), b"3\n")])
    bakes_like_torch(data_version, tmp_path / "dv")


@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_one_error_line_from_the_command_line(tmp_path):
    base = saved(tmp_path)
    prefix = member(base, "data.pkl").split("/")[0]
    src = rewrite(base, tmp_path / "dup.pt", extra=[(f"{prefix}/data/0", bytes(64))])
    one_error_line(cli("convert", src, tmp_path / "out"), src, "appears twice")


# ---------------------------------------------------------------------------------------------
# memory: tiny files that used to allocate gigabytes, and loops that never ended


BINPUT_BOMB = b"\x80\x02}r\x00\x00\x00\x10."  # LONG_BINPUT 2**28: the C unpickler sizes its memo by it


def test_memo_index_bomb_is_refused_before_allocating(tmp_path):
    src = with_pickle(tmp_path, BINPUT_BOMB)
    assert peak_memory(lambda: read_torch_zip(str(src))) < 32 << 20
    refused(src, tmp_path, "memo index 268435456")


def test_bytearray_of_a_huge_size_is_refused(tmp_path):
    src = with_pickle(tmp_path, {"w": tensor(), "pad": Call(bytearray, 3 << 30)})
    assert peak_memory(lambda: read_torch_zip(str(src))) < 32 << 20
    refused(src, tmp_path, "bytearray(3221225472)", error=UnsupportedError)


def test_codec_that_expands_is_refused(tmp_path):
    import codecs
    src = with_pickle(tmp_path, {"w": tensor(), "x": Call(codecs.encode, b"ab" * 8, "hex")})
    refused(src, tmp_path, "_codecs.encode", error=UnsupportedError)


def test_deflate_bomb_in_data_pkl_is_refused_unread(tmp_path):
    base = saved(tmp_path)
    src = tmp_path / "bomb.pt"
    with zipfile.ZipFile(base) as zin, zipfile.ZipFile(src, "w") as zout:
        for info in zin.infolist():
            if not info.filename.endswith("data.pkl"):
                zout.writestr(info.filename, zin.read(info))
                continue
            bomb = zipfile.ZipInfo(info.filename)
            bomb.compress_type = zipfile.ZIP_DEFLATED
            with zout.open(bomb, "w", force_zip64=True) as w:
                w.write(zin.read(info))
                for _ in range(96):  # 96 MiB of padding after STOP: 100 KB deflated
                    w.write(bytes(1 << 20))
    assert src.stat().st_size < 1 << 20
    assert peak_memory(lambda: read_torch_zip(str(src))) < 32 << 20
    refused(src, tmp_path, "data.pkl", "more than the")


def test_sets_beyond_the_budget_are_refused(tmp_path):
    """EMPTY_SET costs one byte and builds 200: a pickle of them must not build gigabytes."""
    many = b"\x80\x04]" + (b"(" + b"\x8f" * 10_000 + b"e") * 100 + b"."  # 1 MB: 1,000,000 sets
    src = with_pickle(tmp_path, many)
    assert peak_memory(lambda: read_torch_zip(str(src))) < 32 << 20
    refused(src, tmp_path, "MiB of objects")


def test_repeated_copies_of_one_list_are_refused(tmp_path):
    """torch.Size(memoized list) again and again: each call copies the list."""
    big = list(range(50_000))
    calls = b"h\x01h\x02\x85R0" * 20_000  # torch.Size(big), discarded, 20,000 times: 8 GB of copies
    data = b"\x80\x02ctorch\nSize\nq\x01" + ops(big).replace(b"]q\x00", b"]q\x02", 1) + b"0" + calls + b"N."
    assert scan(data).end == len(data)
    src = with_pickle(tmp_path, data)
    assert peak_memory(lambda: read_torch_zip(str(src))) < 32 << 20
    refused(src, tmp_path, "torch.Size")


def test_dict_that_contains_itself_is_refused(tmp_path):
    """{"w": t, "loop": <itself>} looped forever, making names without end."""
    loop = b"X\x04\x00\x00\x00loopj\xe8\x03\x00\x00"  # "loop": memo 1000, the dict itself
    data = b"\x80\x02}r\xe8\x03\x00\x00(X\x01\x00\x00\x00w" + ops(tensor()) + loop + b"u."
    refused(with_pickle(tmp_path, data), tmp_path, "contains itself", "'loop'")
    in_list = b"\x80\x02}(X\x01\x00\x00\x00w]r\xe8\x03\x00\x00(" + ops(tensor()) + b"j\xe8\x03\x00\x00eu."
    refused(with_pickle(tmp_path, in_list, "list.pt"), tmp_path, "contains itself")


@pytest.mark.parametrize("opener", [b"]", b"}X\x01\x00\x00\x00k"], ids=["lists", "dicts"])
def test_deep_nesting_is_refused(tmp_path, opener):
    """100,000 nested containers: RecursionError (lists) or a quadratic pile of names (dicts)."""
    depth = 100_000
    closer = b"a" if opener == b"]" else b"s"
    data = b"\x80\x02" + opener * depth + ops(tensor()) + closer * depth + b"."
    refused(with_pickle(tmp_path, data), tmp_path, "deeper than 256 levels")


def test_deeply_nested_key_does_not_crash(tmp_path):
    """A dict key of 2,000,000 nested tuples (2 MB): hashing it overflowed the C stack (SIGSEGV)."""
    data = b"\x80\x02}(X\x01\x00\x00\x00w" + ops(tensor()) + b"N" + b"\x85" * 2_000_000 + b"K\x01u."
    src = with_pickle(tmp_path, data)
    code = ("import sys; from prebake.formats.torch_zip import read_torch_zip; "
            "f = read_torch_zip(sys.argv[1]); print([t.name for t in f.tensors], len(f.skipped))")
    proc = subprocess.run([sys.executable, "-c", code, str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["['w']", "1"]


def test_shared_container_that_multiplies_names_is_refused(tmp_path):
    """One 1000-entry dict referenced 100,000 times would name 10**8 tensors."""
    inner = {f"k{i}": tensor(size=(1,), offset=i % 16) for i in range(1000)}
    body = ops(inner).replace(b"}q\x00", b"}r\x60\xea\x00\x00", 1)  # memo 60000: above the body's own
    refs = b"(" + b"j\x60\xea\x00\x00" * 100_000 + b"l"
    data = b"\x80\x02}(X\x01\x00\x00\x00a" + body + b"X\x01\x00\x00\x00b" + refs + b"u."
    assert scan(data).end == len(data)
    refused(with_pickle(tmp_path, data), tmp_path, "far more entries")


def test_shared_container_referenced_twice_bakes_like_torch(tmp_path):
    shared = {"w": torch.arange(16.0)}
    src = saved(tmp_path, {"a": shared, "b": shared}, name="shared.pt")
    convert(src, tmp_path / "out")
    loaded = check_bake(tmp_path / "out", {"a.w": shared["w"], "b.w": shared["w"]})
    assert loaded["a.w"].data_ptr() == loaded["b.w"].data_ptr()


# ---------------------------------------------------------------------------------------------
# the legacy format: counts and sizes checked against the bytes left


def legacy_parts(path: Path) -> list[bytes]:
    """The five pickles of a legacy checkpoint and what follows them (the storages)."""
    data = path.read_bytes()
    f, parts, start = io.BytesIO(data), [], 0
    for _ in range(5):
        for _ in pickletools.genops(f):
            pass
        parts.append(data[start:f.tell()])
        start = f.tell()
    return [*parts, data[start:]]


def legacy(tmp: Path, name: str, **edits) -> Path:
    """The legacy base checkpoint ({"w": 16 floats}) with pickles replaced: p3 the object tree,
    p4 the key list, p5 the storages; a callable gets the storage key (a pointer value, new on
    every save) and the part it replaces."""
    parts = legacy_parts(saved(tmp, zipped=False, name=f"{name}.base"))
    key = pickle.loads(parts[4])[0]
    for index, make in edits.items():
        part = int(index[1:])
        parts[part] = make(key, parts[part]) if callable(make) else make
    path = tmp / name
    path.write_bytes(b"".join(parts))
    return path


def legacy_tree(key, numel=16, view=None, **fields) -> bytes:
    """A legacy object pickle {"w": tensor} over storage ``key`` (persistent ids carry a view)."""
    return dumps({"w": tensor(storage=Storage(key, numel, view=(view,)), **fields)})


def test_legacy_bad_tensor_and_storage_fields(tmp_path):
    bad = legacy(tmp_path, "neg.pt", p3=lambda k, _: legacy_tree(k, offset=-8))
    refused(bad, tmp_path, "tensor 'w'", "negative")
    huge = legacy(tmp_path, "huge.pt", p3=lambda k, _: legacy_tree(k, numel=1 << 40),
                  p5=lambda k, data: struct.pack("<q", 1 << 40) + data[8:])
    refused(huge, tmp_path, "storage '", "truncated")  # checked before anything is read
    view = legacy(tmp_path, "view.pt", p3=lambda k, _: legacy_tree(k, view=("v", 12, 8), size=(8,)))
    refused(view, tmp_path, "storage view 'v'", "reaches past")
    count = legacy(tmp_path, "count.pt", p3=lambda k, _: legacy_tree(k, numel=8, size=(8,)))
    refused(count, tmp_path, "header says 16 elements, the pickle 8")
    twice = legacy(tmp_path, "twice.pt", p4=lambda k, _: dumps([k, k]))
    refused(twice, tmp_path, "twice")


def test_legacy_header_memo_bomb(tmp_path):
    src = legacy(tmp_path, "bomb.pt", p2=BINPUT_BOMB)
    assert peak_memory(lambda: read_torch_legacy(str(src))) < 32 << 20
    refused(src, tmp_path, "memo index")


def test_legacy_storage_view_bakes_like_torch(tmp_path):
    src = legacy(tmp_path, "view.pt", p3=lambda k, _: legacy_tree(k, view=("v", 4, 8), offset=2, size=(4,)))
    loaded = bakes_like_torch(src, tmp_path)
    assert loaded["w"].tolist() == [6.0, 7.0, 8.0, 9.0]


# ---------------------------------------------------------------------------------------------
# the opcode scanner


@pytest.mark.parametrize(("data", "words"), [
    (b"\x80\x04\x8e" + struct.pack("<Q", 1 << 40) + b".", ("BINBYTES8", "declares 1099511627776 bytes")),
    (b"\x80\x02X\xff\xff\xff\x7f.", ("BINUNICODE", "declares")),
    (b"\x80\x02\x82\x01.", ("EXT1", "copyreg")),
    (b"\x80\x05\x97.", ("NEXT_BUFFER", "out-of-band")),
    (b"\x80\x02\xff.", ("unknown opcode 0xff",)),
    (b"\x80\x02}", ("truncated",)),
    (b"\x80\x02}p99999999\n.", ("memo index 99999999",)),
    (b"\x80\x04\x95" + struct.pack("<Q", 1 << 40) + b".", ("FRAME", "declares")),
])
def test_scanner_refuses_before_the_unpickler(data, words):
    with pytest.raises(FormatError) as info:
        scan(data)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("protocol", range(6))
def test_scanner_finds_the_end_of_every_kind_of_pickle(protocol):
    values = [None, True, 1, -1, 255, 65535, 1 << 40, -(1 << 70), 1.5, "", "x" * 100, "y" * 300,
              "é" * 70, b"", b"z" * 200, bytearray(b"ab"), (1,), (1, 2), (1, 2, 3), tuple(range(9)),
              [1, [2, {3: 4}]], {"a": {1, 2}}, frozenset({5}), complex(1, 2), list(range(70_000))]
    data = pickle.dumps(values, protocol=protocol) + b"trailing"
    assert scan(data).end == len(data) - len(b"trailing")


def test_scanner_memo_limit_grows_with_the_pickle():
    """A real pickle's memo indices pass at any size (here 200,000 memoized strings)."""
    data = pickle.dumps([str(i) for i in range(200_000)], protocol=2)
    assert scan(data).end == len(data)


def test_refusal_keeps_pickle_code_from_running(tmp_path):
    import os
    src = with_pickle(tmp_path, {"w": tensor(), "x": Call(os.system, "touch " + str(tmp_path / "ran"))})
    refused(src, tmp_path, "refus", "system", error=UnsafePickleError)
    assert not (tmp_path / "ran").exists()
