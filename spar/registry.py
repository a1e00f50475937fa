"""A name -> factory registry: built-ins are imported lazily, plugins register at import time."""

from __future__ import annotations

import importlib
from typing import Generic, TypeVar

F = TypeVar("F")


# What a factory that does not declare `device` is taken to compute on: this process's CPU.
LOCAL_DEVICE = "cpu"


class Registry(Generic[F]):
    def __init__(self, builtin: dict[str, str], devices: dict[str, str | None]) -> None:
        self._builtin = builtin  # name -> "module:attr", imported on first use
        # where each built-in computes, known without importing it (None: a remote service)
        self._devices = devices
        self._registered: dict[str, F] = {}

    def device(self, name: str) -> str | None:
        """Where the stages using `name` compute in this process: a device — `apply` runs one
        such stage at a time there — or None, a remote service (many at once). A plugin declares
        it as a `device` attribute of its factory; undeclared, it is taken to compute locally."""
        if name in self._devices:
            return self._devices[name]
        return getattr(self.factory(name), "device", LOCAL_DEVICE)

    def register(self, name: str, factory: F) -> None:
        self._registered[name] = factory

    def names(self) -> list[str]:
        return sorted(self._builtin.keys() | self._registered.keys())

    def factory(self, name: str) -> F:
        if name not in self._registered:
            module, attr = self._builtin[name].split(":")
            self._registered[name] = getattr(importlib.import_module(module), attr)
        return self._registered[name]
