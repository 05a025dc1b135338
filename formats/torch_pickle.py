"""A restricted unpickler for ``torch.save`` pickles that builds descriptions, never objects.

Only the globals in the tables below may be named by a checkpoint's pickle: torch's tensor
rebuild functions and storage types become plain records of (storage, offset, shape, strides);
containers stay containers; a few inert value types (numpy scalars, ``argparse.Namespace``)
become :class:`Opaque` records that are reported and skipped. Any other global, ``os.system``
included, is refused before it is looked up, so nothing from the file ever runs.

The pickle is first checked by :func:`~prebake.formats.pickle_scan.scan` (memo indices,
lengths, an estimate of what it builds), and every allowed callable charges what it allocates
to the same budget, so no pickle makes the unpickler allocate much more than its own size.
Everything a pickle can reach (records, callables, storage types, dtypes) refuses ``BUILD``:
the C unpickler would otherwise set attributes on them (``OrderedDict`` state is checked and
set aside, as torch sets it aside from the mapping).

Opcodes keep the C unpickler's standard meaning, which is what ``torch.load(weights_only=False)``
gives them. torch's ``weights_only`` unpickler implements only the protocol-2 subset that
``torch.save`` writes by default, so a checkpoint saved with ``pickle_protocol=4`` (or using
any other standard opcode) bakes here although ``weights_only=True`` refuses it: the opcodes
themselves cannot run code, only globals can, and those are allow-listed the same way.
"""

from __future__ import annotations

import _compat_pickle
import collections
import functools
import io
import pickle
import re
import threading
from dataclasses import dataclass

from prebake.formats.errors import FormatError, UnsafePickleError, UnsupportedError
from prebake.formats.pickle_scan import LIMITS, Limits, Scan, scan
from prebake.formats.torch_records import (
    STORAGE_DTYPES,
    TENSOR_CALLABLES,
    TORCH_DTYPES,
    Allowed,
    StorageRecord,
    Tag,
    TensorRecord,
    shown,
    storage_from_pid,
)


class Budget:
    """Bytes of objects a pickle may still make the unpickler allocate."""

    def __init__(self, found: Scan, total: int):
        self.left = total - found.cost
        self.total = total
        self.check("its opcodes")

    def charge(self, nbytes: int, what: str) -> None:
        self.left -= nbytes
        self.check(what)

    def check(self, what: str) -> None:
        if self.left < 0:
            raise FormatError(f"the pickle would build more than {self.total >> 20} MiB of objects "
                              f"({what}), far more than its size calls for: refused")


class StateDict(collections.OrderedDict):
    """What ``collections.OrderedDict`` is in a pickle: built empty, filled by SETITEMS.

    Its pickled attribute state (``_metadata``) is checked and dropped: torch's loader does
    ``inst.__dict__.update(state)``, attributes, never entries, and keeping them off the object
    means a state named ``items`` or ``keys`` cannot shadow the mapping's methods.
    """

    def __init__(self, *args, **kwargs):
        if args or kwargs:  # copying one list from the memo again and again would multiply memory
            raise UnsupportedError("the pickle calls OrderedDict() with arguments, which pickle itself "
                                   "never writes (it fills an empty one)")

    def __setstate__(self, state):
        try:
            {}.update(state)  # what torch accepts as attribute state; it refuses anything else
        except (TypeError, ValueError) as e:
            raise FormatError(f"an OrderedDict's pickled state is not a mapping ({e}); "
                              "torch.load refuses it too") from None


# The allowed builtins: each checks its arguments and charges what it copies.


def _sized(u, arg, per_item: int, what: str) -> None:
    if hasattr(arg, "__len__"):
        u.budget.charge(64 + per_item * len(arg), what)


def _set(u, *args):
    if args:
        _sized(u, args[0], 64, "set()")
    return set(*args)


def _frozenset(u, *args):
    if args:
        _sized(u, args[0], 64, "frozenset()")
    return frozenset(*args)


def _size(u, dims=()):
    if type(dims) not in (tuple, list) or any(type(d) is not int for d in dims):
        raise FormatError(f"torch.Size is given {shown(dims)}, not integers")
    u.budget.charge(64 + 8 * len(dims), "torch.Size()")
    return tuple(dims)


def _bytearray(u, *args):
    # pickle writes bytearray(bytes) or bytearray(str, "latin-1"); bytearray(n) would
    # allocate n bytes from a number in the file
    data = args[0] if args else b""
    latin1 = len(args) == 2 and type(data) is str and args[1] in ("latin-1", "latin1")
    if not (latin1 or (len(args) <= 1 and type(data) in (bytes, bytearray))):
        raise UnsupportedError(f"bytearray({', '.join(shown(a) for a in args)}) is not how pickle writes a "
                               "bytearray (it would allocate from a number in the file)")
    u.budget.charge(64 + len(data), "bytearray()")
    return bytearray(*args)


def _encode(u, obj, encoding="utf-8", errors="strict"):
    # protocol-2 pickles spell bytes as _codecs.encode(str, "latin1"); other codecs expand
    # (hex doubles, nested calls double again), so only latin1 is allowed
    if type(obj) is not str or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise UnsupportedError(f"_codecs.encode({shown(obj)}, {shown(encoding)}) is not how pickle writes bytes")
    u.budget.charge(64 + len(obj), "_codecs.encode()")
    return obj.encode("latin-1")


def _scalar(kind):
    def build(u, *args):
        if len(args) > 3:
            raise FormatError(f"{kind.__name__}() is given {len(args)} arguments")
        return kind(*args)
    return build


_VALUE_CALLABLES = {
    ("builtins", "set"): _set,
    ("builtins", "frozenset"): _frozenset,
    ("builtins", "complex"): _scalar(complex),
    ("builtins", "slice"): _scalar(slice),
    ("builtins", "bytearray"): _bytearray,
    ("_codecs", "encode"): _encode,
    ("torch", "Size"): _size,
}
_CALLABLES = {**TENSOR_CALLABLES, **_VALUE_CALLABLES}


class Opaque:
    """An inert stand-in for an allowed non-tensor object; records its arguments, runs nothing."""

    qualname = "object"

    def __init__(self, *args):
        low, high = _OPAQUE[self.qualname]
        if not low <= len(args) <= high:
            raise FormatError(f"the pickle calls {self.qualname}() with {len(args)} arguments, which it does not "
                              "take; torch.load fails on it too")
        if args and not _first_argument_ok(self.qualname, args[0]):
            raise FormatError(f"the pickle calls {self.qualname}({shown(args[0])}, ...), which numpy would refuse "
                              "(torch.load fails on it too)")
        if not _torch_call_ok(self.qualname, args):
            raise FormatError(f"the pickle calls {self.qualname}({', '.join(shown(a) for a in args)}), which torch "
                              "refuses (torch.load fails on it too)")
        self._refuse_tensors(args)
        self.args = args

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __setstate__(self, state):
        self.state = state  # tensors in an object's state are found, checked and reported skipped

    def _refuse_tensors(self, args) -> None:
        # None of these types is built from a tensor: one handed to numpy.dtype() or
        # torch.device() would vanish into the skipped record (a bake missing it) where
        # torch.load fails on the same call: refuse instead.
        for v in args:
            if type(v) in (TensorRecord, StorageRecord):
                raise FormatError(f"the pickle passes a tensor or storage to {self.qualname}(), which "
                                  "takes none; torch.load fails on it too")

    def __repr__(self) -> str:  # in names (an object used as a dict key): no memory address
        return f"<{self.qualname}>"


@functools.cache
def _opaque(qualname: str) -> type:
    # a class shared by every pickle: safe, since BUILD on a class that defines __setstate__
    # calls it unbound and fails instead of setting attributes
    return type("Opaque", (Opaque,), {"qualname": qualname})


_NUMPY_DTYPE = re.compile(r"[?bBhHiIlLqQpPefdgFDGSUVOMmuic]\d{0,8}(\[\w+\])?")  # what dtype.__reduce__ writes


def _first_argument_ok(qualname: str, arg) -> bool:
    """numpy's pickled calls, checked as numpy would: dtype('f8'), scalar(dtype, bytes),
    _reconstruct(ndarray, ...)."""
    name = qualname.rsplit(".", 1)[1]
    if name == "dtype":
        return type(arg) is str and _NUMPY_DTYPE.fullmatch(arg) is not None
    if name == "scalar":
        return isinstance(arg, Opaque) and arg.qualname == "numpy.dtype"
    if name == "_reconstruct":
        return isinstance(arg, type) and issubclass(arg, Opaque) and arg.qualname == "numpy.ndarray"
    return True


def _torch_call_ok(qualname: str, args: tuple) -> bool:
    """torch's own value types, checked by building them: ``torch.device`` parses a device string
    (and, on a machine without an accelerator, refuses a bare index, as torch.load then does);
    ``TorchVersion`` is a ``str``. Neither runs anything of the pickle's: the arguments are
    plain values or prebake's inert records."""
    if qualname == "torch.device":
        import torch

        try:
            torch.device(*args)
        except (TypeError, ValueError, RuntimeError):
            return False
    elif qualname == "torch.torch_version.TorchVersion":
        try:
            str(*args)
        except (TypeError, ValueError, LookupError):
            return False
    return True


# Inert value types that training checkpoints carry: kept as Opaque records, reported, skipped.
# Each with the positional arguments its constructor takes when a pickle calls it (REDUCE):
# a call the real type would refuse is refused, as torch.load would fail on it.
_OPAQUE: dict[str, tuple[int, int]] = {
    "numpy.core.multiarray.scalar": (1, 2), "numpy._core.multiarray.scalar": (1, 2),  # (dtype, bytes)
    "numpy.dtype": (1, 4),  # ("f8", align, copy[, metadata])
    "numpy.core.multiarray._reconstruct": (3, 3), "numpy._core.multiarray._reconstruct": (3, 3),
    "numpy.ndarray": (1, 6),  # ndarray(shape, dtype, buffer, offset, strides, order)
    "argparse.Namespace": (0, 0),  # keyword arguments only; pickles set its state instead
    "torch.device": (1, 2),  # ("cuda", 0)
    "torch.torch_version.TorchVersion": (0, 3),  # a str
}
_TYPES = {("torch", "Tensor"), ("torch.nn.parameter", "Parameter")}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a torch checkpoint's object tree; storages come back as :class:`StorageRecord`.

    ``legacy`` selects the pre-zip persistent-id layout, which may carry storage views. Use
    :func:`unpickle`, which scans the pickle first.
    """

    def __init__(self, file, budget: Budget, *, legacy: bool = False):
        super().__init__(file)
        self.legacy = legacy
        self.budget = budget
        self.storages: dict[str, StorageRecord] = {}  # root storages by key, in first-use order
        self.views: dict[object, StorageRecord] = {}
        self.problems: list[TensorRecord] = []  # tensors torch would refuse, named or not

    def find_class(self, module: str, name: str):
        # torch.save writes protocol 2, which spells Python 3 names the Python 2 way
        # (__builtin__.set, commands.call): translate them as pickle itself would.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        qualname = f"{module}.{name}"[:200]  # for messages: a GLOBAL's lines can be any length
        fn = _CALLABLES.get((module, name))
        if fn is not None:
            return Allowed(fn, qualname, self)
        if module in ("torch", "torch.storage") and name in STORAGE_DTYPES:
            if name == "UntypedStorage" and module != "torch.storage":
                # torch.save spells it torch.storage.UntypedStorage; torch's weights-only loader
                # refuses any other spelling, and so does prebake
                raise FormatError(f"the pickle names {qualname}, which torch.save never writes "
                                  "(torch.storage.UntypedStorage); torch.load(weights_only=True) refuses it")
            return Tag(qualname, "storage", STORAGE_DTYPES[name])
        if module == "torch" and name in TORCH_DTYPES:
            return Tag(qualname, "dtype", TORCH_DTYPES[name])
        if (module, name) in _TYPES:
            return Tag(qualname, "type")
        if (module, name) == ("collections", "OrderedDict"):
            return StateDict  # a class, called at C speed (once per tensor: its hooks)
        if qualname in _OPAQUE:
            return _opaque(qualname)
        if module.startswith("torch.nn.modules") or module.startswith("transformers."):
            raise UnsafePickleError(
                f"the checkpoint pickles a whole object ({qualname}), not a state dict; "
                "save model.state_dict() instead (loading it would run that class's code)")
        raise UnsafePickleError(
            f"refusing to load: the pickle calls {qualname}, which is not a tensor, storage or "
            "container (nothing from the file was run)")

    persistent_load = storage_from_pid


@dataclass
class Unpickled:
    """A checkpoint's object tree and what the unpickler learnt building it."""

    obj: object
    storages: dict[str, StorageRecord]
    problems: list[TensorRecord]  # tensors torch would refuse, named or not
    end: int  # offset just past the pickle's STOP
    budget: int  # bytes the walk over the tree may take


def unpickle(buf, start: int = 0, *, legacy: bool = False, file_bytes: int | None = None,
             limits: Limits = LIMITS) -> Unpickled:
    """Scans, then unpickles the pickle at ``buf[start:]`` (bytes or mmap).

    The memory it may build is ``limits.budget(file_bytes)``: the bytes the pickle takes in
    the file (less than its length when it was deflated). Raises :class:`FormatError` (without
    a path: the reader adds it) for anything refused, corrupt or over budget.
    """
    found = scan(buf, start)
    total = limits.budget(found.end - start if file_bytes is None else file_bytes)
    budget = Budget(found, total)
    data = buf if start == 0 and found.end == len(buf) and isinstance(buf, bytes) else buf[start:found.end]
    # BufferedReader has peek(): the C unpickler then reads 1 MiB at a time, not one read() per opcode
    unpickler = RestrictedUnpickler(io.BufferedReader(io.BytesIO(data), 1 << 20), budget, legacy=legacy)
    try:
        obj = load_with_stack(unpickler, data)
    except FormatError:
        raise
    except RecursionError:
        raise FormatError("the pickle nests objects too deeply to rebuild (RecursionError)") from None
    except Exception as e:  # a corrupt pickle raises anything from EOFError to UnpicklingError
        raise FormatError(f"corrupt pickle ({type(e).__name__}: {e})") from None
    return Unpickled(obj, unpickler.storages, unpickler.problems, found.end, total)


def header_pickle(buf, start: int) -> tuple[object, int]:
    """Unpickles one of the legacy format's header pickles (numbers, strings, dicts; no globals)."""
    found = scan(buf, start)
    Budget(found, LIMITS.budget(found.end - start))
    data = buf[start:found.end]
    unpickler = _PlainUnpickler(io.BufferedReader(io.BytesIO(data)))
    try:
        return load_with_stack(unpickler, data), found.end
    except FormatError:
        raise
    except Exception as e:
        raise FormatError(f"corrupt header pickle ({type(e).__name__}: {e})") from None


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        raise FormatError(f"unexpected global {module}.{name} in a legacy checkpoint header")

    def persistent_load(self, pid):
        raise FormatError("unexpected persistent id in a legacy checkpoint header")



# Hashing a tuple recurses in C without a depth check (CPython 3.11): a dict key of a million
# nested tuples, one byte of pickle each (TUPLE1), overflows the C stack and kills the process.
# A tuple's depth is at most the number of opcodes that can build one, which counting their
# bytes bounds from above (arguments included); past what the main thread's stack surely holds,
# the unpickler runs in a thread whose stack is sized for that bound (reserved, touched only
# as deep as a hash really goes).
_NESTING_OPS = (pickle.TUPLE, pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3, pickle.FROZENSET, pickle.REDUCE)
_STACK_PER_LEVEL = 128  # bytes of C stack one level of tuple hashing takes (measured: 64)
_INLINE_LEVELS = 20_000  # 2.5 MiB: safe on the main thread
_MAX_LEVELS = 8_000_000  # a 1 GiB stack


def load_with_stack(unpickler: pickle.Unpickler, data: bytes):
    """``unpickler.load()`` with a C stack deep enough for any tuple ``data`` can nest."""
    levels = sum(data.count(op) for op in _NESTING_OPS)
    if levels <= _INLINE_LEVELS:
        return unpickler.load()
    if levels > _MAX_LEVELS:
        raise FormatError(f"the pickle could nest {levels} tuples, too deep to rebuild safely")
    result: dict[str, object] = {}

    def load():
        try:
            result["obj"] = unpickler.load()
        except BaseException as e:  # handed to the caller's thread
            result["error"] = e

    previous = threading.stack_size(levels * _STACK_PER_LEVEL + (16 << 20))
    try:
        worker = threading.Thread(target=load, name="prebake-unpickle", daemon=True)
        worker.start()
    finally:
        threading.stack_size(previous)
    worker.join()
    if "error" in result:
        raise result["error"]
    return result["obj"]
