"""The local cache of bakes: ``ensure(src)`` converts on first use and reuses afterwards.

Each entry is a bake in ``$PREBAKE_CACHE`` (default ``~/.cache/prebake``) named by a key: a
fingerprint of the source plus the conversion options. The default fingerprint reads each
source file's size, modification time, and first and last MiB (cheap at any size); ``strict``
hashes every byte instead. A changed source has another key, so it is never served stale.

Two processes that ask for the same entry at once convert it once: the second waits on the
entry's lock file (``flock``, released by the kernel even if the holder crashes) and then
maps the bake the first one made. A crash mid-conversion leaves only a temporary folder, which
the next conversion removes.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import xxhash
from prebake.cache.manifest import is_bake, read_manifest
from prebake.formats.errors import FormatError

FORMAT_VERSION = 2  # bumped when a bake made by an older prebake must not be reused (2: the
# output head of a single --quant type went to Q6_K)
_USED = ".last_used"


def cache_root() -> Path:
    return Path(os.environ.get("PREBAKE_CACHE") or Path.home() / ".cache" / "prebake")


def source_fingerprint(src: str | os.PathLike, strict: bool = False) -> str:
    """A hash of what ``src`` is: every file below it, by size and mtime and sampled bytes, or all bytes."""
    from prebake.cache.integrity import file_checksum
    from prebake.convert.sources import fingerprint

    p = Path(src)
    if not p.exists():
        raise FormatError("no such file or folder", p)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    h = xxhash.xxh3_128()
    for f in files:
        rel = f.relative_to(p) if p.is_dir() else f.name
        what = {"size": f.stat().st_size, "content": file_checksum(f)} if strict else fingerprint(f)
        h.update(f"{rel}\0{json.dumps(what, sort_keys=True)}\0".encode())
    return h.hexdigest()


def cache_key(fingerprint: str, options: dict) -> str:
    text = json.dumps({"v": FORMAT_VERSION, "source": fingerprint, "options": options}, sort_keys=True)
    return xxhash.xxh3_128(text.encode()).hexdigest()[:24]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


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
        with _locked(root / f".{key}.lock"):
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
            out.append(Entry(p.name, p, m.source.get("path", "?"), size,
                             used.stat().st_mtime if used.exists() else p.stat().st_mtime))
    return sorted(out, key=lambda e: -e.last_used)


def remove(key: str, root: str | os.PathLike | None = None) -> bool:
    """Removes one entry (under its lock, so never one being made); False if it was not there."""
    root = Path(root) if root else cache_root()
    entry = root / key
    if not entry.exists():
        return False
    with _locked(root / f".{key}.lock"):
        shutil.rmtree(entry, ignore_errors=True)
        for side in (root / f".{key}{_USED}", root / f".{key}.lock"):
            side.unlink(missing_ok=True)
    return True


def gc(max_size: int, root: str | os.PathLike | None = None) -> list[Entry]:
    """Removes least recently used entries until the cache holds at most ``max_size`` bytes."""
    removed, total = [], 0
    for e in entries(root):
        if total + e.bytes <= max_size:
            total += e.bytes
        else:
            remove(e.key, root)
            removed.append(e)
    return removed

