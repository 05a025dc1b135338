"""``python -m tests.fuzz --n N [--seed S] [--readers a,b] [--jobs J]``: a fuzz campaign and its table.

Prints a table (reader, inputs, one column per outcome class, seconds) and one line per
distinct defect; ``--save DIR`` writes each defect's input (minimized with ``--minimize``) and
a ``defect.json`` saying what it is; ``--json FILE`` writes the counts for scripts (the test
suite's short campaign reads it). ``--replay DIR...`` runs saved reproducers and prints each one's
verdict (``tests/test_fuzz_crashers.py`` replays ``tests/fuzz/crashers/`` so). The same ``--seed`` and
seeds give the same inputs.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _preload() -> None:
    """Imports what the children use, once, so each fork starts with it; caps malloc arenas so
    threads do not reserve address space the memory limit counts; keeps torch to one thread, so
    no OpenMP pool exists to be broken by a fork."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-8, 2)  # M_ARENA_MAX
    import torch

    torch.set_num_threads(1)
    import gguf  # noqa: F401
    import prebake.cache.load  # noqa: F401
    import prebake.cache.prefetch  # noqa: F401
    import prebake.convert.bake  # noqa: F401
    import prebake.convert.cli  # noqa: F401
    import prebake.convert.commands  # noqa: F401
    import prebake.convert.pack  # noqa: F401
    import prebake.formats.ggml_torch  # noqa: F401
    import prebake.formats.gguf_reader  # noqa: F401
    import prebake.formats.integrity  # noqa: F401
    import prebake.formats.safetensors_reader  # noqa: F401
    import prebake.formats.torch_legacy  # noqa: F401
    import prebake.formats.torch_zip  # noqa: F401
    import safetensors.torch  # noqa: F401


def _warm(names: list[str], seeds, root: Path) -> None:
    """Bakes one seed of each reader that asks for it here, in the campaign process, so its
    children start with transformers' modules imported and its caches full (2 s each, once).
    The seed is a valid file made by the real tools, and blocks stay blocks (no torch math)."""
    from prebake.convert.bake import convert
    from prebake.convert.plan import Options

    from tests.fuzz.readers import READERS

    for name in names:
        reader = READERS[name]
        if reader.warm:
            seed = root / "warm" / reader.entry
            seed.parent.mkdir(parents=True, exist_ok=True)
            seed.write_bytes(seeds.by_kind[reader.seeds][0][1])
            convert(seed, root / "warm" / "out", Options(keep_quant=True))
            shutil.rmtree(root / "warm")


def parse_args(argv=None) -> argparse.Namespace:
    from tests.fuzz.readers import READERS

    p = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=100, help="inputs per reader (default 100)")
    p.add_argument("--seed", type=int, default=0, help="campaign seed: the same seed makes the same inputs")
    p.add_argument("--readers", default=",".join(READERS), help=f"comma-separated, of {', '.join(READERS)}")
    p.add_argument("--jobs", type=int, default=1, help="children at once (default 1)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds for prebake on one input (default 5)")
    p.add_argument("--check-timeout", type=float, default=20.0, help="seconds for the reference check")
    p.add_argument("--memory-mib", type=int, default=2048, help="address space a child may add (default 2048)")
    p.add_argument("--seeds", type=Path, default=REPO / "build" / "fuzz" / "seeds", help="seeds folder")
    p.add_argument("--work", type=Path, default=None, help="work folders' root (default: one in /dev/shm)")
    p.add_argument("--save", type=Path, default=None, help="write each defect's input here")
    p.add_argument("--minimize", action="store_true", help="shrink each saved defect's input first")
    p.add_argument("--json", type=Path, default=None, help="write the counts and defects as JSON here")
    p.add_argument("--replay", type=Path, nargs="+", default=None,
                   help="run saved reproducers (folders with defect.json) and print each verdict as a JSON line")
    return p.parse_args(argv)


def _work_root(arg: Path | None) -> Path:
    if arg is not None:
        arg.mkdir(parents=True, exist_ok=True)
        return arg
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="prebake-fuzz-", dir=base))


def save(defect, seeds, root: Path, limits, folder: Path, minimize: bool, campaign_seed: int) -> Path:
    """Writes a defect's input (``input/``) and ``defect.json``; returns the folder."""
    from tests.fuzz.mutators.base import Folder
    from tests.fuzz.readers import READERS

    reader = READERS[defect.reader]
    subject, steps, seed = defect.case.subject, defect.case.steps, defect.case.seed
    if minimize:
        from tests.fuzz.minimize import minimize as shrink

        subject, steps, seed = shrink(reader, defect.case, defect.verdict.signature, seeds, root, limits)
    tag = hashlib.sha1(defect.verdict.signature.encode()).hexdigest()[:8]
    out = folder / f"{defect.reader}-{defect.verdict.cls}-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    from tests.fuzz.campaign import _write_folder

    (out / "input").mkdir(parents=True)
    if isinstance(subject, Folder):
        _write_folder(out / "input", subject)
    else:
        (out / "input" / reader.entry).write_bytes(subject)
    record = {"reader": defect.reader, "class": defect.verdict.cls, "signature": defect.verdict.signature,
              "detail": defect.verdict.detail, "inputs": defect.count, "campaign_seed": campaign_seed,
              "index": defect.case.index, "seed": seed, "steps": steps,
              "mutations": defect.case.descriptions, "minimized": minimize, "log": defect.log[-2000:]}
    (out / "defect.json").write_text(json.dumps(record, indent=1) + "\n")
    return out


def load_reproducer(folder: Path):
    """(reader, subject, the seed's name) of a saved reproducer folder."""
    from tests.fuzz.mutators.base import Folder
    from tests.fuzz.readers import READERS

    record = json.loads((folder / "defect.json").read_text())
    reader = READERS[record["reader"]]
    entry = folder / "input" / reader.entry
    if entry.is_file() and not entry.is_symlink():
        return reader, entry.read_bytes(), record
    files, links = {}, {}
    for p in sorted((folder / "input").rglob("*")):
        rel = p.relative_to(folder / "input").as_posix()
        if p.is_symlink():
            links[rel] = os.readlink(p)
        elif p.is_file():
            files[rel] = p.read_bytes()
    return reader, Folder(files, links), record


def replay_one(folder: Path, seeds, root: Path, limits):
    """The verdict on a saved reproducer, run as the campaign runs it."""
    from tests.fuzz.campaign import judge_subject

    reader, subject, record = load_reproducer(folder)
    bait = seeds.named(reader.seeds, record["seed"]) if reader.bait_bake else None
    return judge_subject(reader, subject, root, limits, bait)


def main(argv=None) -> int:
    args = parse_args(argv)
    from tests.fuzz import seeds as seed_files

    folder = seed_files.ensure(args.seeds)
    _preload()
    from tests.fuzz import table
    from tests.fuzz.campaign import Seeds, run_campaign
    from tests.fuzz.runner import Limits

    seeds = Seeds(*seed_files.load(folder))
    limits = Limits(args.timeout, args.check_timeout, args.memory_mib << 20)
    root = _work_root(args.work)
    try:
        if args.replay:
            _warm(sorted({load_reproducer(f)[0].name for f in args.replay}), seeds, root)
            for folder in args.replay:
                verdict, _ = replay_one(folder, seeds, root, limits)
                print(json.dumps({"reproducer": folder.name, "class": verdict.cls, "signature": verdict.signature,
                                  "detail": verdict.detail}), flush=True)
            return 0
        names = [r for r in args.readers.split(",") if r]
        _warm(names, seeds, root)
        summary = run_campaign(names, args.n, args.seed, seeds, root, limits, args.jobs,
                               progress=lambda r: print(f"{r.reader}: {dict(r.counts)} in {r.seconds:.1f} s",
                                                        file=sys.stderr, flush=True))
        print(table.markdown(summary))
        print(f"\n{sum(sum(r.counts.values()) for r in summary.results)} inputs in {summary.seconds:.0f} s "
              f"(seed {args.seed}, {args.jobs} at a time)")
        wrong_seeds = {f"{r}/{s}": c for r, seeds_ in summary.baseline.items() for s, c in seeds_.items()
                       if c not in ("correct", "clean")}
        if wrong_seeds:
            print(f"\nseeds that do not bake cleanly (a harness problem): {wrong_seeds}")
        if summary.defects:
            print("\ndefects:\n" + table.defects(summary))
        if summary.mutator_errors:
            print(f"\nmutations that did not apply: {dict(summary.mutator_errors)}", file=sys.stderr)
        saved = []
        if args.save:
            saved = [str(save(d, seeds, root, limits, args.save, args.minimize, args.seed))
                     for d in summary.defects.values()]
            print("\nsaved:\n" + "\n".join(saved))
        if args.json:
            args.json.write_text(json.dumps({
                "seconds": summary.seconds, "n": args.n, "seed": args.seed, "baseline": summary.baseline,
                "readers": {r.reader: {"counts": dict(r.counts), "seconds": r.seconds} for r in summary.results},
                "mutator_errors": dict(summary.mutator_errors),
                "defects": [{"reader": d.reader, "class": d.verdict.cls, "signature": d.verdict.signature,
                             "detail": d.verdict.detail, "inputs": d.count, "mutations": d.case.descriptions}
                            for d in summary.defects.values()], "saved": saved}, indent=1))
        return 0
    finally:
        if args.work is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
