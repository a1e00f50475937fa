"""Matplotlib figures of report summaries (Agg backend; figures are returned, then saved)."""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from spar.spec import PlotSpec

SEMANTIC_TIERS = ("direct", "close", "distant", "very_distant")


def tier_order(tiers: list[str]) -> list[str]:
    """direct -> very_distant first, then any other tiers in the order given."""
    known = [t for t in SEMANTIC_TIERS if t in tiers]
    return known + [t for t in tiers if t not in known]


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


def _caption(fig: Figure, invalid: int, errors: int = 0) -> None:
    text = f"{invalid} invalid verdicts, {errors} judge errors"
    if invalid or errors:
        text += " (excluded from every mean)"
    fig.text(0.01, 0.005, text, fontsize=8)


def experiment_figure(summary: dict[str, Any], style: PlotSpec, title: str) -> Figure:
    """Per-tier mean score with CI whiskers: baseline vs fine-tuned (or pairwise scores)."""
    tiers = tier_order(list(summary["tiers"]))
    fig, ax = plt.subplots(figsize=(style.width, style.height))
    series = [(m, [summary["tiers"][t][m] for t in tiers]) for m in summary["models"]]
    # baseline always takes the first colour and the fine-tuned model the second
    colors = [style.colors[int(m == "finetuned") % len(style.colors)] for m in summary["models"]]
    _bars(ax, tiers, series, colors)
    lo, hi = summary["scale"]["min"], summary["scale"]["max"]
    ax.set_ylim(lo - 0.5 if lo > 0 else 0, hi + 0.1)
    mode = summary["judge_mode"]
    ax.set_ylabel("mean score vs baseline (pairwise)" if mode == "pairwise" else "mean judge score")
    ax.set_title(style.title or title)
    _caption(fig, summary["invalid"], summary.get("errors", 0))
    return fig


def effect(summary: dict[str, Any], tier: str) -> dict[str, Any]:
    """The headline effect of one tier: paired delta (absolute) or the pairwise score."""
    per = summary["tiers"][tier]
    return per["delta"] if "delta" in per else per["finetuned"]


def compare_figure(summaries: list[dict[str, Any]], labels: list[str], style: PlotSpec) -> Figure:
    """Several experiments overlaid: one series per experiment, tiers in semantic order."""
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
    for label, rows in runs:
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


def png(fig: Figure, dpi: int) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()
