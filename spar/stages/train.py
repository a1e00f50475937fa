"""train: THE training loop of spar, written once against the Tinker client interface.

Batches of the dataset stage's datums, Adam with a linear, cosine or constant LR schedule over all
steps (after an optional linear warm-up, `training.warmup_ratio`; see `learning_rate`), periodic
`save_state` recorded in `checkpoints.jsonl`, and a final `save_weights_for_sampler`.
A re-run after a crash resumes from the last saved state (never replaying an applied batch).
Output: `checkpoint.json` (sampler path, state path, base model, renderer, steps; with
intermediate `eval.checkpoints` also `checkpoints: {"<step>": "<sampler path>"}`) and
`metrics.jsonl`.

`metrics.jsonl` has one row per step: `step`, `learning_rate` (the rate that step's optimiser step
used), `loss`, `target_tokens` and `batch_size` (datums in the batch). `loss` is the mean negative
log-likelihood *per target token*: the batch's loss-weighted NLL divided by `target_tokens`, the
summed loss weights of the batch (the number of tokens trained on, e.g. the assistant turns; the
masked user turns weigh 0). It is comparable across batch sizes and document lengths: for a
pretrained model on natural text expect roughly 1-5 nats per token; a loss in the hundreds means a
sum over tokens, not a mean (the seed-004 "collapse" diagnostic). A non-finite loss (nan/inf: a
diverged run) is logged as a warning and recorded as it is; training goes on.

Held-out NLL (the dataset's `test.jsonl`, `data.test_size` records): `test_nll` is the mean NLL
per target token of the whole held-out split — the sum of -logprob x weight over every held-out
datum divided by the sum of their weights (tinker-cookbook's NLL evaluator), computed with the
training client's `forward(data, "cross_entropy")` (no gradient, no update). It is in the row of
step s when it was evaluated *after that step's optimiser update*, i.e. on the model after s + 1
steps: every `training.eval_every` steps ((s + 1) % eval_every == 0) and after the last step
(also with eval_every 0). With eval_every > 0, row 0 also has `test_nll_start`: the base model's
held-out NLL, before any update. (A row's `loss` is measured before its update, on the model after
s steps.) No held-out split (test_size 0): no `test_nll`. A resumed run keeps the journaled rows,
their `test_nll` with them, and evaluates the steps it redoes again.

Checkpoints (`eval.checkpoints`): after step s, when s + 1 is one of the listed steps, the
weights are saved for sampling (`save_weights_for_sampler`, named `<run>-step<NNNNNN>`) and
journaled (a `sampler<NNNNNN>` row in `checkpoints.jsonl`, no state: not a resume point). A listed
step equal to the total is the final weights. A resumed run keeps those saved before its state
and saves again those it redoes; `checkpoint.json`'s `checkpoints` maps each step to its path.

Pipelined (tinker-cookbook's pattern): batch k + 1's forward_backward and optim_step are sent
before batch k's results are awaited (`LoopConfig.pipeline_depth` batches ahead, 1 by default; 0
is the serial loop), so a remote service never idles between steps while a result travels back.
The server executes one client's requests in the order they were sent: batch k, then what is due
after it (the held-out forward, the sampler weights, the state), then batch k + 1 — the same
requests in the same order as the serial loop, hence the same losses and weights. Results are
awaited and journaled in step order, a checkpoint row only once its save answered, and a
`save_state` drains the pipeline before the next batch is sent: a resume point still means
"batches before it applied, none after", and a crash loses at most the batches since it. An
intermediate checkpoint's `save_weights_for_sampler` drains it too (the SDK orders that request
only when it is sent, so the next batch could overtake it).
"""

from __future__ import annotations

import logging
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from spar.engines.base import Engine, Future, TrainingClient
from spar.errors import InputError, RunError
from spar.progress import label
from spar.stages.base import (
    Flags,
    GraphContext,
    Options,
    Params,
    RunContext,
    StageKind,
    StageNode,
    StageResult,
    Stopped,
    key,
)
from spar.stages.dataset import apportion, row_to_datum
from spar.stages.models import ModelRef, model_ref
from spar.store import RunStore, atomic_write_text, jsonl_text, read_jsonl

if TYPE_CHECKING:
    from spar.spec import Spec
    from spar.store.state import State

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
    # intermediate sampler weights: step (a string: a JSON key) -> sampler path; None: none asked
    checkpoints: dict[str, str] | None = None


Schedule = Literal["linear", "constant", "cosine"]
PIPELINE_DEPTH = 1  # tinker-cookbook's submit_ahead: batch k+1 goes out before k's results


class LoopConfig(BaseModel):
    """What the training loop needs: the train stage's parameters plus `save_every`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lora_rank: int = 32
    learning_rate: float = 1e-4
    lr_schedule: Schedule = "linear"
    warmup_ratio: float = 0.0
    batch_size: int = 8
    epochs: int = 1
    seed: int = 0
    save_every: int = 0
    eval_every: int = 0  # held-out NLL every N steps and at the end (when there is a test split)
    checkpoints: tuple[int, ...] = ()  # steps whose weights are saved for sampling
    # batches submitted before the results of the one before them are awaited (0: the serial
    # loop). Not a training parameter: the same requests reach the server in the same order.
    pipeline_depth: int = Field(PIPELINE_DEPTH, ge=0)


def warmup_steps(warmup_ratio: float, total_steps: int) -> int:
    """`warmup_ratio * total_steps` rounded to the nearest whole step, a half rounding up
    (0.25 * 10 = 2.5 -> 3), and never more than `total_steps`."""
    return min(total_steps, math.floor(warmup_ratio * total_steps + 0.5))


def learning_rate(cfg: LoopConfig, step: int, total_steps: int) -> float:
    """The learning rate of global step `step` (0-based) of `total_steps`.

    With W = `warmup_steps(cfg.warmup_ratio, total_steps)` (see there for the rounding) and
    peak rate `lr`, every schedule first warms up linearly: step s < W uses lr * (s + 1) / W,
    so the first step uses lr / W and step W - 1 the full lr. The remaining steps, at
    progress p = (s - W) / (total_steps - W) (0 at the first of them), use
    - constant: lr;
    - linear: lr * (1 - p), decaying towards 0 (the last step uses lr / (total_steps - W));
    - cosine: lr * 0.5 * (1 + cos(pi * p)), from lr towards 0.
    Without warm-up (W = 0) linear is lr * (1 - s / total_steps), as it always was.
    """
    lr = cfg.learning_rate
    warm = warmup_steps(cfg.warmup_ratio, total_steps)
    if step < warm:
        return lr * (step + 1) / warm
    if cfg.lr_schedule == "constant":
        return lr
    progress = (step - warm) / (total_steps - warm)
    if cfg.lr_schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr * (1.0 - progress)


def batches(rows: list[dict[str, Any]], cfg: LoopConfig) -> list[list[dict[str, Any]]]:
    """Every epoch reshuffles (seeded); the last batch of an epoch may be short."""
    out: list[list[dict[str, Any]]] = []
    for epoch in range(cfg.epochs):
        order = list(range(len(rows)))
        random.Random(cfg.seed * 1_000_003 + epoch).shuffle(order)
        for start in range(0, len(order), cfg.batch_size):
            out.append([rows[i] for i in order[start : start + cfg.batch_size]])
    return out


def target_tokens(datums: list[Any]) -> float:
    """The summed loss weights of a batch: how many target tokens it trains on."""
    return float(sum(sum(d.loss_fn_inputs["weights"].tolist()) for d in datums))


def mean_nll(output: Any, datums: list[Any]) -> float:
    """The batch's loss-weighted NLL divided by its summed weights: a loss per target token
    (0.0 for a batch without target tokens)."""
    total = 0.0
    for out, datum in zip(output.loss_fn_outputs, datums, strict=True):
        logprobs = out["logprobs"].tolist()
        weights = datum.loss_fn_inputs["weights"].tolist()
        total -= sum(lp * w for lp, w in zip(logprobs, weights, strict=True))
    return total / max(target_tokens(datums), 1e-12)


def held_out_nll(client: TrainingClient, datums: list[Any], batch_size: int) -> float:
    """Mean NLL per target token of `datums` under the client's current weights:
    sum(-logprob x weight) / sum(weight) over all of them (tinker-cookbook's NLL evaluator), from
    `forward(..., "cross_entropy")` in chunks of `batch_size` (every request sent before the
    first result is awaited). nan when the datums have no target token."""
    return collect_nll(submit_forwards(client, datums, batch_size))


def submit_forwards(
    client: TrainingClient, datums: list[Any], batch_size: int
) -> list[tuple[Future, list[Any]]]:
    """`forward(..., "cross_entropy")` of `datums` in chunks of `batch_size`, every request sent
    and none awaited: (future, chunk) pairs for `collect_nll`."""
    chunks = [datums[i : i + batch_size] for i in range(0, len(datums), batch_size)]
    return [(client.forward(chunk, "cross_entropy"), chunk) for chunk in chunks]


def collect_nll(forwards: list[tuple[Future, list[Any]]]) -> float:
    """The held-out NLL per target token of `submit_forwards`' requests (see `held_out_nll`)."""
    nll = weight = 0.0
    for fut, chunk in forwards:
        for out, datum in zip(fut.result().loss_fn_outputs, chunk, strict=True):
            logprobs = out["logprobs"].tolist()
            weights = datum.loss_fn_inputs["weights"].tolist()
            nll -= sum(lp * w for lp, w in zip(logprobs, weights, strict=True))
            weight += sum(weights)
    return nll / weight if weight > 0 else math.nan


def eval_due(step: int, total: int, eval_every: int) -> bool:
    """Is the held-out split evaluated after step `step` (0-based) of `total`: every
    `eval_every` steps and after the last one."""
    return step + 1 == total or (eval_every > 0 and (step + 1) % eval_every == 0)


def checkpoint_error(
    checkpoints: tuple[int, ...], records: int, batch_size: int, epochs: int
) -> str | None:
    """Why `eval.checkpoints` cannot be saved in a run on `records` training records (None: it
    can): a step beyond its ceil(records / batch_size) x epochs optimiser steps."""
    total = math.ceil(records / batch_size) * epochs
    beyond = [c for c in checkpoints if c > total]
    if not beyond:
        return None
    return (
        f"eval.checkpoints: step {beyond[0]} is beyond the {total} training steps "
        f"({records} training records, training.batch_size {batch_size}, "
        f"training.epochs {epochs})"
    )


CHECKPOINTS = "checkpoints.jsonl"  # tinker-cookbook's shape: name, batch, state_path, ...


@dataclass(frozen=True)
class TrainResult:
    sampler_path: str
    state_path: str
    metrics: list[dict[str, Any]]  # every step exactly once, across resumed runs
    resumed_at: int  # batches already applied when this run started (0: a fresh start)
    checkpoints: dict[int, str] = field(default_factory=dict)  # step -> sampler path


@dataclass(frozen=True)
class _Resume:
    batch: int  # batches already applied: training continues with batch index `batch`
    state_path: str
    metrics: list[dict[str, Any]]
    sampler_path: str | None = None  # saved with the state (the final checkpoint)


class TrainJournal:
    """One training run's journals in the state database: a metrics row per applied batch and a
    row per saved state, each committed at once. The checkpoint rows are mirrored to
    `<mirror>/checkpoints.jsonl` in tinker-cookbook's format, for its tools."""

    def __init__(self, state: State, run: str, mirror: Path | None = None) -> None:
        self.state, self.run, self.mirror = state, run, mirror

    def steps(self) -> list[dict[str, Any]]:
        return self.state.train_steps(self.run)

    def checkpoints(self) -> list[dict[str, Any]]:
        return self.state.train_checkpoints(self.run)

    def step(self, row: dict[str, Any]) -> None:
        self.state.train_step_put(self.run, int(row["step"]), row)

    def keep_steps_below(self, batch: int) -> None:
        self.state.train_steps_truncate(self.run, batch)

    def checkpoint(self, name: str, batch: int, **fields: str | bool) -> None:
        self.state.train_checkpoint_add(self.run, {"name": name, "batch": batch, **fields})
        self._mirror()

    def reset(self) -> None:
        self.state.train_reset(self.run)
        self._mirror()

    def _mirror(self) -> None:
        if self.mirror is not None:
            atomic_write_text(self.mirror / CHECKPOINTS, jsonl_text(self.checkpoints()))


def resume_point(journal: TrainJournal, total: int) -> _Resume | None:
    """The last saved state of an interrupted run, if it can be continued.

    A checkpoint row's `batch` is the number of batches already applied (tinker-cookbook's
    meaning), so training resumes *at* batch index `batch`; the batch before it is never
    replayed. Its metrics must be in the journal for steps 0..batch-1.
    """
    rows = [r for r in journal.checkpoints() if r.get("state_path")]
    if not rows:
        return None
    last = rows[-1]
    batch = int(last["batch"])
    steps = {int(r["step"]): r for r in journal.steps()}
    if not 0 < batch <= total or any(i not in steps for i in range(batch)):
        log.warning("%s: cannot resume from %s; training from the start", journal.run, last["name"])
        return None
    sampler = str(last["sampler_path"]) if last.get("sampler_path") else None
    return _Resume(batch, str(last["state_path"]), [steps[i] for i in range(batch)], sampler)


SAMPLER = "sampler"  # name prefix of the journal rows of intermediate sampler weights


def saved_checkpoints(
    journal: TrainJournal, cfg: LoopConfig, total: int, final_sampler: str
) -> dict[int, str]:
    """Step -> sampler path of every `cfg.checkpoints` step: the last journal row saved for it
    (a step redone after a resume was saved again), the final weights for a step == total."""
    saved = {
        int(r["batch"]): str(r["sampler_path"])
        for r in journal.checkpoints()
        if str(r["name"]).startswith(SAMPLER) and r.get("sampler_path")
    }
    saved[total] = final_sampler
    return {c: saved[c] for c in cfg.checkpoints if c in saved}


@dataclass
class _InFlight:
    """A batch submitted to the training client whose results are not yet journaled."""

    step: int
    datums: list[Any]
    lr: float
    fb: Future
    opt: Future
    evals: list[tuple[Future, list[Any]]] | None = None  # held-out forwards after its update
    sampler: Future | None = None  # save_weights_for_sampler of checkpoint step + 1
    state: Future | None = None  # save_state after it (a resume point)


def train_loop(
    engine: Engine,
    base_model: str,
    rows: list[dict[str, Any]],
    cfg: LoopConfig,
    run_id: str,
    journal: TrainJournal,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    test_rows: list[dict[str, Any]] | None = None,
    stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train, resuming from the last state an interrupted run saved in `journal`.

    Every step's metrics and every saved state are committed to the journal as training goes,
    so a crash (even SIGKILL) loses at most the steps since the last `save_state`. The journal
    is kept after training: a re-run with the same fingerprint resumes at the final state and
    applies no batch again (it returns the final checkpoint's paths, without an engine call).
    The learning-rate schedule is a function of the global step, so a resumed run continues it
    where it stopped. `test_rows` (the held-out split): evaluated as the module doc says; the
    `cfg.checkpoints` steps' weights are saved for sampling (see there).

    Pipelined (`cfg.pipeline_depth`, as the module doc says): `on_step` is called in step order
    as each batch's results are awaited, when up to `pipeline_depth` later batches may already
    have been submitted; its row is journaled before it is called.

    `stop()` true (another stage of the apply failed): no further batch is sent; what was sent
    is awaited and journaled, the state saved (a resume point) and `Stopped` raised.
    """
    import tinker
    from tqdm import tqdm

    plan = batches(rows, cfg)
    total = len(plan)
    error = checkpoint_error(cfg.checkpoints, len(rows), cfg.batch_size, cfg.epochs)
    if error is not None:
        raise RunError(error)
    test = [row_to_datum(r) for r in test_rows or ()]
    resume = resume_point(journal, total)
    if resume is not None and resume.batch == total and resume.sampler_path:
        # finished before: its final state and sampler weights are the result. Loading and saving
        # them again would only make new copies (on engine local: rewrite them in place).
        log.info("%s: all %d batches were applied; nothing to train", run_id, total)
        saved = saved_checkpoints(journal, cfg, total, resume.sampler_path)
        return TrainResult(
            resume.sampler_path,
            resume.state_path,
            resume.metrics,
            resumed_at=total,
            checkpoints=saved,
        )
    load = getattr(engine, "create_training_client_from_state_with_optimizer", None)
    client: TrainingClient
    if resume is not None and load is not None:
        log.info(
            "%s: resuming at batch %d of %d from %s", run_id, resume.batch, total, resume.state_path
        )
        client = load(resume.state_path, base_model=base_model)
        start, metrics = resume.batch, list(resume.metrics)
        journal.keep_steps_below(start)  # steps applied after the saved state are redone
    else:
        if resume is not None:
            log.warning(
                "%s: this engine cannot load a saved state; training from the start", run_id
            )
        client = engine.create_lora_training_client(base_model, rank=cfg.lora_rank, seed=cfg.seed)
        start, metrics = 0, []
        journal.reset()
    start_nll = None
    if test and start == 0 and cfg.eval_every > 0:  # the base model: where the curve starts
        start_nll = held_out_nll(client, test, cfg.batch_size)

    def submit(step: int) -> _InFlight:
        """Batch `step`'s requests, then those due at the boundary after it, in the order the
        server executes them; nothing awaited."""
        datums = [row_to_datum(r) for r in plan[step]]
        lr = learning_rate(cfg, step, total)
        fb = client.forward_backward(datums, "cross_entropy")
        opt = client.optim_step(tinker.AdamParams(learning_rate=lr))
        flight = _InFlight(step, datums, lr, fb, opt)
        if test and eval_due(step, total, cfg.eval_every):
            flight.evals = submit_forwards(client, test, cfg.batch_size)
        name = f"{run_id}-step{step + 1:06d}"
        if step + 1 in cfg.checkpoints and step + 1 < total:
            flight.sampler = client.save_weights_for_sampler(name)
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total:
            flight.state = client.save_state(name)
        return flight

    def finish(flight: _InFlight) -> None:
        """Await one submitted batch and journal it: its metrics row, then its saves."""
        step, datums = flight.step, flight.datums
        loss = mean_nll(flight.fb.result(), datums)
        flight.opt.result()
        if not math.isfinite(loss):
            log.warning("%s: step %d: loss is %s (training diverged?)", run_id, step, loss)
        row: dict[str, Any] = {
            "step": step,
            "learning_rate": flight.lr,
            "loss": loss,
            "target_tokens": target_tokens(datums),
            "batch_size": len(datums),
        }
        if flight.evals is not None:
            row["test_nll"] = collect_nll(flight.evals)
        if step == 0 and start_nll is not None:
            row["test_nll_start"] = start_nll
        metrics.append(row)
        journal.step(row)
        if on_step is not None:
            on_step(row)
        if flight.sampler is not None:
            path = flight.sampler.result().path
            journal.checkpoint(f"{SAMPLER}{step + 1:06d}", step + 1, sampler_path=path)
        if flight.state is not None:
            path = flight.state.result().path
            journal.checkpoint(f"step{step + 1:06d}", step + 1, state_path=path)

    # Up to `pipeline_depth` batches are submitted ahead of the one awaited. The server executes
    # a client's requests in submission order, so batch k's results are those of the serial
    # loop; they are journaled in step order, a save only after its result came back (every
    # step before it is journaled by then): the journal still reads "batches before the saved
    # state applied, none after". A save_state drains the pipeline before the next batch goes
    # out, so a crash redoes at most the batches since the last saved state, as serially. So
    # does a save_weights_for_sampler: the tinker SDK (0.38) takes its place in the client's
    # request order only when its coroutine runs on the SDK's thread, so a batch sent right
    # after it could overtake it (and the checkpoint would hold the next update).
    pending: deque[_InFlight] = deque()
    with tqdm(desc=label("train"), unit="step", leave=False, initial=start, total=total) as bar:
        for step in range(start, total):
            if stop is not None and stop():
                while pending:
                    finish(pending.popleft())
                saved = {int(r["batch"]) for r in journal.checkpoints() if r.get("state_path")}
                if step > start and step not in saved:  # the next apply resumes here
                    path = client.save_state(f"{run_id}-step{step:06d}").result().path
                    journal.checkpoint(f"step{step:06d}", step, state_path=path)
                raise Stopped(f"{run_id}: stopped after {step} of {total} batches")
            pending.append(submit(step))
            drain = pending[-1].state is not None or pending[-1].sampler is not None
            while pending and (drain or len(pending) > cfg.pipeline_depth):
                finish(pending.popleft())
                bar.update(1)
        final_state = client.save_state(f"{run_id}-final")
        final_sampler = client.save_weights_for_sampler(f"{run_id}-final")
        while pending:
            finish(pending.popleft())
            bar.update(1)
    state = final_state.result().path
    sampler = final_sampler.result().path
    journal.checkpoint("final", total, state_path=state, sampler_path=sampler, final=True)
    saved = saved_checkpoints(journal, cfg, total, sampler)
    return TrainResult(sampler, state, metrics, resumed_at=start, checkpoints=saved)


class TrainParams(Params):
    # without warm-up the schedule is what it was before `warmup_ratio` existed; without
    # periodic evaluation and intermediate checkpoints, the run is what it was before them (the
    # held-out NLL after the last step is in every run's metrics.jsonl now: a number the same
    # inputs determine, recorded where there is a test split, so no fingerprint changes for it)
    added: ClassVar[dict[str, Any]] = {"warmup_ratio": 0, "eval_every": 0, "checkpoints": ()}

    engine: str = key("model.engine")
    model: ModelRef = key("model.base_model")
    lora_rank: int = key("training.lora_rank")
    learning_rate: float = key("training.learning_rate")
    lr_schedule: Schedule = key("training.lr_schedule")
    warmup_ratio: float = key("training.warmup_ratio")
    batch_size: int = key("training.batch_size")
    epochs: int = key("training.epochs")
    seed: int = key("training.seed")
    # 0 without a held-out split (nothing to evaluate)
    eval_every: int = key("training.eval_every")
    # the intermediate steps of eval.checkpoints (`final` is always saved)
    checkpoints: tuple[int, ...] = key("eval.checkpoints")


class SourceCount(BaseModel):
    """One data source as the estimate counts it before the dataset stage has run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Path  # its records; for a distilled set, the prompts file (one answer per prompt)
    take: int | None = None
    fraction: float | None = None
    answer_tokens: int = 0  # a distilled set: the most tokens an answer adds to a record


class TrainOptions(Options):
    base_model: str  # a model name, or where a local model directory is
    renderer: str  # recorded in checkpoint.json for the sampling stage's convenience
    save_every: int
    # what the estimate counts before the dataset exists: data.docs or data.sources
    docs: Path | None = None
    sources: tuple[SourceCount, ...] = ()
    total: int | None = None  # data.total (a fraction mix)
    max_docs: int | None = None
    test_size: int = 0
    max_length: int | None = None


@dataclass(frozen=True)
class InputCount:
    records: int
    tokens: int  # ~4 bytes a token, at most max_length a record


def _records(store: RunStore, path: Path) -> int:
    n = store.hashes.records(path)  # counted while the plan hashed it
    if n is not None:
        return n
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def _file_count(
    store: RunStore, path: Path, max_length: int | None, answer_tokens: int = 0
) -> InputCount | None:
    if not path.is_file():
        return None
    n = _records(store, path)
    tokens = path.stat().st_size // 4 + n * answer_tokens
    if max_length is not None:
        tokens = min(tokens, n * max_length)
    return InputCount(n, tokens)


def _first(c: InputCount, records: int) -> InputCount:
    """`records` of the counted ones (all if fewer), with their share of the tokens."""
    k = min(records, c.records)
    return InputCount(k, c.tokens * k // c.records if c.records else 0)


def count_inputs(o: TrainOptions, store: RunStore) -> InputCount | None:
    """Records and ~tokens the training mix will be made of, from its input files (None when
    one is missing). An estimate, meant as an upper bound: ~4 bytes a token of whole JSONL
    lines (keys and markup included), each record at most `max_length` tokens; a source with
    `take` contributes take records, a fraction mix `fraction * data.total` records of each
    source (apportioned as the dataset does; without data.total: the largest mix every source
    can fill), a distilled set one
    record per prompt with an answer of at most its `max_tokens`; `max_docs` caps the total."""
    if o.docs is not None:
        count = _file_count(store, o.docs, o.max_length)
    elif o.sources:
        counts: list[InputCount] = []
        for src in o.sources:
            c = _file_count(store, src.path, o.max_length, src.answer_tokens)
            if c is None:
                return None
            counts.append(c)
        fractions = [s.fraction for s in o.sources]
        if all(f is not None for f in fractions):
            fs = [f for f in fractions if f is not None]
            size = o.total
            if size is None:
                size = min(math.floor(c.records / f) for c, f in zip(counts, fs, strict=True))
            shares = apportion(fs, size)  # the dataset's own counts: exact records
            counts = [_first(c, k) for c, k in zip(counts, shares, strict=True)]
        else:
            counts = [
                c if s.take is None else _first(c, s.take)
                for c, s in zip(counts, o.sources, strict=True)
            ]
        count = InputCount(sum(c.records for c in counts), sum(c.tokens for c in counts))
    else:
        return None
    if count is not None and o.max_docs is not None:
        count = _first(count, o.max_docs)
    return count


def intermediate_checkpoints(spec: Spec) -> tuple[int, ...]:
    """The steps of `eval.checkpoints` other than `final`, ascending."""
    return tuple(c for c in spec.eval.checkpoints if c != "final")


def run_id(fingerprint: str) -> str:
    """The engine-side name of a training run: by fingerprint only, so two experiments with the
    same training share it (and the run cache) whatever they are called."""
    return f"spar-{fingerprint[:16]}"


class TrainStage(StageKind[TrainParams, TrainOptions]):
    kind = "train"
    version = 2
    outputs: ClassVar[tuple[str, ...]] = ("checkpoint.json", "metrics.jsonl")
    params_model = TrainParams

    def nodes(self, spec: Spec, g: GraphContext) -> list[StageNode[TrainParams, TrainOptions]]:
        t = spec.training
        params = TrainParams(
            engine=spec.model.engine,
            model=model_ref(spec, g),
            lora_rank=t.lora_rank,
            learning_rate=t.learning_rate,
            lr_schedule=t.lr_schedule,
            warmup_ratio=t.warmup_ratio,
            batch_size=t.batch_size,
            epochs=t.epochs,
            seed=t.seed,
            eval_every=t.eval_every if spec.data.test_size > 0 else 0,
            checkpoints=intermediate_checkpoints(spec),
        )
        d = spec.data
        sources: list[SourceCount] = []
        for src in d.sources or ():
            if src.path is not None:
                sources.append(SourceCount(path=src.path, take=src.take, fraction=src.fraction))
            elif src.distill is not None:
                ds = spec.distill[src.distill]
                sources.append(
                    SourceCount(
                        path=ds.prompts,
                        take=src.take,
                        fraction=src.fraction,
                        answer_tokens=ds.sampling.max_tokens,
                    )
                )
        options = TrainOptions(
            base_model=spec.model.base_model,
            renderer=spec.model.renderer,
            save_every=t.save_every,
            docs=d.docs,
            sources=tuple(sources),
            total=d.total,
            max_docs=d.max_docs,
            test_size=d.test_size,
            max_length=t.max_length,
        )
        return [
            StageNode("train", self, spec.name, params, options, upstream={"dataset": "dataset"})
        ]

    def estimate(
        self,
        node: StageNode[TrainParams, TrainOptions],
        store: RunStore,
        upstream_fresh: bool,
        flags: Flags | None = None,
    ) -> dict[str, int]:
        """Training tokens and optimiser steps: exact from a fresh dataset output (its
        train.jsonl), else counted from the input files (`count_inputs`: ~4 bytes a token, an
        upper bound), less the `data.test_size` held-out records for the steps.

        The steps also check `eval.checkpoints` before any work: a step beyond them is an
        InputError. (Where they cannot be counted yet — a generated data set — the run checks
        it before training: RunError.)"""
        p, o = node.params, node.options
        built = store.stage_dir(node.experiment, "dataset") / "train.jsonl"
        if upstream_fresh and built.exists():
            rows = read_jsonl(built)
            records, per_epoch = len(rows), sum(len(r["input"]) for r in rows)
        else:
            count = count_inputs(o, store)
            if count is None:
                return {}
            records, per_epoch = max(count.records - o.test_size, 0), count.tokens
        steps = math.ceil(records / p.batch_size) * p.epochs
        error = checkpoint_error(p.checkpoints, records, p.batch_size, p.epochs)
        if error is not None and records > 0:
            raise InputError(f"{node.experiment}: {error}")
        return {"training_tokens": per_epoch * p.epochs, "training_steps": steps}

    def run(self, ctx: RunContext[TrainParams, TrainOptions]) -> StageResult:
        from spar.engines import get_engine

        p, o = ctx.params, ctx.options
        rows = read_jsonl(ctx.upstream_file("dataset", "train.jsonl"))
        test_file = ctx.upstream_file("dataset", "test.jsonl")
        test = read_jsonl(test_file) if test_file.exists() else []
        cfg = LoopConfig(
            **p.model_dump(exclude={"engine", "model", "eval_every", "checkpoints"}),
            save_every=o.save_every,
            eval_every=p.eval_every,
            checkpoints=p.checkpoints,
        )
        error = checkpoint_error(cfg.checkpoints, len(rows), cfg.batch_size, cfg.epochs)
        if error is not None:  # before the engine loads anything
            raise RunError(error)
        engine = get_engine(p.engine, ctx.scratch("engines", p.engine))
        rid = run_id(ctx.fingerprint)
        journal = TrainJournal(ctx.store.state, ctx.fingerprint, ctx.scratch("train", rid))
        result = train_loop(
            engine, o.base_model, rows, cfg, rid, journal, test_rows=test, stop=ctx.stop.is_set
        )
        record = CheckpointRecord(
            engine=p.engine,
            base_model=o.base_model,
            renderer=o.renderer,
            sampler_path=result.sampler_path,
            state_path=result.state_path,
            steps=len(result.metrics),
            checkpoints={str(k): v for k, v in sorted(result.checkpoints.items())}
            if p.checkpoints
            else None,
        )
        outputs = {
            "checkpoint.json": (
                record.model_dump_json(indent=2, exclude_none=True) + "\n"
            ).encode(),
            "metrics.jsonl": jsonl_text(result.metrics).encode(),
        }
        return StageResult(outputs, details={"steps_run": len(result.metrics) - result.resumed_at})
