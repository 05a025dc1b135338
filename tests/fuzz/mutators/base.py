"""What every mutator shares: the exception for "cannot apply here", folders as subjects, values.

A mutator is ``fn(subject, rng, ctx) -> (subject, description)``: ``subject`` is the bytes of
one file, or a :class:`Folder` for inputs made of several files (a bake); ``rng`` is its own
``random.Random``, so a step replays alone; ``ctx`` (a :class:`Context`) holds the other seeds
of the same kind (for splicing) and shared blobs. It returns a new subject, never changes the
one it was given, and raises :class:`NotApplicable` when the subject has nothing it can change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from random import Random


class NotApplicable(Exception):
    """The mutator finds nothing to change in this subject (the campaign picks another)."""


@dataclass
class Context:
    """What a mutator may draw on besides its subject."""

    others: list = field(default_factory=list)  # the other seeds of the same kind
    extras: dict[str, bytes] = field(default_factory=dict)  # shared blobs (a deflate bomb)


NO_CONTEXT = Context()


@dataclass
class Folder:
    """An input made of files: relative path -> bytes, and symbolic links: path -> target."""

    files: dict[str, bytes]
    links: dict[str, str] = field(default_factory=dict)

    def copy(self) -> Folder:
        return Folder(dict(self.files), dict(self.links))


def interesting(rng: Random, old: int, bits: int) -> int:
    """A value worth writing over an unsigned ``bits``-wide field that held ``old``."""
    top = (1 << bits) - 1
    choices = [0, 1, old + 1, old - 1, old * 2, old // 2, top, top // 2, top // 2 + 1, old ^ (1 << rng.randrange(bits)),
               rng.getrandbits(bits), 1 << min(bits - 1, 31), 1 << min(bits - 1, 40), 7, 8, 4095, 4096]
    for _ in range(10):
        new = rng.choice(choices) & top
        if new != old:
            return new
    return (old + 1) & top


def offset(rng: Random, size: int, head: int = 4096) -> int:
    """An offset in ``size`` bytes, half the time in the first ``head`` (where the headers are)."""
    if size <= 0:
        raise NotApplicable("empty")
    return rng.randrange(min(size, head)) if rng.random() < 0.5 else rng.randrange(size)
