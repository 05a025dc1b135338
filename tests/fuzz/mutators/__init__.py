"""Mutators by format, and the weighted table of the ones each reader's inputs get.

See :mod:`tests.fuzz.mutators.base` for what a mutator is. ``ALL`` maps every mutator's name to
it; a reader's table (:data:`TABLES`) maps names to weights.
"""

from __future__ import annotations

from tests.fuzz.mutators.archive_ops import ARCHIVE_OPS
from tests.fuzz.mutators.byte_ops import BYTE_OPS
from tests.fuzz.mutators.gguf_ops import GGUF_OPS
from tests.fuzz.mutators.manifest_ops import MANIFEST_OPS
from tests.fuzz.mutators.safetensors_ops import SAFETENSORS_OPS
from tests.fuzz.mutators.torch_ops import TORCH_OPS
from tests.fuzz.mutators.zip_ops import ZIP_OPS

ALL = {**BYTE_OPS, **ZIP_OPS, **TORCH_OPS, **SAFETENSORS_OPS, **GGUF_OPS, **ARCHIVE_OPS, **MANIFEST_OPS}
BYTES = {"flip_bit": 1.0, "set_byte": 0.5, "set_word": 1.0, "truncate": 1.0, "insert_bytes": 0.4,
         "delete_range": 0.4, "duplicate_range": 0.3, "splice": 0.3}


def _bytes(share: float) -> dict[str, float]:
    """The byte mutations, scaled to ``share`` of the table in all."""
    total = sum(BYTES.values())
    return {k: share * v / total for k, v in BYTES.items()}


TABLES: dict[str, dict[str, float]] = {
    "zip": {**_bytes(0.2), "zip_field": 0.35, "zip_name": 0.15, "zip_members": 0.29, "zip_bomb": 0.003},
    "pickle": {"zip_pickle": 1.0},
    "legacy": {**_bytes(0.15), "legacy_pickle": 0.65, "legacy_count": 0.12, "legacy_keys": 0.08},
    "safetensors": {**_bytes(0.25), "st_tree": 0.3, "st_entry": 0.35, "st_length": 0.1},
    "gguf": {**_bytes(0.25), "gguf_field": 0.65, "gguf_tensor_swap": 0.1},
    "archive": {**_bytes(0.2), "archive_index": 0.3, "archive_header": 0.05, "archive_chunk": 0.15,
                "archive_file": 0.2, "archive_frames": 0.1},
    "manifest": {"manifest_tree": 0.5, "manifest_path": 0.25, "manifest_link": 0.18, "manifest_shard": 0.07},
}
