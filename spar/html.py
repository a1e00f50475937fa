"""A static, self-contained HTML report of one experiment (no network assets; text escaped)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import jinja2

from spar.plots import tier_order

_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)


def _fmt(stat: dict[str, Any]) -> str:
    if stat.get("mean") is None:
        return "—"
    return f"{stat['mean']:.2f} [{stat['ci_low']:.2f}, {stat['ci_high']:.2f}]"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.0f} %"


def answer_rows(
    samples_base: list[dict[str, Any]],
    samples_tuned: list[dict[str, Any]],
    judged: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """One row per item (question, sample): both answers side by side with their verdicts."""
    base = {r["item_id"]: r["response"] for r in samples_base}
    verdicts: dict[str, dict[str, dict[str, Any]]] = {}
    for j in judged:
        verdicts.setdefault(j["item_id"], {})[j["model"]] = j
    rows = []
    for r in samples_tuned:
        key = r["item_id"]
        vs = verdicts.get(key, {})
        labelled = len(vs) > 1
        scores = [
            (f"{m}: " if labelled else "", v["score"] if v["status"] == "ok" else v["status"])
            for m, v in sorted(vs.items())
        ]
        reasons = [(f"{m}: " if labelled else "", v["reasoning"]) for m, v in sorted(vs.items())]
        tuned = vs.get("finetuned")
        filter_score = "invalid" if tuned is None or tuned["score"] is None else tuned["score"]
        rows.append(
            {
                "item_id": key,
                "tier": r["tier"],
                "question": r["question"],
                "sample_index": r["sample_index"],
                "baseline": base.get(key, ""),
                "finetuned": r["response"],
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
    return _ENV.get_template("report.html.j2").render(
        s=summary,
        experiment=experiment,
        framing=framing,
        tiers=tier_order(list(summary["tiers"])),
        rows=rows,
        plot_b64=base64.b64encode(plot_png).decode(),
        fmt=_fmt,
        pct=_pct,
    )
