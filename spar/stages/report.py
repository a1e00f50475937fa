"""report: per-tier statistics of the judged scores -> summary.json.

Per model (baseline, fine-tuned) and tier: the mean with a hierarchical-bootstrap CI (questions,
then samples within each question), the exhibits rate (share of scores >= the spec's threshold)
and the count of invalid verdicts, which never enter a mean. In absolute mode also the paired
fine-tuned − baseline delta (paired by question and sample index) with its CI.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any, ClassVar

from spar.spec import Spec
from spar.stages.base import RunContext, StageKind
from spar.stats import estimate, rate
from spar.store import read_jsonl

MODELS = ("baseline", "finetuned")


def _groups(rows: list[dict[str, Any]]) -> list[list[list[float]]]:
    """One seed level (sweeps add more), then question -> ok scores in sample order."""
    by_q: dict[str, list[float]] = defaultdict(list)
    for r in sorted(rows, key=lambda r: r["sample_index"]):
        if r["status"] == "ok":
            by_q[r["question"]].append(float(r["score"]))
    return [list(by_q.values())]


def summarise(spec: Spec, rows: list[dict[str, Any]]) -> dict[str, Any]:
    assert spec.eval.tiers is not None
    boot = spec.report.bootstrap
    kw: dict[str, Any] = {
        "resamples": boot.resamples,
        "seed": boot.seed,
        "confidence": boot.confidence,
    }
    models = [m for m in MODELS if any(r["model"] == m for r in rows)]
    tiers: dict[str, Any] = {}
    for tier in spec.eval.tiers:
        in_tier = [r for r in rows if r["tier"] == tier]
        per: dict[str, Any] = {}
        for model in models:
            sel = [r for r in in_tier if r["model"] == model]
            groups = _groups(sel)
            per[model] = {
                **estimate(groups, **kw).as_json(),
                "invalid": sum(r["status"] != "ok" for r in sel),
                "exhibits_rate": rate(groups, spec.report.exhibits_threshold, **kw).as_json(),
            }
        if models == list(MODELS):
            per["delta"] = paired_delta(in_tier, kw)
        tiers[tier] = per
    return {
        "experiment": spec.name,
        "framing": spec.framing,
        "judge_mode": spec.judge.mode,
        "scale": {"min": spec.judge.scale.min, "max": spec.judge.scale.max},
        "exhibits_threshold": spec.report.exhibits_threshold,
        "bootstrap": boot.model_dump(),
        "models": models,
        "tiers": tiers,
        "invalid": sum(r["status"] != "ok" for r in rows),
    }


def paired_delta(rows: list[dict[str, Any]], kw: dict[str, Any]) -> dict[str, Any]:
    """fine-tuned − baseline per (question, sample index); a pair with an invalid side drops."""
    scores = {(r["model"], r["question"], r["sample_index"]): r for r in rows}
    by_q: dict[str, list[float]] = defaultdict(list)
    dropped = 0
    for (model, question, index), tuned in sorted(scores.items(), key=lambda kv: kv[0][2]):
        if model != "finetuned":
            continue
        base = scores.get(("baseline", question, index))
        if base is None or tuned["status"] != "ok" or base["status"] != "ok":
            dropped += 1
            continue
        by_q[question].append(float(tuned["score"]) - float(base["score"]))
    return {**estimate([list(by_q.values())], **kw).as_json(), "pairs_dropped": dropped}


class ReportStage(StageKind):
    kind = "report"
    version = 2
    outputs: ClassVar[tuple[str, ...]] = ("summary.json",)
    param_keys: ClassVar[tuple[str, ...]] = ("report.exhibits_threshold", "report.bootstrap")

    def run(self, ctx: RunContext) -> dict[str, bytes]:
        rows = read_jsonl(ctx.upstream_file("judge", "judged.jsonl"))
        summary = summarise(ctx.spec, rows)
        return {"summary.json": (json.dumps(summary, indent=2) + "\n").encode()}
