"""Multi-component bakes (diffusers layout): load one component, or each on first access.

>>> parts = load_components("baked-wan/")          # doctest: +SKIP
>>> vae = parts["vae"]                             # maps vae/ only, on first access
>>> both = parts.load(["text_encoder", "transformer"])  # in parallel threads
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor

import torch
from prebake.cache.load import load_from_manifest
from prebake.formats.errors import NotInBakeError
from prebake.formats.manifest import Manifest, read_manifest


class Components(Mapping[str, dict[str, torch.Tensor]]):
    """A lazy mapping from component name to its tensors; each is loaded once, on first access."""

    def __init__(self, path: str | os.PathLike | Manifest, **load_kwargs):
        self.manifest = path if isinstance(path, Manifest) else read_manifest(path)
        if not self.manifest.components:
            raise NotInBakeError("holds one model, not components", self.manifest.root)
        self.load_kwargs = load_kwargs
        self._loaded: dict[str, dict[str, torch.Tensor]] = {}
        self._locks = {name: threading.Lock() for name in self.manifest.components}

    def __getitem__(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self.manifest.components:
            raise NotInBakeError(f"no component {name!r} (the bake has {sorted(self.manifest.components)})",
                                 self.manifest.root)
        with self._locks[name]:
            if name not in self._loaded:
                self._loaded[name] = load_from_manifest(self.manifest, component=name, **self.load_kwargs)
            return self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.manifest.components)

    def __len__(self) -> int:
        return len(self.manifest.components)

    @property
    def loaded(self) -> list[str]:
        """The components mapped so far."""
        return list(self._loaded)

    def load(self, names: Iterable[str] | None = None, threads: int | None = None) -> dict[str, dict]:
        """Loads several components at once, in parallel threads (all of them by default)."""
        names = list(self if names is None else names)
        with ThreadPoolExecutor(threads or len(names) or 1) as pool:
            return dict(zip(names, pool.map(self.__getitem__, names), strict=True))


def load_components(path: str | os.PathLike, **load_kwargs) -> Components:
    """The components of a bake, each loaded on first access with ``load_from_manifest(**load_kwargs)``."""
    return Components(path, **load_kwargs)
