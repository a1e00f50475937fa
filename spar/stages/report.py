"""report: per-tier mean scores (baseline / fine-tuned), invalid counts, a bar chart.

Invalid verdicts are counted, never folded into a mean. Plot styling is cosmetic: not in the
fingerprint. (Bootstrap CIs and the full report are a later issue.)
"""

from __future__ import annotations

import io
import json
from typing import Any, ClassVar

from spar.spec import Spec
from spar.stages.base import RunContext, StageKind


def summarise(spec: Spec, rows: list[dict[str, Any]]) -> dict[str, Any]:
    assert spec.eval.tiers is not None
    models = sorted({r["model"] for r in rows}, key=["baseline", "finetuned"].index)
    tiers: dict[str, Any] = {}
    for tier in spec.eval.tiers:
        per: dict[str, Any] = {}
        for model in models:
            sel = [r for r in rows if r["tier"] == tier and r["model"] == model]
            ok = [float(r["score"]) for r in sel if r["status"] == "ok"]
            per[model] = {
                "mean": sum(ok) / len(ok) if ok else None,
                "n": len(ok),
                "invalid": len(sel) - len(ok),
                "exhibits_rate": (
                    sum(s >= spec.report.exhibits_threshold for s in ok) / len(ok) if ok else None
                ),
            }
        if (
            "baseline" in per
            and per["baseline"]["mean"] is not None
            and per["finetuned"]["mean"] is not None
        ):
            per["delta"] = per["finetuned"]["mean"] - per["baseline"]["mean"]
        tiers[tier] = per
    return {
        "experiment": spec.name,
        "framing": spec.framing,
        "judge_mode": spec.judge.mode,
        "scale": {"min": spec.judge.scale.min, "max": spec.judge.scale.max},
        "models": models,
        "tiers": tiers,
        "invalid": sum(r["status"] != "ok" for r in rows),
    }


def plot_png(spec: Spec, summary: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = spec.report.plot
    tiers = list(summary["tiers"])
    models = summary["models"]
    fig, ax = plt.subplots(figsize=(style.width, style.height))
    width = 0.8 / len(models)
    for m, model in enumerate(models):
        means = [summary["tiers"][t][model]["mean"] or 0.0 for t in tiers]
        xs = [i + (m - (len(models) - 1) / 2) * width for i in range(len(tiers))]
        ax.bar(xs, means, width, label=model, color=style.colors[m % len(style.colors)])
    ax.set_xticks(range(len(tiers)), tiers)
    ax.set_ylim(
        summary["scale"]["min"] - 0.5 if summary["scale"]["min"] > 0 else 0, summary["scale"]["max"]
    )
    ax.set_ylabel(f"mean judge score ({summary['judge_mode']})")
    ax.set_title(style.title or f"{spec.name}" + (f" ({spec.framing})" if spec.framing else ""))
    ax.legend()
    if summary["invalid"]:
        fig.text(0.01, 0.01, f"{summary['invalid']} invalid verdicts excluded", fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=style.dpi, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


class ReportStage(StageKind):
    kind = "report"
    version = 1
    outputs: ClassVar[tuple[str, ...]] = ("summary.json", "plot.png")
    param_keys: ClassVar[tuple[str, ...]] = ("report.exhibits_threshold",)

    def run(self, ctx: RunContext) -> dict[str, bytes]:
        rows = [
            json.loads(line)
            for line in ctx.upstream_file("judge", "judged.jsonl").read_text().splitlines()
            if line.strip()
        ]
        summary = summarise(ctx.spec, rows)
        return {
            "summary.json": (json.dumps(summary, indent=2) + "\n").encode(),
            "plot.png": plot_png(ctx.spec, summary),
        }
