"""The reference readers, and the comparison of a bake with what they read.

- torch checkpoints: ``torch.load(weights_only=True)``, its object tree flattened under the
  names prebake gives (``a.b`` for nested dicts, ``a.0`` for lists and tuples), a cycle or two
  tensors under one name counting as a refusal;
- safetensors: ``safetensors.torch.load_file``;
- GGUF: gguf-py's ``GGUFReader``: every tensor's type, shape and bytes against the manifest's
  record and the shard's bytes (``--names gguf --keep-quant`` bakes keep them as they are), and
  the bake's ``gguf_metadata.gguf`` holding every key-value field byte for byte;
- GGUF baked as a Hugging Face folder: every baked tensor against ``gguf.quants.dequantize`` of
  the GGUF tensor it names as its source, as a multiset of rows (the llama family's Q/K rows are
  permuted on the way, so row order is not compared); and its tokenizer files against the ones
  transformers' own GGUF route (``get_gguf_tokenizer``, ``convert_gguf_tokenizer``, the class,
  ``save_pretrained``) makes of the whole file, byte for byte (prebake's may come from a sample of
  the vocabulary, spliced).

Each returns ``{"verdict": "equal" | "differs" | "ref-refused" | "no-reference", "why", "detail"}``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _refused(e: BaseException, who: str) -> dict:
    """The reference refused the input; one that ran out of memory did not judge it."""
    from tests.fuzz.runner import is_memory_error

    verdict = "no-reference" if is_memory_error(e) else "ref-refused"
    text = str(e).split("WeightsUnpickler error:", 1)[-1].strip()  # torch's reason, after its boilerplate
    return {"verdict": verdict, "why": type(e).__name__, "detail": f"{who}: {type(e).__name__}: {text}"[:500]}


def _differs(why: str, detail: str) -> dict:
    return {"verdict": "differs", "why": why, "detail": detail[:500]}


def flatten(obj) -> list[tuple[str, object]]:
    """(name, tensor) pairs of a loaded object tree, named as prebake names them; a cycle raises."""
    import torch

    out, stack, on_path = [], [("", obj, False)], set()
    while stack:
        name, node, leaving = stack.pop()
        if leaving:
            on_path.discard(id(node))
            continue
        if isinstance(node, torch.Tensor):
            out.append((name, node))
            continue
        if isinstance(node, dict):
            children = [(f"{name}.{k}" if name else str(k), v) for k, v in dict.items(node)]
        elif isinstance(node, (list, tuple)):
            children = [(f"{name}.{i}" if name else str(i), v) for i, v in enumerate(node)]
        else:
            continue
        if id(node) in on_path:
            raise ValueError(f"the object tree holds itself at {name!r}")
        on_path.add(id(node))
        stack.append((name, node, True))
        stack.extend((n, v, False) for n, v in reversed(children))
    return out


def raw(t) -> object:
    """A tensor's bytes in C order as a uint8 tensor (any dtype)."""
    import torch

    t = t.detach().contiguous()
    return t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


def compare_tensors(ref: list[tuple[str, object]], got: dict) -> dict:
    """The bake's tensors against the reference's, name by name: dtype, shape, bytes."""
    import torch

    names = [n for n, _ in ref]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        return {"verdict": "ref-refused", "why": "duplicate-name", "detail": f"two tensors are named {dup!r}"}
    if set(names) != set(got):
        missing, extra = sorted(set(names) - set(got))[:3], sorted(set(got) - set(names))[:3]
        return _differs("names", f"missing {missing} ({len(set(names) - set(got))}), extra {extra}")
    for name, t in ref:
        g = got[name]
        if not isinstance(g, torch.Tensor):
            return _differs("form", f"{name!r} loads as {type(g).__name__}")
        if g.dtype != t.dtype or tuple(g.shape) != tuple(t.shape):
            return _differs("dtype-or-shape", f"{name!r}: bake {g.dtype} {tuple(g.shape)}, reference {t.dtype} "
                                              f"{tuple(t.shape)}")
        if not torch.equal(raw(g), raw(t)):
            return _differs("bytes", f"{name!r}: bytes differ")
    return {"verdict": "equal", "detail": f"{len(ref)} tensors"}


def bake_tensors(out: Path) -> dict:
    from prebake.cache.load import load_from_manifest

    return dict(load_from_manifest(out))


# Inert values prebake's unpickler keeps as skipped leaves (README: "Safe"), which torch's
# weights-only loader takes only when told: the reference is told, so their tensors compare.
INERT = {"numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "numpy.dtype", "numpy.ndarray",
         "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "argparse.Namespace",
         "torch.device", "torch.torch_version.TorchVersion", "torch.UntypedStorage",
         "frozenset", "slice", "complex"}  # builtins, as torch's message names them: values prebake builds


def torch_load(src: Path):
    """``torch.load(weights_only=True)``, allowing the inert globals prebake allows, one by one."""
    import importlib
    import re

    import torch

    allowed = []
    while True:
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(src, map_location="cpu", weights_only=True)
        except Exception as e:
            m = re.search(r"GLOBAL ([\w.]+) was not an allowed global", str(e))
            if not m or m.group(1) not in INERT:
                raise
            module, _, name = m.group(1).rpartition(".")
            value = getattr(importlib.import_module(module or "builtins"), name)
            if value in allowed:  # allowed, and still refused where it stands
                raise
            allowed.append(value)


def torch_check(src: Path, out: Path) -> dict:
    try:
        obj = torch_load(src)
    except Exception as e:  # noqa: BLE001  whatever torch refuses with
        return _refused(e, "torch.load")
    try:
        ref = flatten(obj)
    except ValueError as e:
        return {"verdict": "ref-refused", "why": "cycle", "detail": str(e)}
    return compare_tensors(ref, bake_tensors(out))


def safetensors_check(src: Path, out: Path) -> dict:
    from safetensors.torch import load_file

    try:
        ref = list(load_file(src).items())
    except Exception as e:  # noqa: BLE001
        return _refused(e, "safetensors")
    return compare_tensors(ref, bake_tensors(out))


PLAIN = {"F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"}


def gguf_check(src: Path, out: Path) -> dict:
    """A ``--names gguf --keep-quant`` bake against gguf-py's reading of the same file."""
    from gguf import GGUFReader
    from prebake.formats.manifest import read_manifest

    try:
        reader = GGUFReader(src)
        tensors = {t.name: t for t in reader.tensors}
    except Exception as e:  # noqa: BLE001  gguf-py gives up on many files prebake refuses too
        return {"verdict": "no-reference", "why": type(e).__name__, "detail": f"GGUFReader: {e}"[:300]}
    m = read_manifest(out)
    if len(tensors) != len(reader.tensors) or set(tensors) != set(m.tensors):
        return _differs("names", f"gguf-py {sorted(tensors)[:4]}, bake {sorted(m.tensors)[:4]}")
    for name, t in tensors.items():
        e = m.tensors[name]
        kind = t.tensor_type.name
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        stored = e.qtype if e.qtype else e.dtype
        if stored != kind or tuple(e.shape) != shape or (kind in PLAIN) == bool(e.qtype):
            return _differs("type-or-shape", f"{name!r}: bake {stored} {tuple(e.shape)}, gguf-py {kind} {shape}")
        shard = np.memmap(m.shard_path(e.shard), np.uint8, "r")
        if not np.array_equal(shard[e.offset:e.offset + e.nbytes], np.asarray(t.data).reshape(-1).view(np.uint8)):
            return _differs("bytes", f"{name!r}: bytes differ from gguf-py's")
    return _same_fields(reader, out / "gguf_metadata.gguf") or {"verdict": "equal", "detail": f"{len(tensors)} tensors"}


def _same_fields(reader, kept: Path) -> dict | None:
    """None if the bake's metadata file holds every key-value field of the source byte for byte."""
    from gguf import GGUFReader

    try:
        copy = GGUFReader(kept).fields
    except Exception as e:  # noqa: BLE001
        return _differs("metadata-unreadable", f"gguf_metadata.gguf: {type(e).__name__}: {e}")
    for name, f in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        c = copy.get(name)
        if c is None or [p.tobytes() for p in c.parts] != [p.tobytes() for p in f.parts]:
            return _differs("metadata", f"key {name!r} is not kept as it is")
    return None


def gguf_hf_check(src: Path, out: Path) -> dict:
    """A Hugging Face folder baked from a GGUF (float, dequantized) against gguf-py's values."""
    from gguf import GGUFReader
    from prebake.cache.load import load_from_manifest
    from prebake.formats.manifest import read_manifest

    try:
        reader = GGUFReader(src)
        source = {t.name: t for t in reader.tensors}
    except Exception as e:  # noqa: BLE001
        return {"verdict": "no-reference", "why": type(e).__name__, "detail": f"GGUFReader: {e}"[:300]}
    m = read_manifest(out)
    loaded = load_from_manifest(out, quant=None)
    for name, e in m.tensors.items():
        t = source.get(e.source_name or name)
        if t is None:
            return _differs("source", f"{name!r} names {e.source_name!r}, which the GGUF does not hold")
        try:
            want = _gguf_values(t, loaded[name].dtype)
        except Exception as err:  # noqa: BLE001  a type gguf-py cannot dequantize
            return {"verdict": "no-reference", "why": type(err).__name__, "detail": f"dequantize: {err}"[:300]}
        got = loaded[name]
        if tuple(got.shape) != tuple(want.shape):
            return _differs("shape", f"{name!r}: bake {tuple(got.shape)}, GGUF {tuple(want.shape)}")
        if _rows(got) != _rows(want):
            return _differs("values", f"{name!r}: values differ from gguf-py's {t.name!r}")
    if (out / "tokenizer.json").exists():
        differs = _tokenizer_differs(src, out)
        if differs:
            return differs
    return {"verdict": "equal", "detail": f"{len(m.tensors)} tensors"}


def _tokenizer_differs(src: Path, out: Path) -> dict | None:
    """The bake's tokenizer files against transformers' route on the whole file (None: the same)."""
    import tempfile

    import transformers
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    config = transformers.AutoConfig.from_pretrained(out)
    cls = TOKENIZER_MAPPING.get(type(config), TokenizersBackend) or TokenizersBackend
    with tempfile.TemporaryDirectory() as tmp:
        try:
            architecture, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(str(src))
            backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
            backend.save(f"{tmp}/backend.json")
            paths = [Path(p) for p in cls(tokenizer_file=f"{tmp}/backend.json", **tokenizer_config, **extra)
                     .save_pretrained(f"{tmp}/whole")]
        except BaseException as e:  # noqa: BLE001  (a Rust panic is a BaseException)
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            return _differs("tokenizer", f"the bake has a tokenizer; transformers' route refuses the file: "
                                         f"{type(e).__name__}: {e}")
        for p in paths:
            if p.is_file() and (not (out / p.name).exists() or (out / p.name).read_bytes() != p.read_bytes()):
                return _differs("tokenizer", f"{p.name} differs from transformers' route on the whole file")
    return None


def _gguf_values(t, dtype):
    """A GGUF tensor as the bake should hold it: its own items if stored as ``dtype`` already,
    else gguf-py's dequantized float32 rounded once to ``dtype`` (as torch rounds)."""
    import torch
    from gguf.quants import dequantize

    shape = tuple(reversed(t.shape.tolist()))
    plain = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
    if plain.get(t.tensor_type.name) == dtype:
        raw = torch.from_numpy(np.ascontiguousarray(t.data).reshape(-1).view(np.uint8).copy())
        return raw.view(dtype).reshape(shape)
    return torch.from_numpy(np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(shape)).to(dtype)


def _rows(t):
    """A tensor's rows as a multiset of bytes, every NaN made the same NaN (row order and NaN
    payloads are not what a bake promises to keep once values are computed)."""
    from collections import Counter

    import torch

    t = t.contiguous().clone()
    if t.is_floating_point():
        t[torch.isnan(t)] = float("nan")
    flat = t.reshape(t.shape[0] if t.dim() > 1 else 1, -1)
    return Counter(bytes(r.view(torch.uint8).numpy()) for r in flat)
