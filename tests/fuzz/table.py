"""The campaign's table: one row per reader, a column per outcome class, and the time."""

from __future__ import annotations

from tests.fuzz.campaign import Summary
from tests.fuzz.classify import DEFECTS, FINE

COLUMNS = ["reader", "inputs", *FINE, *DEFECTS, "seconds"]


def rows(summary: Summary) -> list[list[str]]:
    out = []
    for r in summary.results:
        out.append([r.reader, str(sum(r.counts.values())), *(str(r.counts.get(c, 0)) for c in FINE + DEFECTS),
                    f"{r.seconds:.0f}"])
    total = [sum(r.counts.get(c, 0) for r in summary.results) for c in FINE + DEFECTS]
    out.append(["all", str(sum(sum(r.counts.values()) for r in summary.results)), *map(str, total),
                f"{summary.seconds:.0f}"])
    return out


def markdown(summary: Summary) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows(summary)]
    return "\n".join(lines)


def defects(summary: Summary) -> str:
    """One line per distinct defect: reader, class, how many inputs, what."""
    lines = []
    for d in sorted(summary.defects.values(), key=lambda d: (d.reader, d.verdict.cls, -d.count)):
        lines.append(f"- {d.reader} {d.verdict.cls} x{d.count}: {d.verdict.signature}\n    {d.verdict.detail[:300]}\n"
                     f"    input {d.case.index} from seed {d.case.seed}: {'; '.join(d.case.descriptions)[:300]}")
    return "\n".join(lines)
