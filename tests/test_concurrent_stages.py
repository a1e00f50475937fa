"""`spar apply --jobs N`: stages start as soon as their upstream is done, at most N at once and one
at a time per local device; the stage log (`runs/.spar/stages.jsonl`) records the order.

Ordering is checked through the stage log, never through timing: the `fake-remote` engine's
training (tests/fake_plugin.py) does not apply its first batch until the log says `sample_base`
finished, so that test passes only if the two stages really run at once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import Project

from spar.apply import _dependencies, apply_plan
from spar.plan import plan_specs
from spar.spec import load_spec
from spar.store import RunStore


def stage_log(project: Project) -> list[dict]:
    path = project.runs / ".spar" / "stages.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def index(events: list[dict], event: str, stage: str, experiment: str = "exp") -> int:
    for i, e in enumerate(events):
        if (e["event"], e["stage"], e["experiment"]) == (event, stage, experiment):
            return i
    raise AssertionError(f"no {event} {experiment}/{stage} in {events}")


def remote_engine(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    project.edit(lambda d: d["model"].update(engine="fake-remote"))
    monkeypatch.setenv("FAKE_STAGE_LOG", str(project.runs / ".spar" / "stages.jsonl"))


def overlapping(events: list[dict], stages: set[str]) -> list[tuple[str, str]]:
    """Pairs of `stages` that were running at the same moment of the log."""
    running: set[str] = set()
    pairs = []
    for e in events:
        name = f"{e['experiment']}/{e['stage']}"
        if e["stage"] not in stages:
            continue
        if e["event"] == "started":
            pairs += [(other, name) for other in running]
            running.add(name)
        elif e["event"] in ("finished", "failed", "stopped"):
            running.discard(name)
    return pairs


def test_sample_base_finishes_while_train_is_still_running(project, capsys, monkeypatch):
    remote_engine(project, monkeypatch)
    monkeypatch.setenv("FAKE_TRAIN_WAITS_FOR", "sample_base")
    r = project.spar("apply", str(project.spec), "--jobs", "3", capsys=capsys)
    assert r.code == 0, r.err
    events = stage_log(project)
    assert index(events, "started", "train") < index(events, "finished", "sample_base")
    assert index(events, "finished", "sample_base") < index(events, "finished", "train")
    # downstream stages waited for their upstream
    assert index(events, "finished", "train") < index(events, "started", "sample_finetuned")
    assert index(events, "finished", "sample_finetuned") < index(events, "started", "judge")
    # the output still lists stages in plan order (as `spar plan` does), not finishing order
    ran = [line for line in r.out.splitlines() if line.startswith("ran ")]
    assert ran.index("ran exp / sample_base") < ran.index("ran exp / train")
    # and a second apply is a no-op
    assert project.spar("apply", str(project.spec), capsys=capsys).out.startswith("nothing to do")


def test_one_heavy_stage_at_a_time_on_a_local_device(project, capsys, monkeypatch):
    """Engine `fake` declares no device: it is taken to compute locally, like engine `local`."""
    r = project.spar("apply", str(project.spec), "--jobs", "4", capsys=capsys)
    assert r.code == 0, r.err
    events = stage_log(project)
    heavy = {"train", "sample_base", "sample_finetuned", "judge"}
    assert overlapping(events, heavy) == []
    assert {e["stage"] for e in events if e["event"] == "finished"} >= heavy


def test_a_remote_engine_runs_stages_side_by_side(project, capsys, monkeypatch):
    """The same spec on the remote-declared engine: train and sample_base overlap (the training
    waits for sample_base to finish, so this cannot pass serially)."""
    remote_engine(project, monkeypatch)
    monkeypatch.setenv("FAKE_TRAIN_WAITS_FOR", "sample_base")
    assert project.spar("apply", str(project.spec), "--jobs", "2", capsys=capsys).code == 0
    pairs = overlapping(stage_log(project), {"train", "sample_base"})
    assert [set(p) for p in pairs] == [{"exp/train", "exp/sample_base"}]


def test_every_failed_stage_is_reported_and_nothing_downstream_starts(project, capsys, monkeypatch):
    """Each failure lands while the other stage runs (the waits of the remote fake engine)."""
    remote_engine(project, monkeypatch)
    monkeypatch.setenv("FAKE_TRAIN_WAITS_FOR", "sample_base")
    monkeypatch.setenv("FAKE_FAIL_SAMPLE", "base model unreachable")
    monkeypatch.setenv("FAKE_FAIL_TRAIN", "trainer exploded")
    r = project.spar("apply", str(project.spec), "--jobs", "4", capsys=capsys)
    assert r.code == 1
    assert "2 stages failed" in r.err
    assert "exp / sample_base: " in r.err and "base model unreachable" in r.err
    assert "exp / train: " in r.err and "trainer exploded" in r.err
    events = stage_log(project)
    failed = {e["stage"] for e in events if e["event"] == "failed"}
    assert failed == {"sample_base", "train"}
    started = {e["stage"] for e in events if e["event"] == "started"}
    assert not started & {"sample_finetuned", "judge", "report", "plot"}
    # one failure alone: its own message, as with --jobs 1
    monkeypatch.delenv("FAKE_FAIL_TRAIN")
    monkeypatch.delenv("FAKE_TRAIN_WAITS_FOR")
    r = project.spar("apply", str(project.spec), "--jobs", "4", capsys=capsys)
    assert r.code == 1 and "stages failed" not in r.err and "base model unreachable" in r.err
    # several stages failing for one reason (an unreachable service): one line naming them all
    shutil.rmtree(project.runs)
    monkeypatch.setenv("FAKE_TRAIN_WAITS_FOR", "sample_base")
    monkeypatch.setenv("FAKE_FAIL_TRAIN", "base model unreachable")
    r = project.spar("apply", str(project.spec), "--jobs", "4", capsys=capsys)
    lines = [x for x in r.err.splitlines() if "spar: " in x]  # after progress bars
    assert r.code == 1 and len(lines) == 1, r.err
    assert lines[0].endswith(
        "2 stages failed: exp / sample_base, exp / train: base model unreachable"
    )


def test_jobs_must_be_positive(project, capsys):
    with pytest.raises(SystemExit) as e:
        project.spar("apply", str(project.spec), "--jobs", "0", capsys=capsys)
    assert e.value.code == 2
    assert "--jobs: must be at least 1" in capsys.readouterr().err
    assert not project.runs.exists()


def test_twins_in_one_apply_run_once_and_the_second_is_restored(project, capsys, monkeypatch):
    """Two experiments that differ only in name have equal fingerprints everywhere: with many
    jobs the second waits for the first and is restored from the run cache."""
    remote_engine(project, monkeypatch)
    twin = project.root / "twin.yaml"
    data = yaml.safe_load(project.spec.read_text())
    data["name"] = "twin"
    twin.write_text(yaml.safe_dump(data, sort_keys=False))
    r = project.spar("apply", str(project.spec), str(twin), "--jobs", "8", capsys=capsys)
    assert r.code == 0, r.err
    events = stage_log(project)
    twin_events = {e["stage"]: e["event"] for e in events if e["experiment"] == "twin"}
    for stage in ("dataset", "train", "sample_base", "sample_finetuned", "judge"):
        assert twin_events[stage] == "restored", (stage, twin_events)
    steps = (project.runs / "exp" / "train" / "metrics.jsonl").read_text().splitlines()
    assert project.calls_of("forward_backward") == len(steps) > 0  # trained once


def test_dependencies_name_upstream_and_twins(project):
    store = RunStore(project.runs)
    try:
        plan = plan_specs([load_spec(project.spec)], store)
        deps = _dependencies(plan)
        assert deps[("exp", "train")] == {("exp", "dataset")}
        assert ("exp", "train") in deps[("exp", "sample_finetuned")]
        assert ("exp", "train") not in deps[("exp", "sample_base")]
        # jobs=1 runs exactly as before: everything in plan order
        outcome = apply_plan(store, plan, jobs=1)
        assert [p.key for p in outcome.ran] == [p.key for p in plan]
        assert Path(project.runs / ".spar" / "stages.jsonl").exists()
    finally:
        store.close()


def test_progress_bars_name_the_experiment_when_several_run_at_once(project, capsys, monkeypatch):
    """Two experiments (another seed: both train) under --jobs: each stage's bar names its
    experiment; one experiment alone keeps the plain labels."""
    remote_engine(project, monkeypatch)
    r = project.spar("apply", str(project.spec), "--jobs", "4", capsys=capsys)
    assert r.code == 0, r.err
    assert "train:" in r.err and "exp train" not in r.err and "exp judge" not in r.err
    other = project.root / "other.yaml"
    data = yaml.safe_load(project.spec.read_text())
    data["name"] = "other"
    data["training"]["seed"] = data["training"].get("seed", 0) + 1
    other.write_text(yaml.safe_dump(data, sort_keys=False))
    shutil.rmtree(project.runs)
    r = project.spar("apply", str(project.spec), str(other), "--jobs", "4", capsys=capsys)
    assert r.code == 0, r.err
    for experiment in ("exp", "other"):
        for bar in ("train:", "sample sample_finetuned:", "judge:"):
            assert f"{experiment} {bar}" in r.err, (experiment, bar, r.err[-3000:])
