"""A GGUF file as a source to bake: a Hugging Face model folder by default, its GGUF names on request.

Under Hugging Face names (``names="hf"``) each tensor is described as a view of the GGUF's
bytes under the name transformers' checkpoint uses (:mod:`prebake.convert.gguf_names`): an
expert's rows of a stacked ``ffn_*_exps`` are a slice of the map; a Q/K row permutation is an
order to read whole rows in (``TensorInfo.rows``), so blocks stay blocks; Gemma's norm offset
is a constant the executor adds (``TensorInfo.add``). The bake also gets the ``config.json``,
``generation_config.json`` and tokenizer files transformers would make of the metadata.

Either way every key-value pair is kept byte for byte in ``gguf_metadata.gguf``, a GGUF file of
no tensors (any GGUF reader opens it; ``prebake inspect --gguf`` prints it), and with
``gguf_metadata=True`` as JSON too (``gguf_metadata.json``: ten times the size for a large
vocabulary, and every string decoded to write it).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from prebake.convert import execute
from prebake.convert.gguf_config import NotMappable, hf_config
from prebake.convert.output import guard, writing_file
from prebake.formats.gguf_file import SHORT_ARRAY, GGUFFile, open_gguf
from prebake.formats.gguf_reader import describe, metadata_only, source_file
from prebake.formats.tensor import DTYPE_SIZES, SourceFile, StorageRef, TensorInfo, numel, raw_view

METADATA_GGUF = "gguf_metadata.gguf"
METADATA_JSON = "gguf_metadata.json"
HF_BLOCKS_DTYPE = "F32"  # what transformers' GGUF loader dequantizes to, and from_pretrained's default dtype
TORCH_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}

Writer = Callable[[Path, object], list[Path]]  # (bake folder, plan) -> the files it wrote


@dataclass
class GGUFSource:
    """What :class:`~prebake.convert.sources.Source` needs of a GGUF: its described tensors, the
    small files to write beside the shards, what blocks dequantize to by default, notes to show."""

    file: SourceFile
    writers: list[Writer] = field(default_factory=list)
    blocks_dtype: str = "F16"
    notes: list[str] = field(default_factory=list)


def gguf_source(path: str | os.PathLike, names: str = "hf", gguf_metadata: bool = False) -> GGUFSource:
    """The GGUF file at ``path``, to bake under ``names`` ("hf" or "gguf").

    ``names="hf"`` falls back to GGUF names, with a note saying why, where transformers cannot
    load the file's architecture (or is not installed).
    """
    parsed = open_gguf(path)
    writers: list[Writer] = [_metadata_file(parsed)] + ([_metadata_json(parsed)] if gguf_metadata else [])
    notes: list[str] = []
    if names == "hf":
        try:
            return _hf_source(parsed, writers)
        except NotMappable as e:
            notes.append(f"{Path(parsed.path).name}: {e}; baked under its GGUF names")
        except ImportError:  # no transformers, or one before 5 (no revert_weight_conversion)
            notes.append(f"{Path(parsed.path).name}: a Hugging Face folder needs transformers 5 (pip install "
                         "'transformers>=5'); baked under its GGUF names")
    return GGUFSource(source_file(parsed), writers, notes=notes)


def _hf_source(parsed: GGUFFile, writers: list[Writer]) -> GGUFSource:
    from prebake.convert.gguf_names import hf_layout
    from prebake.convert.gguf_tokenizer import has_tokenizer, write_tokenizer

    config = hf_config(parsed)
    layout = hf_layout(parsed, config)
    tensors = [_describe(parsed, t) for t in layout.tensors]
    metadata = {"gguf": parsed.metadata(max_list=SHORT_ARRAY)}
    if layout.dropped:
        metadata["gguf_unused"] = layout.dropped  # as transformers' GGUF loader, the bake leaves them out
    notes = []
    if layout.missing:
        notes.append(f"{Path(parsed.path).name}: transformers' GGUF map fills none of {len(layout.missing)} tensors "
                     f"of {layout.model_class.__name__} ({', '.join(layout.missing[:3])}...): from_pretrained "
                     "will initialize them")
    writers = writers + [_config_files(layout)]
    if has_tokenizer(parsed):  # first: the longest of them (0.3 s for 152k tokens)
        writers.insert(0, lambda folder, plan: _durable(write_tokenizer(parsed, layout.config, folder)))
    return GGUFSource(SourceFile(parsed.path, "gguf", tensors, metadata=metadata), writers, HF_BLOCKS_DTYPE, notes)


def _describe(parsed: GGUFFile, t) -> TensorInfo:
    """The description of one Hugging Face tensor: a view of its GGUF tensor's rows."""
    src = parsed.tensors[t.source]
    whole = describe(parsed, src)
    total = src.shape[0] if len(src.shape) == 1 else numel(src.shape[:-1])
    row_bytes = src.nbytes // total
    if not isinstance(t.rows, tuple):
        offset, nbytes, order = src.offset, src.nbytes, t.rows
    elif t.rows == (0, total):  # the whole tensor (a 1-D tensor of blocks has no whole rows to count in)
        offset, nbytes, order = src.offset, src.nbytes, None
    else:
        start, stop = t.rows
        offset, nbytes, order = src.offset + start * row_bytes, (stop - start) * row_bytes, None
    ref = StorageRef(src.name, offset, offset + nbytes, order is None)
    buffer, shape = parsed.buffer, t.shape
    if whole.qtype is None:
        itemsize = DTYPE_SIZES[whole.dtype]

        def read():
            return raw_view(buffer, offset, shape, itemsize)
    else:
        if len(src.shape) == 1 and (order is not None or t.rows != (0, total)):
            raise NotMappable(f"{t.name!r}: part of a 1-D tensor of {whole.qtype} blocks")
        rows = nbytes // row_bytes if len(src.shape) > 1 else 1

        def read():
            return buffer[offset:offset + nbytes].reshape(rows, nbytes // rows)

    return TensorInfo(t.name, whole.dtype, shape, nbytes, parsed.path, read, ref, whole.qtype,
                      rows=None if order is None else np.asarray(order), add=t.add, source_name=src.name,
                      offset=offset if order is None else None)


def _config_files(layout) -> Writer:
    """config.json (with the dtype the bake stores) and, for a model that generates, generation_config.json."""

    def write(folder: Path, plan) -> list[Path]:
        cfg = layout.config
        cfg.architectures = [layout.model_class.__name__]
        dtype = stored_dtype(plan)
        if dtype is not None:
            cfg.dtype = dtype
        out = [folder / "config.json"]
        execute.write_json(out[0], cfg.to_json_string(use_diff=True))
        if getattr(layout.model_class, "can_generate", lambda: False)():
            from transformers import GenerationConfig

            out.append(folder / "generation_config.json")
            execute.write_json(out[1], GenerationConfig.from_model_config(cfg).to_json_string(use_diff=True))
        return out

    return write


def stored_dtype(plan) -> str | None:
    """The float dtype most of the plan's values are in (torch's name), so ``dtype="auto"`` maps them as they are."""
    counts: dict[str, int] = {}
    for shard in plan.shards:
        for p in shard.tensors.values():
            if p.dtype in TORCH_NAMES and not p.packed:
                counts[p.dtype] = counts.get(p.dtype, 0) + numel(p.source.shape)
    return TORCH_NAMES[max(counts, key=counts.get)] if counts else None


def _metadata_file(parsed: GGUFFile) -> Writer:
    def write(folder: Path, plan) -> list[Path]:
        path = folder / METADATA_GGUF
        with writing_file(path) as tmp, guard(path), open(tmp, "wb") as f:
            f.write(metadata_only(parsed))
            f.flush()
            os.fsync(f.fileno())
        return [path]

    return write


def _metadata_json(parsed: GGUFFile) -> Writer:
    def write(folder: Path, plan) -> list[Path]:
        execute.write_json(folder / METADATA_JSON, parsed.metadata(max_list=None))
        return [folder / METADATA_JSON]

    return write


def _durable(paths: list[Path]) -> list[Path]:
    """Files written by another library, on disk before the bake's folder is renamed into place."""
    for p in paths:
        with guard(p), open(p, "rb") as f:
            os.fsync(f.fileno())
    return paths
