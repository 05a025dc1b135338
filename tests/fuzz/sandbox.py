"""What a fuzz child sets up before it runs a target: limits, a quiet stdio, and an audit of paths.

The child is a fork of the campaign process. It gets its own session (so a timeout kills every
process it started), a memory limit (``RLIMIT_AS`` at the size it was forked with plus the
allowance), a cap on the size of any file it writes (``RLIMIT_FSIZE``: a bigger write kills it
with ``SIGXFSZ``, which Python otherwise ignores), its work folder as the current and temporary folder, and an audit hook
(:func:`sys.addaudithook`) that records every path it opens, lists, creates, renames or removes
and every process it tries to start. The hook judges nothing; :class:`Audit` says which paths
were outside what the target may touch.

A work folder holds ``in/`` (the input), ``out*`` and ``.out*`` (the output and the temporary
names prebake builds it under), ``tmp/`` (``TMPDIR``) and ``bait/``: files a hostile input may
point at, which nothing may open.
"""

from __future__ import annotations

import os
import resource
import signal
import site
import sys
import sysconfig
import tempfile
from pathlib import Path

SENTINEL = "PWNED"  # what a planted payload creates in the work folder if it ever runs
PATH_EVENTS = {  # audit event -> (index of a path argument, index of its dir_fd or None), ...
    "open": ((0, None),), "os.listdir": ((0, None),), "os.scandir": ((0, None),), "os.mkdir": ((0, 2),),
    "os.rmdir": ((0, 1),), "os.remove": ((0, 1),), "os.rename": ((0, 2), (1, 3)), "os.symlink": ((1, 2),),
    "os.link": ((0, 2), (1, 3)), "os.truncate": ((0, None),), "os.chmod": ((0, 2),), "os.utime": ((0, 3),),
    "shutil.copyfile": ((0, None), (1, None)), "shutil.rmtree": ((0, 1),),
}
PROCESS_EVENTS = {"os.system", "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                  "os.forkpty", "pty.spawn"}
MAX_RECORDED = 20


def system_roots() -> list[str]:
    """Folders any child may read: the Python installation, site-packages, the code under test
    (the harness's own modules are imported before any fork, and tracebacks are taken without
    reading source lines, so nothing else is needed)."""
    import prebake.cache
    import prebake.convert
    import prebake.formats

    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sysconfig.get_paths()["stdlib"],
             *site.getsitepackages()}
    for package in (prebake.formats, prebake.convert, prebake.cache):
        roots.update(package.__path__)
    return sorted({os.path.realpath(r) for r in roots})


def _in_rmtree() -> bool:
    """Whether shutil.rmtree's fd-relative walk is on the stack (its top was checked already)."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == "_rmtree_safe_fd":
            return True
        frame = frame.f_back
    return False


def _caller() -> str:
    """``file:line:function`` of the innermost frame of prebake's code on the stack."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if any(f"/{p}/" in name for p in ("formats", "convert", "cache")):
            return f"{os.path.basename(name)}:{frame.f_lineno}:{frame.f_code.co_name}"
        frame = frame.f_back
    return "?"


def kernel_path(path: str) -> bool:
    """/proc, /sys and /dev (but not /dev/shm, where work folders may live)."""
    return path.startswith(("/proc/", "/sys/", "/dev/")) and not path.startswith("/dev/shm/")


class Audit:
    """Records the paths a child touches outside its allowed places, and the processes it starts.

    ``work`` is the child's work folder; inside it only ``bait/`` is out of bounds (the folder itself, where the output
is made, may be listed and synced). Outside
    it, ``roots`` (see :func:`system_roots`) and the kernel's folders may be read, nothing else.
    """

    def __init__(self, work: Path, roots: list[str]):
        self.work = os.path.realpath(work)
        self.roots = tuple(r + os.sep for r in roots)
        self.outside: list[str] = []
        self.processes: list[str] = []
        self.where = ""  # the innermost frame of prebake's code at the first path outside
        self.active = True
        self._busy = False

    def __call__(self, event: str, args: tuple) -> None:
        if not self.active or self._busy:
            return
        if event in PROCESS_EVENTS:
            self._note(self.processes, f"{event} {args[:2]!r}"[:300])
            return
        places = PATH_EVENTS.get(event)
        if places is None:
            return
        self._busy = True
        try:
            for i, fd in places:
                path = args[i] if i < len(args) else None
                if not isinstance(path, (str, bytes, os.PathLike)):
                    continue  # a file descriptor: its path was checked when it was opened
                path = os.fsdecode(path)
                dir_fd = args[fd] if fd is not None and fd < len(args) else None
                if isinstance(dir_fd, int) and not os.path.isabs(path):
                    path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
                elif event == "open" and not os.path.isabs(path) and _in_rmtree():
                    continue  # shutil.rmtree opens sub-folders by dir_fd, which "open" does not report
                if not self.allowed(path):
                    if not self.outside:
                        self.where = _caller()
                    real = os.path.realpath(path)
                    self._note(self.outside, f"{event} {path}" + (f" (-> {real})" if real != os.path.abspath(path) else ""))
        except Exception as e:  # an audit hook must never change what the target does
            self._note(self.outside, f"{event} (audit failed: {e!r})")
        finally:
            self._busy = False

    def allowed(self, path) -> bool:
        """Whether ``path`` (relative to the current folder) is a place the target may touch."""
        real = os.path.realpath(os.fsdecode(path))
        if real == self.work:  # the output's folder: listed for stale temporaries, fsynced
            return True
        if real.startswith(self.work + os.sep):
            first = real[len(self.work) + 1:].split(os.sep, 1)[0]
            return first in ("in", "tmp") or first.startswith(("out", ".out"))
        return kernel_path(real) or real.startswith(self.roots)

    def _note(self, where: list[str], what: str) -> None:
        if len(where) < MAX_RECORDED:
            where.append(what)

    def report(self) -> dict:
        return {"outside": list(self.outside), "processes": list(self.processes), "where": self.where}


def enter(work: Path, memory: int, file_size: int) -> None:
    """Makes this (forked) process a sandboxed child working in ``work``."""
    os.setsid()
    os.chdir(work)
    (work / "tmp").mkdir(exist_ok=True)
    os.environ["TMPDIR"] = str(work / "tmp")
    tempfile.tempdir = str(work / "tmp")
    log = os.open(work / "child.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    sys.stdout = open(1, "w", closefd=False, buffering=1)  # noqa: SIM115  (whatever a test runner had put there)
    sys.stderr = open(2, "w", closefd=False, buffering=1)  # noqa: SIM115
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it: a write past the cap should kill
    if memory:
        resource.setrlimit(resource.RLIMIT_AS, (address_space() + memory,) * 2)
    if file_size:
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size,) * 2)


def address_space() -> int:
    """This process's virtual size now, in bytes (``VmSize``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")
