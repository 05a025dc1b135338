"""The output folder: built under a temporary name, renamed into place only when complete.

An interrupted conversion leaves at most a hidden ``.NAME.prebake-tmp-PID`` folder, never
something that looks like a finished bake; the next conversion into NAME removes it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from prebake.cache.manifest import is_bake
from prebake.formats.errors import OutputError

_TMP = ".prebake-tmp-"


def start(out: Path, force: bool = False, src: Path | None = None, needed: int = 0) -> Path:
    """Checks ``out`` may be written and returns a fresh temporary folder beside it.

    Refuses an ``out`` that is or holds the source ``src`` (even with ``force``: it would delete
    the checkpoint) and a disk without ``needed`` bytes free.
    """
    if src is not None:
        s, o = Path(src).resolve(), out.resolve()
        if s == o or o in s.parents:
            raise OutputError(f"is the source or holds it ({src}); choose another output folder", out)
    if out.exists() and not force:
        if not out.is_dir():
            raise OutputError("exists and is not a folder; choose another output or pass --force", out)
        if any(out.iterdir()) and not is_bake(out):
            raise OutputError("holds files that are not a prebake output; choose an empty folder "
                              "or pass --force to replace it", out)
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if needed > free:
        raise OutputError(f"needs {needed / 2**30:.2f} GiB but only {free / 2**30:.2f} GiB is free there", out)
    remove_stale(out)
    tmp = out.parent / f".{out.name}{_TMP}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def commit(tmp: Path, out: Path) -> None:
    """Replaces ``out`` with the finished ``tmp`` folder (two renames, old bake removed last)."""
    _fsync_dir(tmp)
    old = None
    if out.exists() or out.is_symlink():
        old = out.parent / f".{out.name}.prebake-old-{os.getpid()}"
        os.rename(out, old)
    os.rename(tmp, out)
    _fsync_dir(out.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


def abort(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


def remove_stale(out: Path) -> None:
    """Removes temporary folders (or files) of earlier writes of ``out`` whose process is gone."""
    for p in out.parent.glob(f".{out.name}{_TMP}*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
