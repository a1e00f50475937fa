"""plot: render the report — per-experiment chart, compare chart, self-contained HTML.

Its fingerprint holds only the plot styling (and its upstreams), so a styling edit re-renders
here and nowhere else: nothing is re-judged or re-sampled.
"""

from __future__ import annotations

import json
from typing import ClassVar

from spar.stages.base import RunContext, StageKind
from spar.store import read_jsonl


class PlotStage(StageKind):
    kind = "plot"
    version = 1
    outputs: ClassVar[tuple[str, ...]] = ("plot.png", "compare.png", "report.html")
    param_keys: ClassVar[tuple[str, ...]] = ("report.plot",)

    def run(self, ctx: RunContext) -> dict[str, bytes]:
        from spar.html import answer_rows, render_report
        from spar.plots import compare_figure, experiment_figure, png

        spec = ctx.spec
        style = spec.report.plot
        summary = json.loads(ctx.upstream_file("report", "summary.json").read_text())
        title = spec.name + (f" ({spec.framing})" if spec.framing else "")
        plot = png(experiment_figure(summary, style, title), style.dpi)
        others = [u for u in ctx.node.upstream if u.endswith("/report")]
        summaries = [summary] + [
            json.loads(ctx.upstream_file(u, "summary.json").read_text()) for u in others
        ]
        labels = [s["framing"] or s["experiment"] for s in summaries]
        compare = png(compare_figure(summaries, labels, style), style.dpi)
        rows = answer_rows(
            read_jsonl(ctx.upstream_file("sample_base", "samples.jsonl")),
            read_jsonl(ctx.upstream_file("sample_finetuned", "samples.jsonl")),
            read_jsonl(ctx.upstream_file("judge", "judged.jsonl")),
        )
        html = render_report(summary, plot, rows)
        return {"plot.png": plot, "compare.png": compare, "report.html": html.encode()}
