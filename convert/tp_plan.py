"""``--tp-layout N``: which planned tensors are stored as N column blocks, and the rest's split.

Every planned tensor is labelled with how tensor-parallel ranks split it
(:func:`prebake.formats.tp_layout.split_kind`: column, row, vocab, or replicated), so a load
for rank r of k knows which bytes are its own. With ``--tp-layout N``, each row-parallel 2-D
weight whose columns divide into N (times the GGML block, for blocks) is planned as N tiles:
stored ``(N, rows, columns / N)``, the slice of rank r of any k dividing N one byte range. A
row-parallel tensor that cannot be tiled is kept whole, and the reason recorded.
"""

from __future__ import annotations

from dataclasses import replace

from prebake.formats.ggml_types import BLOCK_SIZES
from prebake.formats.tp_layout import ROW, split_kind


def tp_split(planned: list, n: int | None, model_type: str | None) -> tuple[list, dict[str, str]]:
    """``planned`` with each tensor's ``tp`` label (and ``tiles`` where ``n`` tiles it); the
    row-parallel tensors left whole, with why."""
    out, notes = [], {}
    for p in planned:
        kind = split_kind(p.name, model_type)
        if kind != ROW or not n:
            out.append(replace(p, tp=kind))
            continue
        why = _untileable(p, n)
        if why:
            notes[p.name] = f"kept whole: {why}"
            out.append(replace(p, tp=kind))
        else:
            out.append(replace(p, tp=f"{ROW}:{n}", tiles=n))
    return out, notes


def _untileable(p, n: int) -> str | None:
    shape = p.source.shape
    if len(shape) != 2:
        return f"it has {len(shape)} dimensions (only 2-D weights are tiled)"
    unit = BLOCK_SIZES[p.qtype][0] if p.qtype else 1
    if shape[1] % (n * unit):
        what = f"{n} x the {p.qtype} block ({unit})" if p.qtype else str(n)
        return f"its {shape[1]} columns do not divide into {what}"
    return None
