"""Judging one run: a clean refusal, a correct bake, or a defect of one class.

Outcomes that are fine:

- ``clean``: prebake refused the input with a :class:`PrebakeError`;
- ``correct``: prebake made a bake that loads and equals what the reference reader reads
  (``torch.load(weights_only=True)``, ``safetensors``, gguf-py), or, for archives and
  manifests, that verifies and loads;
- ``unjudged``: prebake made a bake that loads, but the reference could not read the input
  (gguf-py gave up, or ran out of time or memory);
- ``explained``: prebake read a file the reference refuses, for a reason listed in
  :data:`EXPLAINED` (a documented difference, not a wrong bake).

Defects, most severe first (an outcome takes the first that applies):

- ``payload``: the planted sentinel file appeared, or the child tried to start a process;
- ``outside``: the child opened, listed or changed a path outside the input and output;
- ``crash``: the child died of a signal it was not sent (a segfault, an abort);
- ``memory``: an allocation failed under the limit, or the child was killed for memory or for
  a file past the size cap;
- ``hang``: the bake phase ran past its time limit;
- ``traceback``: any exception other than a :class:`PrebakeError`;
- ``wrong``: a bake that does not load or verify, bytes that differ from the reference's, or
  ``verify`` passing a manifest that ``load_from_manifest`` refuses;
- ``accepts``: prebake baked a file the reference refuses, for no listed reason.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass

from tests.fuzz.runner import Raw

FINE = ("clean", "correct", "unjudged", "explained")
DEFECTS = ("payload", "outside", "crash", "memory", "hang", "traceback", "wrong", "accepts")
CLASSES = FINE + DEFECTS

# (reader, pattern on the reference's refusal, why prebake may still read the file)
EXPLAINED: list[tuple[str, str, str]] = [
    (reader, pattern, why)
    for reader in ("torch-zip", "torch-pickle", "torch-legacy")
    for pattern, why in (
        (r"torch\.load: UnpicklingError: Unsupported operand",
         "torch's weights-only unpickler reads a subset of pickle's opcodes (no LIST, DICT, INST...); Python's "
         "unpickler, under prebake's allow-list, reads them all and builds the same containers"),
        (r"torch\.load: UnpicklingError: Can only SETITEMS? for dict",
         "torch's weights-only unpickler refuses SETITEMS on anything but a dict; in Python's unpickler an empty "
         "SETITEMS is a no-op on any object (a non-empty one on a non-dict fails: a clean refusal), the standard "
         "meaning the README documents"),
    )
]


@dataclass(frozen=True)
class Verdict:
    cls: str
    signature: str  # one defect, however many inputs show it: class, exception type, place
    detail: str  # one line for a person

    @property
    def defect(self) -> bool:
        return self.cls in DEFECTS


def judge(raw: Raw, reader: str) -> Verdict:
    """The class of one run of ``reader`` (see the module docstring)."""
    bake, check = raw.report("bake"), raw.report("check")
    harness = raw.report("harness")
    audit = (bake or {}).get("audit", {})
    if raw.sentinel or (bake or {}).get("sentinel") or audit.get("processes"):
        return Verdict("payload", "payload", f"sentinel={raw.sentinel} processes={audit.get('processes')}")
    if audit.get("outside"):
        first = audit["outside"][0]
        return Verdict("outside", f"outside:{_event(first)}:{audit.get('where', '?')}", "; ".join(audit["outside"][:3]))
    if bake is None:
        return _died(raw, harness)
    if bake["status"] == "raised":
        return _raised(bake["error"], after_bake=False)
    verdict = bake.get("verdict")
    if verdict is not None:
        return Verdict(verdict, f"{verdict}:{bake.get('why', '')}", bake.get("detail", ""))
    if check is None:
        why = "timeout" if raw.timed_out == "check" else f"signal {raw.signal}" if raw.signal else "no report"
        return Verdict("unjudged", f"unjudged:{why}", f"the reference did not finish ({why})")
    if check["status"] == "raised":
        e = check["error"]
        return Verdict("unjudged", f"unjudged:{e['type']}", f"the check raised {e['type']}: {e['message'][:200]}")
    return _compared(check, reader)


def _died(raw: Raw, harness: dict | None) -> Verdict:
    """The child ended before reporting its bake phase."""
    where = _where_log(raw.log)
    if harness is not None:
        e = harness["error"]
        return Verdict("traceback", f"harness:{e['type']}:{e['where']}", f"the harness failed: {e['message'][:300]}")
    if raw.timed_out == "bake":
        return Verdict("hang", f"hang:{where}", f"no result after the time limit (stack: {where})")
    if raw.signal == signal.SIGXFSZ:
        return Verdict("memory", f"memory:file-size:{where}", "killed for writing a file past the size cap")
    if raw.signal == signal.SIGKILL:
        return Verdict("memory", f"memory:killed:{where}", "killed (out of memory?)")
    if raw.signal is not None:
        name = signal.Signals(raw.signal).name
        return Verdict("crash", f"crash:{name}:{where}", f"died of {name} at {where}")
    return Verdict("crash", f"crash:exit{raw.exit_code}:{where}", f"exited {raw.exit_code} without a report")


def _raised(e: dict, after_bake: bool) -> Verdict:
    if e["memory"]:
        return Verdict("memory", f"memory:{e['type']}:{e['where']}", f"{e['type']}: {e['message'][:200]}")
    if not e["prebake"]:
        return Verdict("traceback", f"traceback:{e['type']}:{e['where']}",
                       f"{e['stage']}: {e['type']}: {e['message'][:300]}")
    if e["stage"] not in ("start", "source"):  # prebake made a bake, then refused it
        return Verdict("wrong", f"wrong:{e['stage']}-refuses:{e['where']}",
                       f"the bake was made, then {e['stage']} refused it: {e['message'][:300]}")
    return Verdict("clean", f"clean:{e['type']}", e["message"][:300])


def _compared(check: dict, reader: str) -> Verdict:
    verdict = check.get("verdict")
    detail = check.get("detail", "")
    if verdict == "equal":
        return Verdict("correct", "correct", "")
    if verdict == "no-reference":
        return Verdict("unjudged", f"unjudged:{check.get('why', '')}", detail)
    if verdict == "differs":
        return Verdict("wrong", f"wrong:{check.get('why', '')}", detail)
    if verdict == "ref-refused":
        for r, pattern, why in EXPLAINED:
            if r == reader and re.search(pattern, detail):
                return Verdict("explained", f"explained:{pattern}", why)
        return Verdict("accepts", f"accepts:{check.get('why', '')}:{_gist(detail)}", detail)
    return Verdict("traceback", f"harness:verdict:{verdict}", f"unknown check verdict {verdict!r}")


def _gist(message: str, words: int = 6) -> str:
    """What kind of refusal a message is: its first words, leaving out those that name things
    (numbers, paths, quoted names), so one kind of refusal has one signature."""
    text = message.split(": ", 2)[-1]
    kept = [w for w in text.split() if not any(c in w for c in "0123456789/`'\"")]
    return " ".join(kept[:words])


def normalized(signature: str) -> str:
    """A signature without line numbers, so it survives edits elsewhere in the file."""
    return re.sub(r"\.py:\d+:", ".py:", signature)


def _event(entry: str) -> str:
    return entry.split(" ", 1)[0]


_FRAME = re.compile(r'File "([^"]+)", line (\d+) in (\S+)')


def _where_log(log: str) -> str:
    """The innermost prebake frame of the last stack faulthandler dumped into the log."""
    frames = _FRAME.findall(log.rsplit("most recent call first", 1)[-1]) if "most recent call first" in log else []
    ours = [f for f in frames if any(f"/{p}/" in f[0] for p in ("formats", "convert", "cache"))]
    f = (ours or frames or [None])[0]
    return f"{f[0].rsplit('/', 1)[-1]}:{f[1]}:{f[2]}" if f else "?"
