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

import os
import queue
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from prebake.convert import output
from prebake.convert.pool import cores, ordered
from prebake.formats.archive import (
    CHUNK_SIZE,
    DTYPE_LAYOUTS,
    HEADER,
    LAYOUTS,
    MAGIC,
    ArchiveFile,
    ArchiveIndex,
    Chunk,
    decode_chunk,
    encode_chunk,
    header,
    read_index,
    read_into,
    scratch,
)
from prebake.formats.errors import FormatError, OutputError, VerifyError
from prebake.formats.integrity import verify
from prebake.formats.manifest import read_component, read_manifest

Progress = Callable[[int], Callable[[int], None]]
SMALL = 64 << 10  # typed spans below this are packed as plain bytes


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
    spans: dict[str, list[tuple[int, int, str]]] = {}
    for prefix, m in _manifests(bake):
        for s in m.shards:
            size = _size(m.root / s.file)
            if size != s.size:
                raise VerifyError(f"shard is {size} bytes, the manifest says {s.size}: the bake is damaged; "
                                  "run 'prebake verify' or convert again", m.root / s.file)
        for _, b in m.blobs():
            if b.dtype in DTYPE_LAYOUTS:
                file = prefix + m.shards[b.shard].file
                spans.setdefault(file, []).append((b.offset, b.nbytes, DTYPE_LAYOUTS[b.dtype]))
    files = [ArchiveFile(p, _size(bake / p)) for p in _bake_files(bake)]
    chunks = [c for i, f in enumerate(files) for c in plan_file(i, f.size, spans.get(f.path, []))]
    return ArchiveIndex(files, chunks)


def _manifests(bake: Path) -> Iterator[tuple[str, object]]:
    """The bake's manifest, then each component's, with the path prefix of its files."""
    m = read_manifest(bake)
    yield "", m
    for name, c in m.components.items():
        yield c["path"] + "/", read_component(m, name)


def plan_file(file: int, size: int, spans: list[tuple[int, int, str]],
              chunk_size: int = CHUNK_SIZE) -> list[Chunk]:
    """The chunks of a ``size``-byte file whose typed ``spans`` are (offset, nbytes, layout).

    Bytes outside any span are plain; spans under :data:`SMALL` are plain too; small plain gaps
    (alignment padding) join the typed run before them when that keeps elements aligned.
    Chunks never cross a run and split it at element boundaries.
    """
    return [c for run in _runs(size, spans) for c in _cut(file, *run, chunk_size)]


def _runs(size: int, spans: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    runs, pos = [], 0
    for off, n, name in sorted(spans):
        if n <= 0 or off < pos or off + n > size:
            continue  # empty, overlapping or out of range: leave those bytes plain
        if off > pos:
            runs.append((pos, off - pos, "bytes"))
        runs.append((off, n, name if n >= SMALL and n % LAYOUTS[name].itemsize == 0 else "bytes"))
        pos = off + n
    if pos < size:
        runs.append((pos, size - pos, "bytes"))
    return _coalesce(runs)


def _coalesce(runs: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    out: list[tuple[int, int, str]] = []
    for off, n, name in runs:
        if out:
            poff, pn, pname = out[-1]
            k = LAYOUTS[pname].itemsize
            if pn % k == 0 and n % k == 0 and (name == pname or (name == "bytes" and n < SMALL)):
                out[-1] = (poff, pn + n, pname)
                continue
        out.append((off, n, name))
    return out


def _cut(file: int, off: int, n: int, name: str, chunk_size: int) -> list[Chunk]:
    k = LAYOUTS[name].itemsize
    step = -(-n // -(-n // chunk_size))  # near-equal pieces of at most chunk_size ...
    step += -step % k  # ... that end on element boundaries
    return [Chunk(file, off + i, min(step, n - i), name, [], "") for i in range(0, n, step)]


def _bake_files(bake: Path) -> list[str]:
    """Every file in the bake folder; a symbolic link is refused (it could point anywhere)."""
    out = []
    for p in bake.rglob("*"):
        if p.is_symlink():
            raise FormatError("is a symbolic link; a bake holds plain files only", p)
        if p.is_file():
            out.append(p.relative_to(bake).as_posix())
    return sorted(out)


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
    _check_archive_target(archive, force)
    with output.writing_file(archive) as tmp, output.guard(archive), open(tmp, "wb") as out:
        _write_archive(bake, index, out, level, threads or cores(), update)
        out.flush()
        os.fsync(out.fileno())
    return PackReport(archive, len(index.files), len(index.chunks), index.raw_bytes, index.size)


def _write_archive(bake: Path, index: ArchiveIndex, out, level: int, threads: int, update) -> None:
    reserve = len(index.placeholder().to_json())
    out.write(bytes(HEADER.size + reserve))
    fds = [_open_input(bake / f.path) for f in index.files]
    try:
        def encode(i: int):
            c = index.chunks[i]
            path = bake / index.files[c.file].path
            raw = scratch("read", c.length)
            try:
                got = _pread_into(fds[c.file], raw, c.offset)
            except OSError as e:
                raise FormatError(f"cannot read ({e.strerror})", path) from None
            if got != c.length:
                raise FormatError(f"changed while being packed (ends before byte {c.offset + c.length})", path)
            return encode_chunk(raw, LAYOUTS[c.layout], level)

        with ThreadPoolExecutor(threads) as pool:
            for i, (frames, checksum) in enumerate(ordered(pool, encode, range(len(index.chunks)), 2 * threads)):
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
    if len(body) != reserve:
        raise RuntimeError(f"the index needs {len(body)} bytes, {reserve} were reserved")
    out.seek(0)
    out.write(header(body) + body)


def _pread_into(fd: int, buf, offset: int) -> int:
    if hasattr(os, "preadv"):  # Linux, BSDs: straight into the reused buffer
        return os.preadv(fd, [buf], offset)
    data = os.pread(fd, len(buf), offset)
    memoryview(buf)[:len(data)] = data
    return len(data)


def _open_input(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY)
    except OSError as e:
        raise FormatError(f"cannot read ({e.strerror})", path) from None


def _check_archive_target(archive: Path, force: bool) -> None:
    """Refuses to replace a folder, or a file that is not an archive (unless ``force``)."""
    if archive.is_dir():
        raise OutputError("is a folder; choose a file name for the archive", archive)
    if archive.exists() and not force:
        with output.guard(archive), open(archive, "rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                raise OutputError("exists and is not a prebake archive; choose another name or pass "
                                  "--force to replace it", archive)


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
        return unpack_from(f, out_dir, threads=threads, force=force, progress=progress, name=str(path),
                           size=os.fstat(f.fileno()).st_size)


def unpack_from(reader, out_dir: str | os.PathLike, *, threads: int | None = None, force: bool = False,
                progress: Progress | None = None, name: str = "<archive stream>", size: int | None = None) -> Path:
    """:func:`unpack` from any object with ``read(n)``, read once front to back (a pipe, a download).

    ``name`` names the archive in errors. ``size``, the stream's length if known (a file's size,
    a Content-Length), lets a truncated archive be refused before anything is written.
    """
    index = read_index(reader, name)
    if size is not None and size < index.size:
        raise index.truncated(size)
    out = Path(out_dir)
    update = progress(index.raw_bytes) if progress else _ignore
    with output.writing(out, force) as tmp:
        fds = _create_files(tmp, index)
        try:
            _extract(reader, index, fds, tmp, threads or cores(), update)
            if reader.read(1):
                raise FormatError(f"archive has data after its last chunk (byte {index.size} on); "
                                  "it is damaged or not what its index says", name)
            with output.guard(tmp):
                for fd in fds:
                    os.fsync(fd)
        finally:
            for fd in fds:
                os.close(fd)
        verify(tmp)  # the unpacked bake is input too: kept only if its manifest checks and its bytes match it
    return out


def _create_files(tmp: Path, index: ArchiveIndex) -> list[int]:
    """Opens every file of the archive in ``tmp``, at its final size (sparse until written)."""
    fds: list[int] = []
    try:
        for f in index.files:
            path = tmp / f.path
            with output.guard(path):
                path.parent.mkdir(parents=True, exist_ok=True)
                fds.append(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
                os.ftruncate(fds[-1], f.size)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def _extract(reader, index: ArchiveIndex, fds: list[int], tmp: Path, threads: int, update) -> None:
    window = 2 * threads + 1
    free: queue.SimpleQueue = queue.SimpleQueue()  # read buffers, reused: fresh ones cost page faults
    for _ in range(window + 1):
        free.put(bytearray(max((sum(c.frames) for c in index.chunks), default=0)))

    def write(item: tuple[int, bytearray, memoryview]) -> int:
        i, buf, data = item
        c = index.chunks[i]
        try:
            raw = memoryview(decode_chunk(index, i, data))
        finally:
            free.put(buf)
        with output.guard(tmp / index.files[c.file].path):
            done = 0
            while done < c.length:
                done += os.pwrite(fds[c.file], raw[done:], c.offset + done)
            _start_writeback(fds[c.file], c.offset, c.length)
        return c.length

    with ThreadPoolExecutor(threads) as pool:
        for n in ordered(pool, write, _read_chunks(reader, index, free), window):
            update(n)


def _read_chunks(reader, index: ArchiveIndex, free: queue.SimpleQueue) -> Iterator[tuple[int, bytearray, memoryview]]:
    """Each chunk's frames, read in order into a free buffer; a short read is a truncated archive."""
    for i, c in enumerate(index.chunks):
        buf = free.get()
        data = memoryview(buf)[:sum(c.frames)]
        got = read_into(reader, data)
        if got < len(data):
            raise index.truncated(index.starts[i] + got)
        yield i, buf, data


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Starts writing a finished range to disk now, so the closing fsync has little left to do
    (``POSIX_FADV_DONTNEED`` starts asynchronous writeback of dirty pages; see ShardWriter)."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def _ignore(n: int) -> None:
    pass
