"""The bake plan: which tensor goes to which shard, at which offset, in what form.

The plan is plain data computed from tensor descriptions alone, before any byte moves (see
:func:`plan_bake`); :mod:`prebake.convert.execute` applies it. A plan can be printed, tested
and diffed without touching the disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prebake.convert.order import big_first_in_layers, execution_order
from prebake.convert.quant_policy import SINGLE, QuantPolicy, choose
from prebake.convert.tp_plan import tp_split
from prebake.formats.errors import FormatError, UnsupportedError, UsageError
from prebake.formats.ggml_types import blocks_shape
from prebake.formats.manifest import PIECE
from prebake.formats.manifest_checks import MAX_DIMS
from prebake.formats.safetensors_writer import BIG_TENSOR, PAD_PREFIX, Slot, header_bytes, place
from prebake.formats.tensor import DTYPE_SIZES, FLOAT_DTYPES, SkippedLeaf, TensorInfo, numel

GIB = 1 << 30
NAMES = ("hf", "gguf")
DTYPE_NAMES = {"float32": "F32", "fp32": "F32", "float16": "F16", "fp16": "F16", "half": "F16",
               "bfloat16": "BF16", "bf16": "BF16", "F32": "F32", "F16": "F16", "BF16": "BF16"}


@dataclass(frozen=True)
class Options:
    """What the user asked for; part of the manifest, so a bake says how it was made."""

    shard_size: int = 2 * GIB
    align: int = 4096
    dtype: str | None = None  # cast floating tensors to this safetensors code
    quant: str | None = None  # a recipe of prebake.convert.quant_policy: q8_0, q4_k, q4_k_m, ...
    keep_float: bool = False  # with quant: keep the float tensors beside their blocks
    quant_embeddings: bool = False
    quant_skip: tuple[str, ...] = ()
    quant_only: tuple[str, ...] = ()
    quant_pure: bool = False  # one type for every tensor (default: the output head at Q6_K)
    keep_quant: bool = False  # GGUF blocks stay blocks (no dequantize/requantize round trip)
    piece: int = PIECE  # checksum piece: the unit of work (the tests make it small)
    tp_layout: int | None = None  # store row-parallel weights as N column blocks (--tp-layout N)
    names: str = "hf"  # a GGUF's tensors under transformers' names ("hf", with config and tokenizer) or its own
    gguf_metadata: bool = False  # also keep a GGUF's metadata as JSON (gguf_metadata.json)

    def __post_init__(self):
        if self.align < 8 or self.align & (self.align - 1):
            raise UsageError(f"--align must be a power of two >= 8, not {self.align}")
        if self.shard_size < 1:
            raise UsageError("--shard-size must be positive")
        if self.quant:
            object.__setattr__(self, "quant", self.quant.lower())  # Q8_0 and q8_0 name one type
            QuantPolicy(self.quant)  # validates the recipe
        if self.quant_pure and self.quant not in SINGLE:
            raise UsageError("--quant-pure needs --quant with a single type (q8_0, q4_0, ..., q6_k), not "
                             f"{self.quant or 'none'}")
        if self.keep_quant and self.quant:
            raise UsageError("--keep-quant keeps a GGUF's own blocks; --quant makes new ones: choose one")
        if self.piece < 4096 or self.piece & (self.piece - 1):
            raise UsageError(f"the checksum piece must be a power of two >= 4096, not {self.piece}")
        if self.tp_layout is not None and (self.tp_layout < 2 or self.tp_layout & (self.tp_layout - 1)):
            raise UsageError(f"--tp-layout must be a power of two >= 2 (8 serves 1, 2, 4 and 8 ranks), not "
                             f"{self.tp_layout}")
        if self.tp_layout and self.keep_float:
            raise UsageError("--tp-layout with --keep-float is not supported: choose one")
        if self.keep_float and not self.quant:
            raise UsageError("--keep-float keeps float copies beside quantized blocks: it needs --quant")
        if self.names not in NAMES:
            raise UsageError(f"--names is one of {', '.join(NAMES)}, not {self.names!r}")

    @property
    def policy(self) -> QuantPolicy | None:
        if not self.quant:
            return None
        return QuantPolicy(self.quant, self.quant_embeddings, tuple(self.quant_skip), tuple(self.quant_only),
                           self.quant_pure)

    def manifest_record(self) -> dict:
        out = {"shard_size": self.shard_size, "align": self.align, "dtype": self.dtype}
        if self.tp_layout:
            out["tp_layout"] = self.tp_layout
        if self.quant or self.keep_quant:
            out.update(quant=self.quant, keep_float=self.keep_float, quant_embeddings=self.quant_embeddings,
                       quant_skip=list(self.quant_skip), quant_only=list(self.quant_only),
                       keep_quant=self.keep_quant)
            if self.quant_pure:
                out["quant_pure"] = True
        if self.names != "hf":  # recorded only when not the default, so other bakes' records stay as they were
            out["names"] = self.names
        if self.gguf_metadata:
            out["gguf_metadata"] = True
        return out


@dataclass(frozen=True)
class Planned:
    """A tensor to write: where its bytes come from and how they are transformed.

    ``transform`` is "copy", "cast", "dequantize" (GGML blocks to ``dtype``), "quantize" (to the
    GGML blocks of ``qtype``), "blocks" (GGML blocks kept as they are) or "offset" (the source's
    ``add`` added to every value, in float32, then cast to ``dtype``; a dequantization adds it
    too). Every transform takes the source's rows in the order ``source.rows`` gives. ``dtype`` is the
    logical dtype (what blocks unpack to); blocks are stored as ``U8`` of shape
    (rows, bytes per row). ``packed`` marks the blocks kept beside a float copy (``--keep-float``).
    """

    name: str
    source: TensorInfo = field(repr=False)
    dtype: str
    transform: str
    qtype: str | None = None
    packed: bool = False
    tp: str | None = None  # how tensor-parallel ranks split it: column, row, row:N (tiled), vocab
    tiles: int = 1  # > 1: stored as this many column blocks, (tiles, rows, columns / tiles)

    @property
    def stored_dtype(self) -> str:
        return "U8" if self.qtype else self.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape as stored: the logical shape, or (rows, bytes per row) of blocks; tiled, the
        column blocks one after another."""
        base = self.source.shape if self.qtype is None else blocks_shape(self.qtype, self.source.shape)
        if self.tiles == 1:
            return base
        return (self.tiles, base[0], base[1] // self.tiles)

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * DTYPE_SIZES[self.stored_dtype]


@dataclass(frozen=True)
class Alias:
    """A tensor that is a view of a stored one (tied weights, slices): stored once, mapped twice."""

    name: str
    target: str
    storage_offset: int  # elements from the target's first element
    shape: tuple[int, ...]
    strides: tuple[int, ...]


@dataclass
class ShardPlan:
    file: str
    slots: list[Slot]
    tensors: dict[str, Planned]
    header: bytes = b""

    @property
    def data_size(self) -> int:
        return self.slots[-1].offset + self.slots[-1].nbytes if self.slots else 0

    @property
    def size(self) -> int:
        return len(self.header) + self.data_size


@dataclass
class BakePlan:
    shards: list[ShardPlan]
    aliases: list[Alias]
    skipped: list[SkippedLeaf]
    options: Options
    order: list[str] = field(default_factory=list)  # stored tensors in execution order
    quant_notes: dict[str, str] = field(default_factory=dict)  # tensors not at the recipe's type: what, and why
    warnings: list[str] = field(default_factory=list)
    tp_notes: dict[str, str] = field(default_factory=dict)  # row-parallel tensors --tp-layout kept whole, and why

    @property
    def total_bytes(self) -> int:
        return sum(s.data_size for s in self.shards)

    def summary(self) -> dict:
        """A JSON-ready description of the plan (what `--dry-run` prints)."""
        return {
            "shards": [{"file": s.file, "bytes": s.size, "tensors": len(s.tensors),
                        "padding": sum(x.is_padding for x in s.slots)} for s in self.shards],
            "aliases": {a.name: a.target for a in self.aliases},
            "transforms": {p.name: f"{p.source.qtype or p.source.dtype}->{p.qtype or p.dtype}" for s in self.shards
                           for p in s.tensors.values() if p.transform != "copy" and not p.packed},
            "packed_copies": sorted(p.name for s in self.shards for p in s.tensors.values() if p.packed),
            "quant_notes": self.quant_notes,
            "tp_notes": self.tp_notes,
            "warnings": self.warnings,
        }


def plan_bake(tensors: list[TensorInfo], options: Options, skipped: list[SkippedLeaf] = (),
              stem: str = "model", model_type: str | None = None, blocks_dtype: str = "F16") -> BakePlan:
    """Plans a bake of ``tensors`` (from every source file, in file order) into ``stem*.safetensors``.

    Every tensor is stored once, in execution order, in one form: its items, cast, or GGML
    blocks. Only the blocks kept beside float copies (``--keep-float``) go to shards of their
    own, ``stem-RECIPE*.safetensors``, so the float shards stay a plain Hugging Face checkpoint.
    GGML blocks dequantize to ``options.dtype``, else to ``blocks_dtype`` (the source's default).
    """
    by_name = _unique(tensors)
    order = big_first_in_layers(execution_order(list(by_name)), {n: t.nbytes for n, t in by_name.items()},
                                BIG_TENSOR)
    stored, aliases = find_aliases([by_name[n] for n in order])
    chosen, kept = choose(options.policy, stored) if options.policy else ({}, {})
    targets = {a.target for a in aliases}  # aliases view float bytes: their targets keep them
    main, packed = [], []
    for t in stored:
        logical = t.dtype if t.qtype is None else options.dtype or blocks_dtype
        if options.keep_quant and t.qtype is not None and not t.add:  # an offset changes values: blocks cannot keep it
            main.append(Planned(t.name, t, logical, "blocks", t.qtype))
            continue
        if t.qtype is not None:
            _check_decodable(t)
        if t.name in chosen and not (options.keep_float or t.name in targets):
            main.append(Planned(t.name, t, logical, "quantize", chosen[t.name]))
        else:
            main.append(_planned(t, options, blocks_dtype))
            if t.name in chosen:
                packed.append(Planned(t.name, t, logical, "quantize", chosen[t.name], packed=True))
    main, tp_notes = tp_split(main, options.tp_layout, model_type)
    shards = _shard(main, options, stem, 0)
    if packed:
        shards += _shard(packed, options, f"{stem}-{options.quant}", len(shards))
    plan = BakePlan(shards, aliases, list(skipped), options, [p.name for p in main], kept, tp_notes=tp_notes)
    requantized = sorted({t.qtype for t in stored if t.qtype and t.name in chosen})
    if requantized:
        plan.warnings.append(f"--quant {options.quant} quantizes the source's {', '.join(requantized)} blocks "
                             "again from their dequantized values (a second rounding error); --keep-quant keeps "
                             "them as they are")
    return plan


RESERVED = PAD_PREFIX  # names prebake gives its own entries; a source may not use them


def _unique(tensors: list[TensorInfo]) -> dict[str, TensorInfo]:
    by_name: dict[str, TensorInfo] = {}
    for t in tensors:
        if t.name in by_name:
            raise FormatError(f"tensor {t.name!r} appears in both {by_name[t.name].path} and {t.path}")
        if t.name.startswith(RESERVED):
            raise FormatError(f"tensor {t.name!r} has a name prebake reserves for its own padding entries "
                              f"({RESERVED}*); rename it in the checkpoint", t.path)
        if len(t.shape) > MAX_DIMS:  # what a manifest holds, so what load_from_manifest reads back
            raise UnsupportedError(f"tensor {t.name!r} has {len(t.shape)} dimensions; a bake holds at most "
                                   f"{MAX_DIMS}", t.path)
        by_name[t.name] = t
    return by_name


def _check_decodable(t: TensorInfo) -> None:
    from prebake.formats.quants import can_dequantize

    if not can_dequantize(t.qtype):
        raise UnsupportedError(f"tensor {t.name!r} is stored as {t.qtype} blocks, which neither prebake nor gguf-py "
                               "can decode; bake it with --keep-quant to keep the blocks as they are", t.path)


def _planned(t: TensorInfo, options: Options, blocks_dtype: str = "F16") -> Planned:
    if t.qtype is not None:  # GGML blocks: dequantize
        return Planned(t.name, t, options.dtype or blocks_dtype, "dequantize")
    if t.add:
        if t.dtype not in FLOAT_DTYPES:
            raise UnsupportedError(f"tensor {t.name!r} is {t.dtype}: an offset of {t.add} cannot apply", t.path)
        return Planned(t.name, t, options.dtype or t.dtype, "offset")
    if options.dtype and t.dtype in FLOAT_DTYPES and t.dtype != options.dtype:
        return Planned(t.name, t, options.dtype, "cast")
    return Planned(t.name, t, t.dtype, "copy")


def find_aliases(tensors: list[TensorInfo]) -> tuple[list[TensorInfo], list[Alias]]:
    """Splits tensors into those to store and aliases of stored ones.

    A tensor is an alias when its bytes lie inside a stored contiguous tensor of the same dtype
    and storage (tied embeddings, slices, transposes). Wider tensors are considered first, so a
    slice listed before its base still becomes the alias; ties go to the earlier name.
    """
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        if t.storage is not None and t.numel:
            groups.setdefault((t.path, t.storage.key, t.dtype), []).append(i)
    target: dict[int, tuple[int, int]] = {}
    for members in groups.values():
        if len(members) < 2:
            continue
        bases: list[int] = []
        for i in sorted(members, key=lambda i: (tensors[i].storage.start - tensors[i].storage.end,
                                               not tensors[i].storage.contiguous, i)):
            ref = tensors[i].storage
            base = next((b for b in bases if tensors[b].storage.start <= ref.start
                         and ref.end <= tensors[b].storage.end), None)
            if base is None:
                if ref.contiguous:
                    bases.append(i)
                continue
            itemsize = DTYPE_SIZES[tensors[i].dtype]
            target[i] = (base, (ref.start - tensors[base].storage.start) // itemsize)
    stored = [t for i, t in enumerate(tensors) if i not in target]
    aliases = [Alias(tensors[i].name, tensors[b].name, off, tensors[i].shape, tensors[i].storage.strides)
               for i, (b, off) in sorted(target.items())]
    return stored, aliases


def _shard(planned: list[Planned], options: Options, stem: str, first: int) -> list[ShardPlan]:
    groups: list[list[Planned]] = [[]]
    size = 0
    for p in planned:
        if groups[-1] and size + p.nbytes > options.shard_size:
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += p.nbytes
    n = len(groups)
    shards = []
    for i, group in enumerate(groups):
        file = f"{stem}.safetensors" if n == 1 else f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors"
        items = [(p.name, p.stored_dtype, p.shape, p.nbytes, DTYPE_SIZES[p.stored_dtype]) for p in group]
        slots = place(items, options.align, first + i)
        shard = ShardPlan(file, slots, {p.name: p for p in group})
        shard.header = header_bytes(slots, {"format": "pt"}, options.align)
        shards.append(shard)
    return shards
