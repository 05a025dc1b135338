"""The local cache of bakes: ``ensure(src)`` converts on first use and reuses afterwards.

Each entry is a bake in the cache root (``$PREBAKE_CACHE``, else ``$XDG_CACHE_HOME/prebake``, else
``~/.cache/prebake``) named by a key: a
fingerprint of the source plus the conversion options. The default fingerprint reads each
source file's size, modification time, and first and last MiB (cheap at any size); ``strict``
hashes every byte instead. A changed source has another key, so it is never served stale.

Two processes that ask for the same entry at once convert it once: the second waits on the
entry's lock file (``filelock``: an OS lock, released by the kernel even if the holder crashes)
and then maps the bake the first one made. Lock files live in ``.locks/`` and are never removed:
deleting a lock file someone waits on would let a newcomer lock a new file and convert beside
them. A crash mid-conversion leaves only a temporary folder, which the next conversion (or
``prebake cache gc``) removes.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock
from prebake.formats.errors import FormatError
from prebake.formats.manifest import file_checksum, hasher, is_bake, read_manifest

FORMAT_VERSION = 2  # bumped when a bake made by an older prebake must not be reused (2: the
# output head of a single --quant type went to Q6_K)
_USED = ".last_used"


def cache_root() -> Path:
    """``$PREBAKE_CACHE``, else ``$XDG_CACHE_HOME/prebake``, else ``~/.cache/prebake``."""
    if os.environ.get("PREBAKE_CACHE"):
        return Path(os.environ["PREBAKE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "prebake"


def source_fingerprint(src: str | os.PathLike, strict: bool = False) -> str:
    """A hash of what ``src`` is: every file below it, by size and mtime and sampled bytes, or all bytes."""
    from prebake.convert.sources import fingerprint

    p = Path(src)
    if not p.exists():
        raise FormatError("no such file or folder", p)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    h = hasher()
    for f in files:
        rel = f.relative_to(p) if p.is_dir() else f.name
        what = {"size": f.stat().st_size, "content": file_checksum(f)} if strict else fingerprint(f)
        h.update(f"{rel}\0{json.dumps(what, sort_keys=True)}\0".encode())
    return h.hexdigest()


def cache_key(fingerprint: str, options: dict) -> str:
    text = json.dumps({"v": FORMAT_VERSION, "source": fingerprint, "options": options}, sort_keys=True)
    h = hasher()
    h.update(text.encode())
    return h.hexdigest()[:24]


def _lock(root: Path, key: str) -> FileLock:
    """The lock of one entry; its file is never removed (see the module docstring)."""
    (root / ".locks").mkdir(parents=True, exist_ok=True)
    return FileLock(root / ".locks" / f"{key}.lock")


def ensure(src: str | os.PathLike, *, strict: bool = False, root: str | os.PathLike | None = None,
           progress=None, **convert_options) -> Path:
    """The cached bake of ``src`` made with ``convert_options``; converts it on first use.

    ``convert_options``: ``shard_size``, ``align``, ``dtype`` (as :class:`~prebake.convert.plan.Options`)
    and ``variants`` (a list of ``NAME=SPEC``). A prebake archive (``prebake pack``) is
    unpacked straight into the cache. Returns the bake folder, ready for ``load_from_manifest``.

    >>> load_from_manifest(ensure("pytorch_model.bin", dtype="BF16"))  # doctest: +SKIP
    """
    return _ensure(src, strict=strict, root=root, progress=progress, **convert_options)[0]


def _ensure(src, *, strict=False, root=None, progress=None, **convert_options) -> tuple[Path, bool]:
    """``ensure``, also saying whether this call did the conversion."""
    root = Path(root) if root else cache_root()
    fingerprint = source_fingerprint(src, strict)
    options = {k: v for k, v in sorted(convert_options.items())}
    key = cache_key(fingerprint, {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()})
    entry = root / key
    if not is_bake(entry):
        with _lock(root, key):
            if not is_bake(entry):  # nobody made it while we waited
                _make(src, entry, fingerprint, strict, progress, options)
                _touch(entry)
                return entry, True
    _touch(entry)
    return entry, False


def _make(src, entry: Path, fingerprint: str, strict: bool, progress, options: dict) -> None:
    if is_archive(src):
        from prebake.convert.pack import unpack

        unpack(src, entry, force=True, progress=progress)
    else:
        from prebake.convert.bake import convert
        from prebake.convert.plan import Options

        variants = options.pop("variants", ())
        convert(src, entry, Options(**options), force=True, progress=progress, variants=variants)
    if source_fingerprint(src, strict) != fingerprint:  # changed while we read it: never keep that
        shutil.rmtree(entry, ignore_errors=True)
        raise FormatError("changed while it was being converted; try again", src)


def is_archive(src) -> bool:
    """Whether ``src`` is a file written by ``prebake pack``."""
    from prebake.formats.archive import MAGIC

    try:
        with open(src, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except (IsADirectoryError, FileNotFoundError):
        return False


def _touch(entry: Path) -> None:
    (entry.parent / f".{entry.name}{_USED}").touch()


@dataclass
class Entry:
    key: str
    path: Path
    source: str
    options: dict
    bytes: int
    last_used: float


def entries(root: str | os.PathLike | None = None) -> list[Entry]:
    """Every finished bake in the cache, most recently used first."""
    root = Path(root) if root else cache_root()
    out = []
    for p in sorted(root.iterdir()) if root.exists() else []:
        if p.is_dir() and not p.name.startswith(".") and is_bake(p):
            m = read_manifest(p)
            used = root / f".{p.name}{_USED}"
            size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
            out.append(Entry(p.name, p, m.source.get("path", "?"), m.options, size,
                             used.stat().st_mtime if used.exists() else p.stat().st_mtime))
    return sorted(out, key=lambda e: -e.last_used)


def remove(key: str, root: str | os.PathLike | None = None) -> bool:
    """Removes one entry (under its lock, so never one being made); False if it was not there."""
    root = Path(root) if root else cache_root()
    entry = root / key
    if not entry.exists():
        return False
    with _lock(root, key):
        shutil.rmtree(entry, ignore_errors=True)
        (root / f".{key}{_USED}").unlink(missing_ok=True)
    return True


def gc(max_size: int, root: str | os.PathLike | None = None) -> list[Entry]:
    """Removes least recently used entries until the cache holds at most ``max_size`` bytes, and
    the temporary folders of conversions whose process died."""
    from prebake.convert.output import remove_stale

    root_path = Path(root) if root else cache_root()
    for p in root_path.glob(".*.prebake-*-*") if root_path.exists() else []:
        remove_stale(root_path / p.name[1:].split(".prebake-", 1)[0])
    removed, total = [], 0
    for e in entries(root):
        if total + e.bytes <= max_size:
            total += e.bytes
        else:
            remove(e.key, root)
            removed.append(e)
    return removed

