"""The pipelined training loop: batch k + 1 is submitted before batch k's results are awaited.

An in-process "server" (requests executed in submission order, results handed out lazily) pins
when each request is sent and each result awaited at every pipeline depth; engine local pins
that the results are the serial loop's; skyrl's Tinker server, SIGKILLed mid-pipeline under
`spar apply`, pins that a resume applies every batch exactly once.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import Project
from test_tinker_engine import (  # noqa: F401  (skyrl, on_skyrl: fixtures)
    CHECKPOINTS,
    MAX_LENGTH,
    Server,
    assert_complete_metrics,
    batch_keys,
    model_of,
    on_skyrl,
    server_log,
    skyrl,
)
from test_train_curves import Crash, rows_of

from spar.engines.local import LocalEngine
from spar.stages.train import LoopConfig, TrainJournal, TrainResult, batches, train_loop
from spar.store import read_jsonl
from spar.store.state import State

# ---------------------------------------------------------------------------------------------
# an in-order server whose futures record when they are awaited


class _Fut:
    def __init__(self, log: list[str], name: str, value: Any) -> None:
        self.log, self.name, self.value = log, name, value

    def result(self, timeout: float | None = None) -> Any:
        self.log.append(f"await {self.name}")
        return self.value


class _Saved:
    def __init__(self, path: str) -> None:
        self.path = path


class OrderServer:
    """Executes every request the moment it is submitted, in submission order (what a Tinker
    server does with one client's requests); the client sees a result only when it awaits it.
    The model is one number `w`: a batch's log-probabilities depend on it and every optimiser
    step moves it by the learning rate times the last batch's gradient, so a request executed
    out of order changes the numbers."""

    def __init__(self) -> None:
        self.log: list[str] = []  # "fb3", "opt3", "fwd", "state<name>", "await fb3", "row 3", ...
        self.states: dict[str, float] = {}
        self.applied = 0  # optimiser steps executed, over every client

    def client(self, w: float = 0.0) -> OrderClient:
        return OrderClient(self, w)


class OrderClient:
    def __init__(self, server: OrderServer, w: float) -> None:
        self.server, self.w, self.grad, self.n = server, w, 0.0, 0

    def _out(self, data: list[Any], scale: float) -> Any:
        import numpy as np
        import tinker

        outs = []
        for d in data:
            targets = d.loss_fn_inputs["target_tokens"].tolist()
            lp = [-(1.0 + self.w) * scale * (1 + t % 5) / 5 for t in targets]
            outs.append({"logprobs": tinker.TensorData.from_numpy(np.asarray(lp, "float32"))})
        return tinker.ForwardBackwardOutput(loss_fn_output_type="order", loss_fn_outputs=outs)

    def forward_backward(self, data: list[Any], loss_fn: str) -> _Fut:
        name = f"fb{self.n}"
        self.server.log.append(name)
        self.grad = sum(sum(d.loss_fn_inputs["target_tokens"].tolist()) for d in data) / 100
        return _Fut(self.server.log, name, self._out(data, 1.0))

    def forward(self, data: list[Any], loss_fn: str) -> _Fut:
        self.server.log.append("fwd")
        return _Fut(self.server.log, "fwd", self._out(data, 2.0))

    def optim_step(self, adam_params: Any) -> _Fut:
        name = f"opt{self.n}"
        self.server.log.append(name)
        self.w += adam_params.learning_rate * self.grad
        self.n += 1
        self.server.applied += 1
        return _Fut(self.server.log, name, None)

    def _save(self, kind: str, name: str) -> _Fut:
        self.server.log.append(f"{kind} {name}")
        self.server.states[name] = self.w
        return _Fut(self.server.log, f"{kind} {name}", _Saved(name))

    def save_state(self, name: str) -> _Fut:
        return self._save("state", name)

    def save_weights_for_sampler(self, name: str) -> _Fut:
        return self._save("sampler", name)


class OrderEngine:
    def __init__(self, server: OrderServer) -> None:
        self.server = server

    def create_lora_training_client(self, base_model: str, rank: int, seed: int | None = None):
        return self.server.client()

    def create_training_client_from_state_with_optimizer(
        self, path: str, base_model: str | None = None
    ):
        return self.server.client(self.server.states[path])

    def create_sampling_client(self, model_path=None, base_model=None):  # pragma: no cover
        raise AssertionError("training only")


class LoggedJournal(TrainJournal):
    """The journal, with each write also in the server's log (when it happened)."""

    def __init__(self, state: State, run: str, log: list[str]) -> None:
        super().__init__(state, run)
        self.log = log

    def step(self, row: dict[str, Any]) -> None:
        self.log.append(f"row {row['step']}")
        super().step(row)

    def checkpoint(self, name: str, batch: int, **fields: str | bool) -> None:
        self.log.append(f"ckpt {name}")
        super().checkpoint(name, batch, **fields)


def order_rows(n: int) -> list[dict[str, Any]]:
    """n distinct rows: a masked prompt token, then targets that differ from row to row."""
    return [
        {
            "input": [1, *range(10 * i + 2, 10 * i + 2 + 3 + i % 3)],
            "target": [*range(10 * i + 2, 10 * i + 2 + 3 + i % 3), 7],
            "weights": [0.0, *([1.0] * (3 + i % 3))],
        }
        for i in range(n)
    ]


def run_order(
    tmp_path: Path, cfg: LoopConfig, rows: list[dict[str, Any]], test: list[dict[str, Any]]
) -> tuple[OrderServer, TrainResult]:
    server = OrderServer()
    with State(tmp_path / f"state-{len(list(tmp_path.glob('*.db')))}.db") as state:
        journal = LoggedJournal(state, "r", server.log)
        res = train_loop(OrderEngine(server), "m", rows, cfg, "r", journal, test_rows=test)
        assert journal.steps() == res.metrics
    return server, res


def sent(log: list[str]) -> list[str]:
    """The requests, in the order the server executed them (no awaits, no journal writes)."""
    return [e for e in log if not e.startswith(("await ", "row ", "ckpt "))]


def submit(k: int) -> list[str]:
    return [f"fb{k}", f"opt{k}"]


def finish(k: int, *extra: str) -> list[str]:
    return [f"await fb{k}", f"await opt{k}", *extra, f"row {k}"]


FINAL = ["state r-final", "sampler r-final"]
AWAIT_FINAL = ["await state r-final", "await sampler r-final", "ckpt final"]


@pytest.mark.parametrize(
    ("depth", "want"),
    [
        (  # the serial loop: every result awaited before the next batch is sent
            0,
            [x for k in range(4) for x in submit(k) + finish(k)] + FINAL + AWAIT_FINAL,
        ),
        (  # one batch ahead: k + 1 goes out before k's results are awaited
            1,
            [
                *submit(0),
                *submit(1),
                *finish(0),
                *submit(2),
                *finish(1),
                *submit(3),
                *finish(2),
                *FINAL,
                *finish(3),
                *AWAIT_FINAL,
            ],
        ),
        (
            2,
            [
                *submit(0),
                *submit(1),
                *submit(2),
                *finish(0),
                *submit(3),
                *finish(1),
                *FINAL,
                *finish(2),
                *finish(3),
                *AWAIT_FINAL,
            ],
        ),
    ],
)
def test_batches_go_out_ahead_of_the_awaited_results(
    tmp_path: Path, depth: int, want: list[str]
) -> None:
    # Fails if the loop awaited a batch before sending the next (no pipelining), sent more than
    # `depth` ahead, journaled a row before its results came back or out of step order, or
    # changed what the server executes (the numbers differ then: see the last assertion).
    rows = order_rows(4)
    cfg = LoopConfig(batch_size=1, learning_rate=0.5, pipeline_depth=depth)
    server, res = run_order(tmp_path, cfg, rows, [])
    assert server.log == want
    serial, ref = run_order(tmp_path, cfg.model_copy(update={"pipeline_depth": 0}), rows, [])
    assert sent(server.log) == sent(serial.log)
    assert res.metrics == ref.metrics and len({m["loss"] for m in res.metrics}) == 4


def test_a_save_drains_the_pipeline_and_is_journaled_after_its_answer(tmp_path: Path) -> None:
    """6 steps, 2 ahead, a held-out split evaluated after steps 3 and 5, the sampler weights of
    step 2 (a checkpoint) and the state at step 3 (save_every 3): each save is journaled only
    once it answered, after the rows of the steps before it, and nothing is sent after it
    before that (the SDK orders a sampler save only when it sends it)."""
    # Fails if a save went out ahead of its batch or behind the next one, were journaled before
    # its answer or before an earlier step's row, or if the pipeline ran through a save.
    rows, test = order_rows(7)[:6], order_rows(7)[6:]
    cfg = LoopConfig(
        batch_size=1,
        learning_rate=0.5,
        save_every=3,
        eval_every=4,
        checkpoints=(2,),
        pipeline_depth=2,
    )
    server, res = run_order(tmp_path, cfg, rows, test)
    assert server.log == [
        *("fwd", "await fwd"),  # the base model's held-out NLL
        *submit(0),
        *(*submit(1), "sampler r-step000002"),
        *finish(0),
        *finish(1),
        *("await sampler r-step000002", "ckpt sampler000002"),
        *(*submit(2), "state r-step000003"),
        *finish(2),
        *("await state r-step000003", "ckpt step000003"),
        *(*submit(3), "fwd"),
        *submit(4),
        *(*submit(5), "fwd"),
        *finish(3, "await fwd"),
        *FINAL,
        *finish(4),
        *finish(5, "await fwd"),
        *AWAIT_FINAL,
    ]
    serial, ref = run_order(tmp_path, cfg.model_copy(update={"pipeline_depth": 0}), rows, test)
    assert sent(server.log) == sent(serial.log)
    assert res.metrics == ref.metrics
    assert [m["step"] for m in res.metrics if "test_nll" in m] == [3, 5]
    assert server.states == serial.states  # every save holds the serial loop's weights
    assert res.checkpoints == {2: "r-step000002"}


def test_a_crash_mid_pipeline_resumes_from_the_saved_state_exactly_once(tmp_path: Path) -> None:
    """The run dies in step 4's `on_step` when batches 5 (and the final saves) were already
    sent: the server applied every batch, the journal has rows 0-4 and the state at 3. The
    resumed run redoes 3-5 from that state; its rows are the uninterrupted run's, once each."""
    # Fails if a resume started after the saved state (a batch the journal never had), kept a
    # row of a redone step twice, or if a save was journaled that had not answered.
    rows = order_rows(6)
    cfg = LoopConfig(batch_size=1, learning_rate=0.5, save_every=3, pipeline_depth=2)
    _, ref = run_order(tmp_path, cfg, rows, [])

    def crash(row: dict[str, Any]) -> None:
        if row["step"] == 4:
            raise Crash

    server = OrderServer()
    with State(tmp_path / "run.db") as state:
        journal = LoggedJournal(state, "r", server.log)
        engine = OrderEngine(server)
        with pytest.raises(Crash):
            train_loop(engine, "m", rows, cfg, "r", journal, on_step=crash)
        assert server.applied == 6 and "state r-final" in server.log  # all of it was sent
        assert [m["step"] for m in journal.steps()] == [0, 1, 2, 3, 4]
        assert [c["name"] for c in journal.checkpoints()] == ["step000003"]
        server.log.clear()
        res = train_loop(engine, "m", rows, cfg, "r", journal)
        assert res.resumed_at == 3
        assert sent(server.log)[:2] == ["fb0", "opt0"]  # the resumed client's first batch: 3
        assert server.applied == 6 + 3  # total + the batches redone from the saved state
        assert res.metrics == ref.metrics == journal.steps()
        assert [c["name"] for c in journal.checkpoints()] == ["step000003", "final"]


def test_loop_config_refuses_a_negative_depth() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="pipeline_depth"):
        LoopConfig.model_validate({"pipeline_depth": -1})


# ---------------------------------------------------------------------------------------------
# engine local: the serial loop's numbers


def test_pipelined_local_training_is_the_serial_loop(tiny_model: Path, tmp_path: Path) -> None:
    """Real training on engine local (2 epochs, a held-out split, a checkpoint, periodic
    states): every depth gives the serial loop's losses, held-out NLLs, journal and weights."""
    from safetensors.torch import load_file

    base = str(tiny_model)
    rows = rows_of(base, 8)
    train, test = rows[:6], rows[6:]
    cfg = LoopConfig(
        lora_rank=4,
        learning_rate=2e-2,
        batch_size=2,
        epochs=2,
        save_every=4,
        eval_every=2,
        checkpoints=(1,),
    )
    results: dict[int, TrainResult] = {}
    names: dict[int, list[tuple[str, int]]] = {}
    with State(tmp_path / "state.db") as state:
        for depth in (0, 1, 3):
            journal = TrainJournal(state, f"d{depth}")
            results[depth] = train_loop(
                LocalEngine(tmp_path / f"d{depth}"),
                base,
                train,
                cfg.model_copy(update={"pipeline_depth": depth}),
                f"d{depth}",
                journal,
                test_rows=test,
            )
            names[depth] = [(c["name"], c["batch"]) for c in journal.checkpoints()]
    ref = results[0]
    assert len(ref.metrics) == 6 and len({m["loss"] for m in ref.metrics}) == 6
    for depth in (1, 3):
        got = results[depth]
        assert names[depth] == names[0] == [("sampler000001", 1), ("step000004", 4), ("final", 6)]
        assert [sorted(m) for m in got.metrics] == [sorted(m) for m in ref.metrics]
        for g, w in zip(got.metrics, ref.metrics, strict=True):
            for k in ("loss", "test_nll", "test_nll_start", "learning_rate"):
                if k in w:
                    assert g[k] == pytest.approx(w[k], abs=1e-6), (depth, g["step"], k)
        for a, b in (
            (got.sampler_path, ref.sampler_path),
            (got.checkpoints[1], ref.checkpoints[1]),
        ):
            x = load_file(str(Path(a) / "adapter_model.safetensors"))
            y = load_file(str(Path(b) / "adapter_model.safetensors"))
            assert x.keys() == y.keys()
            assert all(x[k].allclose(y[k], atol=1e-6) for k in y), (depth, a)


# ---------------------------------------------------------------------------------------------
# skyrl's Tinker server: SIGKILL in the middle of the pipeline under `spar apply`


def test_spar_apply_on_tinker_sigkilled_mid_pipeline_applies_every_batch_once(
    on_skyrl: Server,  # noqa: F811
    project: Project,
) -> None:
    """`spar apply` (engine tinker, pipelined by default), 6 batches, a state every 2. The
    process is SIGKILLed as it sends batch 3, once the server has applied batch 2 — whose results
    the loop had not awaited yet (it was one batch behind), so the journal does not have it.
    The re-run resumes at the state after batch 1 and redoes batch 2: every step is journaled
    once, and the server applied total + 1 optimiser steps, each batch once in the final
    weights' lineage."""
    # Fails if the train stage did not pipeline (the journal would have step 2 when the kill
    # came), if a resume started after a batch the journal lacks (batch 2 never redone: the
    # lineage misses it), replayed one twice (lineage has a duplicate), or kept a row twice.

    def tinker_spec(d: dict[str, Any]) -> None:
        d["model"]["engine"] = "tinker"
        d["training"].update(batch_size=1, save_every=2, max_length=MAX_LENGTH)
        d["eval"]["samples_per_question"] = 1
        d["eval"]["sampling"]["max_tokens"] = 8

    project.edit(tinker_spec)
    env = {"TINKER_BASE_URL": on_skyrl.url, "TINKER_API_KEY": "tml-spar-test"}
    before = len(server_log(on_skyrl).requests)
    killed = project.spar_proc(
        "apply",
        str(project.spec),
        SPAR_PLUGINS="fake_plugin,tinker_server.kill_plugin",
        SPAR_KILL_AT_FORWARD_BACKWARD="4",  # sending batch 3 (0-based), once batch 2 is applied
        **env,
    )
    out, err = killed.communicate(timeout=600)
    assert killed.returncode == -9, (out, err)
    (log_dir,) = (project.runs / ".spar" / "train").iterdir()
    ckpts = read_jsonl(log_dir / CHECKPOINTS)
    assert [(c["name"], c["batch"]) for c in ckpts] == [("step000002", 2)]
    resumed_from = ckpts[-1]["state_path"]
    first_model = model_of(resumed_from)
    state = State(project.runs / ".spar" / "state.db")
    (fingerprint,) = state.train_runs()
    journal = TrainJournal(state, fingerprint, log_dir)
    assert [m["step"] for m in journal.steps()] == [0, 1]  # not 2: its results never awaited
    srv = server_log(on_skyrl)
    first = srv.of(first_model, "OPTIM_STEP")
    assert len(first) == 3  # ... though the server had applied it

    again = project.spar_proc("apply", str(project.spec), **env)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, (out, err)
    assert "ran exp / train" in out

    spec = yaml.safe_load(project.spec.read_text())
    cfg = LoopConfig(**{k: v for k, v in spec["training"].items() if k != "max_length"})
    rows = read_jsonl(project.runs / "exp/dataset/train.jsonl")
    keys = batch_keys(rows, cfg)
    total = len(batches(rows, cfg))
    assert total == 6 and len(keys) == total
    metrics = read_jsonl(project.runs / "exp/train/metrics.jsonl")
    assert_complete_metrics(metrics, total, cfg)  # every step once, in order
    assert journal.steps() == metrics
    assert [(c["name"], c["batch"]) for c in journal.checkpoints()] == [
        ("step000002", 2),
        ("step000004", 4),
        ("final", 6),
    ]
    record = json.loads((project.runs / "exp/train/checkpoint.json").read_text())
    assert record["steps"] == total
    final_model = model_of(record["state_path"])
    srv = server_log(on_skyrl)
    mine = [r for r in srv.requests[before:] if r.model in (first_model, final_model)]
    optim = [r for r in mine if r.type == "OPTIM_STEP"]
    resumed_at = ckpts[-1]["batch"]
    redone = len(first) - resumed_at
    assert redone == 1 and len(optim) == total + redone
    assert len(srv.of(final_model, "OPTIM_STEP")) == total - resumed_at
    assert srv.lineage(resumed_from, final_model, keys) == list(range(total))
    # the lineage's learning rates: the schedule's, step by step (none skipped or repeated)
    steps = first[:resumed_at] + srv.of(final_model, "OPTIM_STEP")
    for step, req in enumerate(steps):
        want = cfg.learning_rate * (1 - step / total)
        assert math.isclose(req.data["adam_params"]["learning_rate"], want, rel_tol=1e-12)
    state.close()


def test_a_stop_sends_no_further_batch_saves_a_resume_point_and_resumes_exactly(
    tmp_path: Path,
) -> None:
    """`stop()` turns true after step 1 is journaled (another stage of the apply failed): what
    was sent is awaited and journaled, the state after it saved, `Stopped` raised; the next run
    resumes there and applies each remaining batch once, with the uninterrupted run's numbers."""
    from spar.stages.base import Stopped

    rows = order_rows(5)
    cfg = LoopConfig(batch_size=1, learning_rate=0.5, pipeline_depth=1)
    server = OrderServer()
    with State(tmp_path / "stop.db") as state:
        journal = LoggedJournal(state, "r", server.log)
        stopping = {"now": False}

        def on_step(row: dict[str, Any]) -> None:
            stopping["now"] = row["step"] == 1

        with pytest.raises(Stopped, match="stopped after 3 of 5 batches"):
            train_loop(
                OrderEngine(server),
                "m",
                rows,
                cfg,
                "r",
                journal,
                on_step=on_step,
                stop=lambda: stopping["now"],
            )
        # batch 2 was already out when step 1 was journaled: awaited, journaled, then the state
        assert server.log[-6:] == [
            *finish(2)[:2],
            "row 2",
            "state r-step000003",
            "await state r-step000003",
            "ckpt step000003",
        ]
        assert sent(server.log).count("fb3") == 0  # nothing sent after the stop
        assert server.applied == 3
        res = train_loop(OrderEngine(server), "m", rows, cfg, "r", journal)
        assert server.applied == 5  # batches 3 and 4, once each
    _, ref = run_order(tmp_path, cfg, rows, [])
    assert res.metrics == ref.metrics and res.resumed_at == 3
