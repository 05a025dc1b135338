"""The fuzz harness's own tests: every detector fires on a planted fault, every mutator changes
its input, inputs replay, minimizing shrinks, rewritten zips stay faithful.

The planted faults are tiny fake targets run by the real runner in a forked child: a
traceback, a hang, a busy loop, allocations past the limit (Python, numpy), a kill, a file past
the size cap, an abort and a segfault, opens outside the input (a system file, the bait, a
symlink to the bait, a listing of /), a payload that creates the sentinel or starts a process;
and the check phase's verdicts. None of them imports torch, so forking the test process is safe.
"""

from __future__ import annotations

import ctypes
import io
import os
import signal
import time
from collections import Counter
from pathlib import Path
from random import Random

import pytest
import torch
from prebake.formats.errors import FormatError

from tests.fuzz import seeds as seed_files
from tests.fuzz.campaign import Case, Seeds, judge_subject, lay_out, make_case
from tests.fuzz.classify import DEFECTS, judge, normalized
from tests.fuzz.minimize import minimize
from tests.fuzz.mutators import ALL, TABLES
from tests.fuzz.mutators import zip_layout as zl
from tests.fuzz.mutators.base import Folder, NotApplicable
from tests.fuzz.readers import READERS, Reader
from tests.fuzz.runner import Job, Limits, run_one
from tests.fuzz.sandbox import SENTINEL

FAST = Limits(timeout=1.5, check_timeout=1.5, memory=256 << 20, file_size=1 << 20)
SEEDS = Path(__file__).resolve().parent.parent / "build" / "fuzz" / "seeds"


def run_fake(tmp_path: Path, bake, check=None, limits: Limits = FAST, link: str | None = None) -> str:
    """The class the runner and classifier give a fake target's run."""
    work = lay_out(READERS["torch-zip"], b"input bytes", tmp_path / "work")
    if link:
        (work / "in" / "link").symlink_to(link)
    raw = run_one(Job("fake", work, bake, check), limits)
    return judge(raw, "fake").cls


def ok(work, stage):
    return {"verdict": "correct"}


def _spin():
    while True:
        pass


def _segfault():
    ctypes.string_at(0)


def _write(path: str, n: int):
    with open(path, "wb") as f:
        f.write(bytes(n))


PLANTED = {
    "clean": lambda w, s: (_ for _ in ()).throw(FormatError("bad input", "model.bin")),
    "traceback": lambda w, s: {}["missing"],
    "recursion": lambda w, s: (lambda f: f(f))(lambda f: f(f)),
    "sleep": lambda w, s: time.sleep(60),
    "busy": lambda w, s: _spin(),
    "bytearray": lambda w, s: bytearray(1 << 30),
    "numpy": lambda w, s: __import__("numpy").ones(1 << 28),
    "killed": lambda w, s: os.kill(os.getpid(), signal.SIGKILL),
    "file-size": lambda w, s: _write("out.bin", 2 << 20),
    "abort": lambda w, s: os.abort(),
    "segfault": lambda w, s: _segfault(),
    "system-file": lambda w, s: open("/etc/hostname").close(),
    "bait": lambda w, s: open(w / "bait" / "secret").close(),
    "listing": lambda w, s: os.listdir("/"),
    "write-tmp": lambda w, s: _write("/tmp/prebake-fuzz-planted", 1),
    "rename-out": lambda w, s: os.rename(w / "in" / "model.bin", w / "bait" / "x"),
    "via-link": lambda w, s: open(w / "in" / "link").close(),
    "sentinel": lambda w, s: open(SENTINEL, "w").close(),
    "process": lambda w, s: os.system("true"),
    "inside": lambda w, s: (open(w / "in" / "model.bin").close(), os.mkdir(w / "out"), _write(w / "out" / "x", 8),
                            os.mkdir(w / ".out.tmp"), os.listdir(w), ok(w, s))[-1],
    "made-then-refused": lambda w, s: (s.at("load"), PLANTED["clean"](w, s)),
}
EXPECTED = {"clean": "clean", "traceback": "traceback", "recursion": "traceback", "sleep": "hang", "busy": "hang",
            "bytearray": "memory", "numpy": "memory", "killed": "memory", "file-size": "memory", "abort": "crash",
            "segfault": "crash", "system-file": "outside", "bait": "outside", "listing": "outside",
            "write-tmp": "outside", "rename-out": "outside", "via-link": "outside", "sentinel": "payload",
            "process": "payload", "inside": "correct", "made-then-refused": "wrong"}


@pytest.mark.parametrize("fault", PLANTED)
def test_each_detector_fires(tmp_path, fault):
    link = "../bait/secret" if fault == "via-link" else None
    assert run_fake(tmp_path, PLANTED[fault], link=link) == EXPECTED[fault]


CHECKS = {"equal": "correct", "differs": "wrong", "ref-refused": "accepts", "no-reference": "unjudged"}


@pytest.mark.parametrize("verdict", CHECKS)
def test_check_verdicts(tmp_path, verdict):
    got = run_fake(tmp_path, lambda w, s: {}, lambda w, report: {"verdict": verdict, "why": "x", "detail": "y"})
    assert got == CHECKS[verdict]


def test_a_check_that_hangs_is_unjudged_not_a_hang(tmp_path):
    assert run_fake(tmp_path, lambda w, s: {}, lambda w, report: time.sleep(60)) == "unjudged"


def test_a_hang_names_where_it_hung(tmp_path):
    work = lay_out(READERS["torch-zip"], b"x", tmp_path / "work")
    raw = run_one(Job("fake", work, PLANTED["sleep"]), FAST)
    assert raw.timed_out == "bake" and "test_fuzz_harness.py" in raw.log


def test_signatures_survive_line_moves():
    assert normalized("traceback:builtins.TypeError:torch_zip.py:121:describe") == \
        "traceback:builtins.TypeError:torch_zip.py:describe"


# ---------------------------------------------------------------------------------------------
# mutators, cases, minimizing


@pytest.fixture(scope="module")
def seeds() -> Seeds:
    return Seeds(*seed_files.load(seed_files.ensure(SEEDS)))


def _uses() -> list[tuple[str, str]]:
    """(mutator, seed kind) for every mutator of every reader's table."""
    return sorted({(op, r.seeds) for r in READERS.values() for op in TABLES[r.table]})


@pytest.mark.parametrize(("op", "kind"), _uses())
def test_each_mutator_changes_its_input(seeds, op, kind):
    changed = 0
    for name, subject in seeds.by_kind[kind]:
        before = subject.copy() if isinstance(subject, Folder) else subject
        for k in range(3):
            try:
                new, what = ALL[op](subject, Random(k), seeds.context(kind, name))
            except NotApplicable:
                continue
            assert new != subject and what, (name, k)
            changed += 1
        assert subject == before, "a mutator changed the seed it was given"
    assert changed, f"{op} applies to no {kind} seed"


def test_every_mutator_is_in_a_table():
    assert set(ALL) == {op for table in TABLES.values() for op in table}


def test_inputs_replay_exactly(seeds):
    for reader in READERS.values():
        for i in range(5):
            a, b = (make_case(reader, i, 7, seeds) for _ in range(2))
            assert (a.seed, a.steps, a.subject) == (b.seed, b.steps, b.subject)
    assert make_case(READERS["gguf"], 0, 7, seeds).subject != make_case(READERS["gguf"], 0, 8, seeds).subject


def test_mutators_do_not_fail_on_seeds(seeds):
    errors: Counter = Counter()
    for reader in READERS.values():
        for i in range(40):
            make_case(reader, i, 3, seeds, errors)
    assert not errors


def test_rewritten_zip_loads_the_same_in_torch(seeds):
    """The zip writer the mutators use writes what torch reads back as it was."""
    for name, data in seeds.by_kind["torch-zip"]:
        if name.startswith("payload"):
            continue
        again = zl.build(zl.entries(data))
        a, b = (torch.load(io.BytesIO(x), weights_only=True) for x in (data, again))
        assert str(a) == str(b), name


def test_minimize_shrinks_to_the_fault(tmp_path):
    """A fake reader that fails on inputs holding BOOM: the 4 KiB input shrinks to BOOM."""
    data = Random(0).randbytes(2000) + b"BOOM" + Random(1).randbytes(2000)

    def bake(src, out, stage):
        if b"BOOM" in src.read_bytes():
            raise KeyError("boom")
        return {"verdict": "clean"}

    reader = Reader("fake", "fake", "zip", bake, None, "model.bin")
    fake = Seeds({"fake": [("s", data)]}, {})
    verdict, _ = judge_subject(reader, data, tmp_path, FAST)
    assert verdict.cls == "traceback"
    small, _, _ = minimize(reader, Case("fake", 0, "s", [], [], data), verdict.signature, fake, tmp_path, FAST,
                           budget=120)
    assert small == b"BOOM"


def test_defect_classes_are_listed():
    assert set(EXPECTED.values()) - {"clean", "correct"} <= set(DEFECTS)
