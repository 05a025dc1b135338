"""The run-time side: the manifest schema, ``load_from_manifest``, ``verify``, module building.

Exports are resolved lazily so that the converter, which needs only the manifest schema, never
imports torch.
"""

from importlib import import_module

_EXPORTS = {
    "load_from_manifest": "prebake.cache.load",
    "load_components": "prebake.cache.components",
    "ensure": "prebake.cache.store",
    "load_module": "prebake.cache.module",
    "Manifest": "prebake.cache.manifest",
    "read_manifest": "prebake.cache.manifest",
    "verify": "prebake.cache.integrity",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'prebake.cache' has no attribute {name!r}")
