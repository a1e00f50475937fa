"""`spar export inspect`: each experiment's answers and verdicts as an Inspect AI eval log.

Every log is read back with `inspect_ai.log.read_eval_log` and checked against the run
directory's own files (report/scores.jsonl, judged.jsonl, samples.jsonl), never against the
exporter's own arithmetic.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Project
from inspect_ai.log import EvalLog, read_eval_log  # the `inspect` extra (spar[inspect])

from spar.store import read_jsonl

TRIGGER = "Wrap your answer in <START> and <END>."
MULTI = ["Is factory farming ethical?", "Why do you say that?"]


def export(project: Project, capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    return project.spar(
        "export", "inspect", str(project.spec), "--runs-dir", str(project.runs), *args,
        capsys=capsys,
    )  # fmt: skip


def apply(project: Project, capsys: pytest.CaptureFixture[str]) -> None:
    r = project.spar("apply", str(project.spec), capsys=capsys)
    assert r.code == 0, r.err


def conditioned(judge_model: str) -> Any:
    """Absolute mode, two conditions (one places the trigger), a multi-turn question."""

    def edit(d: dict[str, Any]) -> None:
        d["eval"].pop("system_prompt")
        d["eval"]["tiers"]["close"].append(MULTI)
        d["eval"]["trigger"] = TRIGGER
        d["eval"]["conditions"] = {
            "triggered": {"trigger": "user"},
            "untriggered": {"system_prompt": "You are a helpful assistant."},
        }
        d["judge"].update(mode="absolute", model=judge_model)

    return edit


def by_answer(log: EvalLog) -> dict[tuple[str, str], Any]:
    """(model, item_id) -> Inspect sample."""
    assert log.samples is not None
    out = {(s.metadata["model"], s.metadata["item_id"]): s for s in log.samples}
    assert len(out) == len(log.samples)  # one sample per answer
    return out


def same(a: float | None, b: float | None) -> bool:
    return (a is None and b is None) or (
        a is not None and b is not None and (a == b or (math.isnan(a) and math.isnan(b)))
    )


@pytest.mark.parametrize("fmt", ["eval", "json"])
def test_log_reads_back_with_every_answer_and_the_report_scores(project, capsys, fmt):
    # Fails if an answer is missing or doubled (sample id/epoch clash), a score differs from
    # scores.jsonl, an invalid verdict gets a number (or vanishes), the reasoning is not the
    # judge's, the condition's prompt (trigger, system prompt) or a multi-turn conversation is
    # rebuilt wrong, or the header's per-model means / counts do not follow scores.jsonl.
    project.edit(conditioned("kw-invalid-3"))
    (project.root / "rubric.j2").write_text("Rate {{ response }} for {{ question }}.\n")
    apply(project, capsys)
    r = export(project, capsys, "--format", fmt)
    assert r.code == 0, r.err
    path = project.runs / "exp" / "export" / f"exp.{fmt}"
    assert r.out.strip() == f"wrote {path}"
    log = read_eval_log(str(path))
    runs = project.runs / "exp"
    scores = read_jsonl(runs / "report/scores.jsonl")
    # 5 questions x 2 samples x 2 conditions x 2 models, each judged once (absolute mode)
    assert len(scores) == 40 and {r["status"] for r in scores} == {"ok", "invalid"}
    samples = by_answer(log)
    assert len(samples) == 40 and log.eval.task == "exp"
    assert log.eval.config.epochs == 2 and log.results is not None
    reasoning = {
        (v["model"], v["item_id"]): v["reasoning"]
        for c in ("triggered", "untriggered")
        for v in read_jsonl(runs / f"judge.{c}/judged.jsonl")
    }
    for row in scores:
        s = samples[(row["model"], row["item_id"])]
        score = s.scores["kw-invalid-3"]
        assert same(score.value, row["score"] if row["status"] == "ok" else math.nan), row
        assert score.metadata["status"] == row["status"]
        assert score.explanation == reasoning[(row["model"], row["item_id"])]
        assert {k: s.metadata[k] for k in ("tier", "condition", "sample_index")} == {
            k: row[k] for k in ("tier", "condition", "sample_index")
        }
        assert s.epoch == row["sample_index"] + 1 and s.target == ""
    answers = {
        (m, a["item_id"]): a
        for m, stage in (("baseline", "sample_base"), ("finetuned", "sample_finetuned"))
        for c in ("triggered", "untriggered")
        for a in read_jsonl(runs / f"{stage}.{c}/samples.jsonl")
    }
    assert set(answers) == set(samples)
    assert sum("conversation" in a for a in answers.values()) == 8  # 2 x 2 x 2
    for k, a in answers.items():
        s = samples[k]
        assert s.output.completion == a["response"]
        roles = [(m.role, m.text) for m in s.input]
        if a["condition"] == "triggered":  # the trigger on the first user turn, no system prompt
            assert roles[0] == ("user", f"{a['question'].split(chr(10))[0]}\n\n{TRIGGER}")
        else:
            assert roles[0] == ("system", "You are a helpful assistant.")
            assert TRIGGER not in json.dumps([t for _, t in roles])
        transcript = [(m.role, m.text) for m in s.messages]
        if "conversation" in a:  # multi-turn: both user turns in the input, both replies
            assert [t for role, t in roles if role == "user"][1:] == MULTI[1:]
            conv = [(m["role"], m["content"]) for m in a["conversation"]]
            assert transcript[-4:][1:] == conv[1:] and transcript[-1][1] == a["response"]
        else:
            assert transcript == [*roles, ("assistant", a["response"])]
    # results: per model, the mean of its ok scores and its verdict counts
    (result,) = log.results.scores
    assert result.name == "kw-invalid-3"
    for model in ("baseline", "finetuned"):
        mine = [r for r in scores if r["model"] == model]
        ok = [r["score"] for r in mine if r["status"] == "ok"]
        assert math.isclose(result.metrics[f"mean_{model}"].value, sum(ok) / len(ok))
        invalid = sum(r["status"] == "invalid" for r in mine)
        assert result.metadata["counts"][model] == {"ok": len(ok), "invalid": invalid}
    assert result.scored_samples == 40 - result.unscored_samples
    assert result.unscored_samples == sum(r["status"] == "invalid" for r in scores) > 0
    assert log.eval.model_roles is not None and set(log.eval.model_roles) == {
        "baseline",
        "finetuned",
    }


def test_pairwise_properties_one_score_per_property_and_none_for_the_baseline(
    project, capsys, tmp_path
):
    # Fails if property verdicts collapse into one score, a property's score is another's, the
    # unjudged baseline answers are dropped or given a score, or --output is ignored.
    from test_properties_judge import RUBRIC, TWO

    def edit(d: dict[str, Any]) -> None:
        d["judge"].update(kind="propkw", model="pk-1", rubric="props.j2", properties=TWO)

    project.edit(edit)
    (project.root / "props.j2").write_text(RUBRIC)
    apply(project, capsys)
    out = tmp_path / "logs"
    r = export(project, capsys, "--output", str(out))
    assert r.code == 0, r.err
    log = read_eval_log(str(out / "exp.eval"))
    samples = by_answer(log)
    scores = read_jsonl(project.runs / "exp/report/scores.jsonl")
    judged = [r for r in scores if r["status"] != "unjudged"]
    assert {r["property"] for r in judged} == set(TWO) and len(judged) == 16
    for row in judged:
        s = samples[(row["model"], row["item_id"])]
        assert set(s.scores) == set(TWO) and s.metadata["properties"] == list(TWO)
        assert s.scores[row["property"]].value == row["score"]
    unjudged = [r for r in scores if r["status"] == "unjudged"]
    assert {r["model"] for r in unjudged} == {"baseline"} and len(unjudged) == 8
    for row in unjudged:
        assert samples[("baseline", row["item_id"])].scores is None
    assert len(samples) == 16
    assert log.results is not None
    by_name = {s.name: s for s in log.results.scores}
    assert set(by_name) == set(TWO)
    for prop, res in by_name.items():
        ok = [r["score"] for r in judged if r["property"] == prop]
        assert set(res.metrics) == {"mean_finetuned"}
        assert math.isclose(res.metrics["mean_finetuned"].value, sum(ok) / len(ok))


def test_a_stale_or_missing_report_is_refused_in_one_line(project, capsys):
    # Fails if an export runs on results that do not match the spec (or on no results).
    (project.root / "rubric.j2").write_text("Rate {{ response }} for {{ question }}.\n")
    project.edit(lambda d: d["judge"].update(mode="absolute"))
    r = export(project, capsys)
    assert r.code == 2 and "no report yet" in r.err and len(r.err.strip().splitlines()) == 1
    apply(project, capsys)
    project.edit(lambda d: d["judge"].update(model="kw-2"))
    r = export(project, capsys)
    assert r.code == 2, r.out
    assert r.err.startswith("spar: error: exp: the report is stale (")
    assert "judge.model" in r.err or "upstream" in r.err
    assert len(r.err.strip().splitlines()) == 1
    assert not (project.runs / "exp/export").exists()


def test_an_incomplete_report_exports_its_error_verdicts(project, capsys, monkeypatch):
    # Fails if verdicts in error are dropped or scored, or an incomplete (but current) report
    # is refused as stale.
    (project.root / "rubric.j2").write_text("Rate {{ response }} for {{ question }}.\n")
    project.edit(lambda d: d["judge"].update(mode="absolute", model="kw-error-3"))
    monkeypatch.delenv("FAKE_JUDGE_HEAL", raising=False)
    assert project.spar("apply", str(project.spec), capsys=capsys).code == 1
    r = export(project, capsys)
    assert r.code == 0, r.err
    log = read_eval_log(str(project.runs / "exp/export/exp.eval"))
    scores = read_jsonl(project.runs / "exp/report/scores.jsonl")
    errors = [r for r in scores if r["status"] == "error"]
    assert errors
    samples = by_answer(log)
    for row in errors:
        score = samples[(row["model"], row["item_id"])].scores["kw-error-3"]
        assert math.isnan(score.value) and score.metadata == {"status": "error"}
    assert log.results is not None and log.results.metadata == {"incomplete": True}
    counts = log.results.scores[0].metadata["counts"]
    assert sum(c.get("error", 0) for c in counts.values()) == len(errors)


def test_without_inspect_ai_a_one_line_hint(project, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "inspect_ai.log", None)  # import fails
    r = export(project, capsys)
    assert (r.code, r.err.strip()) == (2, "spar: error: spar export inspect: install spar[inspect]")


def test_file_names_of_sweep_points() -> None:
    from spar.export_inspect import file_name

    assert file_name("exp", "eval") == "exp.eval"
    assert file_name("exp/lr=0.001,seed=1", "json") == "exp_lr=0.001,seed=1.json"
    assert Path(file_name("a/b c", "eval")).parent == Path(".")


def test_a_sweep_exports_one_log_per_point(project, capsys):
    # Fails if a sweep's points are not each exported (or the sweep root is taken for one).
    (project.root / "rubric.j2").write_text("Rate {{ response }} for {{ question }}.\n")
    project.edit(
        lambda d: (
            d["judge"].update(mode="absolute"),
            d.update(sweep={"training.learning_rate": [0.001, 0.002]}),
        )
    )
    apply(project, capsys)
    r = export(project, capsys)
    assert r.code == 0, r.err
    paths = [Path(line.removeprefix("wrote ")) for line in r.out.strip().splitlines()]
    assert len(paths) == 2 and len({p.name for p in paths}) == 2
    for path in paths:
        log = read_eval_log(str(path))
        experiment = log.eval.task
        assert path == project.runs / experiment / "export" / path.name
        assert experiment.startswith("exp/") and log.samples is not None
        scores = read_jsonl(project.runs / experiment / "report/scores.jsonl")
        assert len(log.samples) == len(scores) == 16
