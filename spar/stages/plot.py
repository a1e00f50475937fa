"""plot: render the report — per-experiment chart, compare chart, curves, self-contained HTML.

`curves.png` (`spar.curves.curves_figure`): the training curve (loss per step, held-out NLL) and,
with intermediate `eval.checkpoints`, per condition the effect per tier against the checkpoint's
training step. The HTML draws the same curves as inline SVG.

Its parameters are the plot styling and the labels it writes (the experiment's name and framing,
the eval conditions' names, and those of the experiments it compares itself with), so a styling or
label edit re-renders here and nowhere else: nothing is re-judged or re-sampled.

Its upstream roles are the report, every condition's judge and sample stages (named by the stage:
`judge`, or `judge.<condition>` when the spec has eval.conditions), and `compare:i`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, ClassVar

from spar.items import stage_name
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
    # the eval conditions' names in the spec's order; () when the spec has none
    conditions: tuple[str, ...] = key("eval.conditions")
    style: PlotSpec = key("report.plot")


def label(name: str, framing: str) -> str:
    return framing or name


# per condition: the stage (base name) whose output file feeds the answers table
UPSTREAM_PER_CONDITION = {
    "judge": "judged.jsonl",
    "sample_base": "samples.jsonl",
    "sample_finetuned": "samples.jsonl",
}


class PlotStage(StageKind[PlotParams, Options]):
    kind = "plot"
    version = 5  # 5: curves.png, training and checkpoint curves in the HTML
    outputs: ClassVar[tuple[str, ...]] = ("plot.png", "compare.png", "curves.png", "report.html")
    params_model = PlotParams

    def nodes(self, spec: Spec, g: GraphContext) -> list[StageNode[PlotParams, Options]]:
        params = PlotParams(
            experiment=spec.name,
            framing=spec.framing,
            compare_labels=tuple(lab for _, lab in g.compared),
            conditions=tuple(c for c, _ in spec.eval.condition_items() if c),
            style=spec.report.plot,
        )
        upstream = {"report": "report"}
        for c in params.conditions or ("",):
            for base in UPSTREAM_PER_CONDITION:
                upstream[stage_name(base, c)] = stage_name(base, c)
        upstream |= {f"compare:{i}": f"{name}/report" for i, (name, _) in enumerate(g.compared)}
        return [StageNode("plot", self, spec.name, params, Options(), upstream=upstream)]

    def run(self, ctx: RunContext[PlotParams, Options]) -> StageResult:
        from spar.curves import curves_figure
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
        # every condition's files, in the spec's condition order (item ids include the condition)
        rows_of: dict[str, list[dict[str, Any]]] = {base: [] for base in UPSTREAM_PER_CONDITION}
        for c in p.conditions or ("",):
            for base, file in UPSTREAM_PER_CONDITION.items():
                rows_of[base] += read_jsonl(ctx.upstream_file(stage_name(base, c), file))
        rows = answer_rows(
            rows_of["sample_base"],
            rows_of["sample_finetuned"],
            rows_of["judge"],
            summary.get("property_order"),
        )
        html = render_report(summary, plot, rows, p.experiment, p.framing)
        curves = png(curves_figure(summary, style, title), style.dpi)
        outputs = {
            "plot.png": plot,
            "compare.png": compare,
            "curves.png": curves,
            "report.html": html.encode(),
        }
        return StageResult(outputs)
