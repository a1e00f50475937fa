"""Engine registry: name -> factory. Built-ins load lazily; plugins call `register_engine`."""

from __future__ import annotations

from pathlib import Path

from spar.engines.base import Engine, EngineFactory
from spar.registry import Registry

_ENGINES: Registry[EngineFactory] = Registry(
    {
        "local": "spar.engines.local:LocalEngine",
        "tinker": "spar.engines.tinker:TinkerEngine",
    }
)
register_engine = _ENGINES.register
engine_names = _ENGINES.names


# Where a built-in engine's stages compute in this process (known without importing it): a device
# name — its stages run one at a time there — or None, a remote service (many stages at once). A
# plugin declares it as a `device` attribute of its factory; one that does not is taken to compute
# locally.
_DEVICES: dict[str, str | None] = {"local": "cpu", "tinker": None}
LOCAL_DEVICE = "cpu"


def engine_device(name: str) -> str | None:
    if name in _DEVICES:
        return _DEVICES[name]
    return getattr(_ENGINES.factory(name), "device", LOCAL_DEVICE)


def get_engine(name: str, workdir: Path) -> Engine:
    return _ENGINES.factory(name)(workdir)
