"""``load_from_manifest``: every tensor of a bake as a zero-copy view of its memory-mapped shard.

Each shard that holds a wanted tensor is mapped once (``MAP_PRIVATE``: pages come from the page
cache and are shared by every process that maps the bake; a write to a tensor stays private to
the process and never reaches the file). Tensors are views into those mappings, so loading costs
the time to map the files, and only the pages a program touches are ever read.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from prebake.cache.manifest import Manifest, read_manifest

TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "BOOL": torch.bool, "C64": torch.complex64,
}

Names = Iterable[str] | Callable[[str], bool] | None


def load_from_manifest(path: str | os.PathLike | Manifest, *, names: Names = None,
                       device: str | torch.device = "cpu", variant: str | None = None,
                       component: str | None = None, prefetch: bool = False) -> dict[str, torch.Tensor]:
    """Maps a bake and returns its tensors by name, in layout order.

    ``path``: the bake folder or its ``manifest.json`` (or a :class:`Manifest` already read).
    ``names``: a list of names, or a predicate on names, to load a subset; shards holding none
    of them are not mapped. Aliases (tied weights) come back as views of their target.
    ``device``: anything but ``"cpu"`` copies each tensor there once (aliases stay tied).
    ``variant``: a variant's tensors under its names (layers and experts renumbered); ``names``
    then selects among those names.
    ``component``: in a bake of several components (diffusers layout), the one to load.
    ``prefetch``: start reading the loaded tensors' bytes in layout order on a background
    thread (see :mod:`prebake.cache.prefetch`), so touching tensors in execution order hits
    the page cache; it stops by itself once the tensors are garbage-collected.

    >>> sd = load_from_manifest("baked/")                                    # doctest: +SKIP
    >>> model.load_state_dict(sd, assign=True)                               # doctest: +SKIP
    """
    m = path if isinstance(path, Manifest) else read_manifest(path)
    if m.components:
        if component not in m.components:
            raise KeyError(f"the bake holds components {sorted(m.components)}: pass component= one of them")
        m = read_manifest(m.root / m.components[component]["path"])
    elif component is not None:
        raise KeyError(f"the bake has no components (asked for {component!r})")
    if variant is not None:
        return _load_variant(m, variant, names, device, prefetch)
    wanted = _selector(names, m.tensors.keys() | m.aliases.keys())
    targets = {a.target for n, a in m.aliases.items() if wanted(n)}
    storages: dict[int, torch.UntypedStorage] = {}
    out: dict[str, torch.Tensor] = {}
    for name, e in m.tensors.items():
        if not (wanted(name) or name in targets):
            continue
        storage = storages.get(e.shard)
        if storage is None:
            storage = storages[e.shard] = map_shard(m.shard_path(e.shard), m.shards[e.shard].size)
        out[name] = view(storage, TORCH_DTYPES[e.dtype], e.offset, e.shape)
    if prefetch and device is not None and torch.device(device).type == "cpu":
        from prebake.cache.prefetch import Prefetcher, shard_ranges

        Prefetcher(shard_ranges(m, out), owners=storages.values())
    if device is not None and torch.device(device).type != "cpu":
        out = {k: v.to(device) for k, v in out.items()}
    for name, a in m.aliases.items():
        if wanted(name):
            base = out[a.target]
            out[name] = base.as_strided(a.shape, a.strides, base.storage_offset() + a.storage_offset)
    for name in targets:
        if not wanted(name):
            del out[name]
    return out


def map_shard(path: Path, size: int) -> torch.UntypedStorage:
    """One private, read-through memory map of a whole shard file."""
    actual = os.path.getsize(path)
    if actual != size:
        from prebake.formats.errors import ManifestError
        raise ManifestError(f"shard is {actual} bytes, the manifest says {size}: the bake is damaged "
                            "or was changed; run 'prebake verify' or convert again", path)
    return torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)


def view(storage: torch.UntypedStorage, dtype: torch.dtype, offset: int, shape) -> torch.Tensor:
    """A tensor over ``storage`` starting ``offset`` bytes in (a multiple of the item size)."""
    itemsize = dtype.itemsize
    t = torch.empty(0, dtype=dtype)
    return t.set_(storage, offset // itemsize, tuple(shape))


def _load_variant(m: Manifest, variant: str, names: Names, device, prefetch: bool) -> dict[str, torch.Tensor]:
    if variant not in m.variants:
        raise KeyError(f"the bake has no variant {variant!r} (it has {sorted(m.variants) or 'none'})")
    entries = m.variants[variant]["tensors"]
    wanted = _selector(names, entries.keys())
    entries = {n: e for n, e in entries.items() if wanted(n)}
    stored = load_from_manifest(m, names={e["source"] for e in entries.values()}, device=device, prefetch=prefetch)
    return {n: _rows(stored[e["source"]], e.get("rows")) for n, e in entries.items()}


def _rows(t: torch.Tensor, rows: list[int] | None) -> torch.Tensor:
    """Rows of ``t`` along dim 0: a view for a contiguous run, else a (small) gathered copy."""
    if rows is None:
        return t
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return t.narrow(0, rows[0], len(rows))
    return t.index_select(0, torch.tensor(rows, device=t.device))


def _selector(names: Names, known) -> Callable[[str], bool]:
    if names is None:
        return lambda n: True
    if callable(names):
        return names
    chosen = set([names] if isinstance(names, str) else names)
    unknown = chosen - known
    if unknown:
        raise KeyError(f"not in the bake: {sorted(unknown)[:5]}")
    return chosen.__contains__
