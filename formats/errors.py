"""The one error family of prebake.

Every error a user can cause, from the command line or the Python API, is a
:class:`PrebakeError`. The CLI turns exactly these into one line naming the file and the problem
and an exit code (1 for bad input or output, 2 for a bad argument); anything else is a bug and
keeps its traceback. Some subclasses also derive from ``ValueError`` or ``KeyError`` where
callers of the Python API expect those.
"""

from __future__ import annotations


class PrebakeError(Exception):
    """Base class of every error prebake raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, path: object = None):
        self.path = None if path is None else str(path)
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path else message)

    def __str__(self) -> str:  # KeyError would print its argument's repr, quotes and all
        return f"{self.path}: {self.message}" if self.path else self.message


class FormatError(PrebakeError):
    """An input file is truncated, corrupt, or not the format it claims to be."""


class UnsupportedError(FormatError):
    """An input is well formed but holds something prebake cannot convert."""


class UnsafePickleError(FormatError):
    """A pickle asks for a callable outside the allow-list; nothing from it was run."""


class OutputError(PrebakeError):
    """The output cannot be written (folder in use, disk full, permissions)."""


class ManifestError(PrebakeError):
    """A bake's manifest is missing, malformed, of an unknown version, or points outside the bake."""


class VerifyError(PrebakeError):
    """A baked tensor or file no longer matches its recorded checksum."""


class CheckError(PrebakeError):
    """A bake does not compute what its source computes (``prebake check``), or cannot be compared."""


class UsageError(PrebakeError, ValueError):
    """An argument or option that cannot work (exit code 2, like argparse's own errors)."""

    exit_code = 2


class QuantError(UsageError):
    """A quantization recipe or option that does not exist or does not combine."""


class SpecError(UsageError):
    """A variant SPEC that does not parse or selects nothing."""


class NotInBakeError(PrebakeError, KeyError):
    """A tensor, variant or component asked for by name is not in the bake."""


class FitError(UsageError):
    """A bake's tensors and a module's parameters do not match (``load_module``)."""


class PrebakeWarning(UserWarning):
    """Something a conversion did that the user may not expect (the CLI prints one line for each)."""
