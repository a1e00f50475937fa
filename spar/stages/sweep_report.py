"""sweep_report: one summary of a sweep, its points grouped over the replication (seed) keys.

A sweep key whose last part is `seed` (`training.seed`, `eval.sampling.seed`, ...) is a
replication key (`spar.spec.is_seed_key`): points that differ only in such keys form one group,
and within a group each point is one seed — the top level of the design (the seeds answer the
same eval questions: crossed seeds × questions, `spar.stats`). The
metrics are those of the per-experiment report (`spar.stages.report`), computed from every
point's `scores.jsonl`; a group of one seed has exactly its experiment's numbers.

Not part of one spec's graph (`nodes` returns nothing): the planner calls `sweep_report_nodes`
with the root spec and its points. Output `summary.json`:
`{seed_keys, group_keys, interval, groups: [{point, label, experiments, seeds, models,
condition_order, conditions: {c: {exhibits_rate, format_adherence, tiers, invalid, errors}},
gaps, invalid, errors}]}`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from spar.spec import is_seed_key, point_label
from spar.stages.base import (
    GraphContext,
    Options,
    Params,
    RunContext,
    StageKind,
    StageNode,
    StageResult,
    key,
)
from spar.stages.report import (
    ReportParams,
    Row,
    adjust,
    condition_summary,
    gaps,
    report_params,
)
from spar.store import read_jsonl

if TYPE_CHECKING:
    from spar.spec import Spec


class SweepGroup(BaseModel):
    """Points that differ only in replication keys, and how their reports are read."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    point: dict[str, Any]  # the non-seed keys' values
    label: str  # `key=value,...` of `point`; "" when every key is a seed key
    members: tuple[int, ...]  # indices into SweepReportParams.points (role `point:<i>`)
    # the members' report settings (equal within a group but for the interval settings, which
    # are the sweep's)
    report: ReportParams


class SweepPoint(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    experiment: str
    label: str
    values: dict[str, Any]


class SweepReportParams(Params):
    points: tuple[SweepPoint, ...] = key("sweep")
    seed_keys: tuple[str, ...] = key("sweep.seed_keys")
    groups: tuple[SweepGroup, ...] = key("sweep.groups")
    generalize: Literal["questions", "samples"] = key("report.generalize")
    confidence: float = key("report.confidence")


def group_points(
    points: list[tuple[dict[str, Any], Spec]], generalize: str, confidence: float
) -> tuple[tuple[str, ...], tuple[SweepGroup, ...]]:
    """(seed keys, groups of points that differ only in seed keys, in first-point order)."""
    keys = list(dict.fromkeys(k for values, _ in points for k in values))
    seed_keys = tuple(k for k in keys if is_seed_key(k))
    members: dict[str, list[int]] = {}
    firsts: dict[str, tuple[dict[str, Any], Spec]] = {}
    for i, (values, spec) in enumerate(points):
        point = {k: v for k, v in values.items() if not is_seed_key(k)}
        label = point_label(point)
        members.setdefault(label, []).append(i)
        firsts.setdefault(label, (point, spec))
    groups = []
    for label, idx in members.items():
        point, spec = firsts[label]
        rp = report_params(spec).model_copy(
            update={"generalize": generalize, "confidence": confidence}
        )
        groups.append(SweepGroup(point=point, label=label, members=tuple(idx), report=rp))
    return seed_keys, tuple(groups)


def sweep_report_nodes(
    root: Spec, points: list[tuple[dict[str, Any], Spec]]
) -> list[StageNode[SweepReportParams, Options]]:
    """The sweep's one report node (none without points): upstream `point:<i>` is the i-th
    point's report (`<root>/<label>/report`)."""
    if not points:
        return []
    r = root.report
    seed_keys, groups = group_points(points, r.generalize, r.confidence)
    params = SweepReportParams(
        points=tuple(
            SweepPoint(experiment=spec.name, label=point_label(values), values=values)
            for values, spec in points
        ),
        seed_keys=seed_keys,
        groups=groups,
        generalize=r.generalize,
        confidence=r.confidence,
    )
    upstream = {f"point:{i}": f"{spec.name}/report" for i, (_, spec) in enumerate(points)}
    return [
        StageNode(
            "sweep_report", SweepReportStage(), root.name, params, Options(), upstream=upstream
        )
    ]


def summarise_group(
    group: SweepGroup,
    points: tuple[SweepPoint, ...],
    seeds: list[list[Row]],
    seed_keys: tuple[str, ...],
) -> dict[str, Any]:
    """One group's summary; `seeds`: the score rows of each member, in member order."""
    p = group.report
    conditions = {c: condition_summary(seeds, c, p, seeded=True) for c in p.conditions}
    out: dict[str, Any] = {
        "point": group.point,
        "label": group.label,
        "experiments": [points[i].experiment for i in group.members],
        "seeds": [
            {k: v for k, v in points[i].values.items() if k in seed_keys} for i in group.members
        ],
        "models": list(p.models),
        "condition_order": list(p.conditions),
        "conditions": conditions,
        "gaps": gaps(seeds, p, seeded=True),
        "invalid": sum(c["invalid"] for c in conditions.values()),
        "errors": sum(c["errors"] for c in conditions.values()),
    }
    return {**out, "multiple_comparisons": adjust(out, p)}


def summarise_sweep(p: SweepReportParams, scores: dict[int, list[Row]]) -> dict[str, Any]:
    """summary.json of a sweep; `scores`: point index -> its report's scores.jsonl rows."""
    group_keys = list(
        dict.fromkeys(k for pt in p.points for k in pt.values if k not in p.seed_keys)
    )
    return {
        "seed_keys": list(p.seed_keys),
        "group_keys": group_keys,
        "interval": {"generalize": p.generalize, "confidence": p.confidence},
        "groups": [
            summarise_group(g, p.points, [scores[i] for i in g.members], p.seed_keys)
            for g in p.groups
        ],
    }


class SweepReportStage(StageKind[SweepReportParams, Options]):
    kind = "sweep_report"
    version = 2  # 2: t intervals, Holm-adjusted p-values
    outputs: ClassVar[tuple[str, ...]] = ("summary.json",)
    params_model = SweepReportParams

    def nodes(self, spec: Spec, g: GraphContext) -> list[StageNode[SweepReportParams, Options]]:
        return []  # not per spec: see sweep_report_nodes

    def run(self, ctx: RunContext[SweepReportParams, Options]) -> StageResult:
        p = ctx.params
        scores = {
            i: read_jsonl(ctx.upstream_file(f"point:{i}", "scores.jsonl"))
            for i in range(len(p.points))
        }
        summary = summarise_sweep(p, scores)
        return StageResult({"summary.json": (json.dumps(summary, indent=2) + "\n").encode()})
