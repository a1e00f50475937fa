"""Engine registry: name -> factory. Built-ins load lazily; plugins call `register_engine`."""

from __future__ import annotations

from pathlib import Path

from spar.engines.base import Engine, EngineFactory
from spar.registry import Registry

_ENGINES: Registry[EngineFactory] = Registry(
    {
        "local": "spar.engines.local:LocalEngine",
        "tinker": "spar.engines.tinker:TinkerEngine",
    },
    devices={"local": "cpu", "tinker": None},
)
register_engine = _ENGINES.register
engine_names = _ENGINES.names
engine_device = _ENGINES.device  # see Registry.device


def get_engine(name: str, workdir: Path) -> Engine:
    return _ENGINES.factory(name)(workdir)
