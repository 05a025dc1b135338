"""Outputs are built under a temporary name and swapped into place only when complete.

A bake folder grows in a hidden ``.NAME.prebake-tmp-PID`` beside ``NAME``; an archive file
likewise. At the end the finished folder replaces ``NAME`` with one atomic exchange
(``renameat2(RENAME_EXCHANGE)``, Linux 3.15+ on ext4, xfs, btrfs, tmpfs, ...), so at every
instant ``NAME`` holds either the old bake or the new one; the old one, now under the temporary
name, is then removed. Where the kernel or filesystem has no exchange, two renames are used
(``NAME`` aside to ``.NAME.prebake-old-PID``, then the new one in): a crash between them leaves
no ``NAME`` until the next conversion, which puts the old bake back before it starts.

Leftovers of dead processes (``-tmp-`` and ``-old-`` names whose PID is gone) are removed by the
next write of ``NAME`` and by ``prebake cache gc``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prebake.formats.errors import OutputError
from prebake.formats.manifest import is_bake

TMP, OLD = ".prebake-tmp-", ".prebake-old-"
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@contextmanager
def guard(path) -> Iterator[None]:
    """Turns an ``OSError`` while writing ``path`` into one :class:`OutputError` line (disk full named)."""
    try:
        yield
    except OSError as e:
        if e.errno in _FULL:
            raise OutputError(f"no space left on the device while writing ({e.strerror}); free space and "
                              "try again", path) from None
        raise OutputError(f"cannot write ({e.strerror})", path) from None


def temp_name(path: Path, kind: str = TMP) -> Path:
    """The hidden name beside ``path`` under which this process builds (or sets aside) it."""
    return path.parent / f".{path.name}{kind}{os.getpid()}"


@contextmanager
def writing(out: Path, force: bool = False, src: Path | None = None, needed: int = 0) -> Iterator[Path]:
    """Yields a fresh temporary folder for ``out``; swaps it into place if the block succeeds,
    removes it whatever else happens (an error, Ctrl-C, SIGTERM)."""
    tmp = start(out, force, src, needed)
    try:
        yield tmp
        commit(tmp, out)
    except OutputError as e:
        abort(tmp)
        if e.path and e.path.startswith(str(tmp)):  # name the file as the user will know it
            raise OutputError(e.message, str(out) + e.path[len(str(tmp)):]) from None
        raise
    except BaseException:
        abort(tmp)
        raise


@contextmanager
def writing_file(path: Path) -> Iterator[Path]:
    """Yields a temporary file name for ``path``; renames it into place if the block succeeds."""
    with guard(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    tmp = temp_name(path)
    try:
        yield tmp
        with guard(path):
            fault_point("replace-file")
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def start(out: Path, force: bool = False, src: Path | None = None, needed: int = 0) -> Path:
    """Checks ``out`` may be written and returns a fresh temporary folder beside it.

    Refuses an ``out`` that is or holds the source ``src`` (even with ``force``: it would delete
    the checkpoint) and a disk without ``needed`` bytes free.
    """
    if src is not None:
        s, o = Path(src).resolve(), out.resolve()
        if s == o or o in s.parents:
            raise OutputError(f"is the source or holds it ({src}); choose another output folder", out)
    with guard(out):
        out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    if out.exists() and not force:
        if not out.is_dir():
            raise OutputError("exists and is not a folder; choose another output or pass --force", out)
        if any(out.iterdir()) and not is_bake(out):
            raise OutputError("holds files that are not a prebake output; choose an empty folder "
                              "or pass --force to replace it", out)
    free = shutil.disk_usage(out.parent).free
    if needed > free:
        raise OutputError(f"needs {needed / 2**30:.2f} GiB but only {free / 2**30:.2f} GiB is free there", out)
    tmp = temp_name(out)
    _remove(tmp)
    with guard(tmp):
        tmp.mkdir()
    return tmp


def commit(tmp: Path, out: Path) -> None:
    """Puts the finished ``tmp`` folder at ``out``; whatever was at ``out`` is removed after."""
    with guard(out):
        fsync_path(tmp)
        if out.exists() or out.is_symlink():
            fault_point("commit:exchange")
            if _exchange(tmp, out):  # out holds the new bake, tmp the old one
                fsync_path(out.parent)
                fault_point("commit:remove-old")
                _remove(tmp)
                return
            old = temp_name(out, OLD)
            os.rename(out, old)
            fault_point("commit:set-aside")
            os.rename(tmp, out)
            fsync_path(out.parent)
            _remove(old)
            return
        os.rename(tmp, out)
        fsync_path(out.parent)


def abort(tmp: Path) -> None:
    _remove(tmp)


def remove_stale(out: Path) -> None:
    """Cleans up after dead processes that wrote ``out``: a set-aside old bake goes back if ``out``
    is missing (a crash between two renames), other temporary names are removed."""
    for p in sorted(out.parent.glob(f".{glob_escape(out.name)}.prebake-*-*")):
        kind, pid = p.name[len(out.name) + 1:].rsplit("-", 1)[0] + "-", p.name.rsplit("-", 1)[-1]
        if kind not in (TMP, OLD) or not pid.isdigit() or alive(int(pid)):
            continue
        if kind == OLD and not (out.exists() or out.is_symlink()):
            os.rename(p, out)
        else:
            _remove(p)


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists (ours or another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_path(path: Path) -> None:
    """Flushes a file, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fault_point(name: str) -> None:
    """Dies here (SIGKILL) when ``PREBAKE_KILL_AT`` names this point: the crash tests' injection."""
    if os.environ.get("PREBAKE_KILL_AT") == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


_renameat2 = None


def _exchange(a: Path, b: Path) -> bool:
    """Swaps ``a`` and ``b`` atomically; False where the kernel or filesystem cannot."""
    global _renameat2
    if os.environ.get("PREBAKE_NO_EXCHANGE"):  # the tests' way onto the two-rename path
        return False
    if _renameat2 is None:
        _renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", False)
    if not _renameat2:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))
