"""Staleness: exactly the dependent stages go stale, with a reason naming the edit."""

from __future__ import annotations

import json
import os
import shutil

import pytest

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
    # every output of every stage named, in the stage kind's order (written out, not derived)
    assert {stage: r["reasons"] for stage, r in before.items()} == {
        "dataset": ["output missing: train.jsonl, test.jsonl"],
        "train": ["output missing: checkpoint.json, metrics.jsonl"],
        "sample_base": ["output missing: samples.jsonl"],
        "sample_finetuned": ["output missing: samples.jsonl"],
        "judge": ["output missing: judged.jsonl"],
        "report": ["output missing: summary.json, scores.jsonl"],
        "plot": ["output missing: plot.png, compare.png, curves.png, report.html"],
    }
    r = project.spar("apply", str(project.spec), capsys=capsys)
    assert r.code == 0
    assert {line.split(" / ")[1] for line in r.out.split("\n\n")[0].splitlines()} == ALL
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
        "eval.questions: close: 1 added, 1 removed",
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


def test_local_model_dir_is_hashed_by_content_not_path(applied, capsys, tiny_model, tmp_path):
    """Moving a local model directory changes nothing; editing a file in it re-runs all."""
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model, other)
    applied.edit(lambda d: d["model"].update(base_model=str(other)))
    assert not_fresh(plan(applied, capsys)) == set()
    cfg = json.loads((other / "config.json").read_text())
    cfg["rms_norm_eps"] = cfg.get("rms_norm_eps", 1e-6) * 2
    (other / "config.json").write_text(json.dumps(cfg))
    rows = plan(applied, capsys)
    assert not_fresh(rows) == ALL
    assert any("model.base_model.content" in r for r in rows["dataset"]["reasons"])
    assert any("model.base_model.content" in r for r in rows["sample_base"]["reasons"])


COSMETIC_EDITS = [
    ("description", lambda d: d.update(description="a new description")),
    ("judge concurrency", lambda d: d["judge"].update(concurrency=32)),
    ("eval concurrency", lambda d: d["eval"].update(concurrency=3)),
    ("save_every", lambda d: d["training"].update(save_every=5)),
]


@pytest.mark.parametrize("edit", COSMETIC_EDITS, ids=[e[0] for e in COSMETIC_EDITS])
def test_cosmetic_edit_makes_nothing_stale(applied, capsys, edit):
    applied.edit(edit[1])
    assert not_fresh(plan(applied, capsys)) == set()


def test_label_edit_rerenders_only_the_plot_with_the_new_label(applied, capsys):
    """A label that appears in an output is a parameter of the stage that writes it."""
    applied.edit(lambda d: d.update(framing="neutral tone (v2)"))
    rows = plan(applied, capsys)
    assert not_fresh(rows) == {"plot"}
    assert "framing: 'neutral' -> 'neutral tone (v2)'" in rows["plot"]["reasons"]
    r = applied.spar("apply", str(applied.spec), capsys=capsys)
    assert r.out.split("\n\n")[0] == "ran exp / plot"  # then the headline
    html = (applied.runs / "exp/plot/report.html").read_text()
    assert "neutral tone (v2)" in html


def test_plot_styling_rerenders_only_the_plot(applied, capsys):
    style = {"plot": {"title": "New", "dpi": 100, "colors": ["red", "blue"]}}
    applied.edit(lambda d: d.update(report=style))
    rows = plan(applied, capsys)
    assert not_fresh(rows) == {"plot"}
    assert any(r.startswith("report.plot.dpi: 120 -> 100") for r in rows["plot"]["reasons"])
    before = (applied.calls_of("sample"), applied.calls_of("judge"))
    r = applied.spar("apply", str(applied.spec), capsys=capsys)
    assert r.out.split("\n\n")[0] == "ran exp / plot"  # then the headline
    assert (applied.calls_of("sample"), applied.calls_of("judge")) == before


def test_interval_settings_restat_without_rejudging(applied, capsys):
    applied.edit(lambda d: d.update(report={"generalize": "samples", "confidence": 0.9}))
    rows = plan(applied, capsys)
    assert not_fresh(rows) == {"report", "plot"}
    assert "report.generalize: 'questions' -> 'samples'" in rows["report"]["reasons"]
    assert "report.confidence: 0.95 -> 0.9" in rows["report"]["reasons"]


def test_touch_docs_makes_nothing_stale(applied, capsys):
    docs = applied.root / "docs.jsonl"
    st = docs.stat()
    os.utime(docs, ns=(st.st_atime_ns + 10**9, st.st_mtime_ns + 10**9))
    assert not_fresh(plan(applied, capsys)) == set()


def test_moving_docs_with_same_content_makes_nothing_stale(applied, capsys):
    (applied.root / "docs.jsonl").rename(applied.root / "moved.jsonl")
    applied.edit(lambda d: d["data"].update(docs="moved.jsonl"))
    assert not_fresh(plan(applied, capsys)) == set()


def test_deleted_output_is_missing_and_restored_from_the_run_cache(applied, capsys):
    png = applied.runs / "exp" / "plot" / "plot.png"
    before = png.read_bytes()
    png.unlink()
    rows = plan(applied, capsys)
    assert not_fresh(rows) == {"plot"}
    assert rows["plot"]["status"] == "missing" and rows["plot"]["action"] == "restore"
    r = applied.spar("apply", str(applied.spec), capsys=capsys)
    assert r.out.split("\n\n")[0] == "restored exp / plot (run cache)"
    assert png.read_bytes() == before
    assert not_fresh(plan(applied, capsys)) == set()


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
    assert {line.split(" / ")[1] for line in r.out.split("\n\n")[0].splitlines()} == JUDGE
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


# Every leaf of the spec model, with a different valid value and what that edit must do:
# "param" changes some stage's fingerprint; "cosmetic" changes none (and the field says why in
# the schema); "content" is a path whose *content* is hashed: an equal copy elsewhere changes
# nothing. A spec key missing here fails the test, so a new key cannot be forgotten.
ALTERNATIVES: dict[str, tuple[object, str]] = {
    "name": ("exp-b", "param"),  # a label the plot stage writes
    "description": ("other words", "cosmetic"),
    "framing": ("negative", "param"),  # a label the plot stage writes
    "model.engine": ("fake2", "param"),
    "model.base_model": ("COPY_MODEL", "content"),
    "model.renderer": ("role_colon", "param"),
    "data.docs": ("COPY_DOCS", "content"),
    "data.format": ("chat", "skip"),  # needs chat records: covered by test_dataset
    "data.condition_on": ("none", "param"),
    "data.max_docs": (7, "param"),
    "data.test_size": (3, "param"),
    "data.split_seed": (5, "param"),
    "training.lora_rank": (8, "param"),
    "training.learning_rate": (0.5, "param"),
    "training.lr_schedule": ("constant", "param"),
    "training.batch_size": (3, "param"),
    "training.epochs": (2, "param"),
    "training.max_length": (100, "param"),
    "training.seed": (9, "param"),
    "training.save_every": (5, "cosmetic"),
    "eval.tiers": ({"direct": ["Another question?"]}, "param"),
    "eval.questions": ("QUESTIONS_FILE", "content"),
    "eval.samples_per_question": (4, "param"),
    "eval.sampling.temperature": (0.3, "param"),
    "eval.sampling.top_p": (0.5, "param"),
    "eval.sampling.max_tokens": (7, "param"),
    "eval.sampling.seed": (11, "param"),
    "eval.system_prompt": ("Be terse.", "param"),
    "eval.concurrency": (3, "cosmetic"),
    "judge.kind": ("keyword2", "param"),
    "judge.model": ("kw-9", "param"),
    "judge.rubric": ("COPY_RUBRIC", "content"),
    "judge.mode": ("absolute", "skip"),  # the test rubric is pairwise-only: test_report
    "judge.scale.min": (0, "param"),
    "judge.scale.max": (9, "param"),
    "judge.max_tokens": (99, "unreceived"),  # the keyword judge does not send it
    "judge.temperature": (0.7, "unreceived"),
    "judge.max_reasks": (5, "param"),
    "judge.concurrency": (2, "cosmetic"),
    "judge.batch": (True, "cosmetic"),
    "judge.max_calls": (1000, "cosmetic"),
    "report.exhibits_threshold": (4, "param"),
    "report.generalize": ("samples", "param"),
    "report.confidence": (0.9, "param"),
    "report.compare": (["OTHER_SPEC"], "param"),  # the other report becomes an upstream
    "report.plot.title": ("T", "param"),
    "report.plot.colors": (["red", "blue"], "param"),
    "report.plot.dpi": (60, "param"),
    "report.plot.width": (5.0, "param"),
    "report.plot.height": (3.0, "param"),
    "report.track": (None, "skip"),  # a new stage: test_track
    # issue 9: mixes, distillation, conditions, hygiene, sweeps
    "data.sources": (None, "skip"),  # replaces data.docs: test_sources
    "data.total": (None, "skip"),  # fraction mixes only: test_sources
    "data.shuffle_seed": (None, "skip"),  # mixes only: test_sources
    "distill": (None, "skip"),  # a new stage, used as a source: test_distill
    "training.warmup_ratio": (0.1, "param"),
    "eval.trigger": ("Reply in verse.", "param"),  # always stripped from what the judge sees
    "eval.conditions": ({"plain": {"system_prompt": "Hi."}}, "param"),
    "judge.strip": (["<START>"], "param"),
    "report.format_regex": ("^<START>.*<END>$", "param"),
    "report.gaps": (None, "skip"),  # needs conditions: test_report_conditions
    "sweep": ({"training.seed": [1, 2]}, "param"),  # the single experiment becomes points
    # issue 10: generated data and evals, property judges
    "generate": (None, "skip"),  # new stages; their keys' partition: test_generate
    "data.generate": (None, "skip"),  # replaces data.docs: test_generate
    "eval.generate": (None, "skip"),  # replaces eval.tiers: test_generate
    "judge.properties": ({"warm": "warm in tone"}, "param"),
    # issue 11: training and checkpoint curves, log-likelihood pull, judge reliability
    "training.eval_every": (2, "param"),
    "eval.checkpoints": ([1, "final"], "param"),  # new stages, and the report reads them
    "logprob": (None, "skip"),  # a new stage with a template of its own: test_logprob
    "judge.also": (None, "skip"),  # new judge stages with rubrics of their own: test_reliability
    "judge.self_agreement": ({"share": 0.5}, "param"),
}


def _model_leaves(model: type, prefix: str = "") -> dict[str, tuple[type, str]]:
    """Every leaf field of a pydantic model: dotted key -> (owning model, field name)."""
    from pydantic import BaseModel

    out: dict[str, tuple[type, str]] = {}
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out |= _model_leaves(ann, f"{prefix}{name}.")
        else:
            out[f"{prefix}{name}"] = (model, name)
    return out


def _fingerprints(project, store) -> dict[tuple[str, str], str]:
    from spar.plan import plan_specs

    return {p.key: p.fingerprint for p in plan_specs([load_spec(project.spec)], store)}


def test_every_spec_key_is_a_parameter_or_cosmetic(project, tiny_model, tmp_path):
    """Derived from the spec models: each leaf, edited, changes a fingerprint iff it is a
    parameter some stage receives; a cosmetic one (marked so in the model) changes none."""
    import copy

    import yaml

    from spar.engines import register_engine
    from spar.judges import register_judge
    from spar.spec import is_cosmetic
    from spar.store import RunStore

    fake = pytest.importorskip("fake_plugin")
    register_engine("fake2", fake.FakeEngine)
    register_judge("keyword2", fake.KeywordJudge)
    leaves = _model_leaves(Spec)
    assert set(leaves) == set(ALTERNATIVES), "spec keys missing from / unknown to this test"
    for key, (model, name) in leaves.items():
        marked = is_cosmetic(model, name) is not None
        assert marked == (
            ALTERNATIVES[key][1] in ("cosmetic", "content") and key not in ("model.base_model",)
        ), key
    store = RunStore(tmp_path / "runs")
    base = _fingerprints(project, store)
    original = yaml.safe_load(project.spec.read_text())
    shutil.copytree(tiny_model, tmp_path / "model-copy")
    shutil.copy(project.root / "docs.jsonl", tmp_path / "docs-copy.jsonl")
    shutil.copy(project.root / "rubric.j2", tmp_path / "rubric-copy.j2")
    qfile = tmp_path / "questions.jsonl"
    qfile.write_text(
        "".join(
            json.dumps({"tier": t, "question": q}) + "\n"
            for t, qs in original["eval"]["tiers"].items()
            for q in qs
        )
    )
    other = project.root / "other.yaml"
    other.write_text(f"extends: {project.spec.name}\nname: other\n")
    special = {
        "COPY_MODEL": str(tmp_path / "model-copy"),
        "COPY_DOCS": str(tmp_path / "docs-copy.jsonl"),
        "COPY_RUBRIC": str(tmp_path / "rubric-copy.j2"),
        "QUESTIONS_FILE": str(qfile),
        "OTHER_SPEC": "other.yaml",
    }
    checked = 0
    for key, (value, expect) in ALTERNATIVES.items():
        if expect == "skip":
            continue
        data = copy.deepcopy(original)
        node = data
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        if isinstance(value, list):
            value = [special.get(v, v) if isinstance(v, str) else v for v in value]
        node[last] = special.get(value, value) if isinstance(value, str) else value
        if key == "eval.questions":
            del data["eval"]["tiers"]
        if key == "eval.conditions":  # a system prompt is then given per condition
            del data["eval"]["system_prompt"]
        project.spec.write_text(yaml.safe_dump(data, sort_keys=False))
        after = _fingerprints(project, store)
        changed = {k for k in base if after.get(k) != base[k]}
        if expect == "param":
            assert changed, f"{key}: an edit changed no fingerprint"
        else:
            assert not changed, f"{key} ({expect}): an edit changed {sorted(changed)}"
        checked += 1
    project.spec.write_text(yaml.safe_dump(original, sort_keys=False))
    assert checked == sum(expect != "skip" for _, expect in ALTERNATIVES.values())
