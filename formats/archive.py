"""The prebake archive: every file of a bake in one file, compressed losslessly in chunks.

Layout (version 1; integers little-endian)::

    offset   size  field
    0        8     magic b"PBKARCH\\0"
    8        4     version (u32), 1
    12       4     reserved (u32), 0
    16       8     L, the length of the index (u64)
    24       16    xxh3_128 digest of the L index bytes
    40       L     the index: UTF-8 JSON, padded with trailing spaces
    40 + L   ...   chunk data: each chunk's zstd frames, one per plane, back to back, in index order

The index::

    {"format": "prebake-archive", "version": 1, "codec": "zstd", "checksum": "xxh3_128",
     "size": <archive bytes>,
     "files": [{"path": "model.safetensors", "size": 123}, ...],     # every file, in order
     "chunk_fields": ["file", "offset", "length", "layout", "frames", "checksum"],
     "chunks": [[0, 0, 16384, "bytes", [2101], "<xxh3_128 of the raw bytes>"], ...]}

A chunk is ``length`` bytes of ``files[file]`` from ``offset``; the chunks of a file follow one
another and cover it exactly. Chunks are independent (a few MiB each), so they decompress in
parallel and a damaged one is named. A chunk's ``layout`` says how its bytes became planes:

- ``bytes``: one plane, the bytes as they are (headers, padding, integer tensors, files);
- ``planesK`` (K = 2, 4, 8): each K-byte little-endian element is rotated left by one bit, so
  the sign moves to the bottom and the top byte holds the exponent (all of it for BF16, F32
  and F64); byte j of every element then goes to plane j. The exponent plane is small-alphabet
  and compresses about 3x; mantissa planes are close to random and stay near their size.

``frames`` are the compressed sizes of the chunk's planes. Float planes are coded with zstd set
for entropy coding (a 64-entry match table, so nearly every byte goes to the Huffman literal
coder): on exponent bytes, short LZ matches cost more than they save. Measured on BF16 exponent
planes, this gives 0.335 of the plane's size against 0.365 at level 1 and ~0.41 at level 3,
while compressing 2-5x and decompressing 1.5-2x faster. ``level`` applies to ``bytes`` chunks.

The index comes first so that unpack can read the archive once, front to back (a pipe, a
throttled download), and start writing files after the first chunk; pack reserves room for
the index, writes the chunks, then seeks back and writes the index.
"""

from __future__ import annotations

import json
import struct
import threading
from bisect import bisect_right
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import PurePosixPath
from typing import NamedTuple

import numpy as np
import xxhash
import zstandard as zstd
from prebake.formats.errors import FormatError, VerifyError

MAGIC = b"PBKARCH\0"
VERSION = 1
FORMAT = "prebake-archive"
HEADER = struct.Struct("<8sIIQ16s")
CHUNK_SIZE = 4 << 20  # raw bytes per chunk, at most
MAX_INDEX = 1 << 30
MAX_CHUNK = 256 << 20  # the largest chunk a reader accepts
CHUNK_FIELDS = ["file", "offset", "length", "layout", "frames", "checksum"]


class Layout(NamedTuple):
    name: str
    itemsize: int  # bytes per element, and planes per chunk


LAYOUTS = {x.name: x for x in (Layout("bytes", 1), Layout("planes2", 2), Layout("planes4", 4),
                               Layout("planes8", 8))}
DTYPE_LAYOUTS = {"BF16": "planes2", "F16": "planes2", "F32": "planes4", "C64": "planes4",
                 "F64": "planes8"}
_UINT = {2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}
PLANE_PARAMS = zstd.ZstdCompressionParameters.from_level(  # fast strategy, matches seldom found
    1, window_log=17, hash_log=6, chain_log=6, search_log=1, min_match=7)


class ArchiveFile(NamedTuple):
    path: str
    size: int


class Chunk(NamedTuple):
    file: int
    offset: int
    length: int
    layout: str
    frames: list[int]
    checksum: str


@dataclass
class ArchiveIndex:
    files: list[ArchiveFile]
    chunks: list[Chunk]
    size: int = 0  # the whole archive, in bytes
    data_offset: int = 0  # where chunk data starts; not serialized
    name: str = "<archive>"  # names the archive in errors; not serialized
    starts: list[int] = field(default_factory=list, repr=False)  # archive offset of each chunk

    @property
    def raw_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self, reserve: int = 0) -> bytes:
        d = {"format": FORMAT, "version": VERSION, "codec": "zstd", "checksum": "xxh3_128",
             "size": self.size, "files": [f._asdict() for f in self.files],
             "chunk_fields": CHUNK_FIELDS, "chunks": [list(c) for c in self.chunks]}
        text = json.dumps(d, separators=(",", ":")).encode()
        return text + b" " * (reserve - len(text)) if reserve >= len(text) else text

    def placeholder(self) -> ArchiveIndex:
        """This index with every number as large as it can get: its JSON bounds the real one's."""
        big = [c._replace(frames=[10 * c.length + 1000] * LAYOUTS[c.layout].itemsize, checksum="0" * 32)
               for c in self.chunks]
        return ArchiveIndex(self.files, big, 10 * self.raw_bytes + (1 << 40))

    def locate(self, data_offset: int) -> None:
        """Records where chunk data starts and each chunk's archive offset."""
        self.data_offset = data_offset
        self.starts = list(accumulate((sum(c.frames) for c in self.chunks), initial=data_offset))

    def truncated(self, at: int) -> FormatError:
        """The error for an archive that ends at byte ``at``, naming the chunk it cuts."""
        i = bisect_right(self.starts, at) - 1
        where = f"inside {self.label(i)}" if 0 <= i < len(self.chunks) else "before its chunks"
        return FormatError(f"archive is truncated: it ends at byte {at}, {where}; "
                           f"the whole archive is {self.size} bytes", self.name)

    def label(self, i: int) -> str:
        c = self.chunks[i]
        return (f"chunk {i} of {len(self.chunks)} ({self.files[c.file].path}[{c.offset}:{c.offset + c.length}], "
                f"archive bytes {self.starts[i]}:{self.starts[i + 1]})")


def header(index_bytes: bytes) -> bytes:
    return HEADER.pack(MAGIC, VERSION, 0, len(index_bytes), xxhash.xxh3_128_digest(index_bytes))


# --- byte planes --------------------------------------------------------------------------------

def split(raw: np.ndarray, layout: Layout, out: np.ndarray) -> np.ndarray:
    """The planes of ``raw`` (uint8, whole elements), back to back in ``out``; ``raw`` if one plane."""
    k = layout.itemsize
    if k == 1:
        return raw
    x, rotated, low = raw.view(_UINT[k]), scratch("rotated", len(raw)).view(_UINT[k]), out.view(_UINT[k])
    np.right_shift(x, 8 * k - 1, out=low)
    np.left_shift(x, 1, out=rotated)
    rotated |= low
    out.reshape(k, -1)[:] = rotated.view(np.uint8).reshape(-1, k).T
    return out


def merge(planes: np.ndarray, layout: Layout, out: np.ndarray) -> None:
    """Writes the elements whose planes lie back to back in ``planes`` into ``out`` (both uint8).

    The inverse of :func:`split`. ``planes`` is used as scratch and left undefined.
    """
    k = layout.itemsize
    if k == 1:
        out[:] = planes
        return
    x, rows = out.view(_UINT[k]), planes.reshape(k, -1)
    x[:] = rows[-1]
    for row in rows[-2::-1]:
        x <<= 8
        x |= row
    low = np.right_shift(x, 1, out=planes.view(_UINT[k]))
    x <<= 8 * k - 1
    x |= low


# --- chunks -------------------------------------------------------------------------------------

_local = threading.local()  # zstd contexts are not thread-safe: one set per thread


def _compressor(level: int, planar: bool) -> zstd.ZstdCompressor:
    cache = _local.__dict__.setdefault("compressors", {})
    key = (level, planar)
    if key not in cache:
        cache[key] = (zstd.ZstdCompressor(compression_params=PLANE_PARAMS) if planar
                      else zstd.ZstdCompressor(level=level))
    return cache[key]


def _decompressor() -> zstd.ZstdDecompressor:
    if not hasattr(_local, "decompressor"):
        _local.decompressor = zstd.ZstdDecompressor()
    return _local.decompressor


def scratch(purpose: str, n: int) -> np.ndarray:
    """``n`` bytes of this thread's reusable buffer for ``purpose``.

    Chunks come and go by the thousand: fresh buffers would cost a page fault per 4 KiB.
    """
    buffers = _local.__dict__.setdefault("scratch", {})
    buf = buffers.get(purpose)
    if buf is None or len(buf) < n:
        buf = buffers[purpose] = np.empty(max(n, CHUNK_SIZE), np.uint8)
    return buf[:n]


def encode_chunk(raw: np.ndarray, layout: Layout, level: int) -> tuple[list[bytes], str]:
    """A chunk's zstd frames (one per plane) and the xxh3_128 of its raw bytes (uint8)."""
    cctx = _compressor(level, layout.itemsize > 1)
    planes = split(raw, layout, scratch("planes", len(raw)))
    return ([cctx.compress(p) for p in planes.reshape(layout.itemsize, -1)],
            xxhash.xxh3_128_hexdigest(raw))


def decode_chunk(index: ArchiveIndex, i: int, data) -> np.ndarray:
    """The raw bytes of chunk ``i`` from its frames ``data``; :class:`VerifyError` if damaged.

    The result is a view of this thread's scratch buffer, valid until its next call.
    """
    c = index.chunks[i]
    layout = LAYOUTS[c.layout]
    planes, raw = scratch("planes", c.length), scratch("raw", c.length)
    try:
        _decompress(data, c.frames, planes if layout.itemsize > 1 else raw)
    except (zstd.ZstdError, ValueError) as e:
        raise VerifyError(f"{index.label(i)} is damaged ({e})", index.name) from None
    if layout.itemsize > 1:
        merge(planes, layout, raw)
    if xxhash.xxh3_128_hexdigest(raw) != c.checksum:
        raise VerifyError(f"{index.label(i)} is damaged (its checksum does not match)", index.name)
    return raw


def _decompress(data, frames: list[int], out: np.ndarray) -> None:
    """Decompresses the frames back to back in ``data`` into equal parts of ``out``."""
    dctx = _decompressor()
    for frame, part in zip(_frame_views(memoryview(data), frames), out.reshape(len(frames), -1), strict=True):
        size = zstd.frame_content_size(frame)
        if size != len(part):
            raise ValueError(f"a plane's frame says {size} bytes, not {len(part)}")
        with dctx.stream_reader(frame) as reader:
            got = 0
            while got < len(part) and (n := reader.readinto(part[got:])):
                got += n
        if got != len(part):
            raise ValueError(f"a plane decompressed to {got} bytes, not {len(part)}")


def _frame_views(view: memoryview, frames: list[int]) -> list[memoryview]:
    ends = list(accumulate(frames))
    return [view[end - size:end] for size, end in zip(frames, ends, strict=True)]


# --- reading the header and index ---------------------------------------------------------------

def read_into(reader, view: memoryview) -> int:
    """Fills ``view`` from ``reader`` (by ``readinto`` if it has one); returns the bytes read,
    fewer than ``len(view)`` only at the end of the stream."""
    got, readinto = 0, getattr(reader, "readinto", None)
    while got < len(view):
        if readinto is not None:
            n = readinto(view[got:]) or 0
        else:
            data = reader.read(len(view) - got)
            n = len(data)
            view[got:got + n] = data
        if not n:
            break
        got += n
    return got


def read_exact(reader, n: int) -> bytes:
    """Up to ``n`` bytes from ``reader``, fewer only at the end of the stream."""
    buf = bytearray(n)
    return bytes(buf[:read_into(reader, memoryview(buf))])


def read_index(reader, name: str) -> ArchiveIndex:
    """Reads and checks the header and index at the start of ``reader``."""
    head = read_exact(reader, HEADER.size)
    if head[:len(MAGIC)] != MAGIC:
        raise FormatError("not a prebake archive (it does not start with the PBKARCH magic)", name)
    if len(head) < HEADER.size:
        raise FormatError(f"archive is truncated: it ends at byte {len(head)}, inside its header", name)
    _, version, _, length, digest = HEADER.unpack(head)
    if version > VERSION:
        raise FormatError(f"archive version {version} is newer than this prebake understands "
                          f"({VERSION}); upgrade prebake", name)
    if length > MAX_INDEX:
        raise FormatError(f"archive header is damaged (index length {length})", name)
    body = read_exact(reader, length)
    if len(body) < length:
        raise FormatError(f"archive is truncated: it ends at byte {HEADER.size + len(body)}, "
                          f"inside its index ({HEADER.size + length} bytes)", name)
    if xxhash.xxh3_128_digest(body) != digest:
        raise VerifyError("archive index is damaged (its checksum does not match)", name)
    return parse_index(body, HEADER.size + length, name)


def parse_index(body: bytes, data_offset: int, name: str) -> ArchiveIndex:
    try:
        d = json.loads(body)
        if d.get("format") != FORMAT or d.get("codec") != "zstd" or d.get("chunk_fields") != CHUNK_FIELDS:
            raise ValueError("not a prebake archive index")
        files = [ArchiveFile(_safe_path(f["path"]), _count(f["size"])) for f in d["files"]]
        paths = {f.path for f in files}
        if len(paths) < len(files) or paths & {str(q) for f in files for q in PurePosixPath(f.path).parents}:
            raise ValueError("file paths repeat, or one is another's folder")
        chunks = [_chunk(row, len(files)) for row in d["chunks"]]
        index = ArchiveIndex(files, chunks, _count(d["size"]), name=name)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise FormatError(f"archive index is malformed ({type(e).__name__}: {e})", name) from None
    index.locate(data_offset)
    _check_cover(index)
    return index


def _chunk(row: list, nfiles: int) -> Chunk:
    c = Chunk(*row)
    k = LAYOUTS[c.layout].itemsize
    plane = _count(c.length) // k
    if not (_count(c.file) < nfiles and _count(c.offset) >= 0 and c.length % k == 0 and c.length <= MAX_CHUNK
            and len(c.frames) == k and all(_count(s) <= plane + plane // 128 + 1024 for s in c.frames)
            and isinstance(c.checksum, str) and len(c.checksum) == 32):
        raise ValueError(f"bad chunk {row!r}")
    return c


def _count(x) -> int:
    if not isinstance(x, int) or isinstance(x, bool) or x < 0:
        raise ValueError(f"not a byte count: {x!r}")
    return x


def _safe_path(p: str) -> str:
    path = PurePosixPath(p)
    if str(path) != p or path.is_absolute() or "\0" in p or any(s in (".", "..") for s in path.parts):
        raise ValueError(f"unsafe or unnormalized file path {p!r}")
    return p


def _check_cover(index: ArchiveIndex) -> None:
    """Each file's chunks follow one another from byte 0 to its end; sizes add up."""
    ends = [0] * len(index.files)
    for c in index.chunks:
        if c.offset != ends[c.file]:
            raise FormatError(f"archive index is malformed (chunks of {index.files[c.file].path} "
                              f"do not follow one another at byte {c.offset})", index.name)
        ends[c.file] += c.length
    for f, end in zip(index.files, ends, strict=True):
        if end != f.size:
            raise FormatError(f"archive index is malformed (its chunks cover {end} of the "
                              f"{f.size} bytes of {f.path})", index.name)
    if index.starts[-1] != index.size:
        raise FormatError(f"archive index is malformed (its chunks end at byte {index.starts[-1]}, "
                          f"its size says {index.size})", index.name)
