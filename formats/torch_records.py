"""What a torch checkpoint's pickle may build: storage and tensor records, checked as torch checks them.

The restricted unpickler (:mod:`prebake.formats.torch_pickle`) hands the tensor globals a
pickle names to the functions in :data:`TENSOR_CALLABLES` (through :class:`Allowed`, which
passes the unpickler as their first argument) and its persistent ids to
:func:`storage_from_pid`. Each checks its arguments the way ``torch.load`` would (types, int64
range, offsets and strides inside the storage); nothing here allocates in proportion to a
number from the file.

A tensor that torch would refuse becomes a :class:`TensorRecord` with a ``problem``: the reader
raises it under the tensor's name once it knows the name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from prebake.formats.errors import FormatError, UnsupportedError
from prebake.formats.tensor import DTYPE_SIZES, FLOAT_DTYPES

# torch storage class name -> safetensors dtype code
STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "F64", "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16",
    "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8",
    "ByteStorage": "U8", "BoolStorage": "BOOL", "ComplexFloatStorage": "C64",
    "UInt16Storage": "U16", "UInt32Storage": "U32", "UInt64Storage": "U64",
    "Float8_e4m3fnStorage": "F8_E4M3", "Float8_e5m2Storage": "F8_E5M2", "Float8_e8m0fnuStorage": "F8_E8M0",
    "UntypedStorage": "U8",
}
# torch dtype attribute name -> safetensors dtype code (pickled as GLOBAL torch <name>)
TORCH_DTYPES: dict[str, str] = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
    "uint16": "U16", "uint32": "U32", "uint64": "U64", "complex64": "C64",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "float8_e8m0fnu": "F8_E8M0",
}
MAX_INT = (1 << 63) - 1  # torch sizes, strides, offsets and byte counts are int64
MAX_DIMS = 32  # numpy's limit before 2.0
_MAX_KEY = 256
_LOCATION = re.compile(r"[A-Za-z_]+(:[0-9]+)?")  # "cpu", "cuda:1", "mps", "npu:0", ...


class Inert:
    """Base of everything a pickle may name: ``BUILD`` on it is refused, no attribute is set."""

    __slots__ = ()
    what = "an object"

    def __setstate__(self, state):
        raise UnsupportedError(f"the pickle sets state (BUILD) on {self.what}, which torch.save never writes")


class Allowed(Inert):
    """An allowed global: calls ``fn(unpickler, *args)``, so it can check and charge its arguments.

    A slotted object, not a bound method: BUILD on a bound method would write into the
    function's ``__dict__``; here it is refused.
    """

    __slots__ = ("fn", "what", "unpickler")

    def __init__(self, fn, what: str, unpickler):
        self.fn, self.what, self.unpickler = fn, what, unpickler

    def __call__(self, *args):
        return self.fn(self.unpickler, *args)

    def __repr__(self) -> str:  # in names (a global used as a dict key): no memory address
        return self.what


class Tag(Inert):
    """A global that only names something: a storage type, a dtype, ``torch.Tensor``."""

    __slots__ = ("what", "kind", "dtype")

    def __init__(self, what: str, kind: str, dtype: str | None = None):
        self.what, self.kind, self.dtype = what, kind, dtype

    def __repr__(self) -> str:
        return self.what


@dataclass(slots=True)
class StorageRecord:
    """A storage named by a pickle's persistent id; its bytes live elsewhere in the file.

    ``nbytes`` is the storage's size; ``start`` its first byte inside the root storage ``key``
    (non-zero only for the legacy format's storage views).
    """

    key: str
    dtype: str
    nbytes: int
    start: int = 0
    untyped: bool = False  # a torch.UntypedStorage: bytes, and no element type of its own

    def __setstate__(self, state):
        raise UnsupportedError(f"the pickle sets state (BUILD) on storage {self.key!r}")


@dataclass(slots=True)
class TensorRecord:
    """What ``torch._utils._rebuild_tensor_v2`` would have built, as plain data.

    ``problem`` says why torch would refuse it (then the other fields are placeholders).
    """

    storage: StorageRecord | None
    offset: int  # in elements of `dtype`
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: str
    problem: str | None = None

    def __setstate__(self, state):
        raise UnsupportedError("the pickle sets state (BUILD) on a tensor, which torch.save never writes")


def check_int(value, what: str) -> int:
    """``value`` if it is an int in [0, 2**63) (torch's int64, never negative here), else refused."""
    if type(value) is not int:
        raise FormatError(f"{what} is {shown(value)}, not an integer")
    if value < 0:
        raise FormatError(f"{what} is negative ({value})")
    if value > MAX_INT:
        raise FormatError(f"{what} ({shown(value)}) overflows int64")
    return value


def shown(value) -> str:
    """A value for an error message: numbers and strings as they are (cut at 40), else the type."""
    return repr(value)[:40] if type(value) in (int, float, bool, str) else f"a {type(value).__name__}"


# ---------------------------------------------------------------------------------------------
# persistent ids: storages


def storage_from_pid(u, pid) -> StorageRecord:
    """The storage a persistent id names: ``("storage", type, key, location, numel[, view])``.

    The first id that names a key fixes its dtype and size, as in torch. ``location`` (the
    device it was saved from, ``"cuda:0"``) must look like a device name; which device is not
    checked (torch refuses one it cannot map to on the machine that loads it): the bytes are
    the same wherever they go.
    """
    if type(pid) is not tuple or not pid or pid[0] not in ("storage", b"storage"):
        kind = pid[0] if type(pid) is tuple and pid else type(pid).__name__
        raise UnsupportedError(f"unknown persistent id kind {shown(kind)} in the pickle")
    fields = 6 if u.legacy else 5
    if len(pid) != fields:
        raise FormatError(f"a storage persistent id has {len(pid)} fields, not {fields}")
    storage_type, key, numel = pid[1], pid[2], pid[4]
    if type(key) not in (str, int) or len(key := str(key)) > _MAX_KEY:  # torch writes "0", "1", ...
        raise FormatError(f"a storage key is {shown(pid[2])}, not a short string")
    if type(storage_type) is not Tag or storage_type.kind != "storage":
        raise FormatError(f"storage {key!r} has type {shown(storage_type)}, not a torch storage type")
    if not (type(pid[3]) is str and _LOCATION.fullmatch(pid[3])):
        raise FormatError(f"storage {key!r} has location {shown(pid[3])}, not a device name")
    nbytes = numel * DTYPE_SIZES[storage_type.dtype] if type(numel) is int else -1
    if not 0 <= nbytes <= MAX_INT:
        check_int(numel, f"storage {key!r}'s element count")
        check_int(nbytes, f"storage {key!r}'s size in bytes")
    root = u.storages.get(key)
    if root is None:
        root = u.storages[key] = StorageRecord(key, storage_type.dtype, nbytes,
                                               untyped=storage_type.what.endswith("UntypedStorage"))
    if u.legacy and pid[5] is not None:
        return _storage_view(u, root, pid[5], storage_type.dtype)
    return root


def _storage_view(u, root: StorageRecord, view, dtype: str) -> StorageRecord:
    """A legacy storage view ``(view_key, offset, size)``, in elements of ``dtype``, inside ``root``."""
    if type(view) is not tuple or len(view) != 3 or type(view[0]) not in (str, int):
        raise FormatError(f"storage {root.key!r} has a malformed view {shown(view)}")
    itemsize = DTYPE_SIZES[dtype]
    start = check_int(view[1], f"storage view {view[0]!r}'s offset") * itemsize
    nbytes = check_int(view[2], f"storage view {view[0]!r}'s size") * itemsize
    if start + nbytes > root.nbytes:
        raise FormatError(f"storage view {view[0]!r} (bytes {start}-{start + nbytes}) reaches past "
                          f"storage {root.key!r} ({root.nbytes} bytes)")
    found = u.views.get(view[0])
    if found is None:  # torch keeps the first view of a key, as it keeps the first storage
        found = u.views[view[0]] = StorageRecord(root.key, dtype, nbytes, start, root.untyped)
    return found


# ---------------------------------------------------------------------------------------------
# tensors


def _storage_dtype(storage) -> tuple[str | None, str | None]:
    """The element type the older rebuilds take from their storage, or why there is none: torch
    writes an untyped storage only with ``_rebuild_tensor_v3``, which names the dtype itself."""
    if type(storage) is not StorageRecord:
        return None, None
    if storage.untyped:
        return None, "its storage is a torch.UntypedStorage, which has no element type (torch.load fails on it)"
    return storage.dtype, None


def _rebuild_tensor(u, storage, storage_offset, size, stride):
    dtype, problem = _storage_dtype(storage)
    return _record(u, storage, storage_offset, size, stride, dtype, problem=problem)


def _rebuild_tensor_v2(u, storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    dtype, problem = _storage_dtype(storage)
    return _record(u, storage, storage_offset, size, stride, dtype, requires_grad, metadata, problem)


def _rebuild_tensor_v3(u, storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       metadata=None):
    code = dtype.dtype if isinstance(dtype, Tag) and dtype.kind == "dtype" else None
    problem = None if code else f"its dtype is {shown(dtype)}, not a torch dtype"
    if requires_grad is True and not problem:  # torch makes it with requires_grad, then set_() fails on it
        problem = "it is rebuilt by _rebuild_tensor_v3 with requires_grad, which torch.load cannot build"
    return _record(u, storage, storage_offset, size, stride, code, requires_grad, metadata, problem)


def _record(u, storage, offset, size, stride, dtype, requires_grad=False, metadata=None,
            problem=None) -> TensorRecord:
    """A checked record; one torch would refuse gets its ``problem`` instead of a layout.

    Records are charged nothing: each is smaller than the scan's estimate for the opcodes
    that build it (a REDUCE, its callable and its arguments: 256 bytes at least).
    """
    # The fast path, inline (this runs once per tensor): a tensor as torch.save writes it,
    # up to 8 positive dims, well inside its storage. Anything else takes the slow path.
    if (problem is None and type(storage) is StorageRecord and type(offset) is int and offset >= 0
            and type(size) is tuple and type(stride) is tuple and len(size) == len(stride) <= _PLAIN_DIMS
            and requires_grad is False and not metadata and storage.start == 0):
        count = span = 1
        for d, s in zip(size, stride):  # noqa: B905 (lengths checked above)
            if type(d) is not int or type(s) is not int or d <= 0 or not 0 <= s <= _PLAIN_STRIDE:
                break
            count *= d
            span += (d - 1) * s
        else:
            if count <= _PLAIN_STRIDE and (offset + span) * DTYPE_SIZES[dtype] <= storage.nbytes:
                return TensorRecord(storage, offset, size, stride, dtype)
    problem = problem or _tensor_problem(storage, offset, size, stride, dtype, requires_grad, metadata)
    if not problem:
        u.budget.charge(16 * len(size), "tensor sizes")  # tuple(list) copies
        return TensorRecord(storage, offset, tuple(size), tuple(stride), dtype)
    record = TensorRecord(storage if isinstance(storage, StorageRecord) else None, 0, (), (), "U8", problem)
    u.problems.append(record)
    return record


_PLAIN_DIMS = 8
_PLAIN_STRIDE = MAX_INT >> 4  # times an item size of 8 or less still fits int64


def _tensor_problem(storage, offset, size, stride, dtype, requires_grad, metadata) -> str | None:
    """Why ``torch.load`` would refuse this tensor (or prebake cannot map it), or None."""
    if not isinstance(storage, StorageRecord):
        return f"it is built on {shown(storage)}, not a storage"
    try:
        check_int(offset, "its storage offset")
        for name, dims in (("size", size), ("stride", stride)):
            if type(dims) not in (tuple, list):
                return f"its {name} is {shown(dims)}, not a tuple of integers"
            for i, d in enumerate(dims):
                check_int(d, f"its {name}[{i}]")
    except FormatError as e:
        return e.message
    if len(size) != len(stride):
        return f"it has {len(size)} dimensions but {len(stride)} strides"
    if len(size) > MAX_DIMS:
        return f"it has {len(size)} dimensions (at most {MAX_DIMS} are supported)"
    return (_layout_problem(storage, offset, size, stride, DTYPE_SIZES[dtype])
            or _flags_problem(dtype, requires_grad, metadata))


def _layout_problem(storage: StorageRecord, offset: int, size, stride, itemsize: int) -> str | None:
    """Checks the tensor's bytes against int64 and its storage, as torch's ``set_`` does."""
    count, span = 1, 1
    for d, s in zip(size, stride, strict=True):
        count *= d
        span += (d - 1) * s
        if s * itemsize > MAX_INT:
            return f"its stride {s} overflows int64 in bytes"
    if count * itemsize > MAX_INT:
        return f"its size {tuple(size)} overflows int64 in bytes"
    if count == 0:  # torch accepts any offset for an empty tensor; nothing is read
        return None
    end = (offset + span) * itemsize
    if end > storage.nbytes:
        return (f"it reaches past its storage (storage offset {offset}, sizes {tuple(size)}, strides "
                f"{tuple(stride)} need {end} bytes, storage {storage.key!r} holds {storage.nbytes})")
    if storage.start % itemsize:  # a legacy view of another dtype: bytes between items
        return f"it starts at byte {storage.start} of storage {storage.key!r}, inside an item"
    return None


def _flags_problem(dtype: str, requires_grad, metadata) -> str | None:
    if type(requires_grad) is not bool:
        return f"its requires_grad is {shown(requires_grad)}, not a bool"
    if requires_grad and dtype not in FLOAT_DTYPES and dtype != "C64":
        return f"it requires grad but its dtype {dtype} is not floating point (torch.load refuses it)"
    if metadata is None or metadata == {}:
        return None
    if type(metadata) is not dict or not set(metadata) <= {"conj", "neg"}:
        return f"its metadata {shown(metadata)} is not torch's (conj and neg bits)"
    if any(metadata.values()):
        bits = " and ".join(k for k, v in metadata.items() if v)
        return (f"it has its {bits} bit set: torch.load returns it negated or conjugated, its "
                "bytes do not; save t.resolve_conj().resolve_neg() instead")
    return None


def _rebuild_parameter(u, data, requires_grad, backward_hooks):
    if not isinstance(data, TensorRecord):
        raise FormatError(f"a Parameter is built from {shown(data)}, not a tensor")
    if data.problem is None:  # a Parameter with a grad on integers: torch refuses it
        problem = _flags_problem(data.dtype, requires_grad, None)
        if problem:
            data = TensorRecord(data.storage, 0, (), (), "U8", problem)
            u.problems.append(data)
    return data


def _rebuild_parameter_with_state(u, data, requires_grad, backward_hooks, state):
    return _rebuild_parameter(u, data, requires_grad, backward_hooks)


def _rebuild_from_type_v2(u, func, new_type, args, state):
    if not (isinstance(func, Allowed) and func.fn in _TENSOR_REBUILDS):
        raise FormatError(f"_rebuild_from_type_v2 calls {shown(func)}, not a tensor rebuild function")
    if not isinstance(new_type, Tag) or new_type.kind != "type" or type(args) is not tuple:
        raise FormatError(f"_rebuild_from_type_v2 asks for type {shown(new_type)}")
    return func(*args)


def _refuse_kind(what: str):
    def refuse(u, *_args):
        raise UnsupportedError(f"{what} tensors are not supported; convert them to dense tensors first")
    return refuse


_TENSOR_REBUILDS = {_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3}
TENSOR_CALLABLES = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch._utils", "_rebuild_sparse_tensor"): _refuse_kind("sparse"),
    ("torch._utils", "_rebuild_qtensor"): _refuse_kind("quantized (torch.quantization)"),
    ("torch._utils", "_rebuild_nested_tensor"): _refuse_kind("nested"),
    ("torch._utils", "_rebuild_meta_tensor_no_storage"): _refuse_kind("meta"),
    ("torch._utils", "_rebuild_wrapper_subclass"): _refuse_kind("wrapper-subclass"),
}
