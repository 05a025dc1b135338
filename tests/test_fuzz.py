"""A short fuzz campaign in the default test run: every reader, a fixed seed, 100 inputs each
(800 in all, about 45 s on two shared cores; ``make fuzz N=...`` runs long ones).

It runs ``python -m tests.fuzz`` as a fresh process (the campaign forks its children from a
process that has never run torch math, which a pytest process cannot promise) and reads its JSON.
Every seed must bake correctly (else the harness, not prebake, is wrong), every reader must
reach correct bakes as well as refusals, and no defect may appear but the known ones, each of
which has a reproducer in ``tests/fuzz/crashers/`` replayed by ``tests/test_fuzz_crashers.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fuzz.known import known_as
from tests.fuzz.readers import READERS

REPO = Path(__file__).resolve().parent.parent
N, SEED, JOBS = 100, 0, 2


@pytest.fixture(scope="module")
def campaign(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fuzz") / "campaign.json"
    began = time.monotonic()
    proc = subprocess.run(["nice", "-n", "10", sys.executable, "-m", "tests.fuzz", "--n", str(N), "--seed", str(SEED),
                           "--jobs", str(JOBS), "--json", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(f"\n{proc.stdout}\nwall time {time.monotonic() - began:.1f} s")
    return json.loads(out.read_text())


def test_every_seed_bakes_as_it_should(campaign):
    wrong = {f"{r}/{s}": c for r, seeds in campaign["baseline"].items() for s, c in seeds.items()
             if c not in ("correct", "clean")}
    assert not wrong


def test_every_reader_ran_and_reached_correct_bakes(campaign):
    for reader in READERS:
        counts = campaign["readers"][reader]["counts"]
        assert sum(counts.values()) == N, reader
        assert counts.get("correct", 0) > 0 and counts.get("clean", 0) > 0, (reader, counts)


def test_no_defect_but_the_known_ones(campaign):
    new = [d for d in campaign["defects"] if known_as(d["reader"], d["signature"]) is None]
    assert not new, json.dumps(new, indent=1)


def test_mutations_apply(campaign):
    assert sum(campaign["mutator_errors"].values()) < N, campaign["mutator_errors"]
