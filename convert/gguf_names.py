"""Which Hugging Face tensor each GGUF tensor becomes, found by transformers' own GGUF loader.

transformers loads a GGUF in three steps: gguf-py's ``TensorNameMap`` (through
``get_gguf_hf_weights_map`` over the model's state dict) names each GGUF tensor, an
architecture's ``TensorProcessor`` undoes what llama.cpp's converter did to its values (the
Q/K row permutation of the llama family, Gemma's ``+1`` on norms, MoE experts stacked into
``ffn_*_exps`` and fused again), and since transformers 5 the model keeps some tensors in a
form of its own (a layer's experts fused in one parameter) that ``save_pretrained`` turns back
into checkpoint names through ``revert_weight_conversion``.

prebake runs exactly those steps, but on index arrays instead of weights, on a model built on
the meta device (:func:`meta_model`): each GGUF tensor becomes an array holding, for each of
its rows, the number of the tensor and of the row (two columns: enough to see a column moved
or a transpose, both refused), and once more as zeros. What comes out under each checkpoint
name says, with no table of prebake's own, which rows of which GGUF tensor it is (a slice:
a zero-copy view; or a permutation of whole rows, which for blocks moves whole block rows)
and what constant was added to its values (the zeros come out as ``-1`` for a Gemma norm).
Anything else a processor does (a log, a transpose, a reshape across rows) is
:class:`NotMappable`, and the file keeps its GGUF names. No tensor byte is read here.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from prebake.convert.gguf_config import NotMappable
from prebake.formats.gguf_file import GGUFFile, GGUFTensor
from prebake.formats.tensor import numel

ROW_BITS = 32  # an index is (tensor number << ROW_BITS) + row, times two, plus the column: exact in float64
COLUMNS = 2


@dataclass(frozen=True)
class HFTensor:
    """A checkpoint tensor made of one GGUF tensor's rows.

    ``rows`` is ``(start, stop)`` for a run of the source's rows (the usual case, and an
    expert's share of a stacked ``ffn_*_exps``), or an index array for a permutation of all of
    them. A source's rows are its first-axis items for a 1-D tensor, else the rows of its last
    axis (for blocks, block rows). ``add`` is added to every value.
    """

    name: str
    source: str
    shape: tuple[int, ...]
    rows: tuple[int, int] | np.ndarray = field(compare=False)
    add: float = 0.0


@dataclass
class HFLayout:
    """A GGUF under transformers' names: its config object, the model class, its tensors, the
    GGUF tensors transformers does not load, and the model's tensors nothing fills."""

    config: object
    model_class: type
    tensors: list[HFTensor]
    dropped: list[str]
    missing: list[str]


def hf_layout(f: GGUFFile, config: dict) -> HFLayout:
    """Maps every tensor of ``f`` the way transformers' GGUF loader would; raises :class:`NotMappable`."""
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    model, cfg = meta_model(config)
    arch = f.fields["general.architecture"].value()
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config)
    with _one_name_map():
        key_map = get_gguf_hf_weights_map(model, processor)
    sources = list(f.tensors.values())
    ids, dropped = _load(processor, key_map, sources, _index_array)
    zeros, _ = _load(processor, key_map, sources, lambda _, t: np.zeros(_probe_shape(t)))
    state = model.state_dict()
    missing = sorted(set(state) - set(ids) - _tied(model, ids))
    expected = {k: tuple(v.shape) for k, v in _revert(model, {k: state[k] for k in ids if k in state}).items()}
    ids, zeros = _revert(model, ids), _revert(model, zeros)
    tensors = [_decode(name, ids[name], zeros[name], sources, expected.get(name)) for name in ids]
    return HFLayout(cfg, type(model), tensors, dropped, missing)


def meta_model(config: dict):
    """(the model transformers would build for ``config``, on the meta device; its config object)."""
    import torch
    import transformers
    from prebake.convert.gguf_config import NotMappable

    try:  # transformers checks a config its own way: whatever it refuses, it refuses
        cfg = transformers.AutoConfig.for_model(**config)
        cls = model_class(cfg)
        with torch.device("meta"):
            model = cls(cfg)
    except Exception as e:  # transformers validates a config its own way (huggingface_hub's strict
        # dataclasses, its classes' checks): whatever it refuses of this file's metadata, it refuses
        raise NotMappable(f"transformers cannot build a model of its metadata ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    return model, cfg


def model_class(cfg) -> type:
    """The class ``from_pretrained`` users reach for: the config's ``architectures``, else the
    causal LM, else the seq2seq LM, else the base model of its type."""
    import transformers
    from transformers.models.auto import modeling_auto as auto

    for name in getattr(cfg, "architectures", None) or ():
        if hasattr(transformers, name):
            return getattr(transformers, name)
    for mapping in (auto.MODEL_FOR_CAUSAL_LM_MAPPING, auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING, auto.MODEL_MAPPING):
        if type(cfg) in mapping:
            return mapping[type(cfg)]
    raise NotMappable(f"transformers has no model class for {cfg.model_type!r}")


@contextmanager
def _one_name_map():
    """transformers' ``get_gguf_hf_weights_map`` asks gguf-py for a ``TensorNameMap`` again for each
    of the model's submodules (20 ms each: 6 s for a 24-layer model); the map is a pure function of
    (architecture, block count), so while it runs each is built once."""
    import gguf

    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


def _probe_shape(t: GGUFTensor) -> tuple[int, ...]:
    """A 1-D tensor whole; else its rows, each cut to two columns (the processors act on rows)."""
    return t.shape if len(t.shape) == 1 else (*t.shape[:-1], min(t.shape[-1], COLUMNS))


def _index_array(k: int, t: GGUFTensor) -> np.ndarray:
    """Tensor ``k``'s probe: ((k << ROW_BITS) + row) * 2 + column, as float64 (exact to 2**53)."""
    shape = _probe_shape(t)
    rows = numel(shape[:-1]) if len(shape) > 1 else shape[0]
    if rows >= 1 << ROW_BITS:
        raise NotMappable(f"tensor {t.name!r} has more than 2**{ROW_BITS} rows")
    base = ((k << ROW_BITS) + np.arange(rows, dtype=np.float64)) * 2
    if len(shape) == 1:
        return base
    return (base[:, None] + np.arange(shape[-1], dtype=np.float64)).reshape(shape)


def _load(processor, key_map: dict, sources: list[GGUFTensor], probe) -> tuple[dict, list[str]]:
    """load_gguf_checkpoint's tensor loop, on probes: {transformers' name: tensor}, and the GGUF
    tensors it leaves out."""
    import torch

    parsed: dict = {"tensors": {}}
    dropped = []
    for k, t in enumerate(sources):
        try:
            result = processor.process(weights=probe(k, t), name=t.name, tensor_key_mapping=key_map,
                                       parsed_parameters=parsed)
        except Exception as e:  # a processor that needs the real columns (a reshape by width)
            raise NotMappable(f"transformers' {type(processor).__name__} rearranges {t.name!r} in a way prebake "
                              f"cannot follow ({type(e).__name__})") from None
        if result.name is None:
            continue  # the processor stored it itself (stacked experts joined into one parameter)
        if result.name not in key_map:
            dropped.append(t.name)
            continue
        parsed["tensors"][key_map[result.name]] = torch.from_numpy(np.array(result.weights, dtype=np.float64))
    return parsed["tensors"], dropped


def _tied(model, present: dict) -> set[str]:
    """The tensors the model ties to one that is present (its lm_head to its embeddings)."""
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {}
    if not isinstance(tied, dict) or not getattr(model.config, "tie_word_embeddings", True):
        return set()
    return {target for target, source in tied.items() if source in present}


def _revert(model, state: dict) -> dict:
    """transformers' names in memory -> the names ``save_pretrained`` writes (experts split again)."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, state)


def _decode(name: str, ids, zeros, sources: list[GGUFTensor], expected: tuple[int, ...] | None) -> HFTensor:
    """What a checkpoint tensor is, read off the probe values transformers left under its name.

    Where only the shape differs from the model's own (``expected``) the model's wins: llama.cpp
    has squeezed size-1 axes in some versions and not in others, and transformers' processors
    expect one of the two (Qwen2-MoE's ``ffn_gate_inp_shexp``).
    """
    v, z = ids.double().numpy(), zeros.double().numpy()
    add = float(z.flat[0]) if z.size else 0.0
    if not np.isfinite(add) or (z != add).any():
        raise NotMappable(f"transformers computes {name!r} from its GGUF values in a way prebake cannot store")
    v = v - add
    code = np.floor_divide(v, 2)
    k = int(code.flat[0]) >> ROW_BITS
    if not 0 <= k < len(sources):
        raise NotMappable(f"transformers computes {name!r} from its GGUF values in a way prebake cannot store")
    src = sources[k]
    first = code - (k << ROW_BITS)
    if len(src.shape) == 1:
        shape, rows, columns = tuple(v.shape), first.reshape(-1), v.reshape(-1, 1) - 2 * code.reshape(-1, 1)
    else:
        shape = (*v.shape[:-1], src.shape[-1]) if v.ndim else ()
        flat = v.reshape(-1, v.shape[-1]) if v.ndim else v.reshape(1, 1)
        rows, columns = first.reshape(flat.shape)[:, 0], flat - 2 * np.floor_divide(flat[:, :1], 2)
    total = src.shape[0] if len(src.shape) == 1 else numel(src.shape[:-1])
    if not (columns == np.arange(columns.shape[1])).all() or not ((rows >= 0) & (rows < total)).all() \
            or (rows != np.round(rows)).any() or numel(shape) != len(rows) * numel(src.shape) // total:
        raise NotMappable(f"transformers builds {name!r} from {src.name!r} by more than moving its rows")
    rows = rows.astype(np.int64)
    if expected is not None and numel(expected) != numel(shape):
        raise NotMappable(f"the metadata describes a model whose {name!r} is {list(expected)}, but the file holds "
                          f"{list(shape)}")
    if expected is not None and expected != shape:
        shape = expected
    if len(rows) and (rows == np.arange(rows[0], rows[0] + len(rows))).all():
        return HFTensor(name, src.name, shape, (int(rows[0]), int(rows[0]) + len(rows)), add)
    if len(rows) != total or shape != src.shape:
        raise NotMappable(f"transformers builds {name!r} from scattered rows of {src.name!r}")
    return HFTensor(name, src.name, shape, rows, add)
