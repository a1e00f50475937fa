"""A name -> factory registry: built-ins are imported lazily, plugins register at import time."""

from __future__ import annotations

import importlib
from typing import Generic, TypeVar

F = TypeVar("F")


class Registry(Generic[F]):
    def __init__(self, builtin: dict[str, str]) -> None:
        self._builtin = builtin  # name -> "module:attr", imported on first use
        self._registered: dict[str, F] = {}

    def register(self, name: str, factory: F) -> None:
        self._registered[name] = factory

    def names(self) -> list[str]:
        return sorted(self._builtin.keys() | self._registered.keys())

    def factory(self, name: str) -> F:
        if name not in self._registered:
            module, attr = self._builtin[name].split(":")
            self._registered[name] = getattr(importlib.import_module(module), attr)
        return self._registered[name]
