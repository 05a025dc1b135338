"""A bake's work cut into items that any worker can do in any order, with the same bytes.

Each stored tensor's output is cut into checksum pieces (``Options.piece`` bytes, 16 MiB, the
last one shorter); an :class:`Item` is a run of pieces of one shard, whole tensors
of small ones grouped until the run reaches about a piece. Doing an item (:func:`do_item`)
produces its bytes (:func:`~prebake.convert.transforms.produce`, only the rows it needs),
hashes each piece and ``pwrite``\\ s it at its planned offset in the preallocated shard file; it
returns the pieces' digests. The shard files' bytes and the tensors' checksums
(:func:`~prebake.formats.manifest.combine` of their pieces) do not depend on which worker did
what, or when.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prebake.convert.plan import BakePlan, Planned
from prebake.convert.transforms import geometry, produce
from prebake.formats.errors import FormatError, PrebakeError
from prebake.formats.manifest import piece_digest


@dataclass(frozen=True)
class Piece:
    """Bytes ``start:end`` of tensor ``key`` (name, packed), written at ``at`` in shard ``shard``."""

    shard: int
    key: tuple[str, bool]
    index: int  # the piece's number within its tensor
    start: int
    end: int
    at: int  # absolute offset in the shard file


@dataclass(frozen=True)
class Item:
    pieces: tuple[Piece, ...]

    @property
    def nbytes(self) -> int:
        return sum(p.end - p.start for p in self.pieces)


def items(plan: BakePlan) -> Iterator[Item]:
    """The plan's work, in layout order: runs of pieces of one shard, each about a piece long."""
    piece = plan.options.piece
    for index, shard in enumerate(plan.shards):
        run: list[Piece] = []
        size = 0
        for slot in shard.slots:
            if slot.is_padding:
                continue
            p = shard.tensors[slot.name]
            at = len(shard.header) + slot.offset
            for k, start in enumerate(range(0, p.nbytes, piece)):
                end = min(start + piece, p.nbytes)
                if run and size + end - start > piece:
                    yield Item(tuple(run))
                    run, size = [], 0
                run.append(Piece(index, (p.name, p.packed), k, start, end, at + start))
                size += end - start
        if run:
            yield Item(tuple(run))


def planned(plan: BakePlan) -> dict[tuple[str, bool], Planned]:
    """Every planned tensor of ``plan`` by (name, packed)."""
    return {(p.name, p.packed): p for s in plan.shards for p in s.tensors.values()}


def do_item(item: Item, tensors: dict[tuple[str, bool], Planned], fds: dict[int, int]) -> list[tuple]:
    """Produces, hashes and writes ``item``'s pieces into the open shard files ``fds``; returns
    ``[(key, piece index, digest)]``."""
    out = []
    sources = _Sources()
    try:
        for piece in item.pieces:
            p = tensors[piece.key]
            data = sources.read(p, piece.start, piece.end) if _plain_copy(p) else _piece_bytes(p, piece.start, piece.end)
            out.append((piece.key, piece.index, piece_digest(data)))
            pwrite_all(fds[piece.shard], data, piece.at)
    finally:
        sources.close()
    return out


def _plain_copy(p: Planned) -> bool:
    """Whether ``p``'s output is a byte range of its source file, as it lies there."""
    return p.transform in ("copy", "blocks") and p.source.offset is not None and p.source.rows is None and p.tiles == 1


_buffers = threading.local()


class _Sources:
    """Source files read with ``pread`` into this thread's reused buffer, the way ``cp`` moves bytes:
    a copy out of a map faults the source in page by page inside the ``write`` (measured here at
    about a third of ``cp``'s speed)."""

    def __init__(self):
        self.fds: dict[str, int] = {}

    def read(self, p: Planned, start: int, end: int) -> memoryview:
        buf = getattr(_buffers, "buf", None)
        if buf is None or len(buf) < end - start:
            buf = _buffers.buf = memoryview(bytearray(max(end - start, 1 << 20)))
        path = p.source.path
        try:
            fd = self.fds.get(path)
            if fd is None:
                fd = self.fds[path] = os.open(path, os.O_RDONLY)
            view, got = buf[:end - start], 0
            while got < end - start:
                n = os.preadv(fd, [view[got:]], p.source.offset + start + got)
                if n == 0:
                    raise FormatError(f"tensor {p.name!r}: the file ends before its bytes do (truncated while "
                                      "being read?)", path)
                got += n
        except OSError as e:
            raise FormatError(f"cannot read tensor {p.name!r} ({e.strerror or e})", path) from None
        return view

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)


def _piece_bytes(p: Planned, start: int, end: int) -> memoryview:
    """Bytes ``start:end`` of ``p``'s output, computing only the rows that hold them."""
    rows, row_bytes = geometry(p)
    lo, hi = start // row_bytes, -(-end // row_bytes)
    try:
        data = produce(p, lo, hi)
    except OSError as e:
        raise FormatError(f"cannot read tensor {p.name!r} ({e.strerror or e})", p.source.path) from None
    except PrebakeError as e:
        if e.path is None:  # a codec's complaint about the values: say which file and tensor
            raise type(e)(f"tensor {p.name!r}: {e.message}", p.source.path) from None
        raise
    skip = start - lo * row_bytes
    return data[skip:skip + end - start]


def pwrite_all(fd: int, data: memoryview, at: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, at)
        view, at = view[n:], at + n


_SYNC_FILE_RANGE_WRITE = 2
_libc = None
_lock = threading.Lock()


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Starts writing a finished range to disk now, without waiting and without dropping it from
    the page cache (``sync_file_range(SYNC_FILE_RANGE_WRITE)``): the closing ``fsync`` then has
    little left to do, and the bake the user is about to load stays cached."""
    global _libc
    with _lock:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(_libc, "sync_file_range", None)
    if fn is not None:
        fn(fd, ctypes.c_int64(offset), ctypes.c_int64(length), _SYNC_FILE_RANGE_WRITE)


def open_shards(plan: BakePlan, folder: Path) -> dict[int, int]:
    """Creates every shard file at its final size with its header written; returns their fds."""
    fds: dict[int, int] = {}
    try:
        for index, shard in enumerate(plan.shards):
            fd = fds[index] = os.open(folder / shard.file, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.ftruncate(fd, shard.size)  # padding and gaps read as zeros
            pwrite_all(fd, memoryview(shard.header), 0)
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return fds
