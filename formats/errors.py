"""The one error family of prebake.

The CLI turns any :class:`PrebakeError` into one line naming the file and the problem and a
non-zero exit; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class PrebakeError(Exception):
    """Base class of every error prebake raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, path: object = None):
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class FormatError(PrebakeError):
    """An input file is truncated, corrupt, or not the format it claims to be."""


class UnsupportedError(FormatError):
    """An input is well formed but holds something prebake cannot convert."""


class UnsafePickleError(FormatError):
    """A pickle asks for a callable outside the allow-list; nothing from it was run."""


class OutputError(PrebakeError):
    """The output cannot be written (folder in use, disk full, permissions)."""


class ManifestError(PrebakeError):
    """A bake's manifest is missing, malformed, or of an unknown version."""


class VerifyError(PrebakeError):
    """A baked tensor or file no longer matches its recorded checksum."""
