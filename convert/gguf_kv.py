"""A GGUF bake's key-value metadata, written back with the types it came with.

A bake of a GGUF keeps every key's value in ``gguf_metadata.json`` (the manifest holds the
short ones) and, since prebake 0.2, each key's GGUF type in the manifest's ``gguf_types``: JSON
has one kind of number, GGUF ten, and llama.cpp's loader checks them (``context_length`` must be
a UINT32). Bakes made before that have no types: they are inferred as gguf-py's writer would
write them (integers UINT32, or INT32 when negative; floats FLOAT32; integer arrays INT32).
"""

from __future__ import annotations

import json

from prebake.formats.errors import ManifestError
from prebake.formats.manifest import Manifest

SIDE_FILE = "gguf_metadata.json"  # what the bake writes (prebake.convert.bake.GGUF_METADATA)
# keys the writer sets itself, or that describe a file layout the export does not keep
OWN_KEYS = ("general.architecture", "general.alignment", "split.no", "split.count", "split.tensors.count")


def gguf_metadata(m: Manifest) -> dict:
    """Every key-value pair of the GGUF a bake was made from (long arrays included)."""
    side = m.root / SIDE_FILE
    if any(f.path == SIDE_FILE for f in m.files) and side.is_file():
        try:
            return json.loads(side.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ManifestError(f"cannot read {SIDE_FILE} ({e})", side) from None
    return dict(m.metadata.get("gguf") or {})


def add_metadata(w, meta: dict, types: dict | None, replace: dict | None = None) -> None:
    """Adds every key of ``meta`` (but :data:`OWN_KEYS`) to the GGUFWriter ``w``, typed.

    ``replace``: (value, type name) by key, for keys the export changes (the file type).
    """
    import gguf

    T = gguf.GGUFValueType
    replace = replace or {}
    for key, value in meta.items():
        if key in OWN_KEYS or key in replace:
            continue
        kind = (types or {}).get(key) or _infer(value)
        main, _, item = kind.partition(":")
        if main == "ARRAY":
            if not value:
                continue  # GGUF has no empty arrays: gguf-py refuses to write one
            w.add_key_value(key, value, T.ARRAY, T[item] if item and item != "ARRAY" else None)
        else:
            w.add_key_value(key, value, T[main])
    for key, (value, kind) in replace.items():
        w.add_key_value(key, value, gguf.GGUFValueType[kind])


def _infer(value) -> str:
    if isinstance(value, list):
        if not value or isinstance(value[0], list):
            return "ARRAY:ARRAY"
        item = _infer(value[0])
        return "ARRAY:" + ("INT32" if item.startswith("UINT") else item)  # gguf-py's add_array: INT32
    if isinstance(value, bool):
        return "BOOL"
    if isinstance(value, int):
        return "INT32" if value < 0 else "UINT32" if value < 1 << 32 else "UINT64"
    if isinstance(value, float):
        return "FLOAT32"
    return "STRING"

