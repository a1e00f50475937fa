"""Before any paid call: `plan` estimates calls and tokens; `apply` refuses above a budget."""

from __future__ import annotations

import json


def rows(project, capsys) -> dict[str, dict]:
    r = project.spar("plan", str(project.spec), "--json", capsys=capsys)
    assert r.code == 0, r.err
    return {row["stage"]: row for row in json.loads(r.out)}


def test_plan_estimates_calls_for_stale_stages_only(project, capsys):
    before = rows(project, capsys)
    # 4 questions x 2 samples, pairwise: 8 sampling calls per model, 8 judge calls
    assert before["sample_base"]["estimate"]["sample_calls"] == 8
    assert before["sample_finetuned"]["estimate"]["sample_tokens_max"] == 8 * 32
    assert before["judge"]["estimate"]["judge_calls"] == 8
    assert before["judge"]["estimate"]["judge_input_tokens"] > 0
    docs_bytes = (project.root / "docs.jsonl").stat().st_size
    assert before["train"]["estimate"]["training_tokens"] == docs_bytes // 4  # ~4 bytes a token
    text = project.spar("plan", str(project.spec), capsys=capsys).out
    assert "estimate for exp: " in text and "judge calls 8" in text
    assert project.spar("apply", str(project.spec), capsys=capsys).code == 0
    assert all(row["estimate"] is None for row in rows(project, capsys).values())


def test_judge_estimate_is_exact_and_memo_aware(project, capsys):
    assert project.spar("apply", str(project.spec), capsys=capsys).code == 0
    project.edit(lambda d: d["training"].update(epochs=2))
    rows_ = [
        json.loads(x) for x in (project.runs / "exp/dataset/train.jsonl").read_text().splitlines()
    ]
    exact = 2 * sum(len(r["input"]) for r in rows_)
    assert rows(project, capsys)["train"]["estimate"]["training_tokens"] == exact
    project.edit(lambda d: d["training"].update(epochs=1))
    project.edit(lambda d: d["judge"].update(model="kw-2"))
    assert rows(project, capsys)["judge"]["estimate"]["judge_calls"] == 8
    assert project.spar("apply", str(project.spec), capsys=capsys).code == 0
    project.edit(lambda d: d["judge"].update(model="kw-1"))  # back: the run cache has it
    row = rows(project, capsys)["judge"]
    assert row["status"] == "stale" and row["action"] == "restore" and row["estimate"] is None
    # without the run cache the stage runs, but every verdict is in the item memo: 0 calls
    import shutil

    shutil.rmtree(project.runs / ".spar" / "cache")
    row = rows(project, capsys)["judge"]
    assert row["action"] == "run" and row["estimate"]["judge_calls"] == 0
    judged = project.calls_of("judge")
    assert project.spar("apply", str(project.spec), capsys=capsys).code == 0
    assert project.calls_of("judge") == judged


def test_apply_refuses_above_max_judge_calls(project, capsys):
    r = project.spar("apply", str(project.spec), "--max-judge-calls", "5", capsys=capsys)
    assert r.code == 2
    assert r.err.strip() == "spar: error: --max-judge-calls 5: exp/judge would make 8 judge calls"
    assert not project.runs.exists() and project.calls_of("sample") == 0
    r = project.spar("apply", str(project.spec), "--max-judge-calls", "8", capsys=capsys)
    assert r.code == 0, r.err


def test_spec_budget(project, capsys):
    project.edit(lambda d: d["judge"].update(max_calls=3))
    r = project.spar("apply", str(project.spec), capsys=capsys)
    assert r.code == 2 and "judge.max_calls 3" in r.err and "8 judge calls" in r.err
    assert not project.runs.exists()
