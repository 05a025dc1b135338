"""The records a manifest is made of: plain namedtuples, shared by the reader and its checks."""

from __future__ import annotations

from collections import namedtuple

# Entries are plain namedtuples and Manifest a plain class: immutable records, and several times
# cheaper to define at import than dataclasses or typing.NamedTuple, which matters on the load
# path of a process that should be serving a few milliseconds after it starts.
TensorEntry = namedtuple("TensorEntry",
                         "dtype shape shard offset nbytes checksum qtype source_dtype packed tp source_name",
                         defaults=(None, None, None, None, None))
TensorEntry.__doc__ = ("A stored tensor: logical dtype and shape; shard, absolute offset, size and checksum of its "
                       "bytes; their GGML block type if they are blocks; an optional second, packed form; how "
                       "tensor-parallel ranks split it (column, row, vocab; row:N when stored as N column blocks); "
                       "the name the source gave it, when the bake renamed it.")
PackedForm = namedtuple("PackedForm", "qtype shard offset nbytes checksum")
PackedForm.__doc__ = "GGML blocks of a tensor kept beside its float bytes (--keep-float)."
Blob = namedtuple("Blob", "shard offset nbytes checksum dtype qtype")
Blob.__doc__ = "One stored byte range: ``dtype`` as stored (``U8`` for blocks), ``qtype`` for blocks."
AliasEntry = namedtuple("AliasEntry", "target storage_offset shape strides")
AliasEntry.__doc__ = "A view of a stored tensor (tied weights, slices): offset and strides in elements."
ShardEntry = namedtuple("ShardEntry", "file size data_offset")
FileEntry = namedtuple("FileEntry", "path size checksum")

# the columns of the manifest's tensor table, in this order; the first seven are required
COLUMNS = ("name", *TensorEntry._fields)
REQUIRED = COLUMNS[:7]
