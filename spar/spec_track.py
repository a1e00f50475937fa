"""Spec model of `report.track:` — optional experiment tracking (Weights & Biases, MLflow).

Each tracker named here gets one `track` stage (`track.wandb`, `track.mlflow`) after `plot`: it
logs the training metrics per step, the report's summary as scalar values and the plot images as
one run named after the experiment. What says *where* a run goes and under which name (project,
entity, MLflow experiment, tracking URI) is a parameter: an edit logs the run again there. How it
is sent (`wandb.mode`) is not: an offline run is uploaded later with `wandb sync`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# tracker -> (the module it needs, spec key)
TRACKERS: dict[str, str] = {"wandb": "wandb", "mlflow": "mlflow"}


class WandbSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    project: str = Field(min_length=1, description="W&B project the run is logged to")
    entity: str | None = Field(
        None, min_length=1, description="W&B entity (user or team); default: your default entity"
    )
    mode: Literal["online", "offline"] | None = Field(
        None,
        json_schema_extra={"cosmetic": "how the run is sent, not what is logged"},
        description="online | offline (default: WANDB_MODE, else online); an offline run is "
        "uploaded later with `wandb sync <run dir>` (track.json names it)",
    )


class MlflowSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    experiment: str = Field(min_length=1, description="MLflow experiment the run is logged to")
    tracking_uri: str | None = Field(
        None,
        min_length=1,
        description="MLflow tracking URI, e.g. http://127.0.0.1:5000 or file:./mlruns (relative "
        "to the directory spar runs in); default: MLFLOW_TRACKING_URI, else MLflow's default",
    )


class TrackSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    wandb: WandbSpec | None = Field(
        None, description="log each experiment as a Weights & Biases run (needs spar[track])"
    )
    mlflow: MlflowSpec | None = Field(
        None, description="log each experiment as an MLflow run (needs spar[track])"
    )

    @model_validator(mode="after")
    def _some_tracker(self) -> TrackSpec:
        if self.wandb is None and self.mlflow is None:
            raise ValueError("name a tracker: wandb and/or mlflow")
        return self

    def trackers(self) -> list[str]:
        """The trackers this spec logs to, in a fixed order."""
        return [t for t in TRACKERS if getattr(self, t) is not None]
