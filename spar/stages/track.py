"""track: log an experiment to an experiment tracker (`report.track`) — W&B and/or MLflow.

One node per tracker the spec names, `track.wandb` and `track.mlflow`, after `plot`. Upstream:
`train` (`metrics.jsonl`, and its params file: the run's config), `report` (`summary.json`) and
`plot` (`plot.png`, `curves.png`). What is logged and how: `spar.tracking`.

Its parameters are the experiment's name (the run's name) and the tracker's settings that say
where the run goes — W&B project and entity, MLflow experiment and tracking URI; `wandb.mode`
(how it is sent) is an option. With its upstream fingerprints in its own, the stage is fresh
while nothing it logs has changed, so a second apply logs nothing twice; a retrained model, an
edited report or plot, or another project logs a new run.

Output `track.json` (`spar.tracking.TrackRecord`): `{tracker, run_id, run_dir, url, logged:
{steps, summary_keys, images}}`.

A tracker whose package is missing is an InputError before any work (`validate` for the spec
file, `check` at plan time): `report.track.wandb: install spar[track]`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from spar.errors import InputError
from spar.spec_track import TRACKERS, TrackSpec
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

OUTPUT = "track.json"
IMAGES = ("plot.png", "curves.png")


class TrackParams(Params):
    tracker: Literal["wandb", "mlflow"] = key("report.track")
    experiment: str = key("name")  # the run's name
    # the other tracker's fields are None
    project: str | None = Field(None, alias="report.track.wandb.project")
    entity: str | None = Field(None, alias="report.track.wandb.entity")
    mlflow_experiment: str | None = Field(None, alias="report.track.mlflow.experiment")
    tracking_uri: str | None = Field(None, alias="report.track.mlflow.tracking_uri")


class TrackOptions(Options):
    mode: Literal["online", "offline"] | None = None  # W&B: how the run is sent


def missing(track: TrackSpec | None) -> list[str]:
    """The trackers `track` names whose package is not installed."""
    from spar.tracking import installed

    return [t for t in (track.trackers() if track else []) if not installed(TRACKERS[t])]


def _install_error(where: str, tracker: str) -> InputError:
    return InputError(
        f"{where}: report.track.{tracker}: install spar[track] "
        f"(pip install 'spar[track]'; no module {TRACKERS[tracker]!r})"
    )


def validate(spec: Spec, where: str) -> None:
    """Before any work: every tracker the spec names is installed. InputError, one line."""
    for tracker in missing(spec.report.track):
        raise _install_error(where, tracker)


class TrackStage(StageKind[TrackParams, TrackOptions]):
    kind = "track"
    version = 1
    outputs: ClassVar[tuple[str, ...]] = (OUTPUT,)
    params_model = TrackParams

    def nodes(self, spec: Spec, g: GraphContext) -> list[StageNode[TrackParams, TrackOptions]]:
        track = spec.report.track
        if track is None:
            return []
        upstream = {"train": "train", "report": "report", "plot": "plot"}
        out: list[StageNode[TrackParams, TrackOptions]] = []
        if track.wandb is not None:
            w = track.wandb
            params = TrackParams(
                tracker="wandb", experiment=spec.name, project=w.project, entity=w.entity
            )
            options = TrackOptions(mode=w.mode)
            out.append(
                StageNode("track.wandb", self, spec.name, params, options, upstream=upstream)
            )
        if track.mlflow is not None:
            m = track.mlflow
            params = TrackParams(
                tracker="mlflow",
                experiment=spec.name,
                mlflow_experiment=m.experiment,
                tracking_uri=m.tracking_uri,
            )
            node = StageNode(
                "track.mlflow", self, spec.name, params, TrackOptions(), upstream=upstream
            )
            out.append(node)
        return out

    def check(self, node: StageNode[TrackParams, TrackOptions], records: dict[str, int]) -> None:
        from spar.tracking import installed

        if not installed(TRACKERS[node.params.tracker]):
            raise _install_error(node.experiment, node.params.tracker)

    def run(self, ctx: RunContext[TrackParams, TrackOptions]) -> StageResult:
        from spar.store import read_params
        from spar.tracking import (
            RunData,
            config_values,
            log_mlflow,
            log_wandb,
            step_metrics,
            summary_values,
        )

        p = ctx.params
        metrics = ctx.upstream_file("train", "metrics.jsonl")
        rec = read_params(metrics)
        summary = json.loads(ctx.upstream_file("report", "summary.json").read_text())
        images = {
            name.removesuffix(".png"): path
            for name in IMAGES
            if (path := ctx.upstream_file("plot", name)).is_file()
        }
        data = RunData(
            name=p.experiment,
            steps=step_metrics(read_jsonl(metrics)),
            summary=summary_values(summary),
            images=images,
            config=config_values(rec.params) if rec is not None else {},
        )
        if p.tracker == "wandb":
            assert p.project is not None
            record = log_wandb(data, project=p.project, entity=p.entity, mode=ctx.options.mode)
        else:
            assert p.mlflow_experiment is not None
            record = log_mlflow(data, experiment=p.mlflow_experiment, tracking_uri=p.tracking_uri)
        text = json.dumps(record.model_dump(mode="json"), indent=2) + "\n"
        return StageResult({OUTPUT: text.encode()})
