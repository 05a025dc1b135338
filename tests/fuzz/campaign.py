"""A campaign: for each reader, N mutated inputs made from its seeds, run, judged and counted.

Input ``i`` of reader ``r`` in a campaign with seed ``s`` is a function of ``(s, r, i)`` and the
seeds alone (:func:`make_case`), so any input can be made again, and a defect's mutation steps
replayed one by one (:func:`replay`). Each input is laid out in a fresh work folder
(:func:`lay_out`), run by :func:`tests.fuzz.runner.run_all` and judged by
:func:`tests.fuzz.classify.judge`; defects are grouped by signature, with the first input that
showed each kept for saving and minimizing.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from random import Random

from tests.fuzz.classify import Verdict, judge
from tests.fuzz.mutators import ALL, TABLES
from tests.fuzz.mutators.base import Context, Folder, NotApplicable
from tests.fuzz.readers import READERS, Reader
from tests.fuzz.runner import DEFAULT_LIMITS, Job, Limits, Raw, run_all

STEPS = ([1, 2, 3], [0.6, 0.25, 0.15])  # mutations per input, and how often
MAX_INPUT = 16 << 20  # a mutation making an input bigger than this is not kept (a bomb is small)


@dataclass
class Case:
    reader: str
    index: int
    seed: str  # the seed's name
    steps: list[tuple[str, int]]  # (mutator, its rng seed), applied in order
    descriptions: list[str]
    subject: bytes | Folder = field(repr=False)


@dataclass
class Seeds:
    by_kind: dict[str, list[tuple[str, object]]]
    extras: dict[str, bytes]

    def named(self, kind: str, name: str):
        return dict(self.by_kind[kind])[name]

    def context(self, kind: str, name: str) -> Context:
        return Context([s for n, s in self.by_kind[kind] if n != name], self.extras)


def apply(op: str, subject, step_seed: int, ctx: Context):
    return ALL[op](subject, Random(step_seed), ctx)


def make_case(reader: Reader, index: int, seed: int, seeds: Seeds, errors: Counter | None = None) -> Case:
    """Input ``index`` of ``reader`` in the campaign ``seed``."""
    rng = Random(f"{seed}/{reader.name}/{index}")
    name, subject = rng.choice(seeds.by_kind[reader.seeds])
    ctx = seeds.context(reader.seeds, name)
    table = TABLES[reader.table]
    steps, descriptions = [], []
    for _ in range(rng.choices(*STEPS)[0]):
        for _attempt in range(10):
            op = rng.choices(list(table), list(table.values()))[0]
            step_seed = rng.getrandbits(32)
            try:
                new, what = apply(op, subject, step_seed, ctx)
            except NotApplicable:
                continue
            except Exception as e:  # noqa: BLE001  a mutator tripping over an earlier mutation
                if errors is not None:
                    errors[f"{op}: {type(e).__name__}"] += 1
                continue
            if _size(new) > MAX_INPUT:
                continue
            subject = new
            steps.append((op, step_seed))
            descriptions.append(f"{op}: {what}")
            break
    return Case(reader.name, index, name, steps, descriptions, subject)


def _size(subject) -> int:
    return len(subject) if isinstance(subject, bytes) else sum(len(b) for b in subject.files.values())


def replay(reader: Reader, seed_name: str, steps: list[tuple[str, int]], seeds: Seeds):
    """The subject that ``steps`` make of the seed ``seed_name`` (a step that no longer applies
    is skipped)."""
    subject = seeds.named(reader.seeds, seed_name)
    ctx = seeds.context(reader.seeds, seed_name)
    for op, step_seed in steps:
        try:
            subject, _ = apply(op, subject, step_seed, ctx)
        except Exception:  # noqa: BLE001
            continue
    return subject


def lay_out(reader: Reader, subject, work: Path, bait=None) -> Path:
    """A fresh work folder: ``in/`` holding the input, ``bait/`` what nothing may open."""
    if work.exists() or work.is_symlink():
        shutil.rmtree(work)
    (work / "in").mkdir(parents=True)
    if isinstance(subject, bytes):
        (work / "in" / reader.entry).write_bytes(subject)
    else:
        _write_folder(work / "in", subject)
    (work / "bait").mkdir()
    (work / "bait" / "secret").write_text("the bait: nothing may open this file\n")
    if isinstance(bait, Folder):
        _write_folder(work / "bait", Folder({p.split("/", 1)[1]: b for p, b in bait.files.items()}))
    return work


def _write_folder(root: Path, folder: Folder) -> None:
    for rel, data in folder.files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    for rel, target in folder.links.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.exists() or p.is_symlink():
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        p.symlink_to(target)


def job(reader: Reader, key, work: Path) -> Job:
    """The job that runs ``reader``'s target on the input laid out in ``work``."""
    src, out = work / "in" / reader.entry, work / "out"
    check = reader.check
    return Job(key, work, lambda w, stage: reader.bake(src, out, stage),
               (lambda w, report: check(src, out)) if check else None)


@dataclass
class Defect:
    reader: str
    verdict: Verdict
    case: Case
    count: int = 1
    log: str = ""


@dataclass
class ReaderResult:
    reader: str
    counts: Counter
    seconds: float


@dataclass
class Summary:
    results: list[ReaderResult]
    defects: dict[str, Defect]
    mutator_errors: Counter
    seconds: float
    baseline: dict[str, dict[str, str]] = field(default_factory=dict)  # reader -> seed -> class, unmutated


def run_reader(reader: Reader, n: int, seed: int, seeds: Seeds, root: Path, limits: Limits, parallel: int,
               defects: dict[str, Defect], errors: Counter, start: int = 0) -> ReaderResult:
    """Runs inputs ``start .. start + n - 1`` of ``reader``; adds its defects to ``defects``."""
    counts: Counter = Counter()
    began = time.monotonic()

    def jobs():
        for i in range(start, start + n):
            case = make_case(reader, i, seed, seeds, errors)
            work = lay_out(reader, case.subject, root / f"{reader.name}-{i}",
                           seeds.named(reader.seeds, case.seed) if reader.bait_bake else None)
            yield job(reader, case, work)

    shown = began
    for done, raw in run_all(jobs(), limits, parallel):
        verdict = judge(raw, reader.name)
        counts[verdict.cls] += 1
        if verdict.defect:
            _note(defects, reader, verdict, done.key, raw)
        shutil.rmtree(done.work, ignore_errors=True)
        if time.monotonic() - shown >= 10:  # a campaign runs for an hour: say where it is
            shown = time.monotonic()
            print(f"{reader.name}: {sum(counts.values())}/{n} {dict(counts)}", file=sys.stderr, flush=True)
    return ReaderResult(reader.name, counts, time.monotonic() - began)


def _note(defects: dict[str, Defect], reader: Reader, verdict: Verdict, case: Case, raw: Raw) -> None:
    key = f"{reader.name}|{verdict.signature}"
    if key in defects:
        defects[key].count += 1
    else:
        defects[key] = Defect(reader.name, verdict, case, 1, raw.log[-3000:])


def run_baseline(reader: Reader, seeds: Seeds, root: Path, limits: Limits, parallel: int) -> dict[str, str]:
    """Each seed as it is: a correct bake or a clean refusal (a payload seed), else the harness is wrong."""

    def jobs():
        for k, (name, subject) in enumerate(seeds.by_kind[reader.seeds]):
            work = lay_out(reader, subject, root / f"{reader.name}-seed{k}", subject if reader.bait_bake else None)
            yield job(reader, name, work)

    out = {}
    for done, raw in run_all(jobs(), limits, parallel):
        verdict = judge(raw, reader.name)
        out[done.key] = verdict.cls if not verdict.defect else f"{verdict.cls}: {verdict.detail[:200]}"
        shutil.rmtree(done.work, ignore_errors=True)
    return out


def run_campaign(names: list[str], n: int, seed: int, seeds: Seeds, root: Path, limits: Limits = DEFAULT_LIMITS,
                 parallel: int = 1, progress=None) -> Summary:
    """The seeds of each reader as they are, then ``n`` mutated inputs of each."""
    began = time.monotonic()
    defects: dict[str, Defect] = {}
    errors: Counter = Counter()
    results, baseline = [], {}
    for name in names:
        baseline[name] = run_baseline(READERS[name], seeds, root, limits, parallel)
        results.append(run_reader(READERS[name], n, seed, seeds, root, limits, parallel, defects, errors))
        if progress:
            progress(results[-1])
    return Summary(results, defects, errors, time.monotonic() - began, baseline)


def judge_subject(reader: Reader, subject, root: Path, limits: Limits, bait=None) -> tuple[Verdict, Raw]:
    """Runs one subject (a reproducer, a minimization trial) and judges it."""
    from tests.fuzz.runner import run_one

    work = lay_out(reader, subject, root / f"{reader.name}-one", bait)
    try:
        raw = run_one(job(reader, None, work), limits)
        return judge(raw, reader.name), raw
    finally:
        shutil.rmtree(work, ignore_errors=True)

