"""The front end every conversion shares, ``--dry-run`` and Ray's workers included.

:func:`prepare` finds what ``src`` holds (one model, or a folder of components), reads every
tensor's description, checks the variant specs and plans each bake, all before a byte is
written. Planning is pure and deterministic: the same source and options give the same plan
on every machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from prebake.convert.plan import BakePlan, Options, plan_bake
from prebake.convert.sources import Source, component_folders, open_source
from prebake.convert.variants import VariantSpec, parse_named
from prebake.formats.errors import SpecError


@dataclass
class Prepared:
    """What a conversion of ``src`` will write: its sources, their plans, the variants asked for.

    ``sources``/``plans`` are keyed by component name, ``""`` for a single model.
    """

    src: Path
    components: bool
    sources: dict[str, Source]
    plans: dict[str, BakePlan]
    specs: list[tuple[str, VariantSpec]]

    @property
    def total_bytes(self) -> int:
        return sum(p.total_bytes for p in self.plans.values())

    def summary(self) -> dict:
        """A JSON-ready description of every plan (what ``--dry-run`` prints)."""
        plans = {name: plan.summary() for name, plan in self.plans.items()}
        if not self.components:
            return {"src": str(self.src), "bytes": self.total_bytes, **plans[""],
                    "variants": [name for name, _ in self.specs]}
        return {"src": str(self.src), "bytes": self.total_bytes, "components": plans}


def prepare(src: str | os.PathLike, options: Options, variants: list[str] = ()) -> Prepared:
    """Reads and plans the conversion of ``src``; writes nothing."""
    src = Path(src)
    specs = [parse_named(v) for v in variants]  # bad specs fail before any work
    parts = component_folders(src)
    if parts and specs:
        raise SpecError("variants apply to one model; add them to a component's folder instead")
    sources = {name: open_source(p, options.names, options.gguf_metadata) for name, p in parts.items()} if parts \
        else {"": open_source(src, options.names, options.gguf_metadata)}
    plans = {}
    for name, s in sources.items():
        plans[name] = plan_bake(s.tensors, options, s.skipped, s.stem, s.model_type, s.blocks_dtype)
        plans[name].warnings[:0] = s.notes
    return Prepared(src, bool(parts), sources, plans, specs)


