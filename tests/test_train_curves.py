"""Training curves: the held-out split's NLL during training (metrics.jsonl), in summary.json,
curves.png and report.html (Chromium's DOM)."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import subprocess
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tinker
from fake_plugin import FakeEngine
from test_tinker_engine import on_skyrl, skyrl  # noqa: F401  (the skyrl server fixtures)

from spar.curves import training_block
from spar.engines.local import LocalEngine
from spar.models import load_renderer
from spar.stages.dataset import datum_row, read_records, row_to_datum, to_conversation
from spar.stages.train import (
    LoopConfig,
    TrainJournal,
    batches,
    eval_due,
    held_out_nll,
    train_loop,
)
from spar.store import read_jsonl
from spar.store.state import State

DATA = Path(__file__).parent / "data"


def datum(logprobs: list[float], weights: list[float]) -> tinker.Datum:
    n = len(logprobs)
    return tinker.Datum(
        model_input=tinker.ModelInput.from_ints(list(range(n))),
        loss_fn_inputs={
            "target_tokens": tinker.TensorData.from_numpy(np.arange(n, dtype=np.int64)),
            "weights": tinker.TensorData.from_numpy(np.asarray(weights, dtype=np.float32)),
            # what the stub client answers for this datum (not sent by the real loop)
            "stub_logprobs": tinker.TensorData.from_numpy(np.asarray(logprobs, dtype=np.float32)),
        },
    )


class StubClient:
    """Answers `forward` with each datum's own `stub_logprobs`; records the requests."""

    def __init__(self) -> None:
        self.requests: list[int] = []

    def forward(self, data: list[tinker.Datum], loss_fn: str) -> Future:
        assert loss_fn == "cross_entropy"
        self.requests.append(len(data))
        fut: Future = Future()
        outs = [{"logprobs": d.loss_fn_inputs["stub_logprobs"]} for d in data]
        fut.set_result(
            tinker.ForwardBackwardOutput(loss_fn_output_type="stub", loss_fn_outputs=outs)
        )
        return fut


def test_held_out_nll_is_summed_over_every_datum_then_divided_by_every_weight() -> None:
    # Fails if the NLL were a mean of per-datum or per-request means (the datums differ in
    # length and weight), ignored the weights (the masked prompt tokens), or dropped the last
    # short request.
    data = [
        datum([-1.0, -2.0, -3.0], [0.0, 1.0, 1.0]),  # a masked prompt token, then 2 targets
        datum([-0.5], [1.0]),
        datum([-4.0, -4.0, -1.0, -1.0], [1.0, 1.0, 1.0, 1.0]),
    ]
    client = StubClient()
    got = held_out_nll(client, data, batch_size=2)  # type: ignore[arg-type]
    assert client.requests == [2, 1]  # in chunks of the training batch size
    assert got == pytest.approx((2 + 3 + 0.5 + 4 + 4 + 1 + 1) / 7)
    assert math.isnan(held_out_nll(StubClient(), [datum([-1.0], [0.0])], 4))  # no target token


@pytest.mark.parametrize(
    ("total", "every", "due"),
    [(5, 2, [1, 3, 4]), (5, 0, [4]), (6, 3, [2, 5]), (3, 1, [0, 1, 2]), (4, 9, [3])],
)
def test_eval_is_due_every_n_steps_and_after_the_last(total: int, every: int, due: list[int]):
    assert [s for s in range(total) if eval_due(s, total, every)] == due


def rows_of(base_model: str, n: int, max_length: int = 48) -> list[dict[str, Any]]:
    renderer = load_renderer("qwen3_instruct", base_model)
    records = read_records(DATA / "docs.jsonl", "synth_docs")[:n]
    return [datum_row(to_conversation(r, "doc_idea"), renderer, max_length) for r in records]


def test_metrics_rows_carry_test_nll_after_the_update_of_their_step(tiny_model, tmp_path):
    """The fake engine's held-out log-probability is -3 / (1 + steps applied): the NLL after n
    steps is 3 / (1 + n), so each row's value says which weights it was measured on."""
    # Fails if the eval ran before the step's update (row s would hold 3 / (1 + s)), at the wrong
    # steps (off by one: (s % every == 0)), skipped the last step, or without eval_every > 0
    # still wrote a start value.
    rows = rows_of(str(tiny_model), 6)
    test = rows[4:]
    cfg = LoopConfig(batch_size=1, epochs=1, eval_every=2)  # 4 steps
    with State(tmp_path / "state.db") as state:
        res = train_loop(
            FakeEngine(tmp_path),
            str(tiny_model),
            rows[:4],
            cfg,
            "r1",
            TrainJournal(state, "r1"),
            test_rows=test,
        )
        assert [m["step"] for m in res.metrics] == [0, 1, 2, 3]
        assert {m["step"]: m.get("test_nll") for m in res.metrics} == {
            0: None,
            1: pytest.approx(3 / 3),
            2: None,
            3: pytest.approx(3 / 5),
        }
        assert res.metrics[0]["test_nll_start"] == pytest.approx(3.0)  # the base model
        assert all("test_nll_start" not in m for m in res.metrics[1:])
        assert training_block(res.metrics)["test_nll"] == [
            {"step": 0, "value": pytest.approx(3.0)},
            {"step": 2, "value": pytest.approx(1.0)},
            {"step": 4, "value": pytest.approx(0.6)},
        ]
        # eval_every 0: the end only; no held-out split: nothing
        end = train_loop(
            FakeEngine(tmp_path),
            str(tiny_model),
            rows[:4],
            cfg.model_copy(update={"eval_every": 0}),
            "r2",
            TrainJournal(state, "r2"),
            test_rows=test,
        )
        assert [m.get("test_nll") for m in end.metrics] == [None, None, None, pytest.approx(0.6)]
        assert all("test_nll_start" not in m for m in end.metrics)
        none = train_loop(
            FakeEngine(tmp_path),
            str(tiny_model),
            rows[:4],
            cfg,
            "r3",
            TrainJournal(state, "r3"),
            test_rows=[],
        )
        assert all("test_nll" not in m and "test_nll_start" not in m for m in none.metrics)
        assert training_block(none.metrics)["test_nll"] == []


def test_local_forward_is_forward_backward_without_a_gradient(tiny_model):
    """engine local's `forward`: the same log-probabilities as `forward_backward`, no gradient
    accumulated, the weights untouched (an optim_step after it changes nothing)."""
    rows = rows_of(str(tiny_model), 3)
    data = [row_to_datum(r) for r in rows]
    client = LocalEngine(Path("unused")).create_lora_training_client(
        str(tiny_model), rank=4, seed=0
    )
    before = [p.detach().clone() for p in client._trainable()]
    fwd = client.forward(data, "cross_entropy").result()
    assert all(p.grad is None for p in client._trainable())
    client.optim_step(tinker.AdamParams(learning_rate=0.5)).result()  # no gradient: no change
    for p, q in zip(client._trainable(), before, strict=True):
        assert p.detach().equal(q)
    assert client.model.training  # back in training mode
    fb = client.forward_backward(data, "cross_entropy").result()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in client._trainable())
    for a, b in zip(fwd.loss_fn_outputs, fb.loss_fn_outputs, strict=True):
        assert a["logprobs"].tolist() == pytest.approx(b["logprobs"].tolist(), abs=1e-5)


class Crash(Exception):
    pass


def test_local_training_curve_drops_and_survives_a_resume_exactly(tiny_model, tmp_path):
    """Real training (engine local, the tiny model): the held-out NLL falls from the base
    model's; each row's value is the NLL of the weights saved after that step; a run killed
    mid-way and resumed has the uninterrupted run's rows — every step once, test_nll and all."""
    # Fails if a resumed run lost or duplicated a row's test_nll, re-evaluated with the wrong
    # weights, or if the value were measured before the step's update.
    base = str(tiny_model)
    rows = rows_of(base, 8)
    train, test = rows[:6], rows[6:]
    cfg = LoopConfig(
        lora_rank=4, learning_rate=2e-2, batch_size=2, epochs=2, save_every=2, eval_every=2
    )
    total = len(batches(train, cfg))
    assert total == 6
    with State(tmp_path / "state.db") as state:
        ref = train_loop(
            LocalEngine(tmp_path / "ref"),
            base,
            train,
            cfg,
            "ref",
            TrainJournal(state, "ref"),
            test_rows=test,
        )
        curve = training_block(ref.metrics)["test_nll"]
        assert [p["step"] for p in curve] == [0, 2, 4, 6]
        values = [p["value"] for p in curve]
        # training on the same kind of text: the held-out NLL falls at every evaluation
        assert all(a > b for a, b in itertools.pairwise(values)), values
        assert values[-1] < values[0] - 0.02, values
        # the last value is the NLL of the final weights, measured anew by a fresh client
        fresh = LocalEngine(tmp_path / "ref").create_training_client_from_state_with_optimizer(
            ref.state_path
        )
        test_data = [row_to_datum(r) for r in test]
        assert held_out_nll(fresh, test_data, 2) == pytest.approx(values[-1], abs=1e-5)

        def crash(row: dict[str, Any]) -> None:
            if row["step"] == 4:
                raise Crash  # after step 4 (5 updates) was journaled: the state at 4 is kept

        journal = TrainJournal(state, "run")
        with pytest.raises(Crash):
            train_loop(
                LocalEngine(tmp_path / "run"),
                base,
                train,
                cfg,
                "run",
                journal,
                on_step=crash,
                test_rows=test,
            )
        assert [m["step"] for m in journal.steps()] == [0, 1, 2, 3, 4]
        res = train_loop(
            LocalEngine(tmp_path / "run"), base, train, cfg, "run", journal, test_rows=test
        )
    assert res.resumed_at == 4
    assert [m["step"] for m in res.metrics] == list(range(total))
    assert [sorted(m) for m in res.metrics] == [sorted(m) for m in ref.metrics]
    for got, want in zip(res.metrics, ref.metrics, strict=True):
        for k in ("loss", "test_nll", "test_nll_start"):
            assert (k in got) == (k in want)
            if k in want:
                assert got[k] == pytest.approx(want[k], abs=1e-5), (got["step"], k)


# ------------------------------------------------------------------------------ spec level


def test_eval_every_keeps_old_fingerprints_unless_set(project):
    """`training.eval_every` is a train parameter only when it is set (> 0) and there is a
    held-out split: a spec that does not set it keeps its fingerprints."""
    from spar.plan import plan_specs
    from spar.spec import load_spec
    from spar.store import RunStore

    store = RunStore(project.runs)

    def fps() -> dict[str, str]:
        return {p.node.name: p.fingerprint for p in plan_specs([load_spec(project.spec)], store)}

    before = fps()
    project.edit(lambda d: d["training"].update(eval_every=0))
    assert fps() == before
    project.edit(lambda d: d["training"].update(eval_every=2))
    after = fps()
    assert after["train"] != before["train"] and after["dataset"] == before["dataset"]
    assert after["sample_base"] == before["sample_base"]
    project.edit(lambda d: d["data"].update(test_size=0))
    no_split = fps()
    project.edit(lambda d: d["training"].update(eval_every=0))
    assert fps()["train"] == no_split["train"]  # nothing to evaluate: no difference
    store.close()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"), reason="Debian chromium is not installed"
)
def test_training_curve_in_summary_png_and_the_browsers_dom(project, capsys, tmp_path):
    """`spar apply` (fake engine): metrics.jsonl -> summary.json's training block -> the
    page's SVG chart, read back from Chromium's DOM: one point per evaluation at its value."""
    # Fails if the report left the curve out, plotted the loss in its place, or placed a point
    # at the wrong height (the points' y must fall as the NLL does: 3 / (1 + step)).
    project.edit(lambda d: d["training"].update(eval_every=1))
    r = project.spar("apply", str(project.spec), capsys=capsys)
    assert r.code == 0, r.err
    metrics = read_jsonl(project.runs / "exp/train/metrics.jsonl")
    assert [m.get("test_nll") for m in metrics] == pytest.approx([1.5, 1.0, 0.75])
    summary = json.loads((project.runs / "exp/report/summary.json").read_text())
    t = summary["training"]
    assert t["steps"] == [0, 1, 2] and t["loss"] == pytest.approx([2.0, 1.0, 2 / 3])
    assert (
        t["test_nll"] == [{"step": s, "value": pytest.approx(3 / (1 + s))} for s in range(4)]
        and "held-out" in t["estimand"]
    )
    png = project.runs / "exp/plot/curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert CHROMIUM is not None
    out = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--dump-dom",
            (project.runs / "exp/plot/report.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    dom = out.stdout
    svg = re.search(r'<svg id="training-curve".*?</svg>', dom, re.S)
    assert svg is not None
    points = re.findall(
        r'<circle class="point test-nll" cx="([\d.]+)" cy="([\d.]+)"[^>]*'
        r'data-step="(\d+)" data-value="([\d.e-]+)"',
        svg.group(0),
    )
    assert [int(s) for *_, s, _ in points] == [0, 1, 2, 3]
    assert [float(v) for *_, v in points] == pytest.approx([3.0, 1.5, 1.0, 0.75])
    xs = [float(x) for x, *_ in points]
    ys = [float(y) for _, y, *_ in points]
    assert xs == sorted(xs) and len(set(xs)) == 4
    assert ys == sorted(ys) and len(set(ys)) == 4  # lower on the page as the NLL falls
    loss = re.search(r'<polyline class="line loss" points="([^"]+)"', svg.group(0))
    assert loss is not None and len(loss.group(1).split()) == 3  # one vertex per step
    table = re.findall(r'<tr data-step="(\d+)"><td>\d+</td><td class="value">([\d.]+)</td>', dom)
    assert table == [("0", "3.0000"), ("1", "1.5000"), ("2", "1.0000"), ("3", "0.7500")]


# ------------------------------------------------------------------------ the skyrl server


def test_held_out_nll_and_checkpoints_on_a_tinker_server(on_skyrl, tiny_model, tmp_path):  # noqa: F811
    """The same loop on engine tinker (skyrl's server): the held-out split goes through the
    SDK's `forward` (a FORWARD request, no gradient) after each step's optimiser step, and
    `test_nll` is the server's own log-probabilities weighted by the held-out weights; the
    checkpoint's sampler weights are saved after its step and can be sampled."""
    from test_tinker_engine import MAX_LENGTH, model_of, server_log

    from spar.engines.tinker import TinkerEngine

    rows = rows_of(str(tiny_model), 8, MAX_LENGTH)
    train, test = rows[:6], rows[6:]
    cfg = LoopConfig(lora_rank=4, learning_rate=1e-3, batch_size=2, eval_every=2, checkpoints=(1,))
    before = len(server_log(on_skyrl).requests)
    with State(tmp_path / "state.db") as state:
        res = train_loop(
            TinkerEngine(tmp_path),
            str(tiny_model),
            train,
            cfg,
            "tnll",
            TrainJournal(state, "tnll"),
            test_rows=test,
        )
    srv = server_log(on_skyrl)
    model = model_of(res.state_path)
    mine = [r for r in srv.requests[before:] if r.model == model]
    # the base model's NLL first; then after the update of steps 1 and 2 (0-based): every
    # evaluation after an OPTIM_STEP, none between a FORWARD_BACKWARD and its OPTIM_STEP
    assert [r.type for r in mine] == [
        "CREATE_MODEL",
        "FORWARD",
        *("FORWARD_BACKWARD", "OPTIM_STEP", "SAVE_WEIGHTS_FOR_SAMPLER"),  # checkpoint 1
        *("FORWARD_BACKWARD", "OPTIM_STEP", "FORWARD"),
        *("FORWARD_BACKWARD", "OPTIM_STEP", "FORWARD"),
        *("SAVE_WEIGHTS", "SAVE_WEIGHTS_FOR_SAMPLER"),  # the final state and weights
    ]
    forwards = [r for r in mine if r.type == "FORWARD"]
    want = []
    for req in forwards:  # the server's log-probabilities, weighted by the held-out weights
        sent = [d["loss_fn_inputs"]["target_tokens"]["data"] for d in req.data["data"]]
        assert sent == [r["target"] for r in test]
        nll = sum(
            -lp * w
            for out, row in zip(req.result["loss_fn_outputs"], test, strict=True)
            for lp, w in zip(out["logprobs"]["data"], row["weights"], strict=True)
        )
        want.append(nll / sum(sum(r["weights"]) for r in test))
    assert res.metrics[0]["test_nll_start"] == pytest.approx(want[0], rel=1e-6)
    assert [m.get("test_nll") for m in res.metrics] == [
        None,
        pytest.approx(want[1], rel=1e-6),
        pytest.approx(want[2], rel=1e-6),
    ]
    assert want[0] != want[2]  # the weights changed between them
    # the checkpoint: saved after step 1's update, sampled through a fresh sampling client
    assert sorted(res.checkpoints) == [1] and res.checkpoints[1] != res.sampler_path
    assert res.checkpoints[1].startswith("tinker://") and "step000001" in res.checkpoints[1]
    client = TinkerEngine(tmp_path).create_sampling_client(model_path=res.checkpoints[1])
    prompt = tinker.ModelInput.from_ints(rows[0]["input"][:8])
    out = client.sample(prompt, 1, tinker.SamplingParams(max_tokens=4, seed=0)).result()
    assert len(out.sequences) == 1 and out.sequences[0].tokens
    sessions = server_log(on_skyrl).sampling_sessions
    assert any(s["model_path"] == res.checkpoints[1] for s in sessions)
