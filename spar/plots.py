"""Matplotlib figures of report summaries (Agg backend; figures are returned, then saved)."""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, PercentFormatter

from spar.spec import PlotSpec

SEMANTIC_TIERS = ("direct", "close", "distant", "very_distant")
BLANK: dict[str, Any] = {"mean": None}
NO_CONDITION = "(no condition)"  # how a spec without eval.conditions is named next to others


def tier_order(tiers: list[str]) -> list[str]:
    """direct -> very_distant first, then any other tiers in the order given."""
    known = [t for t in SEMANTIC_TIERS if t in tiers]
    return known + [t for t in tiers if t not in known]


def conditions_of(summary: dict[str, Any]) -> list[str]:
    """The named eval conditions of a summary, in the spec's order; [] when it has none."""
    return [c for c in summary.get("condition_order", []) if c]


def tiers_of(summary: dict[str, Any], condition: str = "") -> dict[str, Any]:
    """tier -> per-model stats of one condition ("" for a spec without conditions)."""
    if not condition and "tiers" in summary:
        return summary["tiers"]
    return summary["conditions"][condition]["tiers"]


def property_names(summary: dict[str, Any]) -> list[str]:
    """The judged properties of a summary (judge.properties, in the spec's order); [] when its
    verdicts are one per answer. Works on a report's summary and on a sweep report's group."""
    if "property_order" in summary:
        return list(summary["property_order"])
    for c in summary.get("conditions", {}).values():
        return list(c.get("properties", {}))
    return []


def properties_of(summary: dict[str, Any], condition: str = "") -> dict[str, Any]:
    """property -> its statistics in one condition ("" for a spec without conditions): per model
    (all tiers), `delta` (absolute mode), `tiers`, `invalid`, `errors`; {} without properties."""
    if not condition and "properties" in summary:
        return summary["properties"]
    return summary.get("conditions", {}).get(condition, {}).get("properties", {})


def gap_label(g: dict[str, Any]) -> str:
    """`triggered − untriggered (model)`, and the property when the gap is one property's."""
    prop = f", {g['property']}" if g.get("property") else ""
    return f"{g['triggered']} − {g['untriggered']} ({g['model']}{prop})"


def model_colors(models: list[str], style: PlotSpec) -> list[str]:
    """Baseline always takes the first colour and the fine-tuned model the second."""
    return [style.colors[int(m == "finetuned") % len(style.colors)] for m in models]


def _bars(
    ax: Any, tiers: list[str], series: list[tuple[str, list[dict[str, Any]]]], colors: list[str]
) -> None:
    width = 0.8 / max(len(series), 1)
    for k, (label, stats) in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(tiers))]
        # a tier with no valid score draws no bar (NaN), never a bar at zero
        means = [s["mean"] if s.get("mean") is not None else float("nan") for s in stats]
        err = [
            [
                max(m - (s.get("ci_low") if s.get("ci_low") is not None else m), 0)
                for m, s in zip(means, stats, strict=True)
            ],
            [
                max((s.get("ci_high") if s.get("ci_high") is not None else m) - m, 0)
                for m, s in zip(means, stats, strict=True)
            ],
        ]
        ax.bar(xs, means, width, yerr=err, capsize=3, label=label, color=colors[k % len(colors)])
    ax.set_xticks(range(len(tiers)), tiers)
    ax.legend()


def _caption(fig: Figure, invalid: int, errors: int = 0, detail: str = "") -> None:
    text = f"{invalid} invalid verdicts, {errors} judge errors"
    if invalid or errors:
        text += " (excluded from every mean)"
    if detail:
        text += f"; {detail}"
    fig.text(0.01, 0.005, text, fontsize=8)


def pp_ci(est: dict[str, Any]) -> str:
    """A difference of rates with its CI in percentage points: `+12 pp [-3 pp, +25 pp]`."""
    if est.get("mean") is None:
        return "n/a"
    lo, hi = est["ci_low"], est["ci_high"]
    if lo is None:
        return f"{100 * est['mean']:+.0f} pp [no interval]"
    return f"{100 * est['mean']:+.0f} pp [{100 * lo:+.0f} pp, {100 * hi:+.0f} pp]"


def _gap_bars(ax: Any, gaps: list[dict[str, Any]], style: PlotSpec) -> None:
    """Leakage gaps as horizontal bars with CI whiskers; the numbers are in the tick labels."""
    ys = list(range(len(gaps)))
    means = [g["mean"] if g.get("mean") is not None else float("nan") for g in gaps]
    err = [
        [
            max(m - (g["ci_low"] if g.get("ci_low") is not None else m), 0)
            for m, g in zip(means, gaps, strict=True)
        ],
        [
            max((g["ci_high"] if g.get("ci_high") is not None else m) - m, 0)
            for m, g in zip(means, gaps, strict=True)
        ],
    ]
    colors = model_colors([g["model"] for g in gaps], style)
    ax.barh(ys, means, 0.6, xerr=err, capsize=3, color=colors)
    labels = [f"{gap_label(g)}\n{pp_ci(g)}" for g in gaps]
    ax.set_yticks(ys, labels, fontsize=8)
    ax.invert_yaxis()  # the first gap on top
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlim(-1.05, 1.05)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{100 * x:+.0f} pp"))
    ax.set_xlabel("exhibits-rate gap (triggered − untriggered)")
    ax.set_title("leakage gaps")


def conditions_figure(summary: dict[str, Any], style: PlotSpec, title: str) -> Figure:
    """A spec with eval.conditions: the exhibits rate per condition (one bar per model, CI
    whiskers), format adherence per condition when measured, and the leakage gaps."""
    conds = conditions_of(summary)
    per = summary["conditions"]
    models = summary["models"]
    colors = model_colors(models, style)
    adherence = any(per[c].get("format_adherence") for c in conds)
    gaps = summary.get("gaps") or []
    panels = 1 + int(adherence) + int(bool(gaps))
    fig, grid = plt.subplots(
        1, panels, figsize=(style.width * (1 + 0.5 * (panels - 1)), style.height), squeeze=False
    )
    axes = list(grid[0])
    ax = axes[0]
    _bars(
        ax,
        conds,
        [(m, [per[c]["exhibits_rate"].get(m, BLANK) for c in conds]) for m in models],
        colors,
    )
    ax.set_ylim(0, 1.05)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylabel(f"exhibits rate (score ≥ {summary['exhibits_threshold']})")
    ax.set_title("persona (exhibits) rate by condition")
    if adherence:
        ax = axes[1]
        series = [
            (m, [(per[c].get("format_adherence") or {}).get(m, BLANK) for c in conds])
            for m in models
        ]
        _bars(ax, conds, series, colors)
        ax.set_ylim(0, 1.05)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_ylabel("answers matching the format")
        ax.set_title("format adherence by condition")
    if gaps:
        _gap_bars(axes[-1], gaps, style)
    fig.suptitle(style.title or title)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    detail = ", ".join(
        f"{c}: {per[c].get('invalid', 0)} invalid / {per[c].get('errors', 0)} errors" for c in conds
    )
    _caption(fig, summary["invalid"], summary.get("errors", 0), detail)
    return fig


def _grid(panels: int, style: PlotSpec) -> tuple[Figure, list[Any]]:
    """A figure of `panels` axes, up to 3 a row (sized from the style), in reading order; the
    unused cells of the last row are removed."""
    cols = min(panels, 3)
    rows = -(-panels // cols)
    fig, grid = plt.subplots(
        rows,
        cols,
        figsize=(style.width * (1 + 0.5 * (cols - 1)), style.height * rows),
        squeeze=False,
    )
    axes = [ax for row in grid for ax in row]
    for ax in axes[panels:]:
        fig.delaxes(ax)
    return fig, axes[:panels]


def properties_figure(summary: dict[str, Any], style: PlotSpec, title: str) -> Figure:
    """A spec with judge.properties: a panel per property. Without eval.conditions, that
    property's mean score per tier (one bar per model, CI whiskers); with them, its exhibits rate
    per condition, and a last panel of the leakage gaps (pooled and per property)."""
    props = property_names(summary)
    conds = conditions_of(summary)
    models = summary["models"]
    colors = model_colors(models, style)
    gaps = (summary.get("gaps") or []) if conds else []
    fig, axes = _grid(len(props) + int(bool(gaps)), style)
    lo, hi = summary["scale"]["min"], summary["scale"]["max"]
    for ax, prop in zip(axes, props, strict=False):
        if conds:
            per = [properties_of(summary, c).get(prop, {}) for c in conds]
            series = [
                (m, [st[m]["exhibits_rate"] if m in st else BLANK for st in per]) for m in models
            ]
            _bars(ax, conds, series, colors)
            ax.set_ylim(0, 1.05)
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
            ax.set_ylabel(f"exhibits rate (score ≥ {summary['exhibits_threshold']})")
        else:
            per_tier = properties_of(summary)[prop]["tiers"]
            tiers = tier_order(list(per_tier))
            _bars(ax, tiers, [(m, [per_tier[t][m] for t in tiers]) for m in models], colors)
            ax.set_ylim(lo - 0.5 if lo > 0 else 0, hi + 0.1)
            pairwise = summary["judge_mode"] == "pairwise"
            ax.set_ylabel("mean score vs baseline (pairwise)" if pairwise else "mean judge score")
        ax.set_title(f"property {prop}")
    if gaps:
        _gap_bars(axes[-1], gaps, style)
    fig.suptitle(style.title or title)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    counts = {
        prop: [properties_of(summary, c).get(prop, {}) for c in conds or [""]] for prop in props
    }
    detail = ", ".join(
        f"{prop}: {sum(st.get('invalid', 0) for st in per)} invalid / "
        f"{sum(st.get('errors', 0) for st in per)} errors"
        for prop, per in counts.items()
    )
    _caption(fig, summary["invalid"], summary.get("errors", 0), detail)
    return fig


def experiment_figure(summary: dict[str, Any], style: PlotSpec, title: str) -> Figure:
    """Per-tier mean score with CI whiskers: baseline vs fine-tuned (or pairwise scores); for a
    spec with eval.conditions, the conditions side by side (`conditions_figure`); with
    judge.properties, a panel per property (`properties_figure`)."""
    if property_names(summary):
        return properties_figure(summary, style, title)
    if conditions_of(summary):
        return conditions_figure(summary, style, title)
    per_tier = tiers_of(summary)
    tiers = tier_order(list(per_tier))
    fig, ax = plt.subplots(figsize=(style.width, style.height))
    series = [(m, [per_tier[t][m] for t in tiers]) for m in summary["models"]]
    _bars(ax, tiers, series, model_colors(summary["models"], style))
    lo, hi = summary["scale"]["min"], summary["scale"]["max"]
    ax.set_ylim(lo - 0.5 if lo > 0 else 0, hi + 0.1)
    mode = summary["judge_mode"]
    ax.set_ylabel("mean score vs baseline (pairwise)" if mode == "pairwise" else "mean judge score")
    ax.set_title(style.title or title)
    _caption(fig, summary["invalid"], summary.get("errors", 0))
    return fig


def effect(summary: dict[str, Any], tier: str, condition: str = "") -> dict[str, Any]:
    """The headline effect of one tier (of one condition): paired delta (absolute) or the
    pairwise score."""
    per = tiers_of(summary, condition)[tier]
    return per["delta"] if "delta" in per else per["finetuned"]


def _compare_conditions(
    summaries: list[dict[str, Any]], labels: list[str], style: PlotSpec
) -> Figure:
    """The fine-tuned exhibits rate per condition, one series per experiment. An experiment
    without conditions shows its overall rate under NO_CONDITION."""
    conds = list(dict.fromkeys(c for s in summaries for c in s.get("condition_order", [])))
    series = []
    for s, label in zip(summaries, labels, strict=True):
        per = s.get("conditions", {})
        rates = [
            per[c]["exhibits_rate"].get("finetuned", BLANK) if c in per else BLANK for c in conds
        ]
        series.append((label, rates))
    fig, ax = plt.subplots(figsize=(style.width, style.height))
    palette = [*style.colors[1:], *style.colors[:1], "#1b9e77", "#7570b3", "#e7298a"]
    _bars(ax, [c or NO_CONDITION for c in conds], series, palette)
    ax.set_ylim(0, 1.05)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylabel("fine-tuned exhibits rate")
    ax.set_title(style.title or "fine-tuned exhibits rate by condition")
    _caption(fig, sum(s["invalid"] for s in summaries), sum(s.get("errors", 0) for s in summaries))
    return fig


def compare_figure(summaries: list[dict[str, Any]], labels: list[str], style: PlotSpec) -> Figure:
    """Several experiments overlaid: one series per experiment, tiers in semantic order (or,
    when any of them has eval.conditions, the fine-tuned exhibits rate per condition)."""
    if any(conditions_of(s) for s in summaries):
        return _compare_conditions(summaries, labels, style)
    tiers = tier_order(list(dict.fromkeys(t for s in summaries for t in s["tiers"])))
    fig, ax = plt.subplots(figsize=(style.width, style.height))
    blank = {"mean": None}
    series = [
        (label, [effect(s, t) if t in s["tiers"] else blank for t in tiers])
        for s, label in zip(summaries, labels, strict=True)
    ]
    palette = [*style.colors[1:], *style.colors[:1], "#1b9e77", "#7570b3", "#e7298a"]
    _bars(ax, tiers, series, palette)
    ax.axhline(0, color="black", linewidth=0.8)
    modes = {s["judge_mode"] for s in summaries}
    ax.set_ylabel(
        "fine-tuned − baseline (paired)" if modes == {"absolute"} else "effect (mean score)"
    )
    ax.set_title(style.title or "effect by tier")
    _caption(fig, sum(s["invalid"] for s in summaries), sum(s.get("errors", 0) for s in summaries))
    return fig


def judged_figure(runs: list[tuple[str, list[dict[str, Any]]]], style: PlotSpec) -> Figure:
    """`spar plot`: mean fine-tuned score by tier for several judged.jsonl files, overlaid."""
    from spar.stats import estimate

    tiers = tier_order(list(dict.fromkeys(r["tier"] for _, rows in runs for r in rows)))
    series = []
    invalid = 0
    for label, rows in _by_property(runs):
        tuned = [r for r in rows if r.get("model", "finetuned") == "finetuned"]
        invalid += sum(r.get("status", "ok") != "ok" for r in tuned)
        stats = []
        for t in tiers:
            by_q: dict[str, list[float]] = {}
            for r in tuned:
                if r["tier"] == t and r.get("status", "ok") == "ok":
                    by_q.setdefault(r["question"], []).append(float(r["score"]))
            stats.append(estimate([list(by_q.values())]).as_json())
        series.append((label, stats))
    fig, ax = plt.subplots(figsize=(style.width, style.height))
    _bars(ax, tiers, series, [*style.colors[1:], *style.colors[:1], "#1b9e77", "#7570b3"])
    ax.set_ylabel("mean judge score (fine-tuned)")
    ax.set_title(style.title or "judge score by tier")
    _caption(fig, invalid)
    return fig


def _by_property(
    runs: list[tuple[str, list[dict[str, Any]]]],
) -> list[tuple[str, list[dict[str, Any]]]]:
    """Each run as is, or, when its verdicts carry `property`, one series per property
    (`label [property]`), so verdicts on different properties are never averaged together."""
    out = []
    for label, rows in runs:
        props = list(dict.fromkeys(r["property"] for r in rows if r.get("property") is not None))
        if not props:
            out.append((label, rows))
            continue
        out += [(f"{label} [{p}]", [r for r in rows if r.get("property") == p]) for p in props]
    return out


def logprob_figure(summary: dict[str, Any], style: PlotSpec, title: str) -> Figure | None:
    """The log-likelihood pull per tier (`logprob:` in the spec): the pull and each
    continuation's Δ (fine-tuned − base mean log-probability per token), CI whiskers; None when
    the summary has no logprob block."""
    block = summary.get("logprob") or {}
    per = block.get("tiers") or {}
    if not per:
        return None
    tiers = tier_order(list(per))
    names = block["continuations"]
    series = [(f"pull = {block['pull_definition']}", [per[t]["pull"] for t in tiers])]
    if len(names) > 1:
        series += [(f"Δ({c})", [per[t]["delta"][c] for t in tiers]) for c in names]
    fig, ax = plt.subplots(figsize=(style.width, style.height))
    _bars(ax, tiers, series, [*style.colors[1:2], "#1b9e77", "#7570b3", "#e7298a"])
    ax.legend(fontsize=8)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("fine-tuned − base log-prob per token (nats)")
    ax.set_title(f"{title}: log-likelihood pull of reference continuations")
    fig.text(
        0.01,
        0.005,
        "Δ(c): fine-tuned − base mean log-probability per token of continuation c, given the "
        "question; no sampling, no judge",
        fontsize=8,
    )
    return fig


def png(fig: Figure, dpi: int) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()
