"""report: statistics of the judged answers, per condition -> summary.json and scores.jsonl.

`scores.jsonl` is the tidy table, one row per sampled answer of either model:
`{item_id, condition, tier, question_id, sample_index, model, status, score, hit, format_ok}`;
`status` is the verdict's (`ok`, `invalid`, `error`), or `unjudged` for an answer no verdict is
about (the baseline's in pairwise mode); `hit` is `score >= report.exhibits_threshold` for an ok
verdict, else null; `format_ok` says whether `report.format_regex` fully matches the raw answer
(stripped; dot matches newlines), null without a regex. With `judge.properties` every answer has
one verdict per property, and every row carries `property` (null on an unjudged row).

`summary.json`, per condition: per tier and model the mean score (over questions, each weighing
the same) with a t interval whose estimand is `report.generalize` (`spar.stats`), its exhibits
rate and the invalid / error counts (which never enter a mean); in absolute mode the paired
fine-tuned − baseline delta per tier; the condition's exhibits rate (all tiers) and format
adherence. Then the leakage gaps: per (triggered, untriggered) pair and model, the exhibits rate
in the triggered condition minus the untriggered one, paired by question and sample index. Every
metric states its estimand (`estimand`) and how its interval was made (`method`).

With `judge.properties` (one verdict per answer and property), each condition also gets
`properties: {property: {<model>: stats (all tiers), delta (all tiers), tiers: {tier: {<model>:
stats, delta}}, invalid, errors}}` — the same statistics, computed on that property's verdicts
alone — and the leakage gaps are given per property too (entries with a `property` key). The
metrics without a property then pool every property's verdicts (pairs matched by property too),
and their estimands say so. `summary.json` gains `property_order` (and, without eval.conditions,
a top-level `properties`, like `tiers`). Without properties nothing changes.

Every paired delta and leakage gap carries the two-sided p-value of a zero effect, and
`p_holm`: Holm's adjustment over the family of every per-tier paired delta of the experiment
(tiers × conditions, × properties with judge.properties), or over every leakage gap
(`multiple_comparisons` in summary.json says which). An estimate over fewer than 10 questions
says so (`few_questions`): its interval is wide because the tier has few questions.

The metrics are computed from score rows grouped by seed, so the sweep report
(`spar.stages.sweep_report`) computes the same numbers with seeds as the top level of the
design; with one seed the two agree exactly.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from spar.errors import RunError
from spar.items import stage_name
from spar.reliability import (
    ReliabilityParams,
    exclude,
    reliability_params,
    reliability_summary,
    reliability_upstream,
)
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
from spar.stats import estimate, holm
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
    generalize: Literal["questions", "samples"] = key("report.generalize")
    confidence: float = key("report.confidence")
    # condition names in order; ("",) when the spec has no eval.conditions
    conditions: tuple[str, ...] = key("eval.conditions")
    format_regex: str | None = key("report.format_regex")
    gaps: tuple[tuple[str, str], ...] = key("report.gaps")  # (triggered, untriggered)
    # property names in the spec's order; None: one verdict per answer (judge.properties unset),
    # left out of dumps then (also where the sweep report nests these params)
    properties: tuple[str, ...] | None = Field(None, alias="judge.properties")
    # judge.also / judge.self_agreement (spar.reliability); None: neither (left out of dumps)
    reliability: ReliabilityParams | None = Field(None, alias="judge.reliability")
    added: ClassVar[dict[str, Any]] = {"properties": None, "reliability": None}

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
        generalize=r.generalize,
        confidence=r.confidence,
        conditions=tuple(name for name, _ in spec.eval.condition_items()),
        format_regex=r.format_regex,
        gaps=tuple(spec.gap_pairs()),
        properties=tuple(spec.judge.properties) if spec.judge.properties else None,
        reliability=reliability_params(spec),
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
    for line, v in enumerate(judged, 1):
        ident = (v["model"], v["item_id"])
        judged_ids.add(ident)
        sample = answers.get(ident)
        ok = v["status"] == "ok"
        row = {
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
        out.append(_with_property(p, row, _property_of(p, condition, line, v)))
    for model in MODELS:
        for s in samples.get(model, []):
            if (model, s["item_id"]) in judged_ids:
                continue
            row = {
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
            out.append(_with_property(p, row, None))
    return out


def _property_of(p: ReportParams, condition: str, line: int, verdict: Row) -> str | None:
    """The property a verdict is about: one of judge.properties when the spec has them."""
    prop = verdict.get("property")
    if p.properties is None:
        return None
    if prop not in p.properties:
        where = f"judged.jsonl of condition {condition!r}" if condition else "judged.jsonl"
        raise RunError(
            f"{where}, line {line}: property {prop!r} is not one of judge.properties "
            f"({', '.join(p.properties)})"
        )
    return prop


def _with_property(p: ReportParams, row: Row, prop: str | None) -> Row:
    """`row` with `property` after `tier` when the spec has judge.properties (else unchanged)."""
    if p.properties is None:
        return row
    out: Row = {}
    for k, v in row.items():
        out[k] = v
        if k == "tier":
            out["property"] = prop
    return out


# --------------------------------------------------------------------------- metrics


def ci_words(p: ReportParams, seeded: bool) -> str:
    """The interval's level and estimand in words (how it was computed is each estimate's
    `method`)."""
    if p.generalize == "questions":
        what = "a new question of the tier's population" + (
            " answered by a new seed (a new training run)" if seeded else ""
        )
    else:
        what = (
            "these questions" + (" and seeds" if seeded else "") + (" fixed, new answers sampled")
        )
    return f"{p.confidence * 100:g}% t interval generalising to {what}"


def by_question(rows: Iterable[Row], value: Callable[[Row], float]) -> dict[str, list[float]]:
    """Values grouped by question id (questions in order of first appearance once the rows are
    sorted by sample index; samples in sample-index order). Keyed, so that seeds which answered
    the same questions are treated as crossed seeds x questions (`spar.stats`)."""
    groups: dict[str, list[float]] = defaultdict(list)
    for r in sorted(rows, key=lambda r: r["sample_index"]):
        groups[r["question_id"]].append(value(r))
    return dict(groups)


def _est(groups: list[dict[str, list[float]]], p: ReportParams, estimand: str) -> dict[str, Any]:
    return {**estimate(groups, p.generalize, p.confidence).as_json(), "estimand": estimand}


def _ok(r: Row) -> bool:
    return r["status"] == "ok"


def _prop(r: Row) -> str | None:
    return r.get("property")


def _scope(p: ReportParams, tier: str | None, prop: str | None) -> str:
    """Which verdicts a statistic is about, as its estimand words say it: `in tier T` (the words
    of a spec without properties), `on property 'P' in tier T`, `on property 'P', all tiers`, or,
    pooling every property of a spec that has them, `on every property (pooled) in tier T`."""
    where = f"in tier {tier}" if tier is not None else "all tiers"
    if prop is not None:
        return (
            f"on property {prop!r} {where}"
            if tier is not None
            else f"on property {prop!r}, {where}"
        )
    return where if p.properties is None else f"on every property (pooled) {where}"


def _counts(rows: Iterable[Row]) -> dict[str, int]:
    rows = list(rows)
    return {
        "invalid": sum(r["status"] == "invalid" for r in rows),
        "errors": sum(r["status"] == "error" for r in rows),
    }


def _selected(r: Row, tier: str | None, prop: str | None) -> bool:
    """Is `r` in `tier` (None: any) and about `prop` (None: any property)?"""
    return (tier is None or r["tier"] == tier) and (prop is None or _prop(r) == prop)


def tier_stats(
    seeds: Seeds,
    tier: str | None,
    model: str,
    p: ReportParams,
    seeded: bool,
    prop: str | None = None,
) -> dict[str, Any]:
    """Mean score of the ok verdicts with its CI, invalid / error counts, exhibits rate — of one
    tier (None: every tier) and, with judge.properties, one property (None: all pooled)."""
    sel = [[r for r in s if _selected(r, tier, prop) and r["model"] == model] for s in seeds]
    ci = ci_words(p, seeded)
    scope = _scope(p, tier, prop)
    mean = _est(
        [by_question(filter(_ok, s), lambda r: float(r["score"])) for s in sel],
        p,
        f"mean over questions of the mean judge score of the {model} model's valid verdicts "
        f"{scope}; {ci}",
    )
    rate = _est(
        [by_question(filter(_ok, s), lambda r: float(r["hit"])) for s in sel],
        p,
        f"mean over questions of the share of the {model} model's valid verdicts {scope} "
        f"scoring >= "
        f"{p.exhibits_threshold}; {ci}",
    )
    return {**mean, **_counts(r for s in sel for r in s), "exhibits_rate": rate}


def paired_delta(
    seeds: Seeds, tier: str | None, p: ReportParams, seeded: bool, prop: str | None = None
) -> dict[str, Any]:
    """fine-tuned − baseline per item (paired by item_id: question and sample index; and by
    property when there are several); a pair with an invalid, errored or missing side is dropped
    and counted. `tier` / `prop` None: every tier / property."""
    groups = []
    dropped = 0
    for seed in seeds:
        in_tier = [r for r in seed if _selected(r, tier, prop)]
        base = {(r["item_id"], _prop(r)): r for r in in_tier if r["model"] == "baseline"}
        diffs: list[Row] = []
        for tuned in (r for r in in_tier if r["model"] == "finetuned"):
            b = base.get((tuned["item_id"], _prop(tuned)))
            if b is None or not _ok(tuned) or not _ok(b):
                dropped += 1
                continue
            diffs.append({**tuned, "d": float(tuned["score"]) - float(b["score"])})
        groups.append(by_question(diffs, lambda r: r["d"]))
    same = (
        "question and sample index"
        if p.properties is None
        else "question, sample index and property"
    )
    est = _est(
        groups,
        p,
        f"mean over questions of the mean over samples of (fine-tuned − baseline score) for the "
        f"same {same} "
        f"{_scope(p, tier, prop)}; {ci_words(p, seeded)}",
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
    pooled = "" if p.properties is None else " on every property (pooled)"
    return _est(
        groups,
        p,
        f"mean over questions of the share of the {model} model's valid verdicts{pooled} in "
        f"condition {condition!r} "
        f"(all tiers) scoring >= {p.exhibits_threshold}; {ci_words(p, seeded)}",
    )


def format_adherence(
    seeds: Seeds, condition: str, model: str, p: ReportParams, seeded: bool
) -> Row:
    """Share of the model's raw answers in the condition (every verdict, and none) that the
    format regex fully matches. An answer counts once, however many properties judged it."""
    groups = [
        by_question(
            _answers(
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
        p,
        f"mean over questions of the share of the {model} model's raw answers in condition "
        f"{condition!r} (all tiers, "
        f"whatever their verdict) that report.format_regex fully matches; "
        f"{ci_words(p, seeded)}",
    )


def _answers(rows: Iterable[Row]) -> list[Row]:
    """The first row of each answer (item id and model): one per answer whatever the properties."""
    seen: set[tuple[str, str]] = set()
    out = []
    for r in rows:
        if (r["item_id"], r["model"]) not in seen:
            seen.add((r["item_id"], r["model"]))
            out.append(r)
    return out


def leakage_gap(
    seeds: Seeds,
    triggered: str,
    untriggered: str,
    model: str,
    p: ReportParams,
    seeded: bool,
    prop: str | None = None,
) -> Row:
    """Exhibits in `triggered` − exhibits in `untriggered` for the same (question, sample index)
    — and property, with judge.properties (`prop`: that property's verdicts only; None: every
    property pooled) — per seed; a pair with an invalid, errored or missing side is dropped and
    counted."""
    groups = []
    dropped = 0

    def ident(r: Row) -> tuple[str, int, str | None]:
        return (r["question_id"], r["sample_index"], _prop(r))

    for seed in seeds:
        mine = [r for r in seed if r["model"] == model and _selected(r, None, prop)]
        t = {ident(r): r for r in mine if r["condition"] == triggered}
        u = {ident(r): r for r in mine if r["condition"] == untriggered}
        diffs: list[Row] = []
        for k in [*t, *(k for k in u if k not in t)]:
            a, b = t.get(k), u.get(k)
            if a is None or b is None or not _ok(a) or not _ok(b):
                dropped += 1
                continue
            diffs.append({**a, "d": float(a["hit"]) - float(b["hit"])})
        groups.append(by_question(diffs, lambda r: r["d"]))
    if p.properties is None:
        same = "question and sample index"
    elif prop is None:
        same = "question, sample index and property (every property pooled)"
    else:
        same = f"question and sample index, on property {prop!r}"
    est = _est(
        groups,
        p,
        f"mean over questions of the mean over samples of (exhibits in {triggered!r} − "
        f"exhibits in "
        f"{untriggered!r}) of the {model} model for the same {same} "
        f"(exhibits: score >= {p.exhibits_threshold}); {ci_words(p, seeded)}",
    )
    named = {} if prop is None else {"property": prop}
    return {
        "triggered": triggered,
        "untriggered": untriggered,
        "model": model,
        **named,
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
        canon = json.dumps(
            sorted(mine, key=lambda r: (r["condition"], r["item_id"], _prop(r) or ""))
        )
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
    out: Row = {"tiers": tiers}
    if p.properties is not None:
        out["properties"] = {
            prop: property_summary(rows, own, prop, p, seeded) for prop in p.properties
        }
    return {
        **out,
        "exhibits_rate": {m: exhibits_rate(own[m], condition, m, p, seeded) for m in p.models},
        "format_adherence": None
        if p.format_regex is None
        else {m: format_adherence(own[m], condition, m, p, seeded) for m in sampled},
        **_counts(judged),
    }


def property_summary(
    rows: Seeds, own: dict[str, Seeds], prop: str, p: ReportParams, seeded: bool
) -> Row:
    """One property's verdicts in one condition: per model (all tiers) the mean score and the
    exhibits rate with their CIs and the invalid / error counts, the paired fine-tuned −
    baseline delta (absolute mode); the same per tier; the property's invalid / error counts.
    `rows`: each seed's rows of the condition; `own`: model -> its distinct seeds (`distinct`)."""
    out: Row = {m: tier_stats(own[m], None, m, p, seeded, prop) for m in p.models}
    if p.models == MODELS:
        out["delta"] = paired_delta(rows, None, p, seeded, prop)
    tiers: dict[str, Any] = {}
    for tier in p.tiers:
        per: dict[str, Any] = {m: tier_stats(own[m], tier, m, p, seeded, prop) for m in p.models}
        if p.models == MODELS:
            per["delta"] = paired_delta(rows, tier, p, seeded, prop)
        tiers[tier] = per
    mine = [
        r
        for m in MODELS
        for s in own[m]
        for r in s
        if _prop(r) == prop and r["status"] != "unjudged"
    ]
    return {**out, "tiers": tiers, **_counts(mine)}


def gaps(seeds: Seeds, p: ReportParams, seeded: bool) -> list[Row]:
    """The leakage gaps of every (triggered, untriggered) pair and model; with judge.properties,
    those pooling every property, then per property."""
    pooled = [
        leakage_gap(distinct(seeds, m), t, u, m, p, seeded) for t, u in p.gaps for m in p.models
    ]
    per_property = [
        leakage_gap(distinct(seeds, m), t, u, m, p, seeded, prop)
        for prop in p.properties or ()
        for t, u in p.gaps
        for m in p.models
    ]
    return pooled + per_property


def summarise(p: ReportParams, scores: list[Row]) -> dict[str, Any]:
    """summary.json of one experiment from its score rows (one seed)."""
    seeds = [scores]
    conditions = {c: condition_summary(seeds, c, p, seeded=False) for c in p.conditions}
    out: dict[str, Any] = {
        "judge_mode": p.mode,
        "scale": {"min": p.scale_min, "max": p.scale_max},
        "exhibits_threshold": p.exhibits_threshold,
        "interval": {"generalize": p.generalize, "confidence": p.confidence},
        "models": list(p.models),
        "condition_order": list(p.conditions),
        "conditions": conditions,
    }
    if p.properties is not None:
        out["property_order"] = list(p.properties)
    if p.conditions == ("",):  # no eval.conditions: the layout every consumer reads
        out["tiers"] = conditions[""]["tiers"]
        if p.properties is not None:
            out["properties"] = conditions[""]["properties"]
    judged = [r for r in scores if r["status"] != "unjudged"]
    out = {**out, "gaps": gaps(seeds, p, seeded=False), **_counts(judged)}
    return {**out, "multiple_comparisons": adjust(out, p)}


def tier_deltas(summary: Row, p: ReportParams) -> list[Row]:
    """Every per-tier paired delta of a summary: tiers × conditions (× properties)."""
    out: list[Row] = []
    for c in p.conditions:
        cond = summary["conditions"][c]
        if p.properties is None:
            out += [cond["tiers"][t]["delta"] for t in p.tiers if "delta" in cond["tiers"][t]]
        else:
            for prop in p.properties:
                tiers = cond["properties"][prop]["tiers"]
                out += [tiers[t]["delta"] for t in p.tiers if "delta" in tiers[t]]
    return out


def adjust(summary: Row, p: ReportParams) -> Row:
    """Holm-adjusted p-values (`p_holm`) beside the raw ones, in place: one family of every
    per-tier paired delta, one of every leakage gap. Returns what the families are."""
    families = {"deltas": tier_deltas(summary, p), "gaps": list(summary["gaps"])}
    for members in families.values():
        for entry, adjusted in zip(members, holm([m["p_value"] for m in members]), strict=True):
            entry["p_holm"] = adjusted
    return {
        "method": "holm",
        "deltas": "every per-tier paired delta (fine-tuned − baseline): tiers × conditions"
        + (" × properties" if p.properties is not None else "")
        + f" ({len(families['deltas'])} tests)",
        "gaps": f"every leakage gap ({len(families['gaps'])} tests)",
    }


class ReportStage(StageKind[ReportParams, Options]):
    kind = "report"
    version = 5  # 5: t intervals (report.generalize), Holm-adjusted p-values
    outputs: ClassVar[tuple[str, ...]] = ("summary.json", "scores.jsonl")
    params_model = ReportParams

    def nodes(self, spec: Spec, g: GraphContext) -> list[StageNode[ReportParams, Options]]:
        params = report_params(spec)
        upstream = {
            stage_name(base, c): stage_name(base, c)
            for c in params.conditions
            for base in ("judge", *SAMPLE_STAGES.values())
        }
        if spec.logprob is not None:  # the log-likelihood pull (spar.stages.logprob_report)
            upstream["logprob"] = "logprob"
        from spar.curves import curve_upstream  # training and checkpoint curves

        upstream |= curve_upstream(spec, params.conditions)
        upstream |= reliability_upstream(spec, params.conditions)  # extra judges, re-judge
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

        def read(role: str) -> list[Row]:  # an upstream judge stage's verdicts
            return read_jsonl(ctx.upstream_file(role, "judged.jsonl"))

        if p.reliability is not None:  # judge.also / self_agreement (spar.reliability)
            scores = exclude(p, scores, read)
        summary = summarise(p, scores)
        if p.reliability is not None:
            summary["reliability"] = reliability_summary(p, scores, read, summary)
        from spar.curves import add_curves  # `training`, and `checkpoints` (spar.curves)

        add_curves(summary, ctx, p, scores)
        if "logprob" in ctx.upstream:
            from spar.stages.logprob_report import logprob_summary

            summary["logprob"] = logprob_summary(
                read_jsonl(ctx.upstream_file("logprob", "logprobs.jsonl")),
                p.tiers,
                lambda groups, what: _est(groups, p, f"{what}; {ci_words(p, False)}"),
            )
        return StageResult(
            {
                "summary.json": (json.dumps(summary, indent=2) + "\n").encode(),
                "scores.jsonl": jsonl_text(scores).encode(),
            }
        )
