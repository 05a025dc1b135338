"""A restricted unpickler for ``torch.save`` pickles that builds descriptions, never objects.

Only the globals in the tables below may be named by a checkpoint's pickle: torch's tensor
rebuild functions and storage types become plain records of (storage, offset, shape, strides);
containers stay containers; a few inert value types (numpy scalars, ``argparse.Namespace``)
become :class:`Opaque` records that are reported and skipped. Any other global, ``os.system``
included, is refused before it is looked up, so nothing from the file ever runs.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import collections
import pickle
from dataclasses import dataclass

from prebake.formats.errors import UnsafePickleError, UnsupportedError

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


@dataclass
class StorageRecord:
    """A storage named by a pickle's persistent id; its bytes live elsewhere in the file."""

    key: str
    dtype: str
    numel: int
    view_offset: int = 0  # legacy storage views: element offset into the root storage


@dataclass
class TensorRecord:
    """What ``torch._utils._rebuild_tensor_v2`` would have built, as plain data."""

    storage: StorageRecord
    offset: int  # in elements of `dtype`
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: str


class Opaque:
    """An inert stand-in for an allowed non-tensor object; records its arguments, runs nothing."""

    qualname = "object"

    def __init__(self, *args):
        self.args = args

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __setstate__(self, state):
        self.state = state


def _opaque(qualname: str) -> type:
    return type("Opaque", (Opaque,), {"qualname": qualname})


class _Marker:
    """A class that only tags ``_rebuild_from_type_v2`` (Tensor, Parameter)."""


def _rebuild_tensor_v2(storage, offset, size, stride, *_ignored) -> TensorRecord:
    return _record(storage, offset, size, stride, storage.dtype)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, *_ignored):
    return _record(storage, offset, size, stride, dtype)


def _record(storage, offset, size, stride, dtype) -> TensorRecord:
    if not isinstance(storage, StorageRecord):
        raise UnsupportedError("a tensor is built on something other than a storage")
    if len(size) != len(stride):
        raise UnsupportedError(f"a tensor has {len(size)} dimensions but {len(stride)} strides")
    return TensorRecord(storage, int(offset) + storage.view_offset, tuple(size), tuple(stride), dtype)


def _rebuild_parameter(data, *_ignored):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    return func(*args)


def _refuse_kind(what: str):
    def refuse(*_args):
        raise UnsupportedError(f"{what} tensors are not supported; convert them to dense tensors first")
    return refuse


_TORCH_GLOBALS = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _Marker,
    ("torch.nn.parameter", "Parameter"): _Marker,
    ("torch._utils", "_rebuild_sparse_tensor"): _refuse_kind("sparse"),
    ("torch._utils", "_rebuild_qtensor"): _refuse_kind("quantized (torch.quantization)"),
    ("torch._utils", "_rebuild_nested_tensor"): _refuse_kind("nested"),
    ("torch._utils", "_rebuild_meta_tensor_no_storage"): _refuse_kind("meta"),
    ("torch._utils", "_rebuild_wrapper_subclass"): _refuse_kind("wrapper-subclass"),
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "slice"): slice,
    ("builtins", "bytearray"): bytearray,
    ("_codecs", "encode"): codecs.encode,  # how protocol-2 pickles spell bytes
    ("torch", "Size"): tuple,
}
# Inert value types that training checkpoints carry: kept as Opaque records, reported, skipped.
_OPAQUE = {
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "numpy.dtype",
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "numpy.ndarray",
    "argparse.Namespace", "torch.device", "torch.torch_version.TorchVersion",
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a torch checkpoint's object tree; storages come back as :class:`StorageRecord`.

    ``legacy`` selects the pre-zip persistent-id layout, which may carry storage views.
    """

    def __init__(self, file, *, legacy: bool = False):
        super().__init__(file)
        self.legacy = legacy
        self.storages: dict[str, StorageRecord] = {}

    def find_class(self, module: str, name: str):
        # torch.save writes protocol 2, which spells Python 3 names the Python 2 way
        # (__builtin__.set, commands.call): translate them as pickle itself would.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        fn = _TORCH_GLOBALS.get((module, name))
        if fn is not None:
            return fn
        if module in ("torch", "torch.storage") and name in STORAGE_DTYPES:
            return _storage_type(STORAGE_DTYPES[name])
        if module == "torch" and name in TORCH_DTYPES:
            return TORCH_DTYPES[name]
        qualname = f"{module}.{name}"
        if qualname in _OPAQUE:
            return _opaque(qualname)
        if module.startswith("torch.nn.modules") or module.startswith("transformers."):
            raise UnsafePickleError(
                f"the checkpoint pickles a whole object ({qualname}), not a state dict; "
                "save model.state_dict() instead (loading it would run that class's code)")
        raise UnsafePickleError(
            f"refusing to load: the pickle calls {qualname}, which is not a tensor, storage or "
            "container (nothing from the file was run)")

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            kind = pid[0] if isinstance(pid, tuple) and pid else type(pid).__name__
            raise UnsupportedError(f"unknown persistent id kind {kind!r} in the pickle")
        if self.legacy:
            _, storage_type, key, _location, numel, view = (*pid, None)[:6]
        else:
            _, storage_type, key, _location, numel = pid[:5]
            view = None
        if not isinstance(storage_type, _StorageType):
            raise UnsupportedError(f"storage {key!r} has an unknown type")
        key = str(key)
        root = self.storages.get(key)
        if root is None:
            root = self.storages[key] = StorageRecord(key, storage_type.dtype, int(numel))
        if view is not None:
            view_key, offset, _size = view
            return StorageRecord(key, root.dtype, root.numel, int(offset))
        return root


class _StorageType:
    def __init__(self, dtype: str):
        self.dtype = dtype


def _storage_type(dtype: str) -> _StorageType:
    return _StorageType(dtype)


def flatten(obj, prefix: str = "") -> tuple[list[tuple[str, TensorRecord]], list[tuple[str, str]]]:
    """Walks a checkpoint's tree; returns (dotted name, tensor) pairs and (name, kind) of other leaves.

    ``{"model": {"w": t}, "epoch": 3}`` gives ``[("model.w", t)]`` and ``[("epoch", "int")]``.
    """
    tensors: list[tuple[str, TensorRecord]] = []
    leaves: list[tuple[str, str]] = []
    stack = [(prefix, obj)]
    while stack:
        name, node = stack.pop()
        if isinstance(node, TensorRecord):
            tensors.append((name, node))
        elif isinstance(node, dict):
            stack.extend((f"{name}.{k}" if name else str(k), v) for k, v in reversed(node.items()))
        elif isinstance(node, (list, tuple)) and any(_holds_tensor(v) for v in node):
            stack.extend((f"{name}.{i}" if name else str(i), v) for i, v in reversed(list(enumerate(node))))
        else:
            kind = node.qualname if isinstance(node, Opaque) else type(node).__name__
            leaves.append((name, kind))
    return tensors, leaves


def _holds_tensor(node) -> bool:
    if isinstance(node, TensorRecord):
        return True
    if isinstance(node, dict):
        return any(_holds_tensor(v) for v in node.values())
    if isinstance(node, (list, tuple)):
        return any(_holds_tensor(v) for v in node)
    return False
