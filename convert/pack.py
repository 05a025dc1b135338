"""``pack`` a bake folder into one compressed archive; ``unpack`` an archive back into a bake.

The archive format lives in :mod:`prebake.formats.archive`. Packing plans the chunks from the
manifest (which byte ranges of each shard hold which float type) before any byte moves, then
compresses them in a thread pool and writes them in order. Unpacking reads the archive once,
front to back, in this thread, while a pool decompresses, checks and ``pwrite``\\ s each chunk at
its offset: on a slow stream, decompression hides behind the reading. Both are atomic: the
archive is written under a temporary name, the bake into a temporary folder
(:mod:`prebake.convert.output`), and renamed into place only when complete and checked.

>>> pack("baked/", "model.pbk")             # doctest: +SKIP
>>> unpack("model.pbk", "baked-again/")     # doctest: +SKIP
"""

from __future__ import annotations

import errno
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prebake.cache.manifest import read_manifest
from prebake.convert import output
from prebake.formats.archive import (
    DTYPE_LAYOUTS,
    HEADER,
    LAYOUTS,
    MAGIC,
    ArchiveFile,
    ArchiveIndex,
    decode_chunk,
    encode_chunk,
    header,
    plan_file,
    read_exact,
    read_index,
)
from prebake.formats.errors import FormatError, OutputError, VerifyError

Progress = Callable[[int], Callable[[int], None]]


@dataclass
class PackReport:
    archive: Path
    files: int
    chunks: int
    raw_bytes: int
    archive_bytes: int

    @property
    def ratio(self) -> float:
        """Archive bytes per bake byte."""
        return self.archive_bytes / self.raw_bytes if self.raw_bytes else 1.0


def plan_archive(bake: str | os.PathLike) -> ArchiveIndex:
    """The archive's index for the bake folder ``bake``, without sizes or checksums yet."""
    bake = Path(bake)
    m = read_manifest(bake)
    spans: dict[str, list[tuple[int, int, str]]] = {}
    for t in m.tensors.values():
        if t.dtype in DTYPE_LAYOUTS:
            spans.setdefault(m.shards[t.shard].file, []).append((t.offset, t.nbytes, DTYPE_LAYOUTS[t.dtype]))
    for s in m.shards:
        size = _size(bake / s.file)
        if size != s.size:
            raise VerifyError(f"shard is {size} bytes, the manifest says {s.size}: the bake is damaged; "
                              "run 'prebake verify' or convert again", bake / s.file)
    files = [ArchiveFile(p, _size(bake / p)) for p in _bake_files(bake)]
    chunks = [c for i, f in enumerate(files) for c in plan_file(i, f.size, spans.get(f.path, []))]
    return ArchiveIndex(files, chunks)


def _bake_files(bake: Path) -> list[str]:
    return sorted(p.relative_to(bake).as_posix() for p in bake.rglob("*") if p.is_file())


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as e:
        raise FormatError(f"cannot read ({e.strerror})", path) from None


def pack(bake_dir: str | os.PathLike, archive_path: str | os.PathLike, *, level: int = 3,
         threads: int | None = None, progress: Progress | None = None, force: bool = False) -> PackReport:
    """Writes every file of the bake folder ``bake_dir`` into the archive ``archive_path``.

    ``level``: the zstd level of plain bytes (float planes use entropy-coding settings of their
    own). ``threads``: compression threads (default: the usable cores). ``progress``: called
    once with the total bytes to pack, returns the callable fed each increment. An existing
    ``archive_path`` is replaced only if it is a prebake archive, or with ``force``.
    """
    bake, archive = Path(bake_dir), Path(archive_path)
    index = plan_archive(bake)
    update = progress(index.raw_bytes) if progress else _ignore
    tmp = _start_archive(archive, force)
    try:
        with _guard(archive), open(tmp, "wb") as out:
            _write_archive(bake, index, out, level, threads or _cores(), update)
            out.flush()
            os.fsync(out.fileno())
        with _guard(archive):
            os.replace(tmp, archive)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return PackReport(archive, len(index.files), len(index.chunks), index.raw_bytes, index.size)


def _write_archive(bake: Path, index: ArchiveIndex, out, level: int, threads: int, update) -> None:
    reserve = len(index.placeholder().to_json())
    out.write(bytes(HEADER.size + reserve))
    fds = [_open_input(bake / f.path) for f in index.files]
    try:
        def encode(i: int):
            c = index.chunks[i]
            path = bake / index.files[c.file].path
            try:
                raw = os.pread(fds[c.file], c.length, c.offset)
            except OSError as e:
                raise FormatError(f"cannot read ({e.strerror})", path) from None
            if len(raw) != c.length:
                raise FormatError(f"changed while being packed (ends before byte {c.offset + c.length})", path)
            return encode_chunk(np.frombuffer(raw, np.uint8), LAYOUTS[c.layout], level)

        with ThreadPoolExecutor(threads) as pool:
            for i, (frames, checksum) in enumerate(ordered(pool, encode, range(len(index.chunks)), threads)):
                c = index.chunks[i]
                for f in frames:
                    out.write(f)
                index.chunks[i] = c._replace(frames=[len(f) for f in frames], checksum=checksum)
                update(c.length)
    finally:
        for fd in fds:
            os.close(fd)
    index.size = out.tell()
    body = index.to_json(reserve)
    assert len(body) == reserve, "the reserved index room was too small"
    out.seek(0)
    out.write(header(body) + body)


def _open_input(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY)
    except OSError as e:
        raise FormatError(f"cannot read ({e.strerror})", path) from None


def _start_archive(archive: Path, force: bool) -> Path:
    """Checks ``archive`` may be replaced; returns the temporary name to write it under."""
    if archive.is_dir():
        raise OutputError("is a folder; choose a file name for the archive", archive)
    if archive.exists() and not force:
        with _guard(archive), open(archive, "rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                raise OutputError("exists and is not a prebake archive; choose another name or pass "
                                  "--force to replace it", archive)
    with _guard(archive):
        archive.parent.mkdir(parents=True, exist_ok=True)
    return archive.with_name(f".{archive.name}.prebake-tmp-{os.getpid()}")


def unpack(archive_path: str | os.PathLike, out_dir: str | os.PathLike, *, threads: int | None = None,
           force: bool = False, progress: Progress | None = None) -> Path:
    """Unpacks the archive ``archive_path`` into the folder ``out_dir``, byte for byte.

    ``out_dir`` is replaced only if it holds a bake (or with ``force``); until the end, the
    files grow in a temporary folder beside it. A damaged or truncated archive raises
    :class:`VerifyError` / :class:`FormatError` naming the chunk, and leaves ``out_dir`` as it was.
    """
    path = Path(archive_path)
    with open(_open_input(path), "rb") as f:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return unpack_from(f, out_dir, threads=threads, force=force, progress=progress, name=str(path))


def unpack_from(reader, out_dir: str | os.PathLike, *, threads: int | None = None, force: bool = False,
                progress: Progress | None = None, name: str = "<archive stream>") -> Path:
    """:func:`unpack` from any object with ``read(n)``, read once front to back (a pipe, a download).

    ``name`` names the archive in errors.
    """
    index = read_index(reader, name)
    out = Path(out_dir)
    update = progress(index.raw_bytes) if progress else _ignore
    tmp = output.start(out, force)
    try:
        fds = _create_files(tmp, index)
        try:
            _extract(reader, index, fds, tmp, threads or _cores(), update)
            if reader.read(1):
                raise FormatError(f"archive has data after its last chunk (byte {index.size} on); "
                                  "it is damaged or not what its index says", name)
            with _guard(tmp):
                for fd in fds:
                    os.fsync(fd)
        finally:
            for fd in fds:
                os.close(fd)
        output.commit(tmp, out)
    except BaseException:
        output.abort(tmp)
        raise
    return out


def _create_files(tmp: Path, index: ArchiveIndex) -> list[int]:
    """Opens every file of the archive in ``tmp``, at its final size (sparse until written)."""
    fds: list[int] = []
    try:
        for f in index.files:
            path = tmp / f.path
            with _guard(path):
                path.parent.mkdir(parents=True, exist_ok=True)
                fds.append(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
                os.ftruncate(fds[-1], f.size)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def _extract(reader, index: ArchiveIndex, fds: list[int], tmp: Path, threads: int, update) -> None:
    def write(item: tuple[int, bytes]) -> int:
        i, data = item
        c = index.chunks[i]
        raw = memoryview(decode_chunk(index, i, data)).cast("B")
        with _guard(tmp / index.files[c.file].path):
            done = 0
            while done < c.length:
                done += os.pwrite(fds[c.file], raw[done:], c.offset + done)
        return c.length

    with ThreadPoolExecutor(threads) as pool:
        for n in ordered(pool, write, _read_chunks(reader, index), threads):
            update(n)


def _read_chunks(reader, index: ArchiveIndex) -> Iterator[tuple[int, bytes]]:
    """Each chunk's frames, read in order; a short read is a truncated archive."""
    for i, c in enumerate(index.chunks):
        want = sum(c.frames)
        data = read_exact(reader, want) if want else b""
        if len(data) < want:
            raise FormatError(f"archive is truncated: it ends at byte {index.starts[i] + len(data)}, "
                              f"inside {index.label(i)}; the whole archive is {index.size} bytes", index.name)
        yield i, data


def ordered(pool: ThreadPoolExecutor, fn: Callable, items: Iterable, threads: int) -> Iterator:
    """``fn`` of each item, run in ``pool`` with a few items in flight per thread, yielded in order.

    Items are drawn in the calling thread (so a reader there keeps reading while the pool works);
    the window bounds memory. On an error, the items not yet started are cancelled.
    """
    pending: deque = deque()
    window = 2 * threads + 1
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()


class _guard:
    """Turns an OSError while writing ``path`` into an :class:`OutputError` (disk full named)."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if isinstance(e, OSError):
            why = "disk full" if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "cannot write"
            raise OutputError(f"{why} ({e.strerror})", self.path) from None
        return False


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _ignore(n: int) -> None:
    pass
