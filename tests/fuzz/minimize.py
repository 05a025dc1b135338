"""Shrinking a defect's input while it still shows the same defect (the same signature).

First the seed: the same mutation steps are replayed on each smaller seed of the reader, and
the smallest that still shows the defect is kept. Then the steps: each is dropped in turn and
kept out if the defect stays. Then, for a one-file input, the bytes: chunks are cut out, halves first, then smaller pieces, while the
defect stays (a zip or a pickle keeps enough structure for many cuts to fail; those trials are
the budget's cost). A folder input keeps its files as they are.
"""

from __future__ import annotations

from pathlib import Path

from tests.fuzz.campaign import Case, Seeds, judge_subject, replay
from tests.fuzz.readers import Reader
from tests.fuzz.runner import Limits


class _Trials:
    """Runs trials until the budget is spent; says whether a subject still shows ``signature``."""

    def __init__(self, reader: Reader, signature: str, root: Path, limits: Limits, budget: int, bait):
        self.reader, self.signature, self.root, self.limits, self.left, self.bait = (
            reader, signature, root, limits, budget, bait)

    def same(self, subject) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        verdict, _ = judge_subject(self.reader, subject, self.root, self.limits, self.bait)
        return verdict.signature == self.signature


def minimize(reader: Reader, case: Case, signature: str, seeds: Seeds, root: Path, limits: Limits,
             budget: int = 150) -> tuple[object, list[tuple[str, int]], str]:
    """(smallest subject found, the steps kept, the seed they apply to) for a case that shows ``signature``."""
    seed, steps = _smaller_seed(reader, case, signature, seeds, root, limits)
    bait = seeds.named(reader.seeds, seed) if reader.bait_bake else None
    trials = _Trials(reader, signature, root, limits, budget, bait)
    for step in list(steps):
        fewer = [s for s in steps if s != step]
        if len(fewer) < len(steps) and trials.same(replay(reader, seed, fewer, seeds)):
            steps = fewer
    subject = replay(reader, seed, steps, seeds)
    if (seed, steps) != (case.seed, case.steps) and not trials.same(subject):
        steps, subject = list(case.steps), case.subject
        seed = case.seed
    if isinstance(subject, bytes):
        subject = _cut(subject, trials)
    return subject, steps, seed


def _smaller_seed(reader: Reader, case: Case, signature: str, seeds: Seeds, root: Path,
                  limits: Limits) -> tuple[str, list[tuple[str, int]]]:
    """The smallest seed on which the case's steps still show ``signature`` (the case's own if none)."""
    def size(subject) -> int:
        return len(subject) if isinstance(subject, bytes) else sum(len(b) for b in subject.files.values())

    mine = size(seeds.named(reader.seeds, case.seed))
    for name, subject in sorted(seeds.by_kind[reader.seeds], key=lambda ns: size(ns[1])):
        if size(subject) >= mine:
            break
        bait = subject if reader.bait_bake else None
        trials = _Trials(reader, signature, root, limits, 1, bait)
        if trials.same(replay(reader, name, case.steps, seeds)):
            return name, list(case.steps)
    return case.seed, list(case.steps)


def _cut(data: bytes, trials: _Trials) -> bytes:
    size = len(data) // 2
    while size >= 1 and trials.left > 0:
        at, cut = 0, False
        while at < len(data) and trials.left > 0:
            smaller = data[:at] + data[at + size:]
            if smaller and trials.same(smaller):
                data, cut = smaller, True
            else:
                at += size
        if not cut:
            size //= 2
    return data
