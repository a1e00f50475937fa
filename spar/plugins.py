"""Plugins from installed distributions: Python entry points in three groups.

    [project.entry-points."spar.engines"]   name = engine name   value = "module:factory"
    [project.entry-points."spar.judges"]    name = judge kind    value = "module:factory"
    [project.entry-points."spar.stages"]    name = stage kind    value = "module:StageClass"

An engine factory is called with the engine's work directory (`spar.engines.get_engine`); a judge
factory with `(config, *, batch, journal)` (`spar.judges.get_judge`); a stage class is
instantiated with no arguments and must be a `StageKind` whose `kind` is the entry point's name.

Every entry point of the three groups is loaded when the CLI starts (beside `SPAR_PLUGINS`):
stage kinds must all be known before any spec is planned, and a plugin that cannot load is
reported at once, in one line naming its distribution and entry point, rather than as an
"unknown engine" later. Loading is idempotent within a process.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from spar.errors import InputError

GROUPS = ("spar.engines", "spar.judges", "spar.stages")
_loaded: set[tuple[str, str, str]] = set()  # (group, name, value) already registered


def describe(ep: EntryPoint) -> str:
    """`plugin <distribution> entry point <group>:<name> = <value>` (for error messages)."""
    dist = ep.dist.name if ep.dist is not None else "(unknown distribution)"
    return f"plugin {dist} entry point {ep.group}:{ep.name} = {ep.value!r}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _stage(ep: EntryPoint, obj: Any) -> Any:
    from spar.stages.base import StageKind

    if not (isinstance(obj, type) and issubclass(obj, StageKind)):
        raise InputError(f"{describe(ep)}: not a StageKind subclass")
    try:
        kind = obj()
    except Exception as e:
        raise InputError(f"{describe(ep)}: cannot instantiate: {_first_line(e)}") from None
    if getattr(kind, "kind", None) != ep.name:
        raise InputError(
            f"{describe(ep)}: the class's kind is {getattr(kind, 'kind', None)!r}, "
            f"not the entry point's name {ep.name!r}"
        )
    return kind


def _registrar(group: str) -> Callable[[str, Any], None]:
    if group == "spar.engines":
        from spar.engines import register_engine

        return register_engine
    if group == "spar.judges":
        from spar.judges import register_judge

        return register_judge
    from spar.stages import register_stage

    return lambda _name, kind: register_stage(kind)


def _distinct(group: str) -> list[EntryPoint]:
    """The group's entry points; the same name from two distributions is an error."""
    eps = sorted(entry_points(group=group), key=lambda ep: ep.name)
    by_name: dict[str, EntryPoint] = {}
    out: list[EntryPoint] = []
    for ep in eps:
        other = by_name.get(ep.name)
        if other is not None:
            if other.value == ep.value and _dist(other) == _dist(ep):
                continue  # the same distribution seen twice on sys.path
            raise InputError(
                f"{describe(ep)}: {group} {ep.name!r} is also provided by {describe(other)}"
            )
        by_name[ep.name] = ep
        out.append(ep)
    return out


def _dist(ep: EntryPoint) -> str | None:
    return ep.dist.name if ep.dist is not None else None


def load_entry_points() -> list[str]:
    """Load and register every spar plugin entry point not loaded yet; returns what was loaded
    (`group:name`). A plugin that cannot be imported, or whose object is of the wrong kind, is
    an InputError naming its distribution and entry point."""
    loaded: list[str] = []
    for group in GROUPS:
        for ep in _distinct(group):
            ident = (group, ep.name, ep.value)
            if ident in _loaded:
                continue
            try:
                obj = ep.load()
            except Exception as e:  # any import-time failure of third-party code
                raise InputError(f"{describe(ep)}: cannot load: {_first_line(e)}") from None
            if group == "spar.stages":
                obj = _stage(ep, obj)
            elif not callable(obj):
                raise InputError(f"{describe(ep)}: {ep.value} is not callable (a factory)")
            try:
                _registrar(group)(ep.name, obj)
            except ValueError as e:  # e.g. a stage kind registered twice
                raise InputError(f"{describe(ep)}: {_first_line(e)}") from None
            _loaded.add(ident)
            loaded.append(f"{group}:{ep.name}")
    return loaded
