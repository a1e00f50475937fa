"""report: per-tier statistics of the judged scores -> summary.json.

Per model (baseline, fine-tuned) and tier: the mean with a hierarchical-bootstrap CI (questions,
then samples within each question), the exhibits rate (share of scores >= the spec's threshold)
and the count of invalid verdicts, which never enter a mean. In absolute mode also the paired
fine-tuned − baseline delta (paired by question and sample index) with its CI.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from spar.spec import BootstrapSpec
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
from spar.stats import estimate, rate
from spar.store import read_jsonl

if TYPE_CHECKING:
    from spar.spec import Spec

MODELS = ("baseline", "finetuned")


class ReportParams(Params):
    mode: Literal["pairwise", "absolute"] = key("judge.mode")
    scale_min: int = key("judge.scale.min")
    scale_max: int = key("judge.scale.max")
    tiers: tuple[str, ...] = key("eval.tiers")  # in the order given
    exhibits_threshold: int = key("report.exhibits_threshold")
    bootstrap: BootstrapSpec = key("report.bootstrap")


def _groups(rows: list[dict[str, Any]]) -> list[list[list[float]]]:
    """One seed level (sweeps add more), then question -> ok scores in sample order."""
    by_q: dict[str, list[float]] = defaultdict(list)
    for r in sorted(rows, key=lambda r: r["sample_index"]):
        if r["status"] == "ok":
            by_q[r["question_id"]].append(float(r["score"]))
    return [list(by_q.values())]


def summarise(p: ReportParams, rows: list[dict[str, Any]]) -> dict[str, Any]:
    boot = p.bootstrap
    kw: dict[str, Any] = boot.model_dump()
    models = [m for m in MODELS if any(r["model"] == m for r in rows)]
    tiers: dict[str, Any] = {}
    for tier in p.tiers:
        in_tier = [r for r in rows if r["tier"] == tier]
        per: dict[str, Any] = {}
        for model in models:
            sel = [r for r in in_tier if r["model"] == model]
            groups = _groups(sel)
            per[model] = {
                **estimate(groups, **kw).as_json(),
                "invalid": sum(r["status"] == "invalid" for r in sel),
                "errors": sum(r["status"] == "error" for r in sel),
                "exhibits_rate": rate(groups, p.exhibits_threshold, **kw).as_json(),
            }
        if models == list(MODELS):
            per["delta"] = paired_delta(in_tier, kw)
        tiers[tier] = per
    return {
        "judge_mode": p.mode,
        "scale": {"min": p.scale_min, "max": p.scale_max},
        "exhibits_threshold": p.exhibits_threshold,
        "bootstrap": boot.model_dump(),
        "models": models,
        "tiers": tiers,
        "invalid": sum(r["status"] == "invalid" for r in rows),
        "errors": sum(r["status"] == "error" for r in rows),
    }


def paired_delta(rows: list[dict[str, Any]], kw: dict[str, Any]) -> dict[str, Any]:
    """fine-tuned − baseline per item (question, sample index); a pair with an invalid or
    errored side is dropped and counted."""
    base = {r["item_id"]: r for r in rows if r["model"] == "baseline"}
    by_q: dict[str, list[float]] = defaultdict(list)
    dropped = 0
    tuned_rows = [r for r in rows if r["model"] == "finetuned"]
    for tuned in sorted(tuned_rows, key=lambda r: r["sample_index"]):
        b = base.get(tuned["item_id"])
        if b is None or tuned["status"] != "ok" or b["status"] != "ok":
            dropped += 1
            continue
        by_q[tuned["question_id"]].append(float(tuned["score"]) - float(b["score"]))
    return {**estimate([list(by_q.values())], **kw).as_json(), "pairs_dropped": dropped}


class ReportStage(StageKind[ReportParams, Options]):
    kind = "report"
    version = 3
    outputs: ClassVar[tuple[str, ...]] = ("summary.json",)
    params_model = ReportParams

    def nodes(self, spec: Spec, g: GraphContext) -> list[StageNode[ReportParams, Options]]:
        r = spec.report
        params = ReportParams(
            mode=spec.judge.mode,
            scale_min=spec.judge.scale.min,
            scale_max=spec.judge.scale.max,
            tiers=tuple(dict.fromkeys(q.tier for q in spec.questions())),
            exhibits_threshold=r.exhibits_threshold,
            bootstrap=r.bootstrap,
        )
        return [
            StageNode("report", self, spec.name, params, Options(), upstream={"judge": "judge"})
        ]

    def run(self, ctx: RunContext[ReportParams, Options]) -> StageResult:
        rows = read_jsonl(ctx.upstream_file("judge", "judged.jsonl"))
        summary = summarise(ctx.params, rows)
        return StageResult({"summary.json": (json.dumps(summary, indent=2) + "\n").encode()})
