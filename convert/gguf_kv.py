"""A GGUF bake's key-value metadata, written back with the types it came with.

A bake of a GGUF keeps its key-value section byte for byte in ``gguf_metadata.gguf`` (a GGUF
of no tensors): values and GGUF types come from there. Older bakes kept values as JSON
(``gguf_metadata.json``, the manifest the short ones) and, in 0.2's first form, each key's GGUF
type in the manifest's ``gguf_types``: JSON has one kind of number, GGUF ten, and llama.cpp's
loader checks them (``context_length`` must be a UINT32). Where no types were kept they are
inferred as gguf-py's writer would write them (integers UINT32, or INT32 when negative; floats
FLOAT32; integer arrays INT32).
"""

from __future__ import annotations

import json

from prebake.formats.errors import ManifestError
from prebake.formats.manifest import Manifest

SIDE_FILE = "gguf_metadata.json"  # JSON values (older bakes; --gguf-metadata)
KV_FILE = "gguf_metadata.gguf"  # the source's key-value section, verbatim
# keys the writer sets itself, or that describe a file layout the export does not keep
OWN_KEYS = ("general.architecture", "general.alignment", "split.no", "split.count", "split.tensors.count")


def gguf_keys(m: Manifest) -> tuple[dict, dict | None]:
    """Every key-value pair of the GGUF a bake was made from (long arrays included), and each
    key's GGUF type where the bake kept them (None: to be inferred)."""
    kv = m.root / KV_FILE
    if any(f.path == KV_FILE for f in m.files) and kv.is_file():
        from prebake.formats.gguf_file import open_gguf

        parsed = open_gguf(kv)
        types = {k: f.type if f.item_type is None else f"{f.type}:{f.item_type}" for k, f in parsed.fields.items()}
        return parsed.metadata(max_list=None), types
    return gguf_metadata(m), m.metadata.get("gguf_types")


def gguf_metadata(m: Manifest) -> dict:
    """Every key-value pair of the GGUF a bake was made from, as JSON values (older bakes)."""
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

