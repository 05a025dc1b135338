"""numba's on-disk kernel cache, dropped when anything the kernels were compiled from changes.

numba (``cache=True``) keys a cached kernel on its own source file's stamp and its bytecode. It
does not see what the kernel took from other modules at compile time: the intrinsics and the
``JIT`` flags of :mod:`~prebake.formats.jit_bits`, constants of :mod:`~prebake.formats.ggml_codec`
and :mod:`~prebake.formats.quants_k`. A tree where only those changed keeps loading the old
machine code. That was seen here: kernels compiled before ``nogil`` held the GIL, and two
workers ran at 0.84x one. A changed rounding intrinsic would bake wrong blocks.

So the kernel modules' cache files carry a fingerprint of every such source, the flags and the
numba version, in a stamp file beside them; on a mismatch they are deleted before numba looks
for them, and compile once again. This covers numba's two cache places that follow the source
tree (``__pycache__`` beside it, or under ``NUMBA_CACHE_DIR``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
KERNEL_MODULES = ("quants_jit", "quants_k_jit")  # the modules whose kernels numba caches
# what the kernels' machine code depends on: their modules and everything they take values from
SOURCES = (*KERNEL_MODULES, "jit_bits", "jit_cache", "ggml_codec", "ggml_types", "quants_k")
STAMP = "prebake-kernels.stamp"


def fingerprint(flags: dict) -> str:
    """A digest of the kernels' sources, the numba flags and numba's version."""
    import numba

    h = hashlib.sha256(f"{numba.__version__} {sorted(flags.items())!r}".encode())
    for name in SOURCES:
        h.update((HERE / f"{name}.py").read_bytes())
    return h.hexdigest()


def cache_dirs() -> list[Path]:
    """Where numba caches kernels of this folder's modules: ``__pycache__`` beside them, and the
    matching folder under ``NUMBA_CACHE_DIR`` when that is set."""
    dirs = [HERE / "__pycache__"]
    if os.environ.get("NUMBA_CACHE_DIR"):
        try:
            from numba.core.caching import _CacheLocator  # numba's own naming of the sub-folder

            dirs.append(Path(os.environ["NUMBA_CACHE_DIR"]) / _CacheLocator.get_suitable_cache_subpath(
                str(HERE / "quants_jit.py")))
        except (ImportError, AttributeError):
            pass
    return dirs


def drop_stale(folder: Path, digest: str) -> bool:
    """Deletes the kernel modules' cache files in ``folder`` unless its stamp is ``digest``; then
    stamps it. Returns whether files were deleted. A folder that cannot be written is left alone
    (numba then caches elsewhere, or not at all)."""
    stamp = folder / STAMP
    try:
        if stamp.read_text() == digest:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    dropped = False
    try:
        for module in KERNEL_MODULES:
            for path in (*folder.glob(f"{module}.*.nbi"), *folder.glob(f"{module}.*.nbc")):
                path.unlink(missing_ok=True)
                dropped = True
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"{STAMP}.{os.getpid()}"
        tmp.write_text(digest)
        tmp.replace(stamp)  # atomic: a process importing at the same time reads one stamp or the other
    except OSError:
        pass
    return dropped


def check(flags: dict) -> None:
    """Drops stale cached kernels everywhere numba may load them from; called before any kernel is compiled."""
    digest = fingerprint(flags)
    for folder in cache_dirs():
        drop_stale(folder, digest)
