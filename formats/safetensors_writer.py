"""The aligned safetensors layout: where each tensor goes, the header, and a file writer.

A stock safetensors reader requires the data buffer to be covered exactly, with no holes and
no trailing bytes, so alignment gaps become real ``U8`` padding entries with reserved names.
The header itself is padded with spaces (which the format allows) so the data buffer starts on
an ``align`` boundary; offsets aligned inside the buffer are then aligned in the file.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

PAD_PREFIX = "__prebake_pad__"
BIG_TENSOR = 1 << 20  # tensors this large or larger start on an `align` boundary


@dataclass(frozen=True)
class Slot:
    """One header entry: a tensor (or padding) at ``offset`` bytes into the data buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def is_padding(self) -> bool:
        return self.name.startswith(PAD_PREFIX)


def pad_name(shard: int, index: int) -> str:
    return f"{PAD_PREFIX}.{shard}.{index}"


def is_padding(name: str) -> bool:
    return name.startswith(PAD_PREFIX)


Item = tuple  # (name, dtype, shape, nbytes, itemsize)
LOOKAHEAD = 64  # items ahead whose small tensors may fill a gap (about two layers)
MAX_STATES = 4096  # bounds the search for fillers whatever the sizes


def place(items: list[Item], align: int, shard: int) -> list[Slot]:
    """Lays out ``(name, dtype, shape, nbytes, itemsize)`` in about this order, without holes.

    Tensors of ``BIG_TENSOR`` bytes or more start at a multiple of ``align``; every tensor
    starts at a multiple of its item size. A gap before an aligned tensor is filled with small
    tensors (norms, biases) pulled forward from the next few items, chosen so that they end
    exactly on a boundary; a padding entry (a ``U8`` slot stock readers see as a tensor) is
    left only where no such choice exists. Small tensors thus move at most about a layer
    earlier than their execution order, which costs a prefetch nothing.
    """
    slots: list[Slot] = []
    placed: set[int] = set()
    pos = pads = 0
    for i, (name, dtype, shape, nbytes, itemsize) in enumerate(items):
        if i in placed:
            continue
        big = nbytes >= BIG_TENSOR
        if big and pos % align:
            for j in _fillers(items, i + 1, placed, pos, align):
                placed.add(j)
                slots.append(Slot(items[j][0], items[j][1], items[j][2], pos, items[j][3]))
                pos += items[j][3]
        gap = -pos % (align if big else itemsize)
        if gap:
            slots.append(Slot(pad_name(shard, pads), "U8", (gap,), pos, gap))
            pads += 1
            pos += gap
        slots.append(Slot(name, dtype, shape, pos, nbytes))
        pos += nbytes
    return slots


def _fillers(items: list[Item], start: int, placed: set[int], pos: int, align: int) -> list[int]:
    """Indices of small items after ``start`` whose bytes, laid out from ``pos`` (widest items
    first, so each stays aligned to its item size), end exactly on an ``align`` boundary; [] if none do."""
    pool = [j for j in range(start, min(len(items), start + LOOKAHEAD))
            if j not in placed and items[j][3] < BIG_TENSOR and items[j][3] and pos % items[j][4] == 0]
    gap = -pos % align
    # subset sums modulo align: residue -> (fewest bytes reaching it, the items); bounded states
    best: dict[int, tuple[int, tuple[int, ...]]] = {0: (0, ())}
    for j in pool:
        size = items[j][3]
        for residue, (total, chosen) in list(best.items()):
            r = (residue + size) % align
            better = r in best and best[r][0] > total + size
            if better or (r not in best and len(best) < MAX_STATES):
                best[r] = (total + size, (*chosen, j))
        if gap in best:
            break
    if gap not in best:
        return []
    return sorted(best[gap][1], key=lambda j: (-items[j][4], j))


def header_bytes(slots: list[Slot], metadata: dict[str, str], align: int) -> bytes:
    """The 8-byte length and JSON header, space-padded so the data starts at a multiple of ``align``."""
    header: dict = {"__metadata__": metadata}
    for s in slots:
        header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [s.offset, s.offset + s.nbytes]}
    body = json.dumps(header, separators=(",", ":")).encode()
    total = 8 + len(body)
    body += b" " * (-total % max(align, 8))
    return struct.pack("<Q", len(body)) + body
