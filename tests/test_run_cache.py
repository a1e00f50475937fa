"""The run cache and the item memo: nothing computed twice, nothing stale shown."""

from __future__ import annotations

import json

import pytest

ALL = ["dataset", "train", "sample_base", "sample_finetuned", "judge", "report", "plot"]


def apply(project, capsys, *specs):
    r = project.spar("apply", *(str(s) for s in specs or [project.spec]), capsys=capsys)
    assert r.code == 0, r.err
    return r.out


def plan(project, capsys, spec=None) -> dict[str, dict]:
    r = project.spar("plan", str(spec or project.spec), "--json", capsys=capsys)
    assert r.code == 0, r.err
    return {row["stage"]: row for row in json.loads(r.out)}


def judged(project) -> list[dict]:
    text = (project.runs / "exp/judge/judged.jsonl").read_text()
    return [json.loads(x) for x in text.splitlines() if x]


def outputs(project, exp="exp") -> dict[str, bytes]:
    return {
        str(p.relative_to(project.runs)): p.read_bytes()
        for p in sorted((project.runs / exp).rglob("*"))
        if p.is_file() and not p.name.endswith(".params.yaml")
    }


def test_lr_a_b_a_restores_everything_the_third_time(project, capsys):
    apply(project, capsys)
    first = outputs(project)
    steps_a = project.calls_of("optim_step")
    assert steps_a > 0
    project.edit(lambda d: d["training"].update(learning_rate=2e-3))
    apply(project, capsys)
    steps_b, samples_b = project.calls_of("optim_step"), project.calls_of("sample")
    assert steps_b == 2 * steps_a  # B trained
    project.edit(lambda d: d["training"].update(learning_rate=1e-3))
    rows = plan(project, capsys)
    assert {s: rows[s]["action"] for s in ALL if rows[s]["status"] != "fresh"} == {
        "train": "restore",
        "sample_finetuned": "restore",
        "judge": "restore",
        "report": "restore",
        "plot": "restore",
    }
    out = apply(project, capsys)
    assert "ran " not in out and out.count("restored exp / ") == 5
    # A again: 0 training steps, 0 samples, and exactly the first run's bytes
    assert project.calls_of("optim_step") == steps_b
    assert project.calls_of("sample") == samples_b
    assert outputs(project) == first
    assert {r["status"] for r in plan(project, capsys).values()} == {"fresh"}
    restored = (project.runs / "exp/train/checkpoint.params.yaml").read_text()
    assert "restored_from: exp" in restored


def test_specs_differing_only_in_labels_train_once_and_keep_their_labels(project, capsys):
    apply(project, capsys)
    steps, samples, judged = (project.calls_of(e) for e in ("optim_step", "sample", "judge"))
    other = project.root / "relabelled.yaml"
    other.write_text(
        f"extends: {project.spec.name}\nname: relabelled\nframing: skeptical tone\n"
        "description: the same experiment under another label\n"
    )
    out = apply(project, capsys, other)
    assert (project.calls_of("optim_step"), project.calls_of("sample")) == (steps, samples)
    assert project.calls_of("judge") == judged
    assert "ran relabelled / plot" in out  # the one stage whose outputs carry the label
    assert "restored relabelled / train (run cache)" in out
    html = (project.runs / "relabelled/plot/report.html").read_text()
    assert "skeptical tone" in html and "relabelled" in html
    assert "skeptical tone" not in (project.runs / "exp/plot/report.html").read_text()
    # the summary carries no label, so it is shared byte for byte
    a = (project.runs / "exp/report/summary.json").read_bytes()
    assert (project.runs / "relabelled/report/summary.json").read_bytes() == a


def test_identical_fingerprints_in_one_apply_run_once(project, capsys):
    twin = project.root / "twin.yaml"
    twin.write_text(f"extends: {project.spec.name}\nname: twin\n")
    out = apply(project, capsys, project.spec, twin)
    assert "ran exp / train" in out and "restored twin / train (run cache)" in out
    steps = (project.runs / "exp/train/metrics.jsonl").read_text().count("\n")
    assert steps > 0 and project.calls_of("optim_step") == steps  # trained once, not twice


def test_show_marks_an_unapplied_edit_stale(project, capsys):
    apply(project, capsys)
    r = project.spar("show", str(project.spec), "--json", capsys=capsys)
    (row,) = json.loads(r.out)
    assert row["status"] == "fresh" and row["effects"]
    project.edit(lambda d: d["training"].update(learning_rate=5e-3))
    r = project.spar("show", str(project.spec), "--json", capsys=capsys)
    (row,) = json.loads(r.out)
    assert row["status"] == "stale" and row["effects"] == {} and row["invalid"] is None
    assert any("upstream" in reason or "train" in reason for reason in row["reasons"])
    table = project.spar("show", str(project.spec), capsys=capsys).out
    assert "stale" in table and "spar apply" in table


def test_gc_is_a_dry_run_unless_told_and_keeps_what_specs_use(project, capsys):
    apply(project, capsys)
    project.edit(lambda d: d["training"].update(learning_rate=2e-3))
    apply(project, capsys)
    cache = project.runs / ".spar/cache/stages"
    before = sorted(p.name for p in cache.iterdir())
    r = project.spar("gc", str(project.spec), capsys=capsys)
    assert r.code == 0 and "dry run" in r.out and "would delete 5 cached outputs" in r.out
    assert sorted(p.name for p in cache.iterdir()) == before
    r = project.spar("gc", str(project.spec), "--yes", capsys=capsys)
    assert r.code == 0 and "deleted 5 cached outputs" in r.out
    assert len(list(cache.iterdir())) == len(before) - 5
    # what the spec uses now is untouched: still fresh, and lr A must train again
    assert {r["status"] for r in plan(project, capsys).values()} == {"fresh"}
    project.edit(lambda d: d["training"].update(learning_rate=1e-3))
    assert plan(project, capsys)["train"]["action"] == "run"


def test_item_version_bump_recomputes_items(project, capsys, monkeypatch):
    from spar.stages.judge import JudgeStage

    apply(project, capsys)
    judged = project.calls_of("judge")
    monkeypatch.setattr(JudgeStage, "version", JudgeStage.version + 1)
    monkeypatch.setattr(JudgeStage, "item_version", JudgeStage.item_version + 1)
    rows = plan(project, capsys)
    assert rows["judge"]["status"] == "stale" and rows["judge"]["action"] == "run"
    assert any("stage version" in r for r in rows["judge"]["reasons"])
    apply(project, capsys)
    assert project.calls_of("judge") == 2 * judged  # no old verdict reused


def test_sample_seeds_differ_across_questions_and_pair_base_with_finetuned(project, capsys):
    apply(project, capsys)
    calls = [json.loads(x) for x in project.calls.read_text().splitlines()]
    seeds = [c for c in calls if c["event"] == "sample"]
    base = [c["seed"] for c in seeds if not c["ref"].startswith("fake://")]
    tuned = [c["seed"] for c in seeds if c["ref"].startswith("fake://")]
    assert len(base) == 8 and len(set(base)) == 8  # 4 questions x 2 samples: all different
    assert sorted(base) == sorted(tuned)  # the same draws for the same items


def test_a_transient_judge_outage_ends_in_errors_that_the_next_apply_completes(
    project, capsys, monkeypatch
):
    project.edit(lambda d: d["judge"].update(model="kw-error-2"))
    r = project.spar("apply", str(project.spec), capsys=capsys)
    said = [x for x in r.err.replace("\r", "\n").splitlines() if x.startswith("spar:")]
    assert r.code == 1 and len(said) == 1 and "incomplete" in said[0], r.err
    rows = judged(project)
    errors = [x for x in rows if x["status"] == "error"]
    assert 0 < len(errors) < len(rows) and all(x["score"] is None for x in errors)
    summary = json.loads((project.runs / "exp/report/summary.json").read_text())
    assert summary["errors"] == len(errors)
    state = plan(project, capsys)
    assert state["judge"]["status"] == "stale" and state["judge"]["action"] == "run"
    assert any("error" in reason for reason in state["judge"]["reasons"])
    assert state["report"]["status"] == "stale"  # built on incomplete verdicts
    asked = project.calls_of("judge")
    monkeypatch.setenv("FAKE_JUDGE_HEAL", "1")
    out = apply(project, capsys)
    assert "ran exp / judge" in out
    assert project.calls_of("judge") == asked + len(errors)  # exactly the failed ones
    rows = judged(project)
    assert {x["status"] for x in rows} == {"ok"}
    assert {r["status"] for r in plan(project, capsys).values()} == {"fresh"}


def test_retry_invalid_reasks_exactly_the_invalid_verdicts(project, capsys):
    project.edit(lambda d: d["judge"].update(model="kw-invalid-3"))
    apply(project, capsys)
    rows = judged(project)
    invalid = sorted(x["item_id"] for x in rows if x["status"] == "invalid")
    assert invalid and len(invalid) < len(rows)
    asked = project.calls_of("judge")
    assert "nothing to do" in apply(project, capsys)  # invalid is a verdict: kept
    r = project.spar("apply", str(project.spec), "--retry-invalid", capsys=capsys)
    assert r.code == 0 and "ran exp / judge" in r.out
    assert project.calls_of("judge") == asked + len(invalid)


@pytest.mark.parametrize("kill_after", [3, 9, 13, 17, 21])
def test_sigkill_anywhere_then_reapply_equals_an_uninterrupted_run(project, kill_after):
    """Kill the apply at the N-th sample/judge call (base 1-8, fine-tuned 9-16, judge 17-24),
    re-apply: the same bytes as a run never interrupted, and only the one item in flight when
    the process died is asked again (one request in flight at a time here)."""
    import shutil

    project.edit(lambda d: d["eval"].update(concurrency=1))
    p = project.spar_proc("apply", str(project.spec))
    p.communicate(timeout=300)
    assert p.returncode == 0
    want = outputs(project)
    total = project.calls_of("sample") + project.calls_of("judge")
    assert total == 24
    shutil.rmtree(project.runs)
    project.calls.unlink()
    p = project.spar_proc("apply", str(project.spec), FAKE_KILL_AFTER=str(kill_after))
    p.communicate(timeout=300)
    assert p.returncode == -9
    p = project.spar_proc("apply", str(project.spec))
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert outputs(project) == want
    paid = project.calls_of("sample") + project.calls_of("judge")
    assert paid == total + 1


def test_a_killed_writes_temp_files_are_gone_after_the_next_apply(project, capsys):
    """A SIGKILL in the middle of an atomic write leaves `.<name>.<random>.tmp` beside the file it
    was writing (under --jobs, a light stage may be writing while another stage is killed). The
    next apply deletes them, in every stage of its plan, so the outputs are exactly an
    uninterrupted run's."""
    apply(project, capsys)
    want = outputs(project)
    half = [
        project.runs / "exp/dataset/.test.params.yaml.bmqmxc1y.tmp",
        project.runs / "exp/sample_base/.samples.jsonl.x81kq0.tmp",
    ]
    for f in half:
        f.write_bytes(b"half")
    (project.runs / "exp/dataset/test.params.yaml").unlink()  # its write never finished
    apply(project, capsys)
    assert not any(f.exists() for f in half)
    assert outputs(project) == want


def test_retry_invalid_counts_against_the_judge_budget(project, capsys):
    project.edit(lambda d: d["judge"].update(model="kw-invalid-3"))
    apply(project, capsys)
    invalid = sum(x["status"] == "invalid" for x in judged(project))
    assert invalid > 0
    r = project.spar(
        "apply", str(project.spec), "--retry-invalid", "--max-judge-calls", "0", capsys=capsys
    )
    assert r.code == 2 and f"would make {invalid} judge calls" in r.err
    asked = project.calls_of("judge")
    r = project.spar(
        "apply",
        str(project.spec),
        "--retry-invalid",
        "--max-judge-calls",
        str(invalid),
        capsys=capsys,
    )
    assert r.code == 0 and project.calls_of("judge") == asked + invalid


def test_two_stages_saving_equal_bytes_at_once_both_succeed(tmp_path):
    """Two stages (sweep points under --jobs) whose outputs have equal bytes save the same
    cache object at once. Stage A's copy is held mid-way (its source is a pipe that has given
    half the bytes); stage B saves the same object meanwhile; then A finishes. Both saves
    succeed and the object holds the bytes. (With one shared temp name per object, B's rename
    took A's temp file away and A failed with FileNotFoundError.)"""
    import os
    import threading

    from spar.store import RunStore, hash_path
    from spar.store.files import ParamsRecord, now_iso

    store = RunStore(tmp_path / "runs")
    data = b"identical output bytes\n" * 1000
    plain = tmp_path / "b.out"
    plain.write_bytes(data)
    digest = hash_path(plain)

    def record(fp: str) -> ParamsRecord:
        return ParamsRecord(
            stage="report", kind="report", stage_version=1, experiment=fp, fingerprint=fp,
            params={}, inputs={}, upstream={}, output="out", output_hash=digest,
            versions={}, started=now_iso(), finished=now_iso(),
        )  # fmt: skip

    pipe = tmp_path / "a.out"
    os.mkfifo(pipe)
    errors: list[BaseException] = []

    def save_a() -> None:
        try:
            store.cache.save("a" * 64, {"out": pipe}, {"out": record("a" * 64)})
        except BaseException as e:
            errors.append(e)

    a = threading.Thread(target=save_a)
    a.start()
    fd = None
    for _ in range(1000):  # until A has opened the pipe (no reader yet: ENXIO)
        try:
            fd = os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:
            a.join(0.01)
    assert fd is not None, f"A never read its source: {errors}"
    os.set_blocking(fd, True)
    with os.fdopen(fd, "wb") as writer:
        writer.write(data[:100])
        writer.flush()
        objects = store.cache.root / "objects" / digest[:2]
        for _ in range(1000):  # until A's copy has begun (its temp file exists)
            if objects.is_dir() and any(objects.glob(".*.tmp")):
                break
            a.join(0.01)
        assert any(objects.glob(".*.tmp")), "A's copy did not start"
        store.cache.save("b" * 64, {"out": plain}, {"out": record("b" * 64)})
        writer.write(data[100:])
    a.join(30)
    assert not errors, errors
    assert (objects / digest).read_bytes() == data
    assert store.cache.lookup("a" * 64) is not None and store.cache.lookup("b" * 64) is not None
