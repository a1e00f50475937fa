"""Logging one experiment to an experiment tracker: Weights & Biases or MLflow.

One function per tracker (`log_wandb`, `log_mlflow`), each importing its package only when
called; both log the same `RunData`:

- per training step (`train/metrics.jsonl`): every numeric field of the row but `step` —
  `loss`, `learning_rate`, `target_tokens`, `batch_size`, `test_nll` where evaluated
  (`test_nll_start` in row 0) — as `train/<field>` at that step;
- the report's summary (`report/summary.json`) flattened into scalar values
  (`summary_values`): per-tier effects with their intervals (`tiers/<tier>/delta/mean`,
  `.../ci_low`, `.../ci_high`, `.../p_value`, `.../p_holm`, ...), the per-model statistics, the
  exhibits rates, leakage gaps, the log-likelihood pull, invalid and error counts. W&B: the run's
  summary; MLflow: metrics at step 0;
- the plot images (`plot/plot.png`, `plot/curves.png`): W&B images at the last training step;
  MLflow artifacts under `plots/`;
- as the run's config (MLflow: params) the train stage's resolved parameters
  (`training.learning_rate`, `model.base_model.name`, ...).

The run is named after the experiment; a sweep point's run is grouped (W&B group, MLflow tag
`spar.sweep`) under the sweep's name.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from spar.errors import RunError

Tracker = Literal["wandb", "mlflow"]
Scalar = str | int | float | bool | None

# the summary.json keys that are no scalar result: curves (logged per step), copies, settings
_SKIPPED = frozenset(
    {"training", "checkpoints", "scale", "interval", "exhibits_threshold", "multiple_comparisons"}
)
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. /:]")  # MLflow's metric-name alphabet


class Logged(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int  # training steps logged
    summary_keys: list[str]
    images: list[str]


class TrackRecord(BaseModel):
    """`track.json`: where the run went and what it holds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tracker: Tracker
    run_id: str
    run_dir: str | None = None  # a local run directory (W&B: `wandb sync` it when offline)
    url: str | None = None
    logged: Logged


@dataclass(frozen=True)
class RunData:
    """What one experiment's run logs."""

    name: str  # the experiment
    steps: list[tuple[int, dict[str, float]]]
    summary: dict[str, float]
    images: dict[str, Path]  # name -> png
    config: dict[str, Scalar] = field(default_factory=dict)

    @property
    def group(self) -> str | None:
        """The sweep of a sweep point (`<sweep>/<key=value,...>`); None otherwise."""
        return self.name.split("/", 1)[0] if "/" in self.name else None

    def logged(self) -> Logged:
        return Logged(
            steps=len(self.steps), summary_keys=sorted(self.summary), images=sorted(self.images)
        )


# --------------------------------------------------------------------------- what is logged


def installed(module: str) -> bool:
    """Whether `module` can be imported (without importing it: wandb takes a second)."""
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def metric_key(key: str) -> str:
    return _BAD_KEY_CHARS.sub("_", key)


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v)


def step_metrics(rows: list[dict[str, Any]]) -> list[tuple[int, dict[str, float]]]:
    """metrics.jsonl rows -> (step, {train/<field>: value}) in step order."""
    out: list[tuple[int, dict[str, float]]] = []
    for row in rows:
        values = {
            metric_key(f"train/{k}"): x
            for k, v in row.items()
            if k != "step" and (x := _number(v)) is not None
        }
        out.append((int(row["step"]), values))
    return sorted(out, key=lambda r: r[0])


def _flatten(obj: Any, prefix: str, out: dict[str, float]) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}{k}/", out)
    elif (x := _number(obj)) is not None:
        out[metric_key(prefix.rstrip("/"))] = x


def _gap_name(gap: dict[str, Any]) -> str:
    name = f"{gap['triggered']}-vs-{gap['untriggered']}/{gap['model']}"
    return f"{name}/{gap['property']}" if gap.get("property") else name


def summary_values(summary: dict[str, Any]) -> dict[str, float]:
    """summary.json -> scalar values keyed by their path in it, `/`-separated.

    Without eval.conditions the top-level layout (`tiers/<tier>/delta/mean`, `invalid`, ...)
    plus the one condition's own blocks (`exhibits_rate/...`, `format_adherence/...`); with them,
    `conditions/<condition>/...`. Leakage gaps: `gaps/<triggered>-vs-<untriggered>/<model>/...`.
    Strings (methods, estimands), lists (curves) and booleans are not values."""
    out: dict[str, float] = {}
    conditions: dict[str, Any] = summary.get("conditions") or {}
    for k, v in summary.items():
        if k in _SKIPPED or k in ("conditions", "gaps"):
            continue
        _flatten(v, f"{k}/", out)
    for gap in summary.get("gaps") or []:
        _flatten(gap, f"gaps/{_gap_name(gap)}/", out)
    for c, block in conditions.items():
        if not isinstance(block, dict):
            continue
        if c == "" and "tiers" in summary:  # the unnamed condition: its top-level copy is read
            for k, v in block.items():
                if k not in summary and k not in _SKIPPED:
                    _flatten(v, f"{k}/", out)
        else:
            for k, v in block.items():
                if k not in _SKIPPED:
                    _flatten(v, f"conditions/{c}/{k}/", out)
    return out


def config_values(params: dict[str, Any], prefix: str = "") -> dict[str, Scalar]:
    """A params file's resolved parameters -> flat config values (lists as their text)."""
    out: dict[str, Scalar] = {}
    for k, v in params.items():
        if isinstance(v, dict):
            out |= config_values(v, f"{prefix}{k}.")
        elif isinstance(v, list):
            out[f"{prefix}{k}"] = str(v)
        else:
            out[f"{prefix}{k}"] = v
    return out


# --------------------------------------------------------------------------- W&B


def _wandb_settings(wandb: Any) -> Any:
    """Quiet, and nothing recorded about this machine or process: the run is logged after the
    fact (system metrics would be spar's, not training's). Only settings this version knows."""
    wanted: dict[str, Any] = {
        "silent": True,
        "console": "off",
        "save_code": False,
        "disable_git": True,
        "disable_job_creation": True,
        "x_disable_stats": True,
        "x_disable_meta": True,
        "x_save_requirements": False,
    }
    known = getattr(wandb.Settings, "model_fields", None)
    if known is not None:
        wanted = {k: v for k, v in wanted.items() if k in known}
    else:  # an older, non-pydantic Settings
        wanted = {k: v for k, v in wanted.items() if not k.startswith("x_")}
    return wandb.Settings(**wanted)


def log_wandb(
    data: RunData,
    *,
    project: str,
    entity: str | None,
    mode: Literal["online", "offline"] | None,
) -> TrackRecord:
    """Log `data` as one W&B run; `mode` None: WANDB_MODE decides (else online)."""
    import wandb

    try:
        run = wandb.init(
            project=project,
            entity=entity,
            name=data.name,
            group=data.group,
            job_type="spar",
            config=dict(data.config),
            mode=mode,
            settings=_wandb_settings(wandb),
        )
    except Exception as e:
        raise RunError(f"report.track.wandb: cannot start a run: {e}") from e
    try:
        last = 0
        for step, values in data.steps:
            run.log(values, step=step)
            last = step
        if data.images:
            run.log({k: wandb.Image(str(p)) for k, p in data.images.items()}, step=last)
        run.summary.update(dict(data.summary))
        run_id = str(run.id)
        run_dir = str(Path(run.dir).parent)
        url = None if mode == "offline" else _wandb_url(run)
    except Exception as e:
        run.finish(exit_code=1)
        raise RunError(f"report.track.wandb: logging failed: {e}") from e
    run.finish()
    return TrackRecord(
        tracker="wandb", run_id=run_id, run_dir=run_dir, url=url, logged=data.logged()
    )


def _wandb_url(run: Any) -> str | None:
    try:
        url = run.url
    except Exception:  # offline runs have none (some versions raise)
        return None
    return str(url) if url else None


# --------------------------------------------------------------------------- MLflow

_BATCH = 1000  # MLflow's limits per log_batch: metrics
_PARAM_BATCH = 100  # params
_PARAM_CHARS = 500  # the smallest param-value limit of the MLflow versions spar allows


def log_mlflow(data: RunData, *, experiment: str, tracking_uri: str | None) -> TrackRecord:
    """Log `data` as one MLflow run in `experiment`; `tracking_uri` None: MLFLOW_TRACKING_URI,
    else MLflow's default."""
    from mlflow.entities import Metric, Param, RunStatus
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri=tracking_uri)
        found = client.get_experiment_by_name(experiment)
        exp_id = found.experiment_id if found is not None else client.create_experiment(experiment)
        tags = {"spar.experiment": data.name}
        if data.group is not None:
            tags["spar.sweep"] = data.group
        run = client.create_run(exp_id, run_name=data.name, tags=tags)
    except Exception as e:
        raise RunError(f"report.track.mlflow: cannot start a run: {e}") from e
    run_id = run.info.run_id
    try:
        now = int(time.time() * 1000)
        metrics = [
            Metric(k, v, now, step) for step, values in data.steps for k, v in values.items()
        ]
        metrics += [Metric(k, v, now, 0) for k, v in data.summary.items()]
        params = [Param(k, _param_text(v)) for k, v in data.config.items()]
        for i in range(0, len(params), _PARAM_BATCH):
            client.log_batch(run_id, params=params[i : i + _PARAM_BATCH])
        for i in range(0, len(metrics), _BATCH):
            client.log_batch(run_id, metrics=metrics[i : i + _BATCH])
        for p in data.images.values():
            client.log_artifact(run_id, str(p), "plots")
    except Exception as e:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise RunError(f"report.track.mlflow: logging failed: {e}") from e
    client.set_terminated(run_id)
    artifacts = str(run.info.artifact_uri or "")
    run_dir = None
    if artifacts.startswith("file:"):
        from urllib.parse import unquote, urlparse

        run_dir = str(Path(unquote(urlparse(artifacts).path)).parent)
    url = None
    uri = client.tracking_uri
    if uri.startswith(("http://", "https://")):
        url = f"{uri.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}"
    return TrackRecord(
        tracker="mlflow", run_id=run_id, run_dir=run_dir, url=url, logged=data.logged()
    )


def _param_text(v: Scalar) -> str:
    s = "" if v is None else str(v)
    return s if len(s) <= _PARAM_CHARS else s[: _PARAM_CHARS - 3] + "..."
