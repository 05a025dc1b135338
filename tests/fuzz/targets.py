"""What a fuzz child does with one input: prebake's side (the bake phase) for each kind of target.

- ``convert``: ``convert(src, out)``, then the bake it made must load and verify (an error
  there is a wrong bake, not a clean refusal: the stage says which);
- ``unpack``: ``unpack(src, out)``, then the bake must verify and load (every component and
  variant): an archive unpacks only into a bake that verifies;
- ``manifests``: a bake folder read every way a user reads one: ``load_from_manifest`` (each
  component and variant), ``verify``, ``pack``, and the CLI's ``inspect`` and ``warm``;
  ``verify`` must not pass what ``load_from_manifest`` refuses, nor ``pack`` pack it.

Prebake's errors in the manifest target are outcomes, recorded; any other exception is the
result (a traceback).
"""

from __future__ import annotations

from pathlib import Path

from tests.fuzz.runner import Stage


def load_all(bake: Path) -> int:
    """Loads every tensor of a bake, of each component and variant; returns how many."""
    from prebake.cache.load import load_from_manifest
    from prebake.formats.manifest import read_component, read_manifest

    m = read_manifest(bake)
    parts = [(c, read_component(m, c)) for c in m.components] if m.components else [(None, m)]
    n = 0
    for component, sub in parts:
        n += len(load_from_manifest(bake, component=component))
        for v in sub.variants:
            n += len(load_from_manifest(bake, component=component, variant=v))
    return n


def convert_target(tokenizer_sample: tuple[int, int] | None = None, **options):
    """The bake phase of a reader that converts a checkpoint with ``Options(**options)``.

    ``tokenizer_sample``: (spread tokens, first merges) of a byte-level BPE's sample route, made
    small so that the seeds' few-hundred-token vocabularies are mostly written by the splice (ids
    mapped back), which the reference then compares with transformers' whole route.
    """

    def bake(src: Path, out: Path, stage: Stage) -> dict:
        from prebake.convert.bake import convert
        from prebake.convert.plan import Options
        from prebake.formats.integrity import verify

        if tokenizer_sample:
            from prebake.convert import gguf_tokenizer_splice

            gguf_tokenizer_splice.SPREAD, gguf_tokenizer_splice.FIRST_MERGES = tokenizer_sample
        stage.at("source")
        convert(src, out, Options(**options))
        stage.at("load")
        n = load_all(out)
        stage.at("verify")
        verify(out)
        return {"tensors": n}

    return bake


def unpack_target(src: Path, out: Path, stage: Stage) -> dict:
    from prebake.convert.pack import unpack
    from prebake.formats.integrity import verify

    stage.at("source")
    unpack(src, out, threads=1)
    stage.at("verify")
    verify(out)
    stage.at("load")
    return {"verdict": "correct", "detail": f"{load_all(out)} tensors"}


def manifests_target(src: Path, out: Path, stage: Stage) -> dict:
    from prebake.convert.cli import main
    from prebake.convert.pack import pack
    from prebake.formats.errors import PrebakeError
    from prebake.formats.integrity import verify

    steps = {"load": lambda: load_all(src), "verify": lambda: verify(src),
             "pack": lambda: pack(src, out.with_suffix(".pbk"), threads=1),
             "inspect": lambda: main(["inspect", "--tensors", str(src)]) and _refused("inspect"),
             "warm": lambda: main(["warm", str(src)]) and _refused("warm")}
    refused: dict[str, str | None] = {}
    for name, step in steps.items():
        stage.at(name)
        try:
            step()
            refused[name] = None
        except PrebakeError as e:
            refused[name] = f"{type(e).__name__}: {e}"[:300]
    load = refused["load"]
    if load is not None and refused["verify"] is None:
        return {"verdict": "wrong", "why": "verify-passes-what-load-refuses", "detail": load}
    if load is not None and load.startswith("ManifestError") and refused["pack"] is None:
        return {"verdict": "wrong", "why": "pack-passes-what-load-refuses", "detail": load}
    return {"verdict": "clean" if load else "correct", "why": "", "detail": load or ""}


def _refused(command: str):
    """The CLI returned non-zero: a refusal (its one line is in the child's log)."""
    from prebake.formats.errors import PrebakeError

    raise PrebakeError(f"prebake {command} refused the bake")
