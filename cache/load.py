"""``load_from_manifest``: a bake's tensors by name, as views of its shards.

By default each shard holding a wanted tensor is mapped once (:mod:`prebake.cache.maps`) and
tensors are views into those maps: loading costs the time to map the files, and only the pages
a program touches are ever read. Eager and GPU loads read the wanted bytes with the staged
reader (:mod:`prebake.cache.staged`) instead; tensor-parallel loads take each rank's slices
(:mod:`prebake.cache.tp`). Whatever the way, the result is built the same: one view per tensor.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from prebake.cache import mounts
from prebake.cache.maps import Shards
from prebake.formats.errors import NotInBakeError
from prebake.formats.manifest import Manifest, TensorEntry, read_component, read_manifest

GAP = 1 << 20  # wanted ranges closer than this are read as one (staged loads)

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


class Tensors(dict):
    """A bake's tensors by name, in execution order; ``report`` says how they were loaded
    (:class:`~prebake.cache.reader.ReadReport`: mode, bytes read, O_DIRECT, checks, notes)."""

    report = None


def load_from_manifest(path: str | os.PathLike | Manifest, *, names: Names = None,
                       device: str | torch.device = "cpu", variant: str | None = None,
                       component: str | None = None, prefetch: bool = False,
                       quant: str | None = "auto", mode: str = "auto", verify: bool = False,
                       tp_rank: int | None = None, tp_size: int | None = None) -> Tensors:
    """Maps (or reads) a bake and returns its tensors by name, in execution order.

    ``path``: the bake folder or its ``manifest.json`` (or a :class:`Manifest` already read).
    ``names``: a list of names, or a predicate on names, to load a subset; shards holding none
    of them are not mapped. Aliases (tied weights) come back as views of their target.
    ``device``: where the tensors go. On a GPU the staged reader puts each shard's wanted bytes
    in one device allocation (large reads into pinned buffers, copies overlapped with reading);
    tensors are views of it, aliases stay tied, packed tensors stay packed.
    ``mode``: ``"mmap"`` (zero-copy maps of the shards), ``"eager"`` (the staged reader: large
    aligned reads, ``O_DIRECT`` where it helps, into memory the process owns: the tensors stay
    valid whatever happens to the files), or ``"auto"``: eager for a GPU, for ``verify``, and
    for a bake on a network or FUSE filesystem (where maps turn into small random reads), maps
    otherwise. The choice is in the result's ``report``.
    ``verify``: check every tensor's checksum as its bytes pass (an eager read, no extra one);
    a mismatch raises :class:`~prebake.formats.errors.VerifyError` naming the tensor.
    ``tp_rank``, ``tp_size``: rank r of k's slices, under the original names with the sliced
    shapes (:mod:`prebake.cache.tp`): column- and vocab-parallel tensors split their rows,
    row-parallel ones their columns, the rest whole. On a ``--tp-layout N`` bake (k dividing
    N) each rank maps and reads only its own bytes; on other bakes row-parallel slices are
    strided views of whole tensors (the report says so). ``tp_size`` alone means ``tp_rank=0``.
    ``variant``: a variant's tensors under its names (layers and experts renumbered); ``names``
    then selects among those names.
    ``component``: in a bake of several components (diffusers layout), the one to load.
    ``prefetch``: start reading the loaded tensors' bytes in execution order on a background
    thread (see :mod:`prebake.cache.prefetch`), so touching tensors in that order hits the
    page cache; it stops by itself once the tensors are garbage-collected.
    ``quant``: for bakes with quantized blocks. ``"auto"``: a :class:`PackedTensor` where the
    bake has blocks and no float copy, plain tensors elsewhere. The recipe (``"q4_k_m"``), a
    type (``"q4_k"``) or ``"packed"``: packed wherever the bake has such blocks. ``None``:
    plain tensors only, unpacking (copying) those the bake holds only as blocks.

    Raises :class:`~prebake.formats.errors.NotInBakeError` (a ``KeyError``) for a name,
    variant or component the bake does not hold, and
    :class:`~prebake.formats.errors.ManifestError` for a damaged bake.

    >>> sd = load_from_manifest("baked/")                                    # doctest: +SKIP
    >>> model.load_state_dict(sd, assign=True)                               # doctest: +SKIP
    """
    with _no_gc():  # a manifest of 10,000 tensors is 10,000s of objects: the collector would walk them again and again
        m = path if isinstance(path, Manifest) else read_manifest(path)
        if m.components or component is not None:
            if component is None:
                raise NotInBakeError(f"the bake holds components {sorted(m.components)}: pass component= one of "
                                     "them", m.root)
            m = read_component(m, component)
        if variant is not None:
            return _load_variant(m, variant, names, device, prefetch, quant, mode, verify)
        return _load(m, names, torch.device(device), prefetch, quant, mode, verify, _tp(m, tp_rank, tp_size))


def _load(m: Manifest, names: Names, device: torch.device, prefetch: bool, quant, mode: str, verify: bool,
          tp) -> Tensors:
    wanted = _selector(names, m.tensors.keys() | m.aliases.keys(), m)
    targets = {a.target for n, a in m.aliases.items() if wanted(n)}
    form = _form_chooser(m, quant)
    chosen = [(name, e, form(e)) for name, e in m.tensors.items() if wanted(name) or name in targets]
    mode, note = _mode(m, mode, device, verify)
    fast = tp is None and mode == "mmap"  # whole tensors as views of the maps: no cutting
    cuts = {} if fast else {name: _cut(name, e, how, tp) for name, e, how in chosen}
    if mode == "mmap":
        source, report = Shards(m), None
    else:
        source, report = _staged(m, cuts, device, verify)
        report.notes.insert(0, note) if note else None
        if verify and tp and any(c[4] is None for c in cuts.values()):
            report.notes.append("verify: a checksum covers a whole tensor; the split ones' slices are not checked")
    simple = {} if not fast else source.views(
        [(name, e.shard, TORCH_DTYPES[e.dtype], e.offset, e.shape) for name, e, how in chosen
         if how == "plain" and not (e.tp and e.tp.startswith("row:"))])
    out = Tensors()
    spans = []
    for name, e, how in chosen:
        if name in simple:
            out[name] = simple[name]
            spans.append((e.shard, e.offset, e.nbytes))
            continue
        out[name], span = _tensor(source, e, how, cuts.get(name) or _cut(name, e, how, tp))
        spans.append(span)
    out.report = report or _mapped_report(note)
    if tp and any(c[3].whole for c in cuts.values()):
        out.report.notes.append("the bake was made without --tp-layout: row-parallel slices are strided views "
                                "of whole tensors, and every rank reads those whole")
    if prefetch and mode == "mmap":
        from prebake.cache.prefetch import Prefetcher, coalesce

        Prefetcher(coalesce(spans, m.shard_path), owners=source.values())
    if mode == "mmap" and device.type != "cpu":
        out.update({k: v.to(device) for k, v in out.items()})
    for name, a in m.aliases.items():
        if wanted(name):
            out[name] = _alias(name, a, out[a.target], m.tensors[a.target])
    for name in targets:
        if not wanted(name):
            del out[name]
    return out


@contextmanager
def _no_gc():
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _mode(m: Manifest, mode: str, device: torch.device, verify: bool) -> tuple[str, str | None]:
    """The load's mode ("mmap" or "eager") and, when "auto" chose it for a reason, the reason."""
    if mode not in ("auto", "mmap", "eager"):
        from prebake.formats.errors import UsageError

        raise UsageError(f"mode must be 'auto', 'mmap' or 'eager', not {mode!r}")
    if mode != "auto":
        return mode, None
    if device.type not in ("cpu", "meta"):
        return "eager", f"eager: staged reads onto {device}"
    if verify:
        return "eager", "eager: verify=True checks the bytes as they are read"
    fs = mounts.network_filesystem(m.root)
    return ("eager", f"eager: the bake is on {fs}, a network filesystem") if fs else ("mmap", None)


def _alias(name: str, a, base, target: TensorEntry) -> torch.Tensor:
    """The view an alias names, of its target; of a rank's slice only where the alias is the
    whole target (a tied head): any other view of a sliced tensor would reach past the slice."""
    if tuple(base.shape) == tuple(target.shape):
        return base.as_strided(a.shape, a.strides, base.storage_offset() + a.storage_offset)
    if list(a.shape) == list(target.shape) and a.storage_offset == 0:
        return base
    from prebake.formats.errors import UsageError

    raise UsageError(f"{name!r} is a partial view of {a.target!r}, which ranks split: load it whole")


def _tp(m: Manifest, rank: int | None, size: int | None):
    """(rank, size, model_type) for a tensor-parallel load, None for a whole one."""
    if rank is None and size is None:
        return None
    size = size or 1
    rank = rank or 0
    if size < 1 or not 0 <= rank < size:
        from prebake.formats.errors import UsageError

        raise UsageError(f"tp_rank {rank} is not a rank of tp_size {size}")
    config = m.root / "config.json"
    try:
        import json

        model_type = json.loads(config.read_text()).get("model_type") if config.exists() else None
    except (OSError, ValueError, AttributeError):
        model_type = None
    return rank, size, model_type


def _cut(name: str, e: TensorEntry, form: str, tp) -> tuple:
    """Where the bytes of ``e`` in ``form`` are, (qtype, shard, offset, Slice): the whole tensor,
    or the rank's slice of it."""
    from prebake.cache.tp import kind_of, rank_slice, stored_shape, whole

    if form == "plain":
        qtype, shard, offset, nbytes, digest = None, e.shard, e.offset, e.nbytes, e.checksum
    elif e.qtype:
        qtype, shard, offset, nbytes, digest = e.qtype, e.shard, e.offset, e.nbytes, e.checksum
    else:
        qtype, shard, offset, nbytes, digest = e.packed
    tiling = e.tp if qtype == e.qtype else None
    tiled = bool(tiling and tiling.startswith("row:"))
    stored = stored_shape(e.shape, qtype, tiling)
    if tp is None:
        piece = whole(tuple(e.shape), nbytes, stored, tiled)
    else:
        piece = rank_slice(name, tuple(e.shape), nbytes, stored, kind_of(name, e, tp[2]), tp[0], tp[1], qtype, tiled)
    return qtype, shard, offset, piece, digest if piece.nbytes == nbytes else None


def _staged(m: Manifest, cuts: dict, device: torch.device, verify: bool):
    from prebake.cache.reader import plan_runs
    from prebake.cache.staged import load_runs

    spans = [(name, shard, offset + piece.start, piece.nbytes, digest)
             for name, (qtype, shard, offset, piece, digest) in cuts.items()]
    runs = plan_runs(spans, m.shard_path, lambda i: m.shards[i].size, gap=0 if any(
        c[3].nbytes != m.tensors[n].nbytes for n, c in cuts.items() if n in m.tensors) else GAP)
    shard_of = {m.shard_path(i): i for i in range(len(m.shards))}
    return load_runs(runs, shard_of, device if device.type != "meta" else torch.device("cpu"),
                     m.checksum if verify else None)


def _mapped_report(note):
    from prebake.cache.reader import ReadReport

    return ReadReport("mmap", notes=[note] if note else [])


def _tensor(source, e: TensorEntry, form: str, cut: tuple) -> tuple[torch.Tensor | PackedTensor, tuple]:
    """The tensor ``e`` in the form asked for ("plain", "packed" or "unpack") from the bytes
    ``cut`` names (the whole tensor or a rank's slice), and those bytes' place."""
    qtype, shard, offset, piece, _ = cut
    data = source.view(shard, torch.uint8 if qtype else TORCH_DTYPES[e.dtype], offset + piece.start,
                       piece.view_shape)
    data = piece.finish(data)
    span = (shard, offset + piece.start, piece.nbytes)
    if form == "plain":
        return data, span
    from prebake.cache.packed import PackedTensor

    packed = PackedTensor(data, qtype, piece.shape, TORCH_DTYPES[e.dtype])
    return (packed.dequantize() if form == "unpack" else packed), span


def _form_chooser(m: Manifest, quant: str | None) -> Callable[[TensorEntry], str]:
    """For each entry: "plain" (its float bytes), "packed" (a PackedTensor) or "unpack" (blocks unpacked)."""
    if quant is None:
        return lambda e: "unpack" if e.qtype else "plain"
    if quant == "auto":
        return lambda e: "packed" if e.qtype else "plain"
    if quant in ("packed", m.options.get("quant")):
        return lambda e: "packed" if e.qtype or e.packed else "plain"
    kinds = {q.lower() for q in _qtypes(m)}
    if quant.lower() not in kinds:
        raise NotInBakeError(f"the bake has no {quant!r} blocks (it has {sorted(kinds | {'packed'})})", m.root)

    def choose(e: TensorEntry) -> str:
        qtype = e.qtype or (e.packed.qtype if e.packed else None)
        if qtype is not None and qtype.lower() == quant.lower():
            return "packed"
        return "unpack" if e.qtype else "plain"

    return choose


def _qtypes(m: Manifest) -> set[str]:
    return {e.qtype or e.packed.qtype for e in m.tensors.values() if e.qtype or e.packed}


def _load_variant(m: Manifest, variant: str, names: Names, device, prefetch: bool, quant, mode: str,
                  verify: bool) -> Tensors:
    if variant not in m.variants:
        raise NotInBakeError(f"the bake has no variant {variant!r} (it has {sorted(m.variants) or 'none'})", m.root)
    entries = m.variants[variant]["tensors"]
    wanted = _selector(names, entries.keys(), m)
    entries = {n: e for n, e in entries.items() if wanted(n)}
    stored = load_from_manifest(m, names={e["source"] for e in entries.values()}, device=device, prefetch=prefetch,
                                quant=quant, mode=mode, verify=verify)
    out = Tensors({n: _rows(stored[e["source"]], e.get("rows")) for n, e in entries.items()})
    out.report = stored.report
    return out


def _rows(t, rows: list[int] | None):
    """Rows of ``t`` along dim 0 (experts): a view for a contiguous run, else a (small) gathered copy.

    A packed tensor's blocks run along its last dimension, so each index of dim 0 owns a whole
    number of block rows: selecting experts selects those, and no block is re-encoded.
    """
    if rows is None:
        return t
    packed = not isinstance(t, torch.Tensor)
    data = t.blocks.reshape(t.shape[0], -1) if packed else t
    if rows == list(range(rows[0], rows[0] + len(rows))):
        data = data.narrow(0, rows[0], len(rows))
    else:
        data = data.index_select(0, torch.tensor(rows, device=data.device))
    if not packed:
        return data
    return type(t)(data.reshape(-1, t.blocks.shape[-1]), t.qtype, (len(rows), *t.shape[1:]), t.dtype)


def _selector(names: Names, known, m: Manifest) -> Callable[[str], bool]:
    if names is None:
        return lambda n: True
    if callable(names):
        return names
    chosen = set([names] if isinstance(names, str) else names)
    unknown = chosen - known
    if unknown:
        raise NotInBakeError(f"not in the bake: {sorted(unknown)[:5]}", m.root)
    return chosen.__contains__
