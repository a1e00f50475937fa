"""Params files beside every output, no secrets anywhere, crash recovery, concurrent applies."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import yaml
from audit_plugin import SAY_ENV
from filelock import FileLock

from spar.store import params_path, read_jsonl
from spar.store.state import State

FIELDS = {
    "stage",
    "kind",
    "stage_version",
    "experiment",
    "fingerprint",
    "params",
    "inputs",
    "upstream",
    "output",
    "output_hash",
    "complete",
    "details",
    "restored_from",
    "versions",
    "started",
    "finished",
}


def outputs(project) -> list:
    return [
        p
        for p in (project.runs / "exp").rglob("*")
        if p.is_file() and not p.name.endswith(".params.yaml")
    ]


def test_every_output_has_its_params_file(project, capsys):
    assert project.spar("apply", str(project.spec), capsys=capsys).code == 0
    outs = outputs(project)
    assert {p.name for p in outs} == {
        "train.jsonl",
        "test.jsonl",
        "checkpoint.json",
        "metrics.jsonl",
        "samples.jsonl",
        "judged.jsonl",
        "summary.json",
        "scores.jsonl",
        "plot.png",
        "compare.png",
        "curves.png",
        "report.html",
    }
    import hashlib

    for out in outs:
        rec = yaml.safe_load(params_path(out).read_text())
        assert set(rec) == FIELDS, out
        assert rec["output"] == out.name
        assert rec["output_hash"] == hashlib.sha256(out.read_bytes()).hexdigest()
        assert rec["stage"] == out.parent.name
        assert rec["started"] <= rec["finished"]
        assert "spar" in rec["versions"] and "tinker-cookbook" in rec["versions"]
    train = yaml.safe_load((project.runs / "exp/train/checkpoint.params.yaml").read_text())
    assert train["params"]["training.learning_rate"] == 1e-3
    dataset_train = project.runs / "exp/dataset/train.jsonl"
    assert (
        train["upstream"]["dataset"]["train.jsonl"]
        == hashlib.sha256(dataset_train.read_bytes()).hexdigest()
    )
    ds = yaml.safe_load((project.runs / "exp/dataset/train.params.yaml").read_text())
    docs = project.root / "docs.jsonl"
    assert ds["inputs"]["data.docs"] == hashlib.sha256(docs.read_bytes()).hexdigest()


SECRETS = {
    "ANTHROPIC_API_KEY": "fake-anthropic-0123456789abcdef",
    "TINKER_API_KEY": "fake-tinker-secretsecret-0001",
    "HF_TOKEN": "hf_tokentokentoken42",
    "MY_SECRET": "hunter2hunter2",
}


def no_secret_under_runs(project) -> None:
    files = [p for p in project.runs.rglob("*") if p.is_file()]
    assert len(files) > 20
    for p in files:  # outputs, params files, the run cache and state.db (the item memo)
        data = p.read_bytes()
        for v in SECRETS.values():
            assert v.encode() not in data, (p, v)


def judged_rows(project) -> list[dict]:
    return read_jsonl(project.runs / "exp/judge/judged.jsonl")


def plan_is_fresh(project, capsys) -> bool:
    r = project.spar("plan", str(project.spec), "--json", capsys=capsys)
    return r.code == 0 and {row["status"] for row in json.loads(r.out)} == {"fresh"}


@pytest.fixture
def secrets(monkeypatch) -> dict[str, str]:
    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    return SECRETS


# Each path below makes a secret's value flow into something spar writes, and checks that it is
# there as *** (so it did flow) and nowhere under runs/ as itself. They fail if store.redact is
# disabled (`redact` returning its text), or if the path skips it: StageStore.write_output for
# outputs, write_params for params files, ItemMemo.put (redact_json) for the item memo.


def test_secret_in_a_spec_label_is_redacted(project, capsys, secrets):
    # `framing` is written into report.html and the plot's params file; `description` appears in
    # no output at all
    project.edit(
        lambda d: d.update(
            framing=f"neutral {secrets['MY_SECRET']}",
            description=f"key was {secrets['ANTHROPIC_API_KEY']}",
        )
    )
    assert project.spar("apply", str(project.spec), capsys=capsys).code == 0
    html = (project.runs / "exp/plot/report.html").read_text()
    assert "neutral ***" in html
    plot = yaml.safe_load((project.runs / "exp/plot/plot.params.yaml").read_text())
    assert plot["params"]["framing"] == "neutral ***"
    no_secret_under_runs(project)
    assert plan_is_fresh(project, capsys)  # a redacted params file still matches its spec


def test_secret_in_a_sampled_answer_is_redacted(project, capsys, secrets, monkeypatch):
    monkeypatch.setenv(SAY_ENV, f"my token is {secrets['HF_TOKEN']}")
    project.edit(lambda d: d["model"].update(engine="saying"))
    assert project.spar("apply", str(project.spec), capsys=capsys).code == 0
    for model in ("base", "finetuned"):
        rows = read_jsonl(project.runs / f"exp/sample_{model}/samples.jsonl")
        assert len(rows) == 8 and all(r["response"].endswith("my token is ***") for r in rows)
    with State(project.runs / ".spar/state.db") as state:
        assert state.memo_count("sample") == 16  # journaled too (checked as bytes below)
    no_secret_under_runs(project)
    assert plan_is_fresh(project, capsys)


def test_secret_in_a_judges_reasoning_is_redacted(project, capsys, secrets, monkeypatch):
    monkeypatch.setenv(SAY_ENV, f"the key is {secrets['TINKER_API_KEY']}")
    project.edit(lambda d: d["judge"].update(kind="saying"))
    assert project.spar("apply", str(project.spec), capsys=capsys).code == 0
    rows = judged_rows(project)
    assert len(rows) == 8 and all(r["reasoning"].endswith(": the key is ***") for r in rows)
    assert "the key is ***" in (project.runs / "exp/plot/report.html").read_text()
    no_secret_under_runs(project)


def test_secret_in_an_error_message_is_redacted(project, capsys, secrets, monkeypatch):
    # kw-error-2: about every second judge call fails; its error names a secret
    monkeypatch.setenv(SAY_ENV, f"rejected {secrets['ANTHROPIC_API_KEY']}")
    project.edit(lambda d: d["judge"].update(kind="saying", model="kw-error-2"))
    r = project.spar("apply", str(project.spec), capsys=capsys)
    assert r.code == 1 and "incomplete" in r.err
    errors = [row for row in judged_rows(project) if row["status"] == "error"]
    assert errors and all(e["reasoning"] == "503 overloaded: rejected ***" for e in errors)
    no_secret_under_runs(project)


def test_secret_in_a_parameter_is_redacted_in_params_files(project, capsys, secrets):
    prompt = f"You are a helpful assistant. Token: {secrets['HF_TOKEN']}"
    project.edit(lambda d: d["eval"].update(system_prompt=prompt))
    assert project.spar("apply", str(project.spec), capsys=capsys).code == 0
    for stage in ("sample_base", "sample_finetuned"):
        rec = yaml.safe_load((project.runs / f"exp/{stage}/samples.params.yaml").read_text())
        assert rec["params"]["eval.system_prompt"] == "You are a helpful assistant. Token: ***"
    no_secret_under_runs(project)
    assert plan_is_fresh(project, capsys)


def test_sigkill_mid_sampling_then_reapply_completes_only_missing(project):
    # 4 questions x 2 samples = 8 per model, 2 requests in flight: the process dies inside the
    # 11th sample call. The fake's requests complete as they are sent, so the pool collected the
    # 1st and 2nd fine-tuned items together and committed both before refilling their slots;
    # the 3rd is the one in flight
    project.edit(lambda d: d["eval"].update(concurrency=2))
    p = project.spar_proc("apply", str(project.spec), FAKE_KILL_AFTER="11")
    p.communicate(timeout=300)
    assert p.returncode == -signal.SIGKILL
    assert project.calls_of("sample") == 11
    assert not (project.runs / "exp/sample_finetuned/samples.jsonl").exists()
    assert (project.runs / "exp/sample_base/samples.params.yaml").exists()
    p = project.spar_proc("apply", str(project.spec))
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert "sample_base" not in out and "ran exp / sample_finetuned" in out
    # the 2 committed fine-tuned items are kept; the one in flight and the other 5 are drawn
    assert project.calls_of("sample") == 11 + 6
    rows = (project.runs / "exp/sample_finetuned/samples.jsonl").read_text().splitlines()
    assert len(rows) == 8


def test_sigkill_mid_judging_rejudges_only_unfinished(project):
    # 16 samples, then the 3rd judgment kills the process: 2 verdicts are in the journal
    p = project.spar_proc("apply", str(project.spec), FAKE_KILL_AFTER="19")
    p.communicate(timeout=300)
    assert p.returncode == -signal.SIGKILL
    assert (project.calls_of("sample"), project.calls_of("judge")) == (16, 3)
    p = project.spar_proc("apply", str(project.spec))
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    ran = out.split("\n\n")[0].splitlines()  # then the headline
    assert ran == ["ran exp / judge", "ran exp / report", "ran exp / plot"]
    assert (project.calls_of("sample"), project.calls_of("judge")) == (16, 3 + 6)


def events(project) -> list[dict]:
    return [json.loads(line) for line in project.calls.read_text().splitlines()]


def test_two_concurrent_applies_never_interleave(project):
    """Both applies plan while the runs directory's lock is held (here, by the test), so both
    find every stage missing and provably wait; once the lock is free, one runs everything and
    the other, re-planning under the lock, finds everything fresh and runs nothing."""
    # Fails if apply kept the plan it made before taking the lock (cmd_apply without its second
    # load_and_plan: the second apply runs every stage again, 32 samples), or if RunStore.lock
    # did not exclude (both run while the test holds the lock).
    lock = project.runs / ".spar" / "lock"
    lock.parent.mkdir(parents=True)
    env = {"SPAR_PLUGINS": "fake_plugin,audit_plugin", "AUDIT_TRACE_LOCK": "1"}
    with FileLock(str(lock)):
        procs = [project.spar_proc("apply", str(project.spec), **env) for _ in range(2)]
        deadline = time.monotonic() + 120  # a bound on a hang, not a measurement
        while sum(e["event"] == "lock_wait" for e in events_or_none(project)) < 2:
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            assert time.monotonic() < deadline, "the applies never reached the lock"
            time.sleep(0.05)
        # both planned (everything missing) and wait for the lock; nothing ran meanwhile
        assert project.calls_of("sample") == project.calls_of("forward_backward") == 0
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    ran = [out for out, _ in results if "ran exp" in out]
    idle = [out for out, _ in results if "nothing to do" in out]
    assert len(ran) == 1 and len(idle) == 1, results
    assert len(ran[0].split("\n\n")[0].splitlines()) == 7 and "ran exp / " not in idle[0]
    # every item computed once: the second apply waited, re-planned, found everything fresh
    assert project.calls_of("sample") == 16
    assert project.calls_of("judge") == 8
    # and in this order: both wait; one holds the lock for all the work; then the other
    log = events(project)
    locks = [(e["event"], e["pid"]) for e in log if e["event"].startswith("lock_")]
    first, second = locks[2][1], locks[4][1]
    assert {first, second} == {p.pid for p in procs}
    assert locks[2:] == [
        ("lock_acquired", first),
        ("lock_released", first),
        ("lock_acquired", second),
        ("lock_released", second),
    ]
    work = [i for i, e in enumerate(log) if e["event"] in ("forward_backward", "sample", "judge")]
    held = [i for i, e in enumerate(log) if e.get("pid") == first and e["event"] != "lock_wait"]
    assert held[0] < work[0] and work[-1] < held[1]
    from spar.store.state import State

    assert State(project.runs / ".spar/state.db").memo_count("sample") == 16
    leftovers = [p for p in project.runs.rglob("*.tmp")]
    assert leftovers == []


def events_or_none(project) -> list[dict]:
    return events(project) if project.calls.exists() else []


def test_lock_timeout_refuses(project, capsys):
    from spar.store import RunStore

    store = RunStore(project.runs)
    with store.lock():
        r = project.spar("apply", str(project.spec), "--lock-timeout", "0.2", capsys=capsys)
    assert r.code == 1 and "holds the lock" in r.err
    assert not (project.runs / "exp").exists()
    assert os.listdir(project.runs / ".spar") == ["lock"]
