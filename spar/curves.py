"""Training curves and checkpoint curves: their summary.json blocks, figure and HTML charts.

`training` (every report; from the train stage's metrics.jsonl):
`{"steps": [...], "loss": [...], "test_nll": [{"step", "value"}...], "estimand": "..."}` —
`steps`/`loss` one entry per optimiser step (`loss` measured by that step's forward_backward,
before its update: on the model after `step` updates); `test_nll` the held-out split's mean NLL
per target token on the model after `step` updates (0: the base model, evaluated only with
`training.eval_every` > 0; the last: the trained model). A non-finite loss is null.

`checkpoints` (only when `eval.checkpoints` lists intermediate steps): per condition, in
`conditions.<c>.checkpoints`, and without eval.conditions also at the top level (as `tiers` is):
`[{"step": N, "tiers": {tier: effect}}, ..., {"step": <total steps>, "final": true, "tiers": ...}]`
in step order. A tier's effect is the report's headline statistic for it, computed by the
report's own functions on that checkpoint's answers and verdicts: the paired fine-tuned −
baseline delta (`report.paired_delta`, absolute mode) or the mean pairwise score against the
baseline's answers (`report.tier_stats` of the fine-tuned model, pairwise mode), each with its
interval, p-value and estimand. These p-values are not Holm-adjusted (the family the report
adjusts is the final model's tiers).
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

from spar.items import stage_name
from spar.store import read_jsonl

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from spar.spec import PlotSpec, Spec
    from spar.stages.base import RunContext
    from spar.stages.report import ReportParams

Row = dict[str, Any]

TRAINING_ESTIMAND = (
    "loss: the mean negative log-likelihood per target token of each training batch, from that "
    "step's forward_backward (before its update: the model after `step` optimiser steps); "
    "test_nll: the mean negative log-likelihood per target token of the held-out split "
    "(data.test_size records, the same ones every time): sum of -logprob x weight over all of "
    "them / sum of their weights (tinker-cookbook's NLL evaluator), on the model after `step` "
    "optimiser steps (0: the base model). Exact values of this one run: no interval."
)

_STEP_ROLE = re.compile(r"^judge_step(\d+)(?:\.(.*))?$")


# --------------------------------------------------------------------------- report stage


def curve_upstream(spec: Spec, conditions: tuple[str, ...]) -> dict[str, str]:
    """The report's upstream roles for the curves: `train` (its metrics.jsonl and step count)
    and, per intermediate checkpoint and condition, its judge and sample stages."""
    from spar.stages.sample import checkpoint_stage
    from spar.stages.train import intermediate_checkpoints

    out = {"train": "train"}
    for step in intermediate_checkpoints(spec):
        for c in conditions:
            for kind in ("judge", "sample"):
                name = stage_name(checkpoint_stage(kind, step), c)
                out[name] = name
    return out


def training_block(metrics: list[Row]) -> Row:
    """summary.json's `training` block from the train stage's metrics.jsonl rows."""
    test: list[Row] = []
    if metrics and metrics[0].get("test_nll_start") is not None:
        test.append({"step": 0, "value": _finite(metrics[0]["test_nll_start"])})
    test += [
        {"step": int(r["step"]) + 1, "value": _finite(r["test_nll"])}
        for r in metrics
        if r.get("test_nll") is not None
    ]
    return {
        "steps": [int(r["step"]) for r in metrics],
        "loss": [_finite(r["loss"]) for r in metrics],
        "test_nll": test,
        "estimand": TRAINING_ESTIMAND,
    }


def _finite(x: Any) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


def checkpoint_steps(upstream: dict[str, Any]) -> list[int]:
    """The intermediate checkpoint steps a report reads (from its upstream roles), ascending."""
    found = (_STEP_ROLE.match(role) for role in upstream)
    return sorted({int(m.group(1)) for m in found if m is not None})


def tier_effects(rows: list[Row], p: ReportParams) -> dict[str, Any]:
    """tier -> the headline effect of one model's score rows of one condition: the paired delta
    (absolute) or the fine-tuned model's mean pairwise score (pairwise)."""
    from spar.stages.report import paired_delta, tier_stats

    if p.mode == "absolute":
        return {t: paired_delta([rows], t, p, False) for t in p.tiers}
    return {t: tier_stats([rows], t, "finetuned", p, False) for t in p.tiers}


def add_curves(summary: Row, ctx: RunContext[Any, Any], p: ReportParams, scores: list[Row]) -> None:
    """Adds `training` and (with intermediate checkpoints) `checkpoints` to `summary`."""
    from spar.stages.report import score_rows

    if "train" not in ctx.upstream:  # a report node built without the train stage (tests)
        return
    summary["training"] = training_block(read_jsonl(ctx.upstream_file("train", "metrics.jsonl")))
    steps = checkpoint_steps(ctx.upstream)
    if not steps:
        return
    total = len(summary["training"]["steps"])
    for c in p.conditions:
        base = read_jsonl(ctx.upstream_file(stage_name("sample_base", c), "samples.jsonl"))
        points: list[Row] = []
        for step in steps:
            judged = read_jsonl(
                ctx.upstream_file(stage_name(f"judge_step{step}", c), "judged.jsonl")
            )
            tuned = read_jsonl(
                ctx.upstream_file(stage_name(f"sample_step{step}", c), "samples.jsonl")
            )
            rows = score_rows(p, c, judged, {"baseline": base, "finetuned": tuned})
            points.append({"step": step, "tiers": tier_effects(rows, p)})
        final = [r for r in scores if r["condition"] == c]
        points.append({"step": total, "final": True, "tiers": tier_effects(final, p)})
        summary["conditions"][c]["checkpoints"] = points
    if p.conditions == ("",):
        summary["checkpoints"] = summary["conditions"][""]["checkpoints"]


# --------------------------------------------------------------------------- charts


def checkpoints_of(summary: Row) -> dict[str, list[Row]]:
    """condition ("" without eval.conditions) -> its checkpoint points; {} without them."""
    out = {
        c: block["checkpoints"]
        for c, block in summary.get("conditions", {}).items()
        if block.get("checkpoints")
    }
    if not out and summary.get("checkpoints"):
        out[""] = summary["checkpoints"]
    return out


def effect_label(summary: Row) -> str:
    if summary.get("judge_mode") == "pairwise":
        return "mean pairwise score vs the baseline"
    return "fine-tuned − baseline (paired delta)"


PALETTE = ("#d95f02", "#1b9e77", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d")
W, H = 640.0, 260.0
LEFT, RIGHT, TOP, BOTTOM = 60.0, 16.0, 14.0, 40.0


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values covering [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    out, v = [], first
    while v <= hi + 1e-9 * step:
        out.append(round(v, 10))
        v += step
    return out


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def line_chart(
    series: list[Row], x_label: str, y_label: str, zero_line: bool = False
) -> Row | None:
    """Geometry of an SVG line chart (the template draws it): every series is
    `{name, cls, color, points: [{step, value, lo?, hi?}], line: bool}`; points with a None
    value are left out. Returns the series with pixel coordinates, the axes' ticks and the
    chart size; None when no series has a point."""
    pts = [(pt, s) for s in series for pt in s["points"] if pt.get("value") is not None]
    if not pts:
        return None
    xs = [float(pt["step"]) for pt, _ in pts]
    ys = [
        float(v)
        for pt, _ in pts
        for v in (pt["value"], pt.get("lo"), pt.get("hi"))
        if v is not None
    ]
    if zero_line:
        ys.append(0.0)
    x0, x1 = min(0.0, *xs), max(xs) if max(xs) > 0 else 1.0
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.06 or abs(y1) * 0.1 or 1.0
    y0, y1 = y0 - pad, y1 + pad

    def px(x: float) -> float:
        return round(LEFT + (x - x0) / (x1 - x0) * (W - LEFT - RIGHT), 2)

    def py(y: float) -> float:
        return round(TOP + (y1 - y) / (y1 - y0) * (H - TOP - BOTTOM), 2)

    drawn = []
    for s in series:
        marks = []
        for pt in s["points"]:
            if pt.get("value") is None:
                continue
            mark = {
                "step": pt["step"],
                "value": pt["value"],
                "x": px(float(pt["step"])),
                "y": py(float(pt["value"])),
            }
            if pt.get("lo") is not None and pt.get("hi") is not None:
                mark |= {"lo_y": py(float(pt["lo"])), "hi_y": py(float(pt["hi"]))}
            marks.append(mark)
        drawn.append(
            {
                **{k: s[k] for k in ("name", "cls", "color")},
                "line": s.get("line", True),
                "markers": s.get("markers", True),
                "marks": marks,
                "polyline": " ".join(f"{m['x']},{m['y']}" for m in marks),
            }
        )
    x_ticks = [t for t in _ticks(x0, x1, 6) if float(t).is_integer()] or [x0, x1]
    return {
        "width": W,
        "height": H,
        "plot": {"left": LEFT, "right": W - RIGHT, "top": TOP, "bottom": H - BOTTOM},
        "x_ticks": [{"x": px(t), "label": f"{t:.0f}"} for t in x_ticks],
        "y_ticks": [{"y": py(t), "label": _fmt(t)} for t in _ticks(y0, y1)],
        "zero_y": py(0.0) if zero_line and y0 <= 0 <= y1 else None,
        "x_label": x_label,
        "y_label": y_label,
        "series": drawn,
    }


def training_chart(summary: Row) -> Row | None:
    """The training curve: loss per step (a line) and the held-out NLL (points joined)."""
    t = summary.get("training")
    if not t:
        return None
    loss = [{"step": s, "value": v} for s, v in zip(t["steps"], t["loss"], strict=True)]
    return line_chart(
        [
            {
                "name": "training loss",
                "cls": "loss",
                "color": "#8c8c8c",
                "points": loss,
                "markers": False,
            },
            {
                "name": "held-out NLL",
                "cls": "test-nll",
                "color": "#d95f02",
                "points": t["test_nll"],
            },
        ],
        "optimiser steps applied",
        "NLL per target token (nats)",
    )


def checkpoint_chart(summary: Row, points: list[Row]) -> Row | None:
    """The checkpoint curve of one condition: a tier's effect (with its interval) per step."""
    tiers = list(dict.fromkeys(t for pt in points for t in pt["tiers"]))
    series = []
    for k, tier in enumerate(tiers):
        series.append(
            {
                "name": tier,
                "cls": "tier",
                "color": PALETTE[k % len(PALETTE)],
                "points": [
                    {
                        "step": pt["step"],
                        "value": pt["tiers"][tier].get("mean"),
                        "lo": pt["tiers"][tier].get("ci_low"),
                        "hi": pt["tiers"][tier].get("ci_high"),
                    }
                    for pt in points
                    if tier in pt["tiers"]
                ],
            }
        )
    return line_chart(
        series,
        "training step of the checkpoint",
        effect_label(summary),
        zero_line=summary.get("judge_mode") != "pairwise",
    )


# --------------------------------------------------------------------------- figure


def curves_figure(summary: Row, style: PlotSpec, title: str) -> Figure:
    """curves.png: the training curve (loss per step, held-out NLL), then per condition the
    effect per tier against the checkpoint's step (with its interval) when the spec has
    intermediate checkpoints."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from spar.plots import tier_order

    per_condition = checkpoints_of(summary)
    panels = 1 + len(per_condition)
    fig, axes = plt.subplots(
        1,
        panels,
        figsize=(style.width * (1 + 0.7 * (panels - 1)), style.height),
        squeeze=False,
    )
    ax = axes[0][0]
    t = summary.get("training")
    if t and t["steps"]:
        xs = [s for s, v in zip(t["steps"], t["loss"], strict=True) if v is not None]
        ax.plot(xs, [v for v in t["loss"] if v is not None], color="#8c8c8c", label="training loss")
        if t["test_nll"]:
            ax.plot(
                [p["step"] for p in t["test_nll"]],
                [p["value"] if p["value"] is not None else float("nan") for p in t["test_nll"]],
                "o-",
                color=style.colors[1 % len(style.colors)],
                label="held-out NLL",
            )
        ax.set_xlabel("optimiser steps applied")
        ax.set_ylabel("NLL per target token (nats)")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no training metrics", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("training")
    for k, (condition, points) in enumerate(per_condition.items(), start=1):
        ax = axes[0][k]
        tiers = tier_order(list(dict.fromkeys(tr for pt in points for tr in pt["tiers"])))
        for j, tier in enumerate(tiers):
            stats = [(pt["step"], pt["tiers"][tier]) for pt in points if tier in pt["tiers"]]
            stats = [(x, e) for x, e in stats if e.get("mean") is not None]
            means = [e["mean"] for _, e in stats]
            # a point without an interval (one question) draws no whisker
            lo = [m - _or(e.get("ci_low"), m) for m, (_, e) in zip(means, stats, strict=True)]
            hi = [_or(e.get("ci_high"), m) - m for m, (_, e) in zip(means, stats, strict=True)]
            ax.errorbar(
                [x for x, _ in stats],
                means,
                yerr=[lo, hi],
                fmt="o-",
                capsize=3,
                color=PALETTE[j % len(PALETTE)],
                label=tier,
            )
        if summary.get("judge_mode") != "pairwise":
            ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xlabel("training step of the checkpoint")
        ax.set_ylabel(effect_label(summary))
        ax.set_title(f"checkpoints{f' ({condition})' if condition else ''}")
        ax.legend(fontsize=8)
    for ax in axes[0]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole
    fig.suptitle(style.title or title)
    fig.tight_layout()
    return fig


def _or(x: float | None, default: float) -> float:
    return default if x is None else x


# --------------------------------------------------------------------------- HTML


def html_parts(summary: Row) -> Row:
    """What the report page's training and checkpoint sections draw (spar.html passes these to
    the template): the training chart, and per condition with checkpoints its table rows,
    tiers and chart."""
    from spar.plots import tier_order

    sections = []
    for c, points in checkpoints_of(summary).items():
        tiers = tier_order(list(dict.fromkeys(t for pt in points for t in pt["tiers"])))
        sections.append(
            {
                "condition": c,
                "suffix": f"-{c}" if c else "",
                "tiers": tiers,
                "points": points,
                "chart": checkpoint_chart(summary, points),
            }
        )
    return {
        "training_chart": training_chart(summary),
        "checkpoint_sections": sections,
        "effect_label": effect_label(summary),
    }
