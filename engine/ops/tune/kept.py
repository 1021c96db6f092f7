"""Triton's own autotuned choices, kept: the kernels' configuration store (``kernels.set_config_store``)
backed by the tuning cache.

With ``kernels.deterministic = false`` the attention kernels autotune their tiles (timing each listed
configuration on the first launch of each shape bucket). :class:`KeptConfigs` keeps each choice under the
same environment key as the ops' decisions (card, driver, torch, triton, kernel sources), so a later run on
the same card and versions launches the same tiles without timing them again; under torchrun rank 0's
choices, made while it measures, go to every rank with the decisions (:func:`engine.ops.tune.run.agree`).
``deterministic = true`` runs never autotune: their tiles are the kernels' rule, the same everywhere.
"""
from __future__ import annotations

import torch

from ..table import kernels_module
from .cache import TuneCache, environment_key


class KeptConfigs:
    """A configuration store over a :class:`TuneCache`: entries read from the cache or put by this process
    are held in memory too; ``retune`` ignores what the cache holds (and overwrites it)."""

    def __init__(self, cache: TuneCache | None, device: torch.device, retune: bool = False, env: dict | None = None):
        self.cache, self.retune = cache, retune
        self.env = env if env is not None else environment_key(device)
        self.held: dict[tuple, dict] = {}

    @staticmethod
    def _ident(kernel: str, key: dict) -> tuple:
        """The memory's key: asked on every launch that autotunes, so a tuple of the (scalar) items, not JSON."""
        return kernel, tuple(sorted(key.items()))

    def _cache_key(self, kernel: str, key: dict) -> dict:
        return {"kind": "kernel-config", "kernel": kernel, "env": self.env, "key": key}

    def get(self, kernel: str, key: dict) -> dict | None:
        ident = self._ident(kernel, key)
        if ident not in self.held and not self.retune and self.cache is not None:
            found = self.cache.get(self._cache_key(kernel, key))
            if isinstance(found, dict):
                self.held[ident] = found
        return self.held.get(ident)

    def put(self, kernel: str, key: dict, config: dict) -> None:
        self.held[self._ident(kernel, key)] = dict(config)
        if self.cache is not None:
            self.cache.put(self._cache_key(kernel, key), dict(config))

    def entries(self) -> list[tuple[str, dict, dict]]:
        """(kernel, key, config) of every choice held, to send to the other ranks."""
        return [(kernel, dict(items), config) for (kernel, items), config in self.held.items()]

    def adopt(self, entries: list[tuple[str, dict, dict]]) -> None:
        """Take another rank's choices as this process's own (and keep them in this machine's cache)."""
        for kernel, key, config in entries:
            self.put(kernel, key, config)


def install(cache: TuneCache | None, device: torch.device, retune: bool = False) -> KeptConfigs | None:
    """Keep the kernels' autotuned choices in ``cache`` from now on, on a CUDA device whose kernels package
    imports; returns the store (None where nothing was installed)."""
    kernels = kernels_module()
    if device.type != "cuda" or kernels is None or not hasattr(kernels, "set_config_store"):
        return None
    store = KeptConfigs(cache, device, retune)
    kernels.set_config_store(store)
    return store
