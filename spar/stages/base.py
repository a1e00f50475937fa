"""What a stage kind is, and what a stage gets when it runs."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from spar.spec import Spec
from spar.store import ItemMemo, LineCheck, RunStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageNode:
    """One stage of one experiment, resolved from a spec: everything its fingerprint needs."""

    name: str
    kind: StageKind
    experiment: str
    params: dict[str, Any]
    inputs: dict[str, Path] = field(default_factory=dict)
    upstream: tuple[str, ...] = ()
    spec: Spec | None = None

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.kind.outputs


@dataclass
class RunContext:
    """Handed to `StageKind.run`: the node, the store, and where upstream outputs live."""

    node: StageNode
    store: RunStore
    fingerprint: str
    upstream_dirs: dict[str, Path]
    progress: Callable[[str], None] = field(default=lambda msg: log.info(msg))

    @property
    def spec(self) -> Spec:
        assert self.node.spec is not None
        return self.node.spec

    def upstream_file(self, stage: str, name: str) -> Path:
        return self.upstream_dirs[stage] / name

    def memo(self, name: str) -> ItemMemo:
        return self.store.memo(name)


class StageKind:
    """A kind of stage. Subclasses set `kind`, `version`, `outputs` and implement `run`.

    `version` is part of every fingerprint: bump it when a change to `run` changes results.
    """

    kind: ClassVar[str]
    version: ClassVar[int] = 1
    outputs: ClassVar[tuple[str, ...]]

    def line_check(self, node: StageNode, input_key: str) -> tuple[str, LineCheck] | None:
        """Validator for an input file, run line by line while it is hashed (id, check)."""
        return None

    def estimate(self, node: StageNode, store: RunStore, upstream_fresh: bool) -> dict[str, int]:
        """What running this stage would cost (calls, tokens); {} when nothing is billed."""
        return {}

    def run(self, ctx: RunContext) -> dict[str, bytes]:
        """Do the work; return the bytes of every output (the store writes them)."""
        raise NotImplementedError


def pick(spec: Spec, *keys: str) -> dict[str, Any]:
    """Dotted spec keys -> their JSON values: a stage's result-changing parameters."""
    data = spec.model_dump(mode="json")
    out: dict[str, Any] = {}
    for key in keys:
        node: Any = data
        for part in key.split("."):
            node = node[part]
        out[key] = node
    return out
