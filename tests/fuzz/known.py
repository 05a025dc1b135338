"""Known defects: the reproducers in ``tests/fuzz/crashers/``, each a folder holding the input
(``input/``) and ``defect.json`` (reader, class, signature, what it is, and ``status``).

An ``open`` reproducer is a defect found and not yet fixed: ``tests/test_fuzz_crashers.py``
replays it under ``xfail(strict=True)``, and the short campaign (``tests/test_fuzz.py``) lets
through the defects its ``matches`` (a regular expression over ``reader|signature``, line numbers
left out) covers: one reproducer stands for one cause, however many inputs show it. Once the code is fixed, the replay passes, the strict xfail fails, and the
fixer sets ``"status": "fixed"``: the reproducer is then a regression test that must stay clean.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.fuzz.classify import normalized

CRASHERS = Path(__file__).parent / "crashers"


def reproducers() -> list[tuple[Path, dict]]:
    """Every reproducer folder with its record, by name."""
    return [(p.parent, json.loads(p.read_text())) for p in sorted(CRASHERS.glob("*/defect.json"))]


def known_as(reader: str, signature: str) -> str | None:
    """The open reproducer whose ``matches`` covers this defect, if one does."""
    key = f"{reader}|{normalized(signature)}"
    for folder, record in reproducers():
        if record.get("status", "open") == "open" and re.search(record["matches"], key):
            return folder.name
    return None
