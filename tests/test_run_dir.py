"""Params files beside every output, no secrets anywhere, crash recovery, concurrent applies."""

from __future__ import annotations

import os
import signal

import yaml

from spar.store import params_path

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


def test_no_secret_reaches_runs(project, capsys, monkeypatch):
    secrets = {
        "ANTHROPIC_API_KEY": "fake-anthropic-0123456789abcdef",
        "TINKER_API_KEY": "fake-tinker-secretsecret-0001",
        "HF_TOKEN": "hf_tokentokentoken42",
        "MY_SECRET": "hunter2hunter2",
    }
    for k, v in secrets.items():
        monkeypatch.setenv(k, v)
    # a secret typed into the spec where it does not belong is redacted too
    project.edit(lambda d: d.update(description=f"key was {secrets['ANTHROPIC_API_KEY']}"))
    assert project.spar("apply", str(project.spec), capsys=capsys).code == 0
    files = [p for p in project.runs.rglob("*") if p.is_file()]
    assert len(files) > 20
    for p in files:
        data = p.read_bytes()
        for v in secrets.values():
            assert v.encode() not in data, (p, v)


def test_sigkill_mid_sampling_then_reapply_completes_only_missing(project):
    # 4 questions x 2 samples = 8 per model, 2 requests in flight: the process dies inside the
    # 11th sample call, i.e. after the 1st fine-tuned item was collected and committed, with the
    # 2nd (submitted, not collected) and the 3rd in flight
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
    # the committed fine-tuned item is kept; the 2 in flight and the other 5 are drawn
    assert project.calls_of("sample") == 11 + 7
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
    assert out.splitlines() == ["ran exp / judge", "ran exp / report", "ran exp / plot"]
    assert (project.calls_of("sample"), project.calls_of("judge")) == (16, 3 + 6)


def test_two_concurrent_applies_never_interleave(project):
    procs = [project.spar_proc("apply", str(project.spec)) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    ran = [out for out, _ in results if "ran exp" in out]
    idle = [out for out, _ in results if "nothing to do" in out]
    assert len(ran) == 1 and len(idle) == 1, results
    # every item computed once: the second apply waited, re-planned, found everything fresh
    assert project.calls_of("sample") == 16
    assert project.calls_of("judge") == 8
    from spar.store.state import State

    assert State(project.runs / ".spar/state.db").memo_count("sample") == 16
    leftovers = [p for p in project.runs.rglob("*.tmp")]
    assert leftovers == []


def test_lock_timeout_refuses(project, capsys):
    from spar.store import RunStore

    store = RunStore(project.runs)
    with store.lock():
        r = project.spar("apply", str(project.spec), "--lock-timeout", "0.2", capsys=capsys)
    assert r.code == 1 and "holds the lock" in r.err
    assert not (project.runs / "exp").exists()
    assert os.listdir(project.runs / ".spar") == ["lock"]
