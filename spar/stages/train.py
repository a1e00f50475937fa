"""train: THE training loop of spar, written once against the Tinker client interface.

Batches of the dataset stage's datums, Adam with a linear (or constant) LR schedule over all steps,
periodic `save_state` recorded in `checkpoints.jsonl`, and a final `save_weights_for_sampler`.
Output: `checkpoint.json` (sampler path, state path, base model, renderer) and `metrics.jsonl`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from spar.engines.base import TrainingClient
from spar.spec import TrainingSpec
from spar.stages.base import RunContext, StageKind
from spar.stages.dataset import load_rows, row_to_datum
from spar.store import jsonl_text


class CheckpointRecord(BaseModel):
    """The train stage's output; what sampling the fine-tuned model starts from."""

    model_config = ConfigDict(extra="forbid")

    engine: str
    base_model: str
    renderer: str
    sampler_path: str
    state_path: str
    steps: int


def learning_rate(cfg: TrainingSpec, step: int, total_steps: int) -> float:
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    return cfg.learning_rate * (1.0 - step / total_steps)


def batches(rows: list[dict[str, Any]], cfg: TrainingSpec) -> list[list[dict[str, Any]]]:
    """Every epoch reshuffles (seeded); the last batch of an epoch may be short."""
    out: list[list[dict[str, Any]]] = []
    for epoch in range(cfg.epochs):
        order = list(range(len(rows)))
        random.Random(cfg.seed * 1_000_003 + epoch).shuffle(order)
        for start in range(0, len(order), cfg.batch_size):
            out.append([rows[i] for i in order[start : start + cfg.batch_size]])
    return out


def mean_nll(output: Any, datums: list[Any]) -> float:
    total, weight = 0.0, 0.0
    for out, datum in zip(output.loss_fn_outputs, datums, strict=True):
        logprobs = out["logprobs"].tolist()
        weights = datum.loss_fn_inputs["weights"].tolist()
        total -= sum(lp * w for lp, w in zip(logprobs, weights, strict=True))
        weight += sum(weights)
    return total / max(weight, 1e-12)


def train_loop(
    client: TrainingClient,
    rows: list[dict[str, Any]],
    cfg: TrainingSpec,
    run_id: str,
    checkpoints_log: Path,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[str, str, list[dict[str, Any]]]:
    """Run the loop; returns (sampler path, final state path, per-step metrics)."""
    import tinker
    from tqdm import tqdm

    plan = batches(rows, cfg)
    total = len(plan)
    metrics: list[dict[str, Any]] = []
    for step, batch in enumerate(tqdm(plan, desc="train", unit="step", leave=False)):
        datums = [row_to_datum(r) for r in batch]
        lr = learning_rate(cfg, step, total)
        fb = client.forward_backward(datums, "cross_entropy")
        opt = client.optim_step(tinker.AdamParams(learning_rate=lr))
        loss = mean_nll(fb.result(), datums)
        opt.result()
        row = {"step": step, "learning_rate": lr, "loss": loss, "batch_size": len(batch)}
        metrics.append(row)
        if on_step is not None:
            on_step(row)
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total:
            path = client.save_state(f"{run_id}-step{step + 1:06d}").result().path
            _log_checkpoint(checkpoints_log, f"step{step + 1:06d}", step + 1, state_path=path)
    state = client.save_state(f"{run_id}-final").result().path
    sampler = client.save_weights_for_sampler(f"{run_id}-final").result().path
    _log_checkpoint(checkpoints_log, "final", total, state_path=state, sampler_path=sampler)
    return sampler, state, metrics


def _log_checkpoint(log: Path, name: str, batch: int, **paths: str) -> None:
    """One row per checkpoint, in tinker-cookbook's `checkpoints.jsonl` shape."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.write(json.dumps({"name": name, "batch": batch, **paths}) + "\n")


class TrainStage(StageKind):
    kind = "train"
    version = 1
    outputs: ClassVar[tuple[str, ...]] = ("checkpoint.json", "metrics.jsonl")
    param_keys: ClassVar[tuple[str, ...]] = (
        "model.engine",
        "model.base_model",
        "training.lora_rank",
        "training.learning_rate",
        "training.lr_schedule",
        "training.batch_size",
        "training.epochs",
        "training.seed",
    )

    def run(self, ctx: RunContext) -> dict[str, bytes]:
        from spar.engines import get_engine

        spec = ctx.spec
        rows = load_rows(ctx.upstream_file("dataset", "train.jsonl"))
        engine = get_engine(spec.model.engine, ctx.store.scratch("engines", spec.model.engine))
        client = engine.create_lora_training_client(
            spec.model.base_model, rank=spec.training.lora_rank, seed=spec.training.seed
        )
        run_id = f"{spec.name}-{ctx.fingerprint[:12]}"
        log = ctx.store.scratch("train", ctx.fingerprint[:16]) / "checkpoints.jsonl"
        log.unlink(missing_ok=True)
        sampler, state, metrics = train_loop(client, rows, spec.training, run_id, log)
        record = CheckpointRecord(
            engine=spec.model.engine,
            base_model=spec.model.base_model,
            renderer=spec.model.renderer,
            sampler_path=sampler,
            state_path=state,
            steps=len(metrics),
        )
        return {
            "checkpoint.json": (record.model_dump_json(indent=2) + "\n").encode(),
            "metrics.jsonl": jsonl_text(metrics).encode(),
        }
