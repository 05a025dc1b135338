"""On-disk formats and codecs: bytes in, array views out, no policy.

Every reader yields :class:`prebake.formats.tensor.TensorInfo` descriptions the same way,
whatever the file type, so the conversion pipeline never asks where a tensor came from.
"""

__version__ = "0.2.0"  # the one place the version is written (pyproject reads it from here)
