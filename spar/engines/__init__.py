"""Engine registry: name -> factory. Built-ins load lazily; plugins call `register_engine`."""

from __future__ import annotations

import importlib
from pathlib import Path

from spar.engines.base import Engine, EngineFactory

_BUILTIN: dict[str, str] = {  # name -> "module:attr"
    "local": "spar.engines.local:LocalEngine",
    "tinker": "spar.engines.tinker:TinkerEngine",
}
_REGISTERED: dict[str, EngineFactory] = {}


def register_engine(name: str, factory: EngineFactory) -> None:
    _REGISTERED[name] = factory


def engine_names() -> list[str]:
    return sorted(_BUILTIN.keys() | _REGISTERED.keys())


def get_engine(name: str, workdir: Path) -> Engine:
    if name not in _REGISTERED:
        module, attr = _BUILTIN[name].split(":")
        _REGISTERED[name] = getattr(importlib.import_module(module), attr)
    return _REGISTERED[name](workdir)
