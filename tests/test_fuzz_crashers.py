"""The fuzz harness's reproducers (``tests/fuzz/crashers/``), replayed as the campaign runs them.

An open defect is ``xfail(strict=True)`` with its reason: the day its code is fixed, the
replay is clean, the test XPASSes and fails, and the fixer marks the reproducer ``fixed`` in its
``defect.json``; from then on it must stay clean (see :mod:`tests.fuzz.known`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.classify import DEFECTS
from tests.fuzz.known import known_as, reproducers

REPO = Path(__file__).resolve().parent.parent
FOUND = reproducers()


class DefectShown(AssertionError):
    """The replay still shows the defect; the only failure an open reproducer's xfail accepts
    (a broken harness or replay fails the test whatever the status)."""


@pytest.fixture(scope="module")
def verdicts() -> dict[str, dict]:
    if not FOUND:
        return {}
    proc = subprocess.run([sys.executable, "-m", "tests.fuzz", "--replay", *(str(f) for f, _ in FOUND)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {v["reproducer"]: v for v in lines}


def _param(folder: Path, record: dict):
    if record.get("status", "open") == "fixed":
        return pytest.param(folder, id=folder.name)
    return pytest.param(folder, id=folder.name, marks=pytest.mark.xfail(strict=True, raises=DefectShown,
                                                                    reason=record["reason"]))


@pytest.mark.parametrize("folder", [_param(f, r) for f, r in FOUND])
def test_reproducer_is_not_a_defect(verdicts, folder):
    verdict = verdicts[folder.name]
    if verdict["class"] in DEFECTS:
        raise DefectShown(verdict)


def test_reproducers_are_well_formed():
    for folder, record in FOUND:
        assert (folder / "input").is_dir(), folder
        assert record["class"] in DEFECTS and record.get("reason") and record.get("status") in ("open", "fixed"), folder
        assert known_as(record["reader"], record["signature"]) == folder.name or record["status"] == "fixed", folder
