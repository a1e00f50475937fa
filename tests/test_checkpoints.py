"""Checkpoint curves: `eval.checkpoints` saves sampler weights at the listed steps, samples and
judges each like the final model, and the report gives the effect per tier against step."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from fake_plugin import TOPIC, FakeEngine

from spar.errors import RunError
from spar.stages.train import LoopConfig, TrainJournal, train_loop
from spar.store import read_jsonl
from spar.store.state import State

# 8 docs, test_size 2, batch_size 2: 3 optimiser steps
STEPS = 3


def absolute(d: dict[str, Any]) -> None:
    d["judge"]["mode"] = "absolute"


def checkpoints(*steps: int | str) -> Any:
    def edit(d: dict[str, Any]) -> None:
        d["eval"]["checkpoints"] = list(steps)

    return edit


def topic(response: str) -> bool:
    return any(w in response for w in TOPIC)


def expected_effects(samples: list[dict[str, Any]], base: list[dict[str, Any]], mode: str):
    """tier -> the effect computed by hand from the answers (the keyword judge scores 1 + 2 x
    topic words; base answers have none): absolute, the mean paired delta 2 x topic; pairwise,
    the fine-tuned score 1 + 2 x topic. Every question has the same number of samples, so the
    mean over questions of per-question means is the plain mean."""
    base_ids = {r["item_id"] for r in base}
    by_tier: dict[str, list[float]] = {}
    for r in samples:
        assert r["item_id"] in base_ids
        v = 2.0 * topic(r["response"])
        by_tier.setdefault(r["tier"], []).append(v if mode == "absolute" else 1 + v)
    return {t: sum(vs) / len(vs) for t, vs in by_tier.items()}


@pytest.mark.parametrize("mode", ["absolute", "pairwise"])
def test_two_intermediate_checkpoints_give_three_points_per_tier(
    project, capsys, monkeypatch, mode
):
    """`eval.checkpoints: [1, 2, final]`: sample_step1/2 draw from the weights saved after 1 and
    2 steps (the fake model puts the topic into about steps / (steps + 1) of its answers), are
    judged like the final model, and each tier gets 3 points whose effects are those answers'."""
    # Fails if a checkpoint were sampled from the final weights (or another step's), if its
    # verdicts were paired with the wrong answers, or if the points were put at the wrong steps.
    monkeypatch.setenv("FAKE_DOSE", "1")
    if mode == "absolute":
        (project.root / "rubric.j2").write_text("Rate {{ response }} for {{ question }}.\n")
        project.edit(absolute)
    project.edit(checkpoints(1, 2, "final"))
    project.edit(lambda d: d["eval"].update(samples_per_question=4))
    r = project.spar("apply", str(project.spec), capsys=capsys)
    assert r.code == 0, r.err
    runs = project.runs / "exp"
    record = json.loads((runs / "train/checkpoint.json").read_text())
    assert record["steps"] == STEPS and sorted(record["checkpoints"]) == ["1", "2"]
    for step, path in record["checkpoints"].items():
        state = json.loads(Path(path.removeprefix("fake://")).read_text())
        assert state["steps"] == int(step)  # the weights after that many steps
    assert record["sampler_path"] not in record["checkpoints"].values()
    # each checkpoint's answers came from its own weights (the fake engine's call log)
    calls = [json.loads(x) for x in project.calls.read_text().splitlines()]
    refs = {c["ref"] for c in calls if c["event"] == "sample"}
    assert set(record["checkpoints"].values()) | {record["sampler_path"]} <= refs
    n_items = 4 * 4  # 4 questions x 4 samples
    assert project.calls_of("sample") == 4 * n_items  # base, final, step 1, step 2

    base = read_jsonl(runs / "sample_base/samples.jsonl")
    answers = {
        1: read_jsonl(runs / "sample_step1/samples.jsonl"),
        2: read_jsonl(runs / "sample_step2/samples.jsonl"),
        STEPS: read_jsonl(runs / "sample_finetuned/samples.jsonl"),
    }
    assert all(len(a) == n_items for a in answers.values())
    want = {s: expected_effects(a, base, mode) for s, a in answers.items()}
    assert len({json.dumps(w, sort_keys=True) for w in want.values()}) == 3  # the data differ
    for step in (1, 2):
        judged = read_jsonl(runs / f"judge_step{step}/judged.jsonl")
        tuned = [j for j in judged if j["model"] == "finetuned"]
        assert {j["item_id"] for j in tuned} == {a["item_id"] for a in answers[step]}
        if mode == "absolute":  # beside the baseline's own verdicts
            assert judged[: len(base)] == read_jsonl(runs / "judge_base/judged.jsonl")

    summary = json.loads((runs / "report/summary.json").read_text())
    points = summary["checkpoints"]
    assert summary["conditions"][""]["checkpoints"] == points
    assert [p["step"] for p in points] == [1, 2, STEPS]
    assert [p.get("final", False) for p in points] == [False, False, True]
    tiers = list(summary["tiers"])
    for p in points:
        assert list(p["tiers"]) == tiers  # 3 points per tier
        for tier in tiers:
            assert p["tiers"][tier]["mean"] == pytest.approx(want[p["step"]][tier]), (p, tier)
    # the final point is the report's own headline effect of the final model
    for tier in tiers:
        head = summary["tiers"][tier]["delta" if mode == "absolute" else "finetuned"]
        assert points[-1]["tiers"][tier]["mean"] == pytest.approx(head["mean"])
        assert "estimand" in points[0]["tiers"][tier]
    # plotted, and in the page
    assert (runs / "plot/curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (runs / "plot/report.html").read_text()
    svg = re.search(r'<svg id="checkpoint-curve".*?</svg>', html, re.S)
    assert svg is not None
    marks = re.findall(
        r'<circle class="point tier"[^>]*'
        r'data-series="([^"]+)" data-step="(\d+)" data-value="([^"]+)"',
        svg.group(0),
    )
    assert sorted((t, int(s)) for t, s, _ in marks) == sorted(
        (t, s) for t in tiers for s in (1, 2, STEPS)
    )
    for t, s, v in marks:
        assert float(v) == pytest.approx(want[int(s)][t])
    assert re.findall(r'<table id="checkpoints" class="checkpoints">', html)


def test_without_intermediate_checkpoints_nothing_changes(project):
    """`[final]` (the default) adds no stage and changes no fingerprint; intermediate steps
    change the train stage (it saves them) and what depends on it, never the baseline's."""
    from spar.plan import plan_specs
    from spar.spec import load_spec
    from spar.store import RunStore

    store = RunStore(project.runs)

    def fps() -> dict[str, str]:
        return {p.node.name: p.fingerprint for p in plan_specs([load_spec(project.spec)], store)}

    before = fps()
    assert not [n for n in before if "_step" in n]
    project.edit(checkpoints("final"))
    assert fps() == before
    project.edit(checkpoints(2, "final"))
    after = fps()
    assert set(after) - set(before) == {"sample_step2", "judge_step2"}
    for name in ("dataset", "sample_base"):
        assert after[name] == before[name]
    for name in ("train", "sample_finetuned", "judge", "report"):
        assert after[name] != before[name]
    store.close()


def test_a_checkpoint_beyond_the_training_steps_is_one_line_at_plan_time(project, capsys):
    project.edit(checkpoints(2, STEPS + 1, "final"))
    r = project.spar("plan", str(project.spec), capsys=capsys)
    assert r.code == 2
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and "eval.checkpoints" in lines[0] and f"step {STEPS + 1}" in lines[0]
    assert f"{STEPS} training steps" in lines[0]
    r = project.spar("apply", str(project.spec), capsys=capsys)
    assert r.code == 2 and project.calls_of("forward_backward") == 0  # before any work
    # exactly the total is the final weights: fine
    project.edit(checkpoints(STEPS, "final"))
    assert project.spar("plan", str(project.spec), capsys=capsys).code == 0


def test_the_loop_refuses_a_step_beyond_its_plan_before_training(tiny_model, tmp_path, project):
    """Where the steps were not known at plan time (e.g. a generated data set), the run says
    so before the first batch."""
    from test_train_curves import rows_of

    rows = rows_of(str(tiny_model), 4)
    with State(tmp_path / "s.db") as state, pytest.raises(RunError) as err:
        cfg = LoopConfig(batch_size=2, checkpoints=(1, 5))
        train_loop(FakeEngine(tmp_path), str(tiny_model), rows, cfg, "r", TrainJournal(state, "r"))
    assert "eval.checkpoints: step 5 is beyond the 2 training steps" in str(err.value)
    assert project.calls_of("forward_backward") == 0


def test_intermediate_checkpoints_survive_a_resume(tiny_model, tmp_path):
    """engine local: checkpoints saved before the state a crashed run resumes from are kept (not
    saved again); those after it are saved by the resumed run; both hold the uninterrupted run's
    weights."""
    # Fails if a resume forgot the earlier checkpoints, kept a stale path for a step it redid,
    # or saved the weights at the wrong step.
    from safetensors.torch import load_file
    from test_train_curves import Crash, rows_of

    from spar.engines.local import LocalEngine

    base = str(tiny_model)
    rows = rows_of(base, 8)
    cfg = LoopConfig(
        lora_rank=4, learning_rate=2e-2, batch_size=2, save_every=2, checkpoints=(1, 3, 4)
    )
    with State(tmp_path / "state.db") as state:
        ref = train_loop(
            LocalEngine(tmp_path / "ref"), base, rows, cfg, "ref", TrainJournal(state, "ref")
        )
        assert sorted(ref.checkpoints) == [1, 3, 4] and ref.checkpoints[4] == ref.sampler_path

        def crash(row: dict[str, Any]) -> None:
            if row["step"] == 2:  # 3 updates applied; the state at 2 saved, step 3's not yet
                raise Crash

        journal = TrainJournal(state, "run")
        engine = LocalEngine(tmp_path / "run")
        with pytest.raises(Crash):
            train_loop(engine, base, rows, cfg, "run", journal, on_step=crash)
        first = {
            r["batch"]: r["sampler_path"] for r in journal.checkpoints() if "sampler" in r["name"]
        }
        assert sorted(first) == [1]
        mtime = (Path(first[1]) / "adapter_model.safetensors").stat().st_mtime_ns
        res = train_loop(engine, base, rows, cfg, "run", journal)
        assert res.resumed_at == 2
        assert sorted(res.checkpoints) == [1, 3, 4] and res.checkpoints[1] == first[1]
        assert (Path(first[1]) / "adapter_model.safetensors").stat().st_mtime_ns == mtime
        # a finished run asked again returns the same checkpoints without training
        again = train_loop(engine, base, rows, cfg, "run", journal)
        assert again.checkpoints == res.checkpoints and again.resumed_at == 4
    for step in (1, 3, 4):
        got = load_file(str(Path(res.checkpoints[step]) / "adapter_model.safetensors"))
        want = load_file(str(Path(ref.checkpoints[step]) / "adapter_model.safetensors"))
        for k in want:
            assert got[k].allclose(want[k], atol=1e-6), (step, k)
    one = load_file(str(Path(ref.checkpoints[1]) / "adapter_model.safetensors"))
    three = load_file(str(Path(ref.checkpoints[3]) / "adapter_model.safetensors"))
    assert any(not one[k].allclose(three[k]) for k in one)  # different steps, different weights


def test_checkpoints_per_condition(project, capsys):
    """With eval.conditions, every condition gets its checkpoint stages and its own points (in
    `conditions.<c>.checkpoints`; no top-level `checkpoints`)."""

    def edit(d: dict[str, Any]) -> None:
        d["eval"].pop("system_prompt")
        d["eval"]["trigger"] = "Wrap your answer in <START> and <END>."
        d["eval"]["conditions"] = {
            "triggered": {"trigger": "user"},
            "untriggered": {"system_prompt": "You are a helpful assistant."},
        }
        d["eval"]["checkpoints"] = [1, 2, "final"]
        d["judge"]["mode"] = "absolute"

    project.edit(edit)
    (project.root / "rubric.j2").write_text("Rate {{ response }} for {{ question }}.\n")
    r = project.spar("apply", str(project.spec), capsys=capsys)
    assert r.code == 0, r.err
    runs = project.runs / "exp"
    for c in ("triggered", "untriggered"):
        for step in (1, 2):
            assert (runs / f"sample_step{step}.{c}/samples.jsonl").exists()
            assert (runs / f"judge_step{step}.{c}/judged.jsonl").exists()
    summary = json.loads((runs / "report/summary.json").read_text())
    assert "checkpoints" not in summary
    for c in ("triggered", "untriggered"):
        points = summary["conditions"][c]["checkpoints"]
        assert [p["step"] for p in points] == [1, 2, STEPS]
        assert all(len(p["tiers"]) == 3 for p in points)
    html = (runs / "plot/report.html").read_text()
    assert 'id="checkpoints-triggered"' in html and 'id="checkpoint-curve-untriggered"' in html
