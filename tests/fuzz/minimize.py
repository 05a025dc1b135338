"""Shrinking a defect's input while it still shows the same defect (the same signature).

First the mutation steps: each is dropped in turn and kept out if the defect stays. Then, for
a one-file input, the bytes: chunks are cut out, halves first, then smaller pieces, while the
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
             budget: int = 150) -> tuple[object, list[tuple[str, int]]]:
    """(smallest subject found, the steps kept) for a case that shows ``signature``."""
    bait = seeds.named(reader.seeds, case.seed) if reader.bait_bake else None
    trials = _Trials(reader, signature, root, limits, budget, bait)
    steps = list(case.steps)
    for step in list(steps):
        fewer = [s for s in steps if s != step]
        if len(fewer) < len(steps) and trials.same(replay(reader, case.seed, fewer, seeds)):
            steps = fewer
    subject = replay(reader, case.seed, steps, seeds)
    if steps != case.steps and not trials.same(subject):
        steps, subject = list(case.steps), case.subject
    if isinstance(subject, bytes):
        subject = _cut(subject, trials)
    return subject, steps


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
