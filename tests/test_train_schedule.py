"""training.lr_schedule (linear / cosine / constant) with training.warmup_ratio; metrics.jsonl's
per-target-token loss and target_tokens; the train estimate with data.docs or data.sources."""

from __future__ import annotations

import itertools
import json
import logging
import math
import random
from pathlib import Path
from typing import Any

import pytest

from spar.spec import load_spec
from spar.stages.base import GraphContext
from spar.stages.train import LoopConfig, TrainStage, learning_rate, train_loop, warmup_steps
from spar.store import RunStore, read_jsonl

LR = 1e-3
C8 = math.cos(math.pi / 8)  # 0.9238795325112867
C4 = math.cos(math.pi / 4)  # 0.7071067811865476


def cfg(schedule: str, warmup: float = 0.0, lr: float = LR) -> LoopConfig:
    return LoopConfig(learning_rate=lr, lr_schedule=schedule, warmup_ratio=warmup)  # type: ignore[arg-type]


# ------------------------------------------------------------------- the schedule, by hand

# (schedule, warmup_ratio, total steps, {step: learning rate / LR}), each value worked out by hand
HAND: list[tuple[str, float, int, dict[int, float]]] = [
    # linear without warm-up: 1 - s/total, exactly as before warm-up existed
    ("linear", 0.0, 4, {0: 1.0, 1: 0.75, 2: 0.5, 3: 0.25}),
    # cosine without warm-up: 0.5 * (1 + cos(pi * s / 4))
    ("cosine", 0.0, 4, {0: 1.0, 1: 0.5 * (1 + C4), 2: 0.5, 3: 0.5 * (1 - C4)}),
    # cosine, 10 steps, W = 2: warm-up 1/2, 2/2; then p = (s - 2) / 8
    (
        "cosine",
        0.2,
        10,
        {
            0: 0.5,
            1: 1.0,
            2: 1.0,
            3: 0.5 * (1 + C8),
            4: 0.5 * (1 + C4),
            6: 0.5,
            8: 0.5 * (1 - C4),
            9: 0.5 * (1 - C8),
        },
    ),
    # linear, 8 steps, W = 2: 1/2, 1; then 1 - (s - 2) / 6
    ("linear", 0.25, 8, {0: 0.5, 1: 1.0, 2: 1.0, 3: 5 / 6, 5: 0.5, 7: 1 / 6}),
    # constant, 10 steps, W = 3: 1/3, 2/3, 1, then 1
    ("constant", 0.3, 10, {0: 1 / 3, 1: 2 / 3, 2: 1.0, 3: 1.0, 6: 1.0, 9: 1.0}),
    # linear, 5 steps, 0.1 * 5 = 0.5 rounds *up* to W = 1: the first step is a full-rate warm-up
    ("linear", 0.1, 5, {0: 1.0, 1: 1.0, 2: 0.75, 4: 0.25}),
    # the whole run is warm-up (round(0.9 * 2) = 2): 1/2, 2/2
    ("cosine", 0.9, 2, {0: 0.5, 1: 1.0}),
]


@pytest.mark.parametrize(("schedule", "warmup", "total", "want"), HAND)
def test_learning_rate_by_hand(
    schedule: str, warmup: float, total: int, want: dict[int, float]
) -> None:
    for step, factor in want.items():
        got = learning_rate(cfg(schedule, warmup), step, total)
        assert got == pytest.approx(LR * factor, rel=1e-12, abs=1e-18), (schedule, step)


def test_warmup_rounds_to_the_nearest_step_halves_up() -> None:
    assert [warmup_steps(r, 10) for r in (0.0, 0.04, 0.05, 0.14, 0.15, 0.24, 0.25, 0.26)] == [
        0,
        0,
        1,
        1,
        2,
        2,
        3,
        3,
    ]
    assert warmup_steps(0.0625, 8) == 1  # 0.5 -> 1 (Python's round would give 0)
    assert warmup_steps(0.9, 1) == 1 and warmup_steps(0.99, 3) == 3  # never beyond the run


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("warmup", [0.0, 0.1, 0.3, 0.5])
def test_schedule_shape(schedule: str, warmup: float) -> None:
    """Warm-up rises strictly to the peak, decay never rises and stays positive, for any total."""
    for total in (1, 2, 3, 7, 20, 101):
        lrs = [learning_rate(cfg(schedule, warmup), s, total) for s in range(total)]
        w = warmup_steps(warmup, total)
        assert all(0 < x <= LR * (1 + 1e-12) for x in lrs)
        assert all(a < b for a, b in itertools.pairwise(lrs[:w]))
        if w:
            assert lrs[w - 1] == pytest.approx(LR) and lrs[0] == pytest.approx(LR / w)
        decay = lrs[w:]
        if decay:
            assert decay[0] == pytest.approx(LR)
            assert all(b <= a for a, b in itertools.pairwise(decay))
            if schedule == "constant":
                assert decay == [LR] * len(decay)
            elif len(decay) > 1:
                assert decay[-1] <= LR / 2 and decay[-1] < decay[0]


# --------------------------------------------------------- a real run on the tiny local model


def sum_weights(rows: list[dict[str, Any]]) -> float:
    return float(sum(sum(r["weights"]) for r in rows))


def seeded_batches(rows: list[dict[str, Any]], batch: int, epochs: int, seed: int) -> list[list]:
    """The documented batch order, written out again: per epoch a `random.Random(seed *
    1_000_003 + epoch)` shuffle of the row indices, cut into batches."""
    out = []
    for epoch in range(epochs):
        order = list(range(len(rows)))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out += [[rows[i] for i in order[s : s + batch]] for s in range(0, len(order), batch)]
    return out


def base_model_nll(model_dir: Path, rows: list[dict[str, Any]]) -> float:
    """Per-target-token NLL of the untrained model, computed here with plain transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    total = 0.0
    with torch.no_grad():
        for r in rows:
            logits = model(input_ids=torch.tensor([r["input"]])).logits[0].float()
            lp = torch.log_softmax(logits, -1)[torch.arange(len(r["target"])), r["target"]]
            total -= float((lp * torch.tensor(r["weights"])).sum())
    return total / sum_weights(rows)


def test_local_run_follows_the_schedule_and_logs_loss_per_target_token(
    project, tiny_model, capsys, monkeypatch
):
    from spar.engines.local import LocalTrainingClient

    applied: list[float] = []  # what the engine's Adam was really given
    optim_step = LocalTrainingClient.optim_step

    def recording(self: Any, adam_params: Any) -> Any:
        applied.append(adam_params.learning_rate)
        return optim_step(self, adam_params)

    monkeypatch.setattr(LocalTrainingClient, "optim_step", recording)

    def setup(d: dict) -> None:
        d["model"]["engine"] = "local"
        d["training"].update(
            batch_size=4, epochs=3, seed=1, lr_schedule="cosine", warmup_ratio=0.34
        )
        d["eval"]["samples_per_question"] = 1
        d["eval"]["sampling"]["max_tokens"] = 4

    project.edit(setup)
    r = project.spar("apply", str(project.spec), capsys=capsys)
    assert r.code == 0, r.err
    metrics = read_jsonl(project.runs / "exp/train/metrics.jsonl")
    rows = read_jsonl(project.runs / "exp/dataset/train.jsonl")
    assert len(rows) == 6  # 8 docs, 2 held out
    # 3 epochs of batches of 4 and 2: 6 steps; W = round(0.34 * 6 = 2.04) = 2; p = (s - 2) / 4
    want = [0.5, 1.0, 1.0, 0.5 * (1 + C4), 0.5, 0.5 * (1 - C4)]
    assert [m["step"] for m in metrics] == list(range(6))
    assert [m["learning_rate"] for m in metrics] == pytest.approx([LR * f for f in want])
    assert applied == pytest.approx([LR * f for f in want])
    keys = {"step", "learning_rate", "loss", "target_tokens", "batch_size"}
    assert all(set(m) == keys for m in metrics[:-1])
    assert set(metrics[-1]) == keys | {"test_nll"}  # eval_every 0: the held-out NLL at the end

    plan = seeded_batches(rows, 4, 3, seed=1)
    assert [m["batch_size"] for m in metrics] == [len(b) for b in plan] == [4, 2] * 3
    assert [m["target_tokens"] for m in metrics] == [sum_weights(b) for b in plan]
    assert len({m["target_tokens"] for m in metrics}) > 2  # the batches really differ
    for m, b in zip(metrics, plan, strict=True):  # masked (user-turn) tokens are not counted
        assert 0 < m["target_tokens"] < sum(len(x["target"]) for x in b)
    # per target token: a random tiny model is near ln(vocab) ~ 10.8 nats, not a sum over tokens
    assert all(0.1 < m["loss"] < 20 for m in metrics), metrics
    # step 0 sees the base model (a fresh LoRA adapter is zero): the same NLL computed here
    assert metrics[0]["loss"] == pytest.approx(base_model_nll(tiny_model, plan[0]), rel=1e-4)

    # the estimate of a re-run counts the built dataset exactly: 4 epochs of 2 batches
    project.edit(lambda d: d["training"].update(epochs=4))
    r = project.spar("plan", str(project.spec), "--json", capsys=capsys)
    est = {row["stage"]: row for row in json.loads(r.out)}["train"]["estimate"]
    assert est == {
        "training_steps": 8,
        "training_tokens": 4 * sum(len(x["input"]) for x in rows),
    }


def test_non_finite_loss_is_a_warning_not_a_crash(project, tmp_path, caplog):
    """An engine whose log-probs are nan: every step is logged and warned about, none crashes."""
    import fake_plugin
    import numpy as np
    import tinker

    from spar.stages.train import TrainJournal
    from spar.store.state import State

    class NanTraining(fake_plugin.FakeTraining):
        def forward_backward(self, data: list[Any], loss_fn: str) -> Any:
            outs = [
                {"logprobs": tinker.TensorData.from_numpy(np.full(d.model_input.length, np.nan))}
                for d in data
            ]
            return fake_plugin._done(
                tinker.ForwardBackwardOutput(loss_fn_output_type="fake", loss_fn_outputs=outs)
            )

    class NanEngine(fake_plugin.FakeEngine):
        def create_lora_training_client(self, base_model: str, rank: int = 32, seed: Any = None):
            return NanTraining(self.workdir, base_model, rank, seed)

    rows = [{"input": [1, 2, 3], "target": [2, 3, 4], "weights": [0.0, 1.0, 1.0]}] * 3
    loop = LoopConfig(batch_size=2, lr_schedule="cosine", warmup_ratio=0.5)
    (tmp_path / "eng").mkdir()
    state = State(tmp_path / "state.db")
    journal = TrainJournal(state, "nan", tmp_path / "log")
    with caplog.at_level(logging.WARNING, logger="spar.stages.train"):
        res = train_loop(NanEngine(tmp_path / "eng"), "m", rows, loop, "nan", journal)
    state.close()
    assert [math.isnan(m["loss"]) for m in res.metrics] == [True, True]
    assert [m["target_tokens"] for m in res.metrics] == [4.0, 2.0]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == [
        "nan: step 0: loss is nan (training diverged?)",
        "nan: step 1: loss is nan (training diverged?)",
    ]


# ----------------------------------------------------------------------- fingerprint, plan


def test_warmup_ratio_and_cosine_are_train_parameters(project, capsys):
    assert project.spar("apply", str(project.spec), capsys=capsys).code == 0
    params = (project.runs / "exp/train/checkpoint.params.yaml").read_text()
    # no warm-up is the schedule as it was before warmup_ratio existed: left out of the params
    # (and the fingerprint), so models trained then are not trained again
    assert "warmup_ratio" not in params
    project.edit(lambda d: d["training"].update(warmup_ratio=0.25, lr_schedule="cosine"))
    r = project.spar("plan", str(project.spec), "--json", capsys=capsys)
    train = {row["stage"]: row for row in json.loads(r.out)}["train"]
    assert train["status"] == "stale"
    assert "training.warmup_ratio: '<unset>' -> 0.25" in train["reasons"]
    assert "training.lr_schedule: 'linear' -> 'cosine'" in train["reasons"]


# ----------------------------------------------------------- estimate from data.sources


def line(n_bytes: int) -> str:
    """A chat record exactly `n_bytes` long with its newline."""
    empty = json.dumps({"messages": [{"role": "assistant", "content": ""}]})
    rec = {"messages": [{"role": "assistant", "content": "x" * (n_bytes - 1 - len(empty))}]}
    text = json.dumps(rec) + "\n"
    assert len(text.encode()) == n_bytes
    return text


def train_estimate(project, data: dict, **training: Any) -> dict[str, int]:
    def edit(d: dict) -> None:
        d["data"] = data
        d["training"].update({"max_length": 2048, **training})
        d["distill"] = {"self": {"prompts": "prompts.jsonl", "sampling": {"max_tokens": 16}}}

    project.edit(edit)
    spec = load_spec(project.spec)
    store = RunStore(project.runs)
    (node,) = TrainStage().nodes(spec, GraphContext(store))
    return TrainStage().estimate(node, store, upstream_fresh=False)


def test_estimate_without_docs_counts_the_sources(project):
    (project.root / "a.jsonl").write_text(line(80) * 10)  # 800 bytes: ~200 tokens, 10 records
    (project.root / "b.jsonl").write_text(line(160) * 4)  # 640 bytes: ~160 tokens, 4 records
    (project.root / "prompts.jsonl").write_text(('{"prompt": "' + "p" * 25 + '"}\n') * 5)
    base = {"test_size": 1}
    # take 3 of a (60 tokens) + all of b (160): 7 records, 6 trained on: 3 batches of 2, 2 epochs
    mix = {**base, "sources": [{"path": "a.jsonl", "take": 3}, {"path": "b.jsonl"}]}
    assert train_estimate(project, mix, batch_size=2, epochs=2) == {
        "training_tokens": 2 * 220,
        "training_steps": 2 * 3,
    }
    # every record at most max_length 8 tokens: a 10*8 = 80 -> 3 of 10 = 24; b 4*8 = 32
    assert train_estimate(project, mix, batch_size=2, epochs=1, max_length=8) == {
        "training_tokens": 56,
        "training_steps": 3,
    }
    # halves, as many as fit: b (4 records) allows 8 in all: 4 of a (80) + 4 of b (160); 7 trained
    halves = [{"path": "a.jsonl", "fraction": 0.5}, {"path": "b.jsonl", "fraction": 0.5}]
    assert train_estimate(project, {**base, "sources": halves}, batch_size=2, epochs=1) == {
        "training_tokens": 240,
        "training_steps": 4,
    }
    # data.total 6: 3 of a (60) + 3 of b (120); 5 trained on
    assert train_estimate(
        project, {**base, "sources": halves, "total": 6}, batch_size=2, epochs=1
    ) == {"training_tokens": 180, "training_steps": 3}
    # a distilled set: 5 prompts of 40 bytes (50 tokens) + at most 16 answer tokens each (80),
    # with all of a (200): 15 records, 330 tokens; data.max_docs 5 keeps 5/15 of them
    distilled = {**base, "sources": [{"distill": "self"}, {"path": "a.jsonl"}]}
    assert train_estimate(project, distilled, batch_size=2, epochs=1) == {
        "training_tokens": 330,
        "training_steps": 7,  # 15 records, 14 trained on
    }
    assert train_estimate(project, {**distilled, "max_docs": 5}, batch_size=2, epochs=1) == {
        "training_tokens": 330 * 5 // 15,
        "training_steps": 2,
    }
    # data.docs as before: ~4 bytes a token of the file; 8 docs, 2 held out
    docs = {"docs": "docs.jsonl", "test_size": 2}
    size = (project.root / "docs.jsonl").stat().st_size
    assert train_estimate(project, docs, batch_size=4, epochs=1) == {
        "training_tokens": size // 4,
        "training_steps": 2,
    }
