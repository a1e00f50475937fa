"""plot: render the report — per-experiment chart, compare chart, self-contained HTML.

Its parameters are the plot styling and the labels it writes (the experiment's name and framing,
and those of the experiments it compares itself with), so a styling or label edit re-renders here
and nowhere else: nothing is re-judged or re-sampled.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, ClassVar

from spar.spec import PlotSpec
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
from spar.store import read_jsonl

if TYPE_CHECKING:
    from spar.spec import Spec


class PlotParams(Params):
    # the labels this stage writes into its outputs
    experiment: str = key("name")
    framing: str = key("framing")
    # one per compared experiment, in `compare:i` order
    compare_labels: tuple[str, ...] = key("report.compare.labels")
    style: PlotSpec = key("report.plot")


def label(name: str, framing: str) -> str:
    return framing or name


class PlotStage(StageKind[PlotParams, Options]):
    kind = "plot"
    version = 2
    outputs: ClassVar[tuple[str, ...]] = ("plot.png", "compare.png", "report.html")
    params_model = PlotParams

    def nodes(self, spec: Spec, g: GraphContext) -> list[StageNode[PlotParams, Options]]:
        params = PlotParams(
            experiment=spec.name,
            framing=spec.framing,
            compare_labels=tuple(lab for _, lab in g.compared),
            style=spec.report.plot,
        )
        upstream = {s: s for s in ("report", "judge", "sample_base", "sample_finetuned")}
        upstream |= {f"compare:{i}": f"{name}/report" for i, (name, _) in enumerate(g.compared)}
        return [StageNode("plot", self, spec.name, params, Options(), upstream=upstream)]

    def run(self, ctx: RunContext[PlotParams, Options]) -> StageResult:
        from spar.html import answer_rows, render_report
        from spar.plots import compare_figure, experiment_figure, png

        p = ctx.params
        style = p.style
        summary = json.loads(ctx.upstream_file("report", "summary.json").read_text())
        title = p.experiment + (f" ({p.framing})" if p.framing else "")
        plot = png(experiment_figure(summary, style, title), style.dpi)
        others = [
            json.loads(ctx.upstream_file(f"compare:{i}", "summary.json").read_text())
            for i in range(len(p.compare_labels))
        ]
        labels = [label(p.experiment, p.framing), *p.compare_labels]
        compare = png(compare_figure([summary, *others], labels, style), style.dpi)
        rows = answer_rows(
            read_jsonl(ctx.upstream_file("sample_base", "samples.jsonl")),
            read_jsonl(ctx.upstream_file("sample_finetuned", "samples.jsonl")),
            read_jsonl(ctx.upstream_file("judge", "judged.jsonl")),
        )
        html = render_report(summary, plot, rows, p.experiment, p.framing)
        outputs = {"plot.png": plot, "compare.png": compare, "report.html": html.encode()}
        return StageResult(outputs)
