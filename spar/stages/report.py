"""report: statistics of the judged answers, per condition -> summary.json and scores.jsonl.

`scores.jsonl` is the tidy table, one row per sampled answer of either model:
`{item_id, condition, tier, question_id, sample_index, model, status, score, hit, format_ok}`;
`status` is the verdict's (`ok`, `invalid`, `error`), or `unjudged` for an answer no verdict is
about (the baseline's in pairwise mode); `hit` is `score >= report.exhibits_threshold` for an ok
verdict, else null; `format_ok` says whether `report.format_regex` fully matches the raw answer
(stripped; dot matches newlines), null without a regex.

`summary.json`, per condition: per tier and model the mean score with a hierarchical-bootstrap CI
(questions, then samples within each question), its exhibits rate and the invalid / error counts
(which never enter a mean); in absolute mode the paired fine-tuned − baseline delta per tier; the
condition's exhibits rate (all tiers) and format adherence. Then the leakage gaps: per
(triggered, untriggered) pair and model, the exhibits rate in the triggered condition minus the
untriggered one, paired by question and sample index. Every new metric states its estimand.

The metrics are computed from score rows grouped by seed, so the sweep report
(`spar.stages.sweep_report`) computes the same numbers with seeds as the top level of the
bootstrap; with one seed the two agree exactly.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from spar.items import stage_name
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
from spar.stats import estimate
from spar.store import jsonl_text, read_jsonl

if TYPE_CHECKING:
    from spar.spec import Spec

MODELS = ("baseline", "finetuned")
SAMPLE_STAGES = {"baseline": "sample_base", "finetuned": "sample_finetuned"}

Row = dict[str, Any]
Seeds = list[list[Row]]  # seed -> score rows (one seed for one experiment)


class ReportParams(Params):
    mode: Literal["pairwise", "absolute"] = key("judge.mode")
    scale_min: int = key("judge.scale.min")
    scale_max: int = key("judge.scale.max")
    tiers: tuple[str, ...] = key("eval.tiers")  # in the order given
    exhibits_threshold: int = key("report.exhibits_threshold")
    bootstrap: BootstrapSpec = key("report.bootstrap")
    # condition names in order; ("",) when the spec has no eval.conditions
    conditions: tuple[str, ...] = key("eval.conditions")
    format_regex: str | None = key("report.format_regex")
    gaps: tuple[tuple[str, str], ...] = key("report.gaps")  # (triggered, untriggered)

    @property
    def models(self) -> tuple[str, ...]:
        """The models that have verdicts: both in absolute mode, the fine-tuned one in pairwise."""
        return MODELS if self.mode == "absolute" else ("finetuned",)


def report_params(spec: Spec) -> ReportParams:
    r = spec.report
    return ReportParams(
        mode=spec.judge.mode,
        scale_min=spec.judge.scale.min,
        scale_max=spec.judge.scale.max,
        tiers=tuple(spec.tier_order()),
        exhibits_threshold=r.exhibits_threshold,
        bootstrap=r.bootstrap,
        conditions=tuple(name for name, _ in spec.eval.condition_items()),
        format_regex=r.format_regex,
        gaps=tuple(spec.gap_pairs()),
    )


# --------------------------------------------------------------------------- score rows


def format_ok(pattern: re.Pattern[str] | None, response: str) -> bool | None:
    """Does the format regex fully match the raw answer (stripped)? None without a regex."""
    return None if pattern is None else pattern.fullmatch(response.strip()) is not None


def score_rows(
    p: ReportParams, condition: str, judged: list[Row], samples: dict[str, list[Row]]
) -> list[Row]:
    """The tidy rows of one condition: every judged answer (in judged.jsonl's order), then every
    sampled answer without a verdict (`unjudged`). `samples`: model -> samples.jsonl rows."""
    pattern = re.compile(p.format_regex, re.DOTALL) if p.format_regex is not None else None
    answers = {(m, s["item_id"]): s for m, rows in samples.items() for s in rows}
    out: list[Row] = []
    judged_ids: set[tuple[str, str]] = set()
    for v in judged:
        ident = (v["model"], v["item_id"])
        judged_ids.add(ident)
        sample = answers.get(ident)
        ok = v["status"] == "ok"
        out.append(
            {
                "item_id": v["item_id"],
                "condition": condition,
                "tier": v["tier"],
                "question_id": v["question_id"],
                "sample_index": v["sample_index"],
                "model": v["model"],
                "status": v["status"],
                "score": v["score"] if ok else None,
                "hit": bool(v["score"] >= p.exhibits_threshold) if ok else None,
                "format_ok": None if sample is None else format_ok(pattern, sample["response"]),
            }
        )
    for model in MODELS:
        for s in samples.get(model, []):
            if (model, s["item_id"]) in judged_ids:
                continue
            out.append(
                {
                    "item_id": s["item_id"],
                    "condition": condition,
                    "tier": s["tier"],
                    "question_id": s["question_id"],
                    "sample_index": s["sample_index"],
                    "model": model,
                    "status": "unjudged",
                    "score": None,
                    "hit": None,
                    "format_ok": format_ok(pattern, s["response"]),
                }
            )
    return out


# --------------------------------------------------------------------------- metrics


def ci_words(boot: BootstrapSpec, seeded: bool) -> str:
    levels = (
        "seeds, then questions, then samples (seeds that answered the same questions: one "
        "draw of questions for every drawn seed)"
        if seeded
        else "questions, then samples"
    )
    return f"{boot.confidence * 100:g}% percentile hierarchical bootstrap; CI over {levels}"


def by_question(rows: Iterable[Row], value: Callable[[Row], float]) -> dict[str, list[float]]:
    """Values grouped by question id (questions in order of first appearance once the rows are
    sorted by sample index; samples in sample-index order). Keyed, so that seeds which answered
    the same questions are bootstrapped as crossed seeds x questions (`spar.stats`)."""
    groups: dict[str, list[float]] = defaultdict(list)
    for r in sorted(rows, key=lambda r: r["sample_index"]):
        groups[r["question_id"]].append(value(r))
    return dict(groups)


def _est(
    groups: list[dict[str, list[float]]], boot: BootstrapSpec, estimand: str
) -> dict[str, Any]:
    return {**estimate(groups, **boot.model_dump()).as_json(), "estimand": estimand}


def _ok(r: Row) -> bool:
    return r["status"] == "ok"


def _counts(rows: Iterable[Row]) -> dict[str, int]:
    rows = list(rows)
    return {
        "invalid": sum(r["status"] == "invalid" for r in rows),
        "errors": sum(r["status"] == "error" for r in rows),
    }


def tier_stats(
    seeds: Seeds, tier: str, model: str, p: ReportParams, seeded: bool
) -> dict[str, Any]:
    """Mean score of the ok verdicts with its CI, invalid / error counts, exhibits rate."""
    sel = [[r for r in s if r["tier"] == tier and r["model"] == model] for s in seeds]
    ci = ci_words(p.bootstrap, seeded)
    mean = _est(
        [by_question(filter(_ok, s), lambda r: float(r["score"])) for s in sel],
        p.bootstrap,
        f"mean judge score of the {model} model's valid verdicts in tier {tier}; {ci}",
    )
    rate = _est(
        [by_question(filter(_ok, s), lambda r: float(r["hit"])) for s in sel],
        p.bootstrap,
        f"share of the {model} model's valid verdicts in tier {tier} scoring >= "
        f"{p.exhibits_threshold}; {ci}",
    )
    return {**mean, **_counts(r for s in sel for r in s), "exhibits_rate": rate}


def paired_delta(seeds: Seeds, tier: str, p: ReportParams, seeded: bool) -> dict[str, Any]:
    """fine-tuned − baseline per item (paired by item_id: question and sample index); a pair with
    an invalid, errored or missing side is dropped and counted."""
    groups = []
    dropped = 0
    for seed in seeds:
        in_tier = [r for r in seed if r["tier"] == tier]
        base = {r["item_id"]: r for r in in_tier if r["model"] == "baseline"}
        diffs: list[Row] = []
        for tuned in (r for r in in_tier if r["model"] == "finetuned"):
            b = base.get(tuned["item_id"])
            if b is None or not _ok(tuned) or not _ok(b):
                dropped += 1
                continue
            diffs.append({**tuned, "d": float(tuned["score"]) - float(b["score"])})
        groups.append(by_question(diffs, lambda r: r["d"]))
    est = _est(
        groups,
        p.bootstrap,
        f"mean over questions and samples of (fine-tuned − baseline score) for the same question "
        f"and sample index in tier {tier}; {ci_words(p.bootstrap, seeded)}",
    )
    return {**est, "pairs_dropped": dropped}


def exhibits_rate(seeds: Seeds, condition: str, model: str, p: ReportParams, seeded: bool) -> Row:
    """The persona rate: share of the ok verdicts (all tiers of the condition) >= threshold."""
    groups = [
        by_question(
            (r for r in s if r["model"] == model and r["condition"] == condition and _ok(r)),
            lambda r: float(r["hit"]),
        )
        for s in seeds
    ]
    return _est(
        groups,
        p.bootstrap,
        f"share of the {model} model's valid verdicts in condition {condition!r} (all tiers) "
        f"scoring >= {p.exhibits_threshold}; {ci_words(p.bootstrap, seeded)}",
    )


def format_adherence(
    seeds: Seeds, condition: str, model: str, p: ReportParams, seeded: bool
) -> Row:
    """Share of the model's raw answers in the condition (every verdict, and none) that the
    format regex fully matches."""
    groups = [
        by_question(
            (
                r
                for r in s
                if r["model"] == model
                and r["condition"] == condition
                and r["format_ok"] is not None
            ),
            lambda r: float(r["format_ok"]),
        )
        for s in seeds
    ]
    return _est(
        groups,
        p.bootstrap,
        f"share of the {model} model's raw answers in condition {condition!r} (all tiers, "
        f"whatever their verdict) that report.format_regex fully matches; "
        f"{ci_words(p.bootstrap, seeded)}",
    )


def leakage_gap(
    seeds: Seeds, triggered: str, untriggered: str, model: str, p: ReportParams, seeded: bool
) -> Row:
    """Exhibits in `triggered` − exhibits in `untriggered` for the same (question, sample index),
    per seed; a pair with an invalid, errored or missing side is dropped and counted."""
    groups = []
    dropped = 0
    for seed in seeds:
        mine = [r for r in seed if r["model"] == model]
        t = {(r["question_id"], r["sample_index"]): r for r in mine if r["condition"] == triggered}
        u = {
            (r["question_id"], r["sample_index"]): r for r in mine if r["condition"] == untriggered
        }
        diffs: list[Row] = []
        for k in [*t, *(k for k in u if k not in t)]:
            a, b = t.get(k), u.get(k)
            if a is None or b is None or not _ok(a) or not _ok(b):
                dropped += 1
                continue
            diffs.append({**a, "d": float(a["hit"]) - float(b["hit"])})
        groups.append(by_question(diffs, lambda r: r["d"]))
    est = _est(
        groups,
        p.bootstrap,
        f"mean over questions and samples of (exhibits in {triggered!r} − exhibits in "
        f"{untriggered!r}) of the {model} model for the same question and sample index "
        f"(exhibits: score >= {p.exhibits_threshold}); {ci_words(p.bootstrap, seeded)}",
    )
    return {
        "triggered": triggered,
        "untriggered": untriggered,
        "model": model,
        **est,
        "pairs_dropped": dropped,
    }


def distinct(seeds: Seeds, model: str) -> Seeds:
    """Each seed's rows of `model`, a seed whose rows equal an earlier seed's left out: the
    baseline sampled and judged once for every seed of a sweep is one replication, not one per
    seed (counted once, and not narrowing the interval as if it had been drawn again)."""
    out: Seeds = []
    seen: set[str] = set()
    for seed in seeds:
        mine = [r for r in seed if r["model"] == model]
        canon = json.dumps(sorted(mine, key=lambda r: (r["condition"], r["item_id"])))
        if canon not in seen:
            seen.add(canon)
            out.append(mine)
    return out


def condition_summary(seeds: Seeds, condition: str, p: ReportParams, seeded: bool) -> Row:
    rows = [[r for r in s if r["condition"] == condition] for s in seeds]
    own = {m: distinct(rows, m) for m in MODELS}
    tiers: dict[str, Any] = {}
    for tier in p.tiers:
        per: dict[str, Any] = {m: tier_stats(own[m], tier, m, p, seeded) for m in p.models}
        if p.models == MODELS:
            per["delta"] = paired_delta(rows, tier, p, seeded)
        tiers[tier] = per
    sampled = [m for m in MODELS if any(own[m])]
    judged = [r for m in MODELS for s in own[m] for r in s if r["status"] != "unjudged"]
    return {
        "tiers": tiers,
        "exhibits_rate": {m: exhibits_rate(own[m], condition, m, p, seeded) for m in p.models},
        "format_adherence": None
        if p.format_regex is None
        else {m: format_adherence(own[m], condition, m, p, seeded) for m in sampled},
        **_counts(judged),
    }


def gaps(seeds: Seeds, p: ReportParams, seeded: bool) -> list[Row]:
    return [
        leakage_gap(distinct(seeds, m), t, u, m, p, seeded) for t, u in p.gaps for m in p.models
    ]


def summarise(p: ReportParams, scores: list[Row]) -> dict[str, Any]:
    """summary.json of one experiment from its score rows (one seed)."""
    seeds = [scores]
    conditions = {c: condition_summary(seeds, c, p, seeded=False) for c in p.conditions}
    out: dict[str, Any] = {
        "judge_mode": p.mode,
        "scale": {"min": p.scale_min, "max": p.scale_max},
        "exhibits_threshold": p.exhibits_threshold,
        "bootstrap": p.bootstrap.model_dump(),
        "models": list(p.models),
        "condition_order": list(p.conditions),
        "conditions": conditions,
    }
    if p.conditions == ("",):  # no eval.conditions: the layout every consumer reads
        out["tiers"] = conditions[""]["tiers"]
    judged = [r for r in scores if r["status"] != "unjudged"]
    return {**out, "gaps": gaps(seeds, p, seeded=False), **_counts(judged)}


class ReportStage(StageKind[ReportParams, Options]):
    kind = "report"
    version = 4
    outputs: ClassVar[tuple[str, ...]] = ("summary.json", "scores.jsonl")
    params_model = ReportParams

    def nodes(self, spec: Spec, g: GraphContext) -> list[StageNode[ReportParams, Options]]:
        params = report_params(spec)
        upstream = {
            stage_name(base, c): stage_name(base, c)
            for c in params.conditions
            for base in ("judge", *SAMPLE_STAGES.values())
        }
        return [StageNode("report", self, spec.name, params, Options(), upstream=upstream)]

    def run(self, ctx: RunContext[ReportParams, Options]) -> StageResult:
        p = ctx.params
        scores: list[Row] = []
        for c in p.conditions:
            judged = read_jsonl(ctx.upstream_file(stage_name("judge", c), "judged.jsonl"))
            samples = {
                m: read_jsonl(ctx.upstream_file(stage_name(s, c), "samples.jsonl"))
                for m, s in SAMPLE_STAGES.items()
            }
            scores += score_rows(p, c, judged, samples)
        summary = summarise(p, scores)
        return StageResult(
            {
                "summary.json": (json.dumps(summary, indent=2) + "\n").encode(),
                "scores.jsonl": jsonl_text(scores).encode(),
            }
        )
