"""What a stage kind is, and what a stage gets when it runs.

A stage kind declares a pydantic `Params` model — exactly what changes its result — and an
`Options` model for what does not (concurrency, resume intervals, where a local model lives).
`nodes()` is the only code of a stage kind that reads the spec: it builds the params, options,
input files and upstream references of the nodes it contributes to a spec's graph. `run()` then
gets its params, options, input files and upstream output directories, never the spec.

fingerprint = hash(kind, version, params, content hashes of inputs, upstream fingerprints), and
item memo keys = hash(kind, item_version, params less `collection`/`validity` fields, item).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from spar.errors import Stopped
from spar.store import ItemMemo, LineCheck, RunStore

if TYPE_CHECKING:
    from spar.spec import Spec

log = logging.getLogger(__name__)


def key(spec_key: str) -> Any:
    """A parameter field named, in params files and `spar plan` reasons, by its spec key."""
    return Field(alias=spec_key)


class AddedFields(BaseModel):
    """A model whose later fields must not disturb what was made before they existed: each field
    in `added` is left out of every dump — fingerprints, item keys, params files, and wherever
    the model is nested in another's params — while it holds the value (given there) that means
    "as before", so results made then keep their fingerprints and nothing re-runs."""

    added: ClassVar[dict[str, Any]] = {}

    @model_serializer(mode="wrap")
    def _without_unchanged_additions(self, handler: SerializerFunctionWrapHandler) -> Any:
        out = handler(self)
        for name, before in self.added.items():
            if getattr(self, name) == before and isinstance(out, dict):
                out.pop(type(self).model_fields[name].alias or name, None)
                out.pop(name, None)
        return out


class Params(AddedFields):
    """A stage's result-changing parameters: its fingerprint and its item keys come from these.

    Fields carry their spec key as alias (`training.learning_rate`), so params files and plan
    reasons speak the spec's language; derived fields use a descriptive dotted name."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    # fields that only enumerate the items (a question list, a sample count): in the fingerprint,
    # not in any item key, so adding a question or a sample computes only the new items
    collection: ClassVar[frozenset[str]] = frozenset()
    # fields that decide whether a memoised item may be reused rather than what it is (e.g. a
    # re-ask budget): in the fingerprint; the stage checks them against each memoised item
    validity: ClassVar[frozenset[str]] = frozenset()

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def item_basis(self) -> dict[str, Any]:
        return self.model_dump(
            mode="json", by_alias=True, exclude=set(self.collection | self.validity)
        )


class Options(BaseModel):
    """What a stage needs at run time that does not change its result (never hashed)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


P = TypeVar("P", bound=Params)
O = TypeVar("O", bound=Options)  # noqa: E741


@dataclass(frozen=True)
class InputFile:
    """A file (or directory) whose content enters the fingerprint."""

    path: Path
    check: tuple[str, LineCheck] | None = None  # (check id, line validator) run while hashing
    files: tuple[Path, ...] | None = None  # a directory: the files that make up its content


@dataclass(frozen=True)
class StageNode(Generic[P, O]):
    """One stage of one experiment, resolved from a spec: everything its fingerprint needs."""

    name: str
    kind: StageKind[P, O]
    experiment: str
    params: P
    options: O
    inputs: dict[str, InputFile] = field(default_factory=dict)
    # role -> "stage" of the same experiment or "experiment/stage" of another
    upstream: dict[str, str] = field(default_factory=dict)

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.kind.outputs

    def upstream_at(self, role: str) -> tuple[str, str]:
        """(experiment, stage) of an upstream role: `stage` is a stage of this experiment,
        `other/stage` one of another (experiment names may contain `/`: sweep points)."""
        return upstream_key(self.experiment, self.upstream[role])


def upstream_key(experiment: str, ref: str) -> tuple[str, str]:
    exp, _, stage = ref.rpartition("/")
    return (exp or experiment, stage)


@dataclass
class Flags:
    """Per-apply switches from the command line."""

    retry_invalid: bool = False


@dataclass
class RunContext(Generic[P, O]):
    """Handed to `StageKind.run`: the params, options, inputs and upstream outputs — no spec."""

    params: P
    options: O
    inputs: dict[str, Path]
    upstream: dict[str, Path]  # role -> output directory of the upstream stage
    upstream_fps: dict[str, str]  # role -> fingerprint of the upstream stage
    fingerprint: str
    store: RunStore
    kind: StageKind[P, O]
    name: str = ""
    flags: Flags = field(default_factory=Flags)
    # set when another stage of this apply failed: a long loop stops sending new work, lets what is
    # in flight be journaled, and raises `Stopped`
    stop: threading.Event = field(default_factory=threading.Event)

    def stopping(self) -> None:
        """Raise `Stopped` if this apply is stopping (call between items or steps)."""
        if self.stop.is_set():
            raise Stopped(f"stage {self.name}: stopped (another stage failed)")

    def upstream_file(self, role: str, name: str) -> Path:
        return self.upstream[role] / name

    def memo(self) -> ItemMemo:
        return self.store.memo(self.kind.kind, self.kind.item_version, self.params.item_basis())

    def scratch(self, *parts: str) -> Path:
        return self.store.scratch(*parts)


@dataclass
class StageResult:
    outputs: dict[str, bytes]
    errors: int = 0  # items that failed (not journaled): the stage is incomplete, re-run next time
    details: dict[str, Any] = field(default_factory=dict)  # counts for the params file


@dataclass(frozen=True)
class GraphContext:
    """What `nodes()` may know besides the spec: the experiments this one compares itself with,
    and the store (to content-hash a local model directory)."""

    store: RunStore
    compared: tuple[tuple[str, str], ...] = ()  # (experiment name, label)


def on_device(device: str | None) -> frozenset[str]:
    """A stage's `devices` when it computes on `device` (None: a remote service, no device)."""
    return frozenset() if device is None else frozenset({device})


class StageKind(Generic[P, O]):
    """A kind of stage. Subclasses set `kind`, `version`, `outputs`, `params_model` and implement
    `nodes` and `run`.

    `version` is part of every fingerprint: bump it when a change to `run` changes results.
    `item_version` is part of every item key: bump it when a change changes per-item results.
    """

    kind: ClassVar[str]
    version: ClassVar[int] = 1
    item_version: ClassVar[int] = 1
    outputs: ClassVar[tuple[str, ...]]
    params_model: ClassVar[type[Params]]

    def nodes(self, spec: Spec, g: GraphContext) -> list[StageNode[P, O]]:
        """The nodes this kind adds to the graph of `spec` (upstream nodes come earlier)."""
        raise NotImplementedError

    def check(self, node: StageNode[P, O], records: dict[str, int]) -> None:
        """Validate, before any work, what needs the inputs' content (`records`: non-blank line
        count of each checked input). Raise InputError."""

    def estimate(
        self,
        node: StageNode[P, O],
        store: RunStore,
        upstream_fresh: bool,
        flags: Flags | None = None,
    ) -> dict[str, int]:
        """What running this stage would cost (calls, tokens); {} when nothing is billed."""
        return {}

    def devices(self, node: StageNode[P, O]) -> frozenset[str]:
        """The local devices this stage computes on: `apply` runs one such stage at a time per
        device, while stages of remote services (Tinker, Claude) and light stages run at once.
        By default, the device of the engine its params name (none: no engine)."""
        from spar.engines import engine_device

        engine = getattr(node.params, "engine", None)
        return on_device(engine_device(engine) if isinstance(engine, str) else None)

    def run(self, ctx: RunContext[P, O]) -> StageResult:
        """Do the work; return the bytes of every output (the store writes them)."""
        raise NotImplementedError
