"""The run-time side: ``load_from_manifest``, ``verify``, module building, the local cache.

Exports are resolved lazily, so ``import prebake.cache`` costs nothing until a name is used.
"""

from importlib import import_module

_EXPORTS = {
    "load_from_manifest": "prebake.cache.load",
    "load_components": "prebake.cache.components",
    "ensure": "prebake.cache.store",
    "load_module": "prebake.cache.module",
    "Manifest": "prebake.formats.manifest",
    "read_manifest": "prebake.formats.manifest",
    "verify": "prebake.formats.integrity",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'prebake.cache' has no attribute {name!r}")
