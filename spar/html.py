"""A static, self-contained HTML report of one experiment (no network assets; text escaped)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import jinja2

from spar.curves import html_parts
from spar.plots import (
    conditions_of,
    gap_label,
    pp_ci,
    properties_of,
    property_names,
    tier_order,
    tiers_of,
)
from spar.reliability import html_rows as reliability_rows

_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)


def _fmt(stat: dict[str, Any]) -> str:
    if stat.get("mean") is None:
        return "—"
    if stat.get("ci_low") is None:
        return f"{stat['mean']:.2f} [no interval]"
    return f"{stat['mean']:.2f} [{stat['ci_low']:.2f}, {stat['ci_high']:.2f}]"


def _delta(stat: dict[str, Any]) -> str:
    """A paired delta: mean [CI], its p-value and the Holm-adjusted one, and a note when the
    tier has too few questions for a narrow interval."""
    text = _fmt(stat)
    if stat.get("p_value") is not None:
        text += f"; p {stat['p_value']:.3g}"
        if stat.get("p_holm") is not None:
            text += f", Holm {stat['p_holm']:.3g}"
    if stat.get("few_questions"):
        text += f" (wide: {stat['questions']} questions)"
    return text


def interval_words(summary: dict[str, Any]) -> str:
    """The report's interval settings in words (older summaries: a percentile bootstrap)."""
    iv = summary.get("interval")
    if iv is None:
        boot = summary.get("bootstrap", {})
        return f"{boot.get('confidence', 0.95) * 100:g} % percentile-bootstrap CIs (older report)"
    target = (
        "a new question of the tier's population (and a new seed, with seeds)"
        if iv["generalize"] == "questions"
        else "these questions fixed, new answers sampled"
    )
    return f"{iv['confidence'] * 100:g} % t intervals generalising to {target}"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.0f} %"


def _pct_ci(est: dict[str, Any] | None) -> str:
    """A rate with its CI in percent: `42 % [30 %, 55 %]`."""
    if not est or est.get("mean") is None:
        return "—"
    if est.get("ci_low") is None:
        return f"{_pct(est['mean'])} [no interval]"
    return f"{_pct(est['mean'])} [{_pct(est['ci_low'])}, {_pct(est['ci_high'])}]"


def _turns(sample: dict[str, Any] | None) -> list[dict[str, str]] | None:
    """The conversation of a multi-turn answer (every user and assistant turn), else None."""
    return None if sample is None else sample.get("conversation") or None


def answer_rows(
    samples_base: list[dict[str, Any]],
    samples_tuned: list[dict[str, Any]],
    judged: list[dict[str, Any]],
    properties: list[str] | None = None,
) -> list[dict[str, Any]]:
    """One row per item (question, condition, sample) — and per property, when the verdicts are
    one per (answer, property) — with both answers side by side and that row's verdicts, joined
    by item id (which includes the condition), in the order of `samples_tuned` (properties in
    the order of `properties`, else of their first verdict). A multi-turn answer also gives its
    conversation (`baseline_turns`, `finetuned_turns`: lists of {role, content})."""
    base = {r["item_id"]: r for r in samples_base}
    named = properties or dict.fromkeys(
        j["property"] for j in judged if j.get("property") is not None
    )
    props: list[str | None] = [*named] or [None]
    verdicts: dict[tuple[str, str | None], dict[str, dict[str, Any]]] = {}
    for j in judged:
        verdicts.setdefault((j["item_id"], j.get("property")), {})[j["model"]] = j
    rows = []
    for r in samples_tuned:
        key = r["item_id"]
        b = base.get(key)
        for prop in props:
            vs = verdicts.get((key, prop), {})
            labelled = len(vs) > 1
            scores = [
                (f"{m}: " if labelled else "", v["score"] if v["status"] == "ok" else v["status"])
                for m, v in sorted(vs.items())
            ]
            reasons = [
                (f"{m}: " if labelled else "", v["reasoning"]) for m, v in sorted(vs.items())
            ]
            tuned = vs.get("finetuned")
            filter_score = "invalid" if tuned is None or tuned["score"] is None else tuned["score"]
            rows.append(
                {
                    "item_id": key,
                    "tier": r["tier"],
                    "condition": r.get("condition", ""),
                    "property": prop or "",
                    "question": r["question"],
                    "sample_index": r["sample_index"],
                    "baseline": "" if b is None else b["response"],
                    "finetuned": r["response"],
                    "baseline_turns": _turns(b),
                    "finetuned_turns": _turns(r),
                    "scores": scores,
                    "reasons": reasons,
                    "filter_score": filter_score,
                }
            )
    return rows


def render_report(
    summary: dict[str, Any],
    plot_png: bytes,
    rows: list[dict[str, Any]],
    experiment: str,
    framing: str,
) -> str:
    """The report page. A spec with eval.conditions gets a section per condition (exhibits rate,
    format adherence, per-tier means), a table of leakage gaps with their estimands, and a
    condition column and filter in the answers table. A spec with judge.properties gets, per
    condition, a table of the properties (each model's mean and exhibits rate over all tiers,
    the paired delta, counts) and a per-tier table per property, and a property column and
    filter in the answers table."""
    conditions = conditions_of(summary)
    per_condition = {c: tiers_of(summary, c) for c in conditions or [""]}
    tiers = tier_order(list(dict.fromkeys(t for per in per_condition.values() for t in per)))
    overall = summary.get("conditions", {}).get("")  # a spec without conditions, new schema
    properties = property_names(summary)
    per_property = {c: properties_of(summary, c) for c in conditions or [""]}
    return _ENV.get_template("report.html.j2").render(
        s=summary,
        experiment=experiment,
        framing=framing,
        conditions=conditions,
        per_condition=per_condition,
        overall=overall,
        tiers=tiers,
        properties=properties,
        per_property=per_property,
        rows=rows,
        plot_b64=base64.b64encode(plot_png).decode(),
        fmt=_fmt,
        delta=_delta,
        interval_words=interval_words(summary),
        pct=_pct,
        pct_ci=_pct_ci,
        pp_ci=pp_ci,
        gap_label=gap_label,
        **_logprob_parts(summary, experiment),
        **html_parts(summary),  # training and checkpoint curves (spar.curves)
        reliability=reliability_rows(summary),  # judge.also / self_agreement
    )


def _logprob_parts(summary: dict[str, Any], experiment: str) -> dict[str, Any]:
    """The log-likelihood pull's table rows and chart (`logprob:` in the spec; else empty)."""
    from spar.plots import logprob_figure, png
    from spar.spec import PlotSpec
    from spar.stages.logprob_report import tier_rows

    style = PlotSpec()
    fig = logprob_figure(summary, style, experiment)
    chart = None if fig is None else base64.b64encode(png(fig, style.dpi)).decode()
    return {"logprob_rows": tier_rows(summary), "logprob_b64": chart}
