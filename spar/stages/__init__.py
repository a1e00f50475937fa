"""Stage kinds, in pipeline order. Plugins add theirs with `register_stage` (after the built-ins,
so their nodes may depend on any built-in node)."""

from __future__ import annotations

import importlib
from typing import Any

from spar.stages.base import StageKind

_BUILTIN = (
    "spar.stages.generate:GenerateStage",
    "spar.stages.generate_output:GenerateOutputStage",
    "spar.stages.distill:DistillStage",
    "spar.stages.dataset:DatasetStage",
    "spar.stages.train:TrainStage",
    "spar.stages.sample:SampleStage",
    "spar.stages.logprob:LogprobStage",
    "spar.stages.judge:JudgeStage",
    "spar.stages.judge_also:JudgeAlsoStage",
    "spar.stages.report:ReportStage",
    "spar.stages.sweep_report:SweepReportStage",
    "spar.stages.plot:PlotStage",
    "spar.stages.track:TrackStage",
)
_kinds: list[StageKind[Any, Any]] = []
_plugins: list[StageKind[Any, Any]] = []


def register_stage(kind: StageKind[Any, Any]) -> None:
    """Add a stage kind; its `nodes()` is asked for every spec after the built-in kinds'."""
    if any(k.kind == kind.kind for k in (*stage_kinds(), *_plugins)):
        raise ValueError(f"stage kind {kind.kind!r} is already registered")
    _plugins.append(kind)


def stage_kinds() -> list[StageKind[Any, Any]]:
    if not _kinds:
        for ref in _BUILTIN:
            module, attr = ref.split(":")
            _kinds.append(getattr(importlib.import_module(module), attr)())
    return [*_kinds, *_plugins]
