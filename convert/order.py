"""Execution order: embeddings, layer 0, layer 1, ..., final norm, head.

Laying tensors out in this order makes a sequential read of the shards the order a forward
pass touches them, so readahead and prefetch serve the model as it runs.
"""

from __future__ import annotations

import re

# The first numeric path component names the layer: model.layers.3., transformer.h.3., blk.3.,
# encoder.layer.3., decoder.block.3., double_blocks.3. ... The text before it names the stack.
FIRST_NUMBER = _NUMBER = re.compile(r"(?:^|\.)(\d+)(?=\.|$)")
_EMBEDDING = re.compile(r"embed|wte\b|wpe\b|token_embd|word_embeddings|position_embeddings|^shared\.")
_HEAD = re.compile(r"(^|\.)(lm_head|output|classifier|score|cls|qa_outputs)(\.|$)")
# MoE routers pick the experts (their rows are the experts'): transformers' and GGUF's names
_ROUTER = re.compile(r"(\.gate\.(weight|bias)|ffn_gate_inp\.weight|\.router(\.layer)?\.(weight|bias))$")


def layer_of(name: str) -> tuple[str, tuple[int, ...]] | None:
    """``("model.layers", (3,))`` for ``model.layers.3.mlp.experts.1.w1`` ... the stack and its numbers.

    All numeric components are returned (layer first, then e.g. the expert), None for tensors
    outside any numbered stack.
    """
    first = _NUMBER.search(name)
    if first is None:
        return None
    numbers = tuple(int(m.group(1)) for m in _NUMBER.finditer(name))
    return name[:first.start()], numbers


def big_first_in_layers(names: list[str], nbytes: dict[str, int], big: int) -> list[str]:
    """Within each layer, tensors of ``big`` bytes or more first, then the small ones (norms, biases).

    Execution order holds layer by layer; inside a layer, grouping the small tensors means the
    big ones (aligned) follow each other without gaps, so a layer needs at most one padding entry
    instead of one per bias.
    """
    out: list[str] = []
    run: list[str] = []
    key = None
    for name in [*names, None]:
        layer = layer_of(name) if name is not None else None
        k = (layer[0], layer[1][0]) if layer else None
        if run and (k != key or k is None):
            out += [n for n in run if nbytes[n] >= big] + [n for n in run if nbytes[n] < big]
            run = []
        if name is None:
            break
        if k is None:
            out.append(name)
        else:
            run.append(name)
        key = k
    return out


def is_embedding(name: str) -> bool:
    """Whether ``name`` is an input embedding (token, position) outside the numbered layers."""
    return layer_of(name) is None and bool(_EMBEDDING.search(name))


def is_router(name: str) -> bool:
    """Whether ``name`` is a MoE router (gate) weight or bias."""
    return bool(_ROUTER.search(name))


def is_head(name: str) -> bool:
    """Whether ``name`` is an output head outside the numbered layers (lm_head, output, classifier)."""
    return layer_of(name) is None and not _EMBEDDING.search(name) and bool(_HEAD.search(name))


def execution_order(names: list[str]) -> list[str]:
    """Sorts tensor names into execution order; ties keep the source order."""
    stacks: dict[str, int] = {}
    for name in names:
        layer = layer_of(name)
        if layer is not None:
            stacks.setdefault(layer[0], len(stacks))
    keys = {}
    for index, name in enumerate(names):
        layer = layer_of(name)
        if layer is not None:
            keys[name] = (1, stacks[layer[0]], layer[1], index)
        elif _EMBEDDING.search(name):
            keys[name] = (0, 0, (), index)
        elif _HEAD.search(name):
            keys[name] = (3, 0, (), index)
        else:
            keys[name] = _after_its_stack(name, stacks, index)
    return sorted(names, key=keys.__getitem__)


def _after_its_stack(name: str, stacks: dict[str, int], index: int) -> tuple:
    """A final norm goes right after the stack it closes: encoder.final_layer_norm after
    encoder.block.N, model.norm after model.layers.N; anything else after all stacks."""
    owner = max((s for s in stacks if "." in s and name.startswith(s.rsplit(".", 1)[0] + ".")),
                key=len, default=None)
    if owner is None:
        return (2, 0, (), index)
    return (1, stacks[owner], (float("inf"),), index)
