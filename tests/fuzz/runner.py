"""Runs fuzz jobs, each in a forked child with a time and memory limit, several at a time.

The campaign process imports torch, prebake and the reference readers once; every input then
runs in a ``fork`` of it (about 10 ms, against about 2 s for a fresh interpreter), sandboxed by
:mod:`tests.fuzz.sandbox`. A child runs two phases and reports each as one JSON line on a pipe:

- ``bake``: prebake on the input (its audit report and whether the sentinel appeared ride
  along), under ``Limits.timeout``;
- ``check``: the reference reader's verdict on what prebake made, under ``Limits.check_timeout``,
  only if the job has a check and the bake phase ended without a verdict of its own.

A child past its deadline is killed with its whole session (``SIGKILL``); ``faulthandler`` has
dumped its stack into ``child.log`` just before, so a hang says where it hung. The parent never
runs a target itself.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import select
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.fuzz import sandbox

LOG_TAIL = 6000  # bytes of child.log kept with a result


@dataclass(frozen=True)
class Limits:
    timeout: float = 5.0  # seconds for the bake phase
    check_timeout: float = 20.0  # seconds for the reference phase
    memory: int = 2 << 30  # bytes of address space a child may add to what it was forked with
    file_size: int = 256 << 20  # the largest file a child may write


DEFAULT_LIMITS = Limits()


class Stage:
    """Where a target is (``"convert"``, ``"load"``...): an error is reported with its stage."""

    def __init__(self):
        self.name = "start"

    def at(self, name: str) -> None:
        self.name = name


@dataclass
class Job:
    """One input to run. ``bake(work, stage)`` runs prebake and returns a JSON-able dict (with a
    ``verdict`` when it needs no reference); ``check(work, report)`` returns the reference's."""

    key: object
    work: Path
    bake: Callable[[Path, Stage], dict]
    check: Callable[[Path, dict], dict] | None = None


@dataclass
class Raw:
    """What happened to one child, before any judgement."""

    reports: list[dict]
    timed_out: str | None  # the phase whose deadline passed
    signal: int | None  # the signal that ended the child, if one did
    exit_code: int | None
    seconds: float
    peak_rss_mib: float
    log: str = ""
    sentinel: bool = False  # the payload's file exists in the work folder after the child ended

    def report(self, phase: str) -> dict | None:
        return next((r for r in self.reports if r.get("phase") == phase), None)


def describe(e: BaseException, stage: str) -> dict:
    """An exception as plain data: its type, message, stage and the frames that raised it."""
    from prebake.formats.errors import PrebakeError

    frames = traceback.StackSummary.extract(traceback.walk_tb(e.__traceback__), lookup_lines=False)  # no file reads
    ours = [f for f in frames if any(f"/{p}/" in f.filename for p in ("formats", "convert", "cache"))]
    where = ours[-1] if ours else (frames[-1] if frames else None)
    if isinstance(e, RecursionError) and ours:  # where the stack ran out varies: name the function that recursed
        where = max(ours, key=lambda f: sum(g.name == f.name and g.filename == f.filename for g in ours))
    text = str(e)
    return {"type": f"{type(e).__module__}.{type(e).__qualname__}", "message": text[:600],
            "lines": text.count("\n") + 1, "prebake": isinstance(e, PrebakeError),
            "memory": is_memory_error(e), "stage": stage,
            "where": f"{Path(where.filename).name}:{where.lineno}:{where.name}" if where else "",
            "frames": [f"{Path(f.filename).name}:{f.lineno}:{f.name}" for f in frames[-10:]]}


def is_memory_error(e: BaseException) -> bool:
    """A failed allocation, however the library spells it (numpy, torch's C++ allocator, mmap)."""
    if isinstance(e, MemoryError):
        return True
    text = str(e)
    return ("can't allocate memory" in text or "std::bad_alloc" in text or "Cannot allocate memory" in text
            or "DefaultCPUAllocator" in text)


def _phase(run: Callable[[Stage], dict]) -> dict:
    stage = Stage()
    try:
        return {"status": "ok", **run(stage)}
    except BaseException as e:  # noqa: BLE001  everything a target raises is the outcome
        return {"status": "raised", "error": describe(e, stage.name)}


def _send(fd: int, message: dict) -> None:
    data = (json.dumps(message, default=str) + "\n").encode()
    while data:
        data = data[os.write(fd, data):]


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    with contextlib.suppress(OSError):
        (file or sys.stderr).write(warnings.formatwarning(message, category, filename, lineno, line=""))


def _child(job: Job, fd: int, limits: Limits, roots: list[str]) -> None:
    """The forked child: sandbox, bake phase, check phase; never returns."""
    try:
        sandbox.enter(job.work, limits.memory, limits.file_size)
        faulthandler.enable(file=sys.stderr)
        faulthandler.dump_traceback_later(max(0.1, limits.timeout - 0.3), exit=False)
        # A warning is printed without its source line: reading the caller's file (the harness's
        # own targets.py) through linecache would count as a read outside the input.
        warnings.showwarning = _show_warning
        audit = sandbox.Audit(job.work, roots)
        sys.addaudithook(audit)
        report = _phase(lambda stage: job.bake(job.work, stage))
        audit.active = False
        faulthandler.cancel_dump_traceback_later()
        report.update(phase="bake", audit=audit.report(), sentinel=(job.work / sandbox.SENTINEL).exists())
        _send(fd, report)
        if job.check is not None and report["status"] == "ok" and report.get("verdict") is None:
            faulthandler.dump_traceback_later(max(0.1, limits.check_timeout - 0.3), exit=False)
            _send(fd, {"phase": "check", **_phase(lambda stage: job.check(job.work, report))})
    except BaseException as e:  # noqa: BLE001
        with contextlib.suppress(BaseException):
            _send(fd, {"phase": "harness", "status": "raised", "error": describe(e, "harness")})
    finally:
        os._exit(0)


@dataclass
class _Running:
    job: Job
    pid: int
    fd: int
    started: float
    deadline: float
    phase: str = "bake"
    buffer: bytes = b""
    reports: list[dict] = field(default_factory=list)
    timed_out: str | None = None


def _start(job: Job, limits: Limits, roots: list[str]) -> _Running:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        _child(job, write, limits, roots)
    os.close(write)
    now = time.monotonic()
    return _Running(job, pid, read, now, now + limits.timeout)


def _feed(r: _Running, data: bytes, limits: Limits) -> None:
    r.buffer += data
    while b"\n" in r.buffer:
        line, r.buffer = r.buffer.split(b"\n", 1)
        report = json.loads(line)
        r.reports.append(report)
        if report.get("phase") == "bake":
            r.phase = "check"
            r.deadline = time.monotonic() + limits.check_timeout


def _kill(pid: int) -> None:
    for kill in (os.killpg, os.kill):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            kill(pid, signal.SIGKILL)


def _finish(r: _Running) -> Raw:
    os.close(r.fd)
    _, status, usage = os.wait4(r.pid, 0)
    _kill(r.pid)  # anything the child started (a payload's shell) goes with it
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    log = _tail(r.job.work / "child.log")
    return Raw(r.reports, r.timed_out, sig, code, time.monotonic() - r.started, usage.ru_maxrss / 1024, log,
               (r.job.work / sandbox.SENTINEL).exists())


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - LOG_TAIL))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def run_all(jobs: Iterable[Job], limits: Limits = DEFAULT_LIMITS, parallel: int = 1) -> Iterator[tuple[Job, Raw]]:
    """Runs ``jobs``, at most ``parallel`` at once; yields each with its :class:`Raw` as it ends.

    A job's work folder must be laid out when the iterator hands it over (it is consumed only
    as slots free up, so a generator can lay each one out just in time).
    """
    roots = sandbox.system_roots()
    pending, running = iter(jobs), {}
    try:
        while True:
            while len(running) < parallel and (job := next(pending, None)) is not None:
                r = _start(job, limits, roots)
                running[r.fd] = r
            if not running:
                return
            wait = max(0.0, min(r.deadline for r in running.values()) - time.monotonic())
            ready, _, _ = select.select(list(running), [], [], wait)
            for fd in ready:
                r = running[fd]
                data = os.read(fd, 1 << 16)
                if data:
                    _feed(r, data, limits)
                else:
                    del running[fd]
                    yield r.job, _finish(r)
            now = time.monotonic()
            for r in list(running.values()):
                if now >= r.deadline and r.timed_out is None:
                    r.timed_out = r.phase
                    _kill(r.pid)  # its pipe closes; the loop collects it
    finally:
        for r in running.values():
            _kill(r.pid)
            os.close(r.fd)
            os.waitpid(r.pid, 0)


def run_one(job: Job, limits: Limits = DEFAULT_LIMITS) -> Raw:
    """Runs one job and returns what happened."""
    return next(run_all([job], limits))[1]
