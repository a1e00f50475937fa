"""Staleness: exactly the dependent stages go stale, with a reason naming the edit."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from spar.plan import COSMETIC_KEYS, build_graph
from spar.spec import Spec, load_spec

ALL = {"dataset", "train", "sample_base", "sample_finetuned", "judge", "report", "plot"}
TUNED = {"train", "sample_finetuned", "judge", "report", "plot"}
SAMPLES = {"sample_base", "sample_finetuned", "judge", "report", "plot"}
JUDGE = {"judge", "report", "plot"}


def plan(project, capsys) -> dict[str, dict]:
    r = project.spar("plan", str(project.spec), "--json", capsys=capsys)
    assert r.code == 0, r.err
    return {row["stage"]: row for row in json.loads(r.out)}


def not_fresh(rows: dict[str, dict]) -> set[str]:
    return {name for name, row in rows.items() if row["status"] != "fresh"}


@pytest.fixture
def applied(project, capsys):
    r = project.spar("apply", str(project.spec), capsys=capsys)
    assert r.code == 0, r.err
    return project


def test_fresh_after_apply_and_second_apply_runs_nothing(project, capsys):
    before = plan(project, capsys)
    assert {r["status"] for r in before.values()} == {"missing"}
    assert all(
        r["reasons"] == ["output missing: " + r["reasons"][0].split(": ", 1)[1]]
        for r in before.values()
    )
    r = project.spar("apply", str(project.spec), capsys=capsys)
    assert r.code == 0
    assert {line.split(" / ")[1] for line in r.out.splitlines()} == ALL
    assert not_fresh(plan(project, capsys)) == set()
    calls = project.calls.read_text()
    r = project.spar("apply", str(project.spec), capsys=capsys)
    assert r.code == 0 and "nothing to do" in r.out
    assert project.calls.read_text() == calls  # no engine or judge call at all


EDITS = [
    # (edit id, spec edit or None, file edit or None, expected stale set, reason fragment, stage)
    (
        "learning_rate",
        lambda d: d["training"].update(learning_rate=2e-3),
        None,
        TUNED,
        "training.learning_rate: 0.001 -> 0.002",
        "train",
    ),
    (
        "lora_rank",
        lambda d: d["training"].update(lora_rank=8),
        None,
        TUNED,
        "training.lora_rank: 4 -> 8",
        "train",
    ),
    (
        "renderer",
        lambda d: d["model"].update(renderer="role_colon"),
        None,
        ALL,
        "model.renderer: 'qwen3_instruct' -> 'role_colon'",
        "sample_base",
    ),
    (
        "question",
        lambda d: d["eval"]["tiers"]["close"].__setitem__(0, "What is for dinner?"),
        None,
        SAMPLES,
        "eval.tiers.close",
        "sample_base",
    ),
    (
        "temperature",
        lambda d: d["eval"]["sampling"].update(temperature=0.7),
        None,
        SAMPLES,
        "eval.sampling.temperature: 1.0 -> 0.7",
        "sample_finetuned",
    ),
    (
        "samples_per_question",
        lambda d: d["eval"].update(samples_per_question=3),
        None,
        SAMPLES,
        "eval.samples_per_question: 2 -> 3",
        "sample_base",
    ),
    (
        "judge_model",
        lambda d: d["judge"].update(model="kw-2"),
        None,
        JUDGE,
        "judge.model: 'kw-1' -> 'kw-2'",
        "judge",
    ),
    (
        "rubric",
        None,
        ("rubric.j2", lambda t: t + "Be strict.\n"),
        JUDGE,
        "judge.rubric content changed",
        "judge",
    ),
    (
        "docs",
        None,
        ("docs.jsonl", lambda t: t.replace("tunnel ventilation", "cross ventilation")),
        {"dataset", *TUNED},
        "data.docs content changed",
        "dataset",
    ),
]


@pytest.mark.parametrize("edit", EDITS, ids=[e[0] for e in EDITS])
def test_edit_makes_exactly_dependents_stale(applied, capsys, edit):
    _, spec_edit, file_edit, expected, reason, stage = edit
    if spec_edit is not None:
        applied.edit(spec_edit)
    if file_edit is not None:
        path = applied.root / file_edit[0]
        path.write_text(file_edit[1](path.read_text()))
    rows = plan(applied, capsys)
    assert not_fresh(rows) == expected
    assert all(rows[s]["status"] == "stale" for s in expected)
    assert any(reason in r for r in rows[stage]["reasons"]), rows[stage]["reasons"]
    for s in expected - {stage}:
        assert rows[s]["reasons"], s
    if "train" in expected and stage != "train":
        assert "upstream dataset changed" in rows["train"]["reasons"]
    if "judge" in expected and stage != "judge":
        assert any(r.startswith("upstream sample_") for r in rows["judge"]["reasons"])


def test_base_model_change_makes_everything_stale(applied, capsys, tiny_model, tmp_path):
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model, other)
    applied.edit(lambda d: d["model"].update(base_model=str(other)))
    rows = plan(applied, capsys)
    assert not_fresh(rows) == ALL
    assert any("model.base_model" in r for r in rows["dataset"]["reasons"])
    assert any("model.base_model" in r for r in rows["sample_base"]["reasons"])


COSMETIC_EDITS = [
    ("description", lambda d: d.update(description="a new description")),
    ("framing label", lambda d: d.update(framing="neutral tone (v2)")),
    ("judge concurrency", lambda d: d["judge"].update(concurrency=32)),
    ("eval concurrency", lambda d: d["eval"].update(concurrency=3)),
    ("save_every", lambda d: d["training"].update(save_every=5)),
]


@pytest.mark.parametrize("edit", COSMETIC_EDITS, ids=[e[0] for e in COSMETIC_EDITS])
def test_cosmetic_edit_makes_nothing_stale(applied, capsys, edit):
    applied.edit(edit[1])
    assert not_fresh(plan(applied, capsys)) == set()


def test_plot_styling_rerenders_only_the_plot(applied, capsys):
    style = {"plot": {"title": "New", "dpi": 100, "colors": ["red", "blue"]}}
    applied.edit(lambda d: d.update(report=style))
    rows = plan(applied, capsys)
    assert not_fresh(rows) == {"plot"}
    assert any(r.startswith("report.plot.dpi: 120 -> 100") for r in rows["plot"]["reasons"])
    before = (applied.calls_of("sample"), applied.calls_of("judge"))
    r = applied.spar("apply", str(applied.spec), capsys=capsys)
    assert r.out.strip() == "ran exp / plot"
    assert (applied.calls_of("sample"), applied.calls_of("judge")) == before


def test_bootstrap_settings_restat_without_rejudging(applied, capsys):
    applied.edit(lambda d: d.update(report={"bootstrap": {"resamples": 500, "seed": 3}}))
    rows = plan(applied, capsys)
    assert not_fresh(rows) == {"report", "plot"}
    assert "report.bootstrap.resamples: 2000 -> 500" in rows["report"]["reasons"]


def test_touch_docs_makes_nothing_stale(applied, capsys):
    docs = applied.root / "docs.jsonl"
    st = docs.stat()
    os.utime(docs, ns=(st.st_atime_ns + 10**9, st.st_mtime_ns + 10**9))
    assert not_fresh(plan(applied, capsys)) == set()


def test_moving_docs_with_same_content_makes_nothing_stale(applied, capsys):
    (applied.root / "docs.jsonl").rename(applied.root / "moved.jsonl")
    applied.edit(lambda d: d["data"].update(docs="moved.jsonl"))
    assert not_fresh(plan(applied, capsys)) == set()


def test_deleted_output_is_missing_and_only_it_reruns(applied, capsys):
    (applied.runs / "exp" / "plot" / "plot.png").unlink()
    rows = plan(applied, capsys)
    assert not_fresh(rows) == {"plot"}
    assert rows["plot"]["status"] == "missing"
    r = applied.spar("apply", str(applied.spec), capsys=capsys)
    assert r.out.strip() == "ran exp / plot"


def test_hand_edited_output_is_stale(applied, capsys):
    out = applied.runs / "exp" / "judge" / "judged.jsonl"
    text = out.read_text()
    assert '"score": 3.0' in text
    out.write_text(text.replace('"score": 3.0', '"score": 4.0', 1))
    rows = plan(applied, capsys)
    assert rows["judge"]["status"] == "stale"
    assert rows["judge"]["reasons"] == ["output judged.jsonl changed on disk"]


def test_rubric_edit_rejudges_without_resampling(applied, capsys):
    samples_before = applied.calls_of("sample")
    judged_before = applied.calls_of("judge")
    rubric = applied.root / "rubric.j2"
    rubric.write_text(rubric.read_text() + "Answer with a number.\n")
    r = applied.spar("apply", str(applied.spec), capsys=capsys)
    assert {line.split(" / ")[1] for line in r.out.splitlines()} == JUDGE
    assert applied.calls_of("sample") == samples_before
    assert applied.calls_of("judge") == 2 * judged_before


def test_more_samples_draws_only_new_indices(applied, capsys):
    n_questions = 4
    before = applied.calls_of("sample")
    assert before == 2 * n_questions * 2  # two models x questions x 2 samples
    base_rows = (applied.runs / "exp/sample_base/samples.jsonl").read_text().splitlines()
    applied.edit(lambda d: d["eval"].update(samples_per_question=3))
    applied.spar("apply", str(applied.spec), capsys=capsys)
    assert applied.calls_of("sample") == before + 2 * n_questions
    new_rows = (applied.runs / "exp/sample_base/samples.jsonl").read_text().splitlines()
    assert len(new_rows) == 3 * n_questions
    assert set(base_rows) <= set(new_rows)  # the first two draws are unchanged


def test_second_experiment_on_same_base_reuses_baseline(applied, capsys):
    other = applied.root / "other.yaml"
    other.write_text(
        f"extends: {applied.spec.name}\nname: exp2\ntraining:\n  learning_rate: 0.005\n"
    )
    before = applied.calls_of("sample")
    r = applied.spar("apply", str(other), capsys=capsys)
    assert r.code == 0, r.err
    assert applied.calls_of("sample") == before + 8  # fine-tuned only; baseline from the memo
    a = (applied.runs / "exp/sample_base/samples.jsonl").read_text()
    assert (applied.runs / "exp2/sample_base/samples.jsonl").read_text() == a


def _leaves(d: dict, prefix: str = "") -> set[str]:
    out: set[str] = set()
    for k, v in d.items():
        if isinstance(v, dict) and v and k != "tiers":
            out |= _leaves(v, f"{prefix}{k}.")
        else:
            out.add(f"{prefix}{k}")
    return out


def test_every_spec_key_is_a_parameter_or_cosmetic(project):
    """Pins the partition: each leaf of a spec is in some stage's params or declared cosmetic."""
    spec = load_spec(project.spec)
    covered = set(COSMETIC_KEYS)
    for node in build_graph(spec):
        covered |= set(node.params)
    leaves = _leaves(Spec.model_validate(spec.model_dump()).model_dump(mode="json"))
    uncovered = {
        leaf for leaf in leaves if not any(leaf == c or leaf.startswith(c + ".") for c in covered)
    }
    assert uncovered == set()
    assert not set(COSMETIC_KEYS) & {k for n in build_graph(spec) for k in n.params}
