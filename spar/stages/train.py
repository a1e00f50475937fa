"""train: THE training loop of spar, written once against the Tinker client interface.

Batches of the dataset stage's datums, Adam with a linear (or constant) LR schedule over all steps,
periodic `save_state` recorded in `checkpoints.jsonl`, and a final `save_weights_for_sampler`.
A re-run after a crash resumes from the last saved state (never replaying an applied batch).
Output: `checkpoint.json` (sampler path, state path, base model, renderer) and `metrics.jsonl`.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from spar.engines.base import Engine, TrainingClient
from spar.spec import TrainingSpec
from spar.stages.base import RunContext, StageKind, StageNode
from spar.stages.dataset import row_to_datum
from spar.store import RunStore, jsonl_text, read_jsonl

log = logging.getLogger(__name__)


class CheckpointRecord(BaseModel):
    """The train stage's output; what sampling the fine-tuned model starts from."""

    model_config = ConfigDict(extra="forbid")

    engine: str
    base_model: str
    renderer: str
    sampler_path: str
    state_path: str
    steps: int


def _count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


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


CHECKPOINTS = "checkpoints.jsonl"  # tinker-cookbook's shape: name, batch, state_path, ...
STEPS = "steps.jsonl"  # one metrics row per applied batch, appended before its checkpoint


@dataclass(frozen=True)
class TrainResult:
    sampler_path: str
    state_path: str
    metrics: list[dict[str, Any]]  # every step exactly once, across resumed runs
    resumed_at: int  # batches already applied when this run started (0: a fresh start)


@dataclass(frozen=True)
class _Resume:
    batch: int  # batches already applied: training continues with batch index `batch`
    state_path: str
    metrics: list[dict[str, Any]]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Complete JSON lines only: a line cut short by a crash is ignored."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def resume_point(workdir: Path, total: int) -> _Resume | None:
    """The last saved state of an interrupted run in `workdir`, if it can be continued.

    A checkpoint row's `batch` is the number of batches already applied (tinker-cookbook's
    meaning), so training resumes *at* batch index `batch`; the batch before it is never
    replayed. Its metrics must be in the steps journal for steps 0..batch-1.
    """
    rows = [r for r in _read_jsonl(workdir / CHECKPOINTS) if r.get("state_path")]
    if not rows:
        return None
    last = rows[-1]
    batch = int(last["batch"])
    steps: dict[int, dict[str, Any]] = {}
    for row in _read_jsonl(workdir / STEPS):
        steps.setdefault(int(row["step"]), row)
    if not 0 < batch <= total or any(i not in steps for i in range(batch)):
        log.warning("%s: cannot resume from %s; training from the start", workdir, last["name"])
        return None
    return _Resume(batch, str(last["state_path"]), [steps[i] for i in range(batch)])


def train_loop(
    engine: Engine,
    base_model: str,
    rows: list[dict[str, Any]],
    cfg: TrainingSpec,
    run_id: str,
    workdir: Path,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train, resuming from the last state saved in `workdir` by an interrupted run.

    `workdir` holds `checkpoints.jsonl` and the per-step metrics journal `steps.jsonl`; both
    are appended and flushed as training goes, so a crash (even SIGKILL) loses at most the
    steps since the last `save_state`. The learning-rate schedule is a function of the global
    step, so a resumed run continues it where it stopped.
    """
    import tinker
    from tqdm import tqdm

    plan = batches(rows, cfg)
    total = len(plan)
    ckpt_log, journal = workdir / CHECKPOINTS, workdir / STEPS
    workdir.mkdir(parents=True, exist_ok=True)
    resume = resume_point(workdir, total)
    load = getattr(engine, "create_training_client_from_state_with_optimizer", None)
    client: TrainingClient
    if resume is not None and load is not None:
        log.info(
            "%s: resuming at batch %d of %d from %s", run_id, resume.batch, total, resume.state_path
        )
        client = load(resume.state_path, base_model=base_model)
        start, metrics = resume.batch, list(resume.metrics)
        # drop steps applied after the saved state, and any line a crash cut short
        _rewrite_jsonl(journal, metrics)
        _rewrite_jsonl(ckpt_log, _read_jsonl(ckpt_log))
    else:
        if resume is not None:
            log.warning(
                "%s: this engine cannot load a saved state; training from the start", run_id
            )
        client = engine.create_lora_training_client(base_model, rank=cfg.lora_rank, seed=cfg.seed)
        start, metrics = 0, []
        ckpt_log.unlink(missing_ok=True)
        journal.unlink(missing_ok=True)
    with journal.open("a") as steps_out:
        for step in tqdm(
            range(start, total), desc="train", unit="step", leave=False, initial=start, total=total
        ):
            batch = plan[step]
            datums = [row_to_datum(r) for r in batch]
            lr = learning_rate(cfg, step, total)
            fb = client.forward_backward(datums, "cross_entropy")
            opt = client.optim_step(tinker.AdamParams(learning_rate=lr))
            loss = mean_nll(fb.result(), datums)
            opt.result()
            row = {"step": step, "learning_rate": lr, "loss": loss, "batch_size": len(batch)}
            metrics.append(row)
            steps_out.write(json.dumps(row) + "\n")
            steps_out.flush()
            if on_step is not None:
                on_step(row)
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total:
                path = client.save_state(f"{run_id}-step{step + 1:06d}").result().path
                _log_checkpoint(ckpt_log, f"step{step + 1:06d}", step + 1, state_path=path)
    state = client.save_state(f"{run_id}-final").result().path
    sampler = client.save_weights_for_sampler(f"{run_id}-final").result().path
    _log_checkpoint(ckpt_log, "final", total, state_path=state, sampler_path=sampler, final=True)
    return TrainResult(sampler, state, metrics, resumed_at=start)


def _rewrite_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def _log_checkpoint(log: Path, name: str, batch: int, **fields: str | bool) -> None:
    """One row per checkpoint, in tinker-cookbook's `checkpoints.jsonl` shape."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.write(json.dumps({"name": name, "batch": batch, **fields}) + "\n")
        f.flush()


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

    def estimate(self, node: StageNode, store: RunStore, upstream_fresh: bool) -> dict[str, int]:
        """Training tokens: exact from a fresh dataset output, else ~4 bytes a token of docs."""
        spec = node.spec
        assert spec is not None
        built = store.stage_dir(node.experiment, "dataset") / "train.jsonl"
        if upstream_fresh and built.exists():
            per_epoch = sum(len(r["input"]) for r in read_jsonl(built))
        else:
            per_epoch = spec.data.docs.stat().st_size // 4
            if spec.training.max_length is not None:
                per_epoch = min(per_epoch, _count_lines(spec.data.docs) * spec.training.max_length)
        return {"training_tokens": per_epoch * spec.training.epochs}

    def run(self, ctx: RunContext) -> dict[str, bytes]:
        from spar.engines import get_engine

        spec = ctx.spec
        rows = read_jsonl(ctx.upstream_file("dataset", "train.jsonl"))
        engine = get_engine(spec.model.engine, ctx.store.scratch("engines", spec.model.engine))
        run_id = f"{spec.name}-{ctx.fingerprint[:12]}"
        workdir = ctx.store.scratch("train", ctx.fingerprint[:16])
        result = train_loop(engine, spec.model.base_model, rows, spec.training, run_id, workdir)
        sampler, state, metrics = result.sampler_path, result.state_path, result.metrics
        record = CheckpointRecord(
            engine=spec.model.engine,
            base_model=spec.model.base_model,
            renderer=spec.model.renderer,
            sampler_path=sampler,
            state_path=state,
            steps=len(metrics),
        )
        outputs = {
            "checkpoint.json": (record.model_dump_json(indent=2) + "\n").encode(),
            "metrics.jsonl": jsonl_text(metrics).encode(),
        }
        # done: a later run with this fingerprint (outputs deleted) trains afresh
        for name in (CHECKPOINTS, STEPS):
            (workdir / name).unlink(missing_ok=True)
        return outputs
