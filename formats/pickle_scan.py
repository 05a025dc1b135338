"""A bounded pass over a pickle's opcodes, run before the C unpickler ever sees the bytes.

The C unpickler trusts the numbers in its input: ``LONG_BINPUT 2**28`` makes it allocate a
memo of 2**29 slots, ``BINBYTES8 2**40`` a 1 TiB buffer, and one-byte ``EMPTY_SET`` opcodes
build 200-byte sets. :func:`scan` walks the opcodes once (about 12 ms for the 1 MB pickle of
a 7,720-tensor state dict, a tenth of ``pickletools.genops``) and refuses, before anything is
built:

- an opcode that is unknown, or needs out-of-band buffers or the copyreg extension registry;
- an argument that runs past the end of the pickle (a length, a line, a frame);
- a memo index beyond :func:`_memo_limit` of the bytes before it: a real pickler numbers its
  memo entries 0, 1, 2, ..., so this bounds the memo by the pickle's size.

It also finds where the pickle ends (its ``STOP``), which the legacy format needs, and
estimates, pessimistically, the memory the objects it builds will take: the unpickler refuses
a pickle whose estimate passes its :class:`Limits` budget.
"""

from __future__ import annotations

import functools
import pickle
import pickletools
import re
import struct
from dataclasses import dataclass

from prebake.formats.errors import FormatError, UnsupportedError


@dataclass(frozen=True)
class Limits:
    """How much memory a pickle may make the unpickler (and the walk after it) allocate."""

    memory_per_byte: int = 80  # torch.save pickles take 4-7 (estimated: up to 64)
    memory_floor: int = 64 << 20

    def budget(self, nbytes: int) -> int:
        return self.memory_floor + self.memory_per_byte * nbytes


LIMITS = Limits()


@dataclass(frozen=True)
class Scan:
    """What :func:`scan` found: where the pickle ends and what building it would cost."""

    end: int  # offset just past STOP
    cost: int  # estimated bytes of objects the unpickler will allocate


# Argument kinds; a kind >= 0 is a fixed-size argument of that many bytes.
_LINE, _LINE2, _COUNT1, _COUNT4, _COUNT8, _PUT4, _PUT_LINE, _FRAME, _STOP, _REFUSED, _UNKNOWN = range(-1, -12, -1)
_REFUSED_OPS = {
    "EXT1": "the copyreg extension registry", "EXT2": "the copyreg extension registry",
    "EXT4": "the copyreg extension registry", "NEXT_BUFFER": "out-of-band buffers",
    "READONLY_BUFFER": "out-of-band buffers",
}
_SPECIAL = {"LONG_BINPUT": _PUT4, "PUT": _PUT_LINE, "FRAME": _FRAME, "STOP": _STOP,
            "GLOBAL": _LINE2, "INST": _LINE2}
# Everything the regex skips is charged per byte: the worst of it (TUPLE1 over and over)
# keeps a 64-byte tuple per byte, and 64 is below Limits.memory_per_byte, so only sets and
# allowed callables can exhaust a budget. Sets are charged one by one; long strings by size.
_RUN_COST = 64
_SET_COST = 232
_STRING_COST = 80
_SETS = {"EMPTY_SET", "EMPTY_FROZENSET", "FROZENSET"}
_SHORT_STRING = 128  # strings shorter than this are skipped by the regex
_MEMO_SLACK = 1 << 16  # memo indices may reach 4 x the bytes before them + this


def _tables():
    """Argument kind per opcode byte, opcode names, and the regexes that skip plain runs."""
    kinds, names, by_width, strings = [_UNKNOWN] * 256, {}, {}, []
    counted = {pickletools.TAKEN_FROM_ARGUMENT1: _COUNT1, pickletools.TAKEN_FROM_ARGUMENT4: _COUNT4,
               pickletools.TAKEN_FROM_ARGUMENT4U: _COUNT4, pickletools.TAKEN_FROM_ARGUMENT8U: _COUNT8}
    for op in pickletools.opcodes:
        code = op.code.encode("latin-1")
        names[code[0]] = op.name
        n = 0 if op.arg is None else op.arg.n
        if op.name in _REFUSED_OPS:
            kinds[code[0]] = _REFUSED
        elif op.name in _SPECIAL:
            kinds[code[0]] = _SPECIAL[op.name]
        elif n >= 0:
            kinds[code[0]] = n
            if op.name not in _SETS:
                by_width.setdefault(n, []).append(re.escape(code))
        else:
            kinds[code[0]] = _LINE if n == pickletools.UP_TO_NEWLINE else counted[n]
            if op.name in ("BINUNICODE", "SHORT_BINUNICODE"):  # how protocols 2 and 4 write str
                strings.append(_short_strings(code, 4 if op.name == "BINUNICODE" else 1))
    plain = [b"[" + b"".join(ops) + b"]" + b"." * n for n, ops in sorted(by_width.items())] + strings
    return tuple(kinds), names, b"|".join(plain)


def _short_strings(code: bytes, width: int) -> bytes:
    """A string opcode with a payload shorter than _SHORT_STRING: one alternative per length.

    Each alternative starts with its length byte, a literal that sre rejects in one test.
    """
    pad = b"\\x00" * (width - 1)
    lengths = [re.escape(bytes([n])) + pad + b".{%d}" % n for n in range(_SHORT_STRING)]
    return re.escape(code) + b"(?:" + b"|".join(lengths) + b")"


@functools.cache
def _run_regex(tier: int) -> re.Pattern:
    """Plain opcodes, plus LONG_BINPUT with an index below ``2**(16 + tier)``.

    Compiled on first use (about 10 ms each; a pickle of more than 240 KB needs a second, of
    more than 4 MB a third). A bounded repeat: sre keeps a backtracking record per repetition
    (240 bytes), so an unbounded one would itself take memory in proportion to the run.
    """
    third = b"\\x00" if tier == 0 else b"[\\x00-" + b"\\x%02x" % ((1 << tier) - 1) + b"]"
    put = re.escape(pickle.LONG_BINPUT) + b".." + third + b"\\x00"
    return re.compile(b"(?:" + put + b"|" + _PLAIN + b"){0,4096}", re.DOTALL)


_KINDS, _NAMES, _PLAIN = _tables()
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def _memo_limit(before: int) -> int:
    """The largest memo index allowed after ``before`` bytes: the C unpickler sizes its memo by
    the index (16 bytes per slot), and a real pickler numbers entries 0, 1, 2, ... (at most one
    per 2 bytes), so this keeps the memo within 64 bytes per pickle byte."""
    return 4 * before + _MEMO_SLACK


def scan(buf, start: int = 0) -> Scan:
    """Checks the pickle that starts at ``buf[start]`` (bytes or mmap); returns where it ends.

    Runs of fixed-size opcodes and short strings are skipped by a regex (in C), 4096 opcodes
    per match; only long strings, large memo indices, text arguments and sets come back to
    Python. Raises :class:`FormatError` naming the opcode and its byte offset for anything it
    refuses.
    """
    kinds, u32 = _KINDS, _U32.unpack_from
    size = len(buf)
    pos, cost = start, 0
    while True:
        # the regex that lets LONG_BINPUT through up to 2**(16 + tier) <= _memo_limit(pos); a
        # real pickler's indices stay far below it (one entry per 6 bytes at the very most)
        limit = _memo_limit(pos - start)
        skipped = _run_regex(8 if limit >= 1 << 24 else 4 if limit >= 1 << 20 else 0).match(buf, pos).end()
        cost += _RUN_COST * (skipped - pos)
        pos = skipped
        if pos >= size:
            raise FormatError(f"pickle is truncated (no STOP opcode in its {size - start} bytes)")
        op = buf[pos]
        kind = kinds[op]
        pos += 1
        if kind == _COUNT4 and pos + 4 <= size:  # BINUNICODE, the common string: inlined
            payload = u32(buf, pos)[0]
            pos += 4 + payload
            cost += _STRING_COST + payload
            if pos > size:
                _counted(buf, pos - 4 - payload, kind, size, start)  # raises, naming the opcode
        elif kind in (_COUNT4, _COUNT1, _COUNT8):
            pos, payload = _counted(buf, pos, kind, size, start)
            cost += _STRING_COST + payload
        elif kind == _PUT4:
            index = u32(buf, pos)[0] if pos + 4 <= size else 0
            if index > _memo_limit(pos - start):
                _refuse_memo(index, pos - 1 - start)
            pos += 4
            cost += _RUN_COST
        elif kind >= 0:  # a set, or a plain opcode where the regex stopped (its bound, the end)
            pos += kind
            cost += _SET_COST
        elif kind in (_LINE, _LINE2, _PUT_LINE):
            line_start = pos
            pos = _lines(buf, pos, kind, size, start)
            cost += _STRING_COST + pos - line_start
        elif kind == _STOP:
            return Scan(pos, cost)
        elif kind == _FRAME:  # a frame only groups the opcodes that follow; its length must fit
            _counted(buf, pos, _COUNT8, size, start)
            pos += 8
        else:
            _refuse_op(op, pos - 1 - start)


def _counted(buf, pos: int, kind: int, size: int, start: int) -> tuple[int, int]:
    width = 1 if kind == _COUNT1 else 4 if kind == _COUNT4 else 8
    if pos + width > size:
        raise FormatError(f"pickle is truncated in the length of the opcode at byte {pos - 1 - start}")
    n = buf[pos] if width == 1 else (_U32 if width == 4 else _U64).unpack_from(buf, pos)[0]
    pos += width
    if n > size - pos:
        raise FormatError(f"pickle opcode {_NAMES[buf[pos - width - 1]]} at byte {pos - width - 1 - start} "
                          f"declares {n} bytes but only {size - pos} follow")
    return pos + n, n


def _lines(buf, pos: int, kind: int, size: int, start: int) -> int:
    op_at = pos - 1
    for _ in range(2 if kind == _LINE2 else 1):
        nl = buf.find(b"\n", pos, size)
        if nl < 0:
            raise FormatError(f"pickle is truncated in the opcode at byte {op_at - start}")
        line, pos = buf[pos:nl], nl + 1
    if kind == _PUT_LINE:
        try:
            index = int(line)
        except ValueError:
            raise FormatError(f"pickle PUT at byte {op_at - start} has a bad index") from None
        if index > _memo_limit(pos - start):
            _refuse_memo(index, op_at - start)
    return pos


def _refuse_memo(index: int, at: int):
    raise FormatError(f"pickle memo index {index} at byte {at} is beyond any real pickle's "
                      "(indices count up from 0): refused before allocating its memo")


def _refuse_op(op: int, at: int):
    name = _NAMES.get(op)
    if name is None:
        raise FormatError(f"pickle has an unknown opcode 0x{op:02x} at byte {at}")
    raise UnsupportedError(f"pickle opcode {name} at byte {at} needs {_REFUSED_OPS[name]}, "
                           "which no torch checkpoint uses")
