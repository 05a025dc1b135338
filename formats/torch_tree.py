"""Names the tensors of an unpickled checkpoint: a bounded walk over its tree of containers.

``{"model": {"w": t}, "epoch": 3}`` gives ``[("model.w", t)]`` and ``[("epoch", "int")]``.
A pickle can build what no state dict holds: a dict that contains itself, lists nested a
million deep, one big dict referenced from every slot of a list (its names multiply). The walk
refuses a cycle and nesting deeper than :data:`MAX_DEPTH`, and stops once the names it makes
pass a memory budget. It never recurses in Python, and reads containers through ``dict`` and
``list`` themselves, never through a method a pickle could have shadowed (``node.items``).
"""

from __future__ import annotations

import reprlib

from prebake.formats.errors import FormatError
from prebake.formats.torch_records import Allowed, Tag, TensorRecord

MAX_DEPTH = 256  # a training checkpoint nests 4 or 5 deep
_ENTRY_COST = 160  # bytes a name's entry takes besides its characters (tuples, list slots)
_KEY_REPR = reprlib.Repr()  # a bounded repr for keys that are not str or numbers
_KEY_REPR.maxstring = _KEY_REPR.maxother = 80
_END = object()


def flatten(obj, budget: int) -> tuple[list[tuple[str, TensorRecord]], list[tuple[str, str]]]:
    """Walks a checkpoint's tree; returns (dotted name, tensor) pairs and (name, kind) of other leaves.

    Dicts are always entered; lists and tuples only when a tensor lies somewhere inside them
    (``"history": [1.0, 0.5]`` stays one leaf). ``budget`` bounds the bytes of names made.
    """
    if not isinstance(obj, (dict, list, tuple, TensorRecord)):  # a pickle whose result is a function, ...
        raise FormatError(f"the checkpoint holds {_kind(obj)}, not a state dict or a tensor: nothing to bake")
    holds = _Holders()
    tensors: list[tuple[str, TensorRecord]] = []
    leaves: list[tuple[str, str]] = []
    path: list[int] = []  # ids of the containers above the node being visited
    stack = [("", obj, 0, None)]
    while stack:
        name, node, depth, odd_key = stack.pop()
        if isinstance(node, TensorRecord):
            if odd_key is not None:
                raise FormatError(f"tensor {name[:120]!r} sits under a dict key that is {odd_key}, which has no "
                                  "stable name (torch would name it by its memory address or type): refused")
            tensors.append((name, node))
            continue
        if isinstance(node, dict):
            children = dict.items(node)
        elif isinstance(node, (list, tuple)) and holds(node):
            children = enumerate(node)
        else:
            leaves.append((name, _kind(node)))
            continue
        del path[depth:]
        if id(node) in path:
            raise FormatError(f"the checkpoint contains itself at {name[:120]!r} (a {type(node).__name__} "
                              "inside its own value), which no state dict does")
        if depth >= MAX_DEPTH:
            raise FormatError(f"the checkpoint nests containers deeper than {MAX_DEPTH} levels "
                              f"(at {name[:120]!r})")
        path.append(id(node))
        # charged before the names are built: a shared container makes all its names at once
        budget -= len(node) * (_ENTRY_COST + len(name) + 1)
        _check_budget(budget, name)
        named = []
        for key, value in children:
            text = key if type(key) is str else _key_text(key, name)
            budget -= len(text)
            odd = odd_key if odd_key is not None or type(key) in _PLAIN_KEYS else _odd_key(key)
            named.append((f"{name}.{text}" if name else text, value, depth + 1, odd))
        _check_budget(budget, name)
        stack.extend(reversed(named))
    return tensors, leaves


def _check_budget(budget: int, name: str) -> None:
    if budget < 0:
        raise FormatError(f"the checkpoint's tree names far more entries than its pickle holds (at "
                          f"{name[:80]!r}: one container referenced from many places); refused")


class _Holders:
    """Whether a list or tuple holds a tensor somewhere inside; each container is walked once.

    An iterative depth-first walk: a container met again while it is still being walked is a
    cycle, refused, and so is a path deeper than MAX_DEPTH.
    """

    def __init__(self):
        self.done: dict[int, tuple[bool, int]] = {}  # id -> (holds a tensor, height below it)

    def __call__(self, root) -> bool:
        found = self.done.get(id(root))
        return found[0] if found is not None else self._walk(root)

    def _walk(self, root) -> bool:
        done = self.done
        path: list[list] = []  # [container, iterator over its values, holds a tensor, height]
        on_path: set[int] = set()
        self._enter(path, on_path, root)
        while path:
            top = path[-1]
            child = next(top[1], _END)
            if child is _END:
                path.pop()
                on_path.discard(id(top[0]))
                done[id(top[0])] = (top[2], top[3])
                if path:
                    path[-1][2] |= top[2]
                    path[-1][3] = max(path[-1][3], top[3] + 1)
            elif isinstance(child, TensorRecord):
                top[2] = True
            elif isinstance(child, (dict, list, tuple)):
                seen = done.get(id(child))
                if id(child) in on_path:
                    raise FormatError(f"the checkpoint contains itself (a {type(child).__name__} inside its "
                                      "own value), which no state dict does")
                if seen is None:
                    self._enter(path, on_path, child)
                elif len(path) + seen[1] >= MAX_DEPTH:  # a shared container, reached deeper this time
                    raise FormatError(f"the checkpoint nests containers deeper than {MAX_DEPTH} levels")
                else:
                    top[2] |= seen[0]
                    top[3] = max(top[3], seen[1] + 1)
        return done[id(root)][0]

    @staticmethod
    def _enter(path: list[list], on_path: set[int], node) -> None:
        if len(path) >= MAX_DEPTH:
            raise FormatError(f"the checkpoint nests containers deeper than {MAX_DEPTH} levels")
        path.append([node, iter(dict.values(node) if isinstance(node, dict) else node), False, 0])
        on_path.add(id(node))


_PLAIN_KEYS = (str, int, bool, float, type(None))


def _odd_key(key) -> str | None:
    """What a key is when its text in a name is not the ``str()`` torch's flattened name would
    use (a function, a class, an object, a tuple: repr and str differ or hold addresses)."""
    if type(key) in _PLAIN_KEYS or (type(key) is Tag and key.kind == "dtype"):
        return None
    return f"a {key.what}" if isinstance(key, (Allowed, Tag)) else f"a {type(key).__name__}"


def _key_text(key, parent: str) -> str:
    """A key as it appears in a dotted name: str() for strings and numbers, a bounded repr else."""
    if type(key) is str:
        return key
    try:
        return str(key) if key is None or type(key) in (int, bool, float) else _KEY_REPR.repr(key)
    except ValueError:  # an int of more than 4300 digits
        raise FormatError(f"a key under {parent[:80]!r} is an integer too long to print") from None


def _kind(node) -> str:
    if isinstance(node, (Allowed, Tag)):  # a global stored as a value
        return node.what
    return getattr(type(node), "qualname", None) or type(node).__name__
