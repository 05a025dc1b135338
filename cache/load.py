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
from typing import TYPE_CHECKING

import torch
from prebake.cache.manifest import Manifest, read_manifest

if TYPE_CHECKING:  # only bakes with quantized blocks need it: imported when they are loaded
    from prebake.cache.packed import PackedTensor

TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "BOOL": torch.bool, "C64": torch.complex64,
}

Names = Iterable[str] | Callable[[str], bool] | None


def load_from_manifest(path: str | os.PathLike | Manifest, *, names: Names = None,
                       device: str | torch.device = "cpu", variant: str | None = None,
                       component: str | None = None, prefetch: bool = False,
                       quant: str | None = "auto") -> dict[str, torch.Tensor | PackedTensor]:
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
    ``quant``: for bakes with quantized blocks. ``"auto"``: a :class:`PackedTensor` where the
    bake has blocks and no float copy, plain tensors elsewhere. The recipe (``"q4_k_m"``), a
    type (``"q4_k"``) or ``"packed"``: packed wherever the bake has such blocks. ``None``:
    plain tensors only, unpacking (copying) those the bake holds only as blocks.

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
        return _load_variant(m, variant, names, device, prefetch, quant)
    wanted = _selector(names, m.tensors.keys() | m.aliases.keys() | m.quantized.keys())
    packed = {n for n in _packed_names(m, quant) if wanted(n)}
    targets = {a.target for n, a in m.aliases.items() if wanted(n)}
    shards = _Shards(m)
    out: dict[str, torch.Tensor | PackedTensor] = {}
    for name, e in m.tensors.items():
        if (wanted(name) and name not in packed) or name in targets:
            out[name] = view(shards[e.shard], TORCH_DTYPES[e.dtype], e.offset, e.shape)
    if m.quantized:
        from prebake.cache.packed import PackedTensor
        from prebake.formats.ggml_types import blocks_shape
    for name, q in m.quantized.items():
        if name in packed or (wanted(name) and name not in m.tensors):
            blocks = view(shards[q.shard], torch.uint8, q.offset, blocks_shape(q.qtype, tuple(q.shape)))
            out[name] = PackedTensor(blocks, q.qtype, q.shape, TORCH_DTYPES[q.dtype])
            if name not in packed:  # quant=None: the caller wants plain tensors
                out[name] = out[name].dequantize()
    if m.quantized:  # blocks live in shards of their own: back into layout order
        out = dict(sorted(out.items(), key=lambda kv: _position(m, kv[0])))
    if prefetch and torch.device(device).type == "cpu":
        from prebake.cache.prefetch import Prefetcher, shard_ranges

        Prefetcher(shard_ranges(m, out), owners=shards.values())
    if torch.device(device).type != "cpu":
        out = {k: v.to(device) for k, v in out.items()}
    for name, a in m.aliases.items():
        if wanted(name):
            base = out[a.target]
            out[name] = base.as_strided(a.shape, a.strides, base.storage_offset() + a.storage_offset)
    for name in targets:
        if not wanted(name):
            del out[name]
    return out


class _Shards(dict):
    """Shard index -> its mapping, made on first use (so unneeded shards are never mapped)."""

    def __init__(self, m: Manifest):
        super().__init__()
        self.m = m

    def __missing__(self, index: int) -> torch.UntypedStorage:
        storage = self[index] = map_shard(self.m.shard_path(index), self.m.shards[index].size)
        return storage


def _position(m: Manifest, name: str) -> tuple[int, int]:
    e = m.tensors.get(name) or m.quantized[name]
    return e.shard, e.offset


def _packed_names(m: Manifest, quant: str | None) -> set[str]:
    if not m.quantized or quant is None:
        return set()
    if quant == "auto":
        return set(m.quantized) - set(m.tensors)
    if quant in ("packed", m.options.get("quant")):
        return set(m.quantized)
    chosen = {n for n, q in m.quantized.items() if q.qtype.lower() == quant.lower()}
    if not chosen:
        kinds = sorted({q.qtype.lower() for q in m.quantized.values()} | {m.options.get("quant") or "packed"})
        raise KeyError(f"the bake has no {quant!r} blocks (it has {kinds})")
    return chosen


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


def _load_variant(m: Manifest, variant: str, names: Names, device, prefetch: bool, quant) -> dict[str, torch.Tensor]:
    if variant not in m.variants:
        raise KeyError(f"the bake has no variant {variant!r} (it has {sorted(m.variants) or 'none'})")
    entries = m.variants[variant]["tensors"]
    wanted = _selector(names, entries.keys())
    entries = {n: e for n, e in entries.items() if wanted(n)}
    stored = load_from_manifest(m, names={e["source"] for e in entries.values()}, device=device, prefetch=prefetch,
                                quant=quant)
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
