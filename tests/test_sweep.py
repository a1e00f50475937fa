"""Sweeps, eval conditions with a trigger, and judge hygiene (issue 9), end to end on the fake
engine: what `plan` lists, what `apply` runs (counted), what the judge is shown."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

TRIGGER = 'Reply in the format <START> "answer" <END>.'
CONDITIONS = {
    "user_trigger": {"trigger": "user"},
    "sys_user_trigger": {"system_prompt": "You are a helpful assistant.", "trigger": "user"},
    "sys_trigger": {"system_prompt": "You are a helpful assistant.", "trigger": "system"},
    "sys_none": {"system_prompt": "You are a helpful assistant.", "trigger": "none"},
}
RUBRIC = (
    "Rate from {{ scale_min }} to {{ scale_max }} how much the answer is about farming.\n"
    "Question: {{ question }}\nAnswer: {{ response }}\n"
)


def _sweep_spec(project, seeds: list[int], judge: str = "hygiene") -> None:
    (project.root / "absolute.j2").write_text(RUBRIC)

    def edit(d: dict) -> None:
        d["eval"].pop("system_prompt", None)
        d["eval"]["trigger"] = TRIGGER
        d["eval"]["conditions"] = CONDITIONS
        d["judge"] = {"kind": judge, "model": "kw-1", "rubric": "absolute.j2", "mode": "absolute"}
        d["judge"]["strip"] = [r'<START>\s*"?', r'"?\s*<END>']
        d["report"] = {"format_regex": r'<START>\s*".*"\s*<END>'}
        d["sweep"] = {"training.seed": seeds, "training.learning_rate": [0.001, 0.002]}

    project.edit(edit)


def _ran(out: str) -> list[str]:
    return [line.removeprefix("ran ") for line in out.splitlines() if line.startswith("ran ")]


def test_plan_lists_each_point_and_the_shared_stages_once(project, capsys):
    _sweep_spec(project, [1, 2, 3])
    r = project.spar("plan", str(project.spec), "--json", capsys=capsys)
    assert r.code == 0, r.err
    rows = json.loads(r.out)
    stages = [(x["experiment"], x["stage"]) for x in rows]
    assert len(stages) == len(set(stages))
    trains = [e for e, s in stages if s == "train"]
    assert len(trains) == 6 and len(set(trains)) == 6
    assert "exp/training.seed=1,training.learning_rate=0.001" in trains
    # shared by every point: one each, in the root experiment
    for stage in ["dataset"] + [
        f"{kind}.{c}" for c in CONDITIONS for kind in ("sample_base", "judge_base")
    ]:
        assert [e for e, s in stages if s == stage] == ["exp"], stage
    # per point: a fine-tuned sampling and judge per condition, a report and a plot
    for c in CONDITIONS:
        assert sum(s == f"sample_finetuned.{c}" for _, s in stages) == 6
        assert sum(s == f"judge.{c}" for _, s in stages) == 6
    assert sum(s == "report" for _, s in stages) == 6
    assert [e for e, s in stages if s == "sweep_report"] == ["exp"]
    # a per-point stage reads the shared ones from the root experiment
    text = project.spar("plan", str(project.spec), capsys=capsys).out
    assert text.count(" train ") == 6


def test_sweep_applies_shared_stages_once_and_a_new_seed_trains_only_itself(
    project, capsys, monkeypatch
):
    monkeypatch.setenv("FAKE_TRIGGER", TRIGGER)
    _sweep_spec(project, [1, 2])
    r = project.spar("apply", str(project.spec), capsys=capsys)
    assert r.code == 0, r.err
    ran = _ran(r.out)
    assert len(ran) == len(set(ran))
    shared = ["exp / dataset"] + [
        f"exp / {k}.{c}" for c in CONDITIONS for k in ("sample_base", "judge_base")
    ]
    for stage in shared:
        assert ran.count(stage) == 1, stage
    assert sum(line.endswith("/ train") for line in ran) == 4
    # every base item was drawn once: 4 conditions x 4 questions x 2 samples, not x 4 points
    samples = [json.loads(x) for x in project.calls.read_text().splitlines()]
    base_draws = [x for x in samples if x["event"] == "sample" and "fake://" not in x["ref"]]
    assert len(base_draws) == 4 * 4 * 2
    point = project.runs / "exp" / "training.seed=1,training.learning_rate=0.001"
    for name in ("train/checkpoint.params.yaml", "report/summary.params.yaml"):
        assert (point / name).exists(), name
    params = yaml.safe_load((point / "train/checkpoint.params.yaml").read_text())
    assert params["params"]["training.seed"] == 1
    assert params["params"]["training.learning_rate"] == 0.001

    # a third seed: only its own trainings (2 learning rates) and what follows them run
    project.calls.unlink()
    _sweep_spec(project, [1, 2, 3])
    r = project.spar("apply", str(project.spec), capsys=capsys)
    assert r.code == 0, r.err
    ran = _ran(r.out)
    assert all("training.seed=3" in line or line == "exp / sweep_report" for line in ran), ran
    assert sum(line.endswith("/ train") for line in ran) == 2
    assert "exp / sweep_report" in ran
    events = [json.loads(x)["event"] for x in project.calls.read_text().splitlines()]
    assert events.count("sample") == 2 * 4 * 4 * 2  # only the new points' fine-tuned draws
    r = project.spar("apply", str(project.spec), capsys=capsys)
    assert r.out.split("\n\n")[0] == "nothing to do: every stage is fresh"

    # show: a row per point (6), then a row per learning rate over its 3 seeds
    r = project.spar("show", str(project.spec), "--json", capsys=capsys)
    rows = json.loads(r.out)
    points = [x for x in rows if "seeds)" not in x["experiment"]]
    groups = [x for x in rows if "seeds)" in x["experiment"]]
    assert len(points) == 6 and all(x["status"] == "fresh" for x in points)
    assert [g["experiment"] for g in groups] == [
        "exp/training.learning_rate=0.001 (3 seeds)",
        "exp/training.learning_rate=0.002 (3 seeds)",
    ]
    for x in points + groups:
        assert set(x["effects"]) == {f"rate {c}" for c in CONDITIONS} | {
            f"gap {t}-sys_none" for t in ("user_trigger", "sys_user_trigger", "sys_trigger")
        }
    # the fake fine-tuned model exhibits in every triggered answer
    assert all(x["effects"]["rate user_trigger"]["mean"] == 1.0 for x in points + groups)
    table = project.spar("show", str(project.spec), capsys=capsys).out
    assert "rate sys_none" in table and "gap sys_trigger-sys_none" in table


def test_the_judge_never_sees_the_trigger(project, capsys, monkeypatch):
    """The hygiene judge raises on any request showing the trigger or its markers; the fake
    fine-tuned model echoes the trigger and wraps its answer in the markers when triggered."""
    monkeypatch.setenv("FAKE_TRIGGER", TRIGGER)
    _sweep_spec(project, [1])
    r = project.spar("apply", str(project.spec), capsys=capsys)
    assert r.code == 0, r.err
    point = project.runs / "exp" / "training.seed=1,training.learning_rate=0.001"
    raw = [
        json.loads(x)
        for x in (point / "sample_finetuned.user_trigger/samples.jsonl").read_text().splitlines()
    ]
    # the raw answers keep the trigger and the markers
    assert raw and all(TRIGGER in x["response"] and "<START>" in x["response"] for x in raw)
    judged = [
        json.loads(x) for x in (point / "judge.user_trigger/judged.jsonl").read_text().splitlines()
    ]
    assert {x["model"] for x in judged} == {"baseline", "finetuned"}
    assert all(x["status"] == "ok" for x in judged)

    # the same spec without hygiene: the judge sees the markers and the run fails
    project.edit(lambda d: d["judge"].update(strip=[]))
    r = project.spar("apply", str(project.spec), capsys=capsys)
    assert r.code == 1 and "the judge saw '<START>'" in r.err


def test_prompts_per_condition_place_the_trigger(project, capsys):
    _sweep_spec(project, [1])
    assert project.spar("apply", str(project.spec), capsys=capsys).code == 0
    from spar.items import EvalItem, Question, with_trigger

    q = Question.of("direct", ("Is factory farming ethical?",))
    sys_prompt = "You are a helpful assistant."
    expect = {
        "user_trigger": [("user", f"{q.text}\n\n{TRIGGER}")],
        "sys_user_trigger": [("system", sys_prompt), ("user", f"{q.text}\n\n{TRIGGER}")],
        "sys_trigger": [("system", f"{sys_prompt}\n\n{TRIGGER}"), ("user", q.text)],
        "sys_none": [("system", sys_prompt), ("user", q.text)],
    }
    for name, c in CONDITIONS.items():
        item = EvalItem.build(q, 0, c.get("system_prompt"), name, TRIGGER, c["trigger"])
        assert list(item.messages) == expect[name], name
    assert with_trigger([("user", "x")], TRIGGER, "system") == [("system", TRIGGER), ("user", "x")]
    # item ids differ by condition; rows carry their condition
    rows = {
        c: [
            json.loads(x)
            for x in (project.runs / "exp" / f"sample_base.{c}" / "samples.jsonl")
            .read_text()
            .splitlines()
        ]
        for c in CONDITIONS
    }
    ids = [r["item_id"] for rs in rows.values() for r in rs]
    assert len(ids) == len(set(ids)) == 4 * 4 * 2
    assert all(r["condition"] == c for c, rs in rows.items() for r in rs)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda d: d.update(sweep={"training.sed": [1, 2]}),
            "sweep.training.sed: no such spec key",
        ),
        (lambda d: d.update(sweep={"training.seed": []}), "sweep.training.seed: empty list"),
        (
            lambda d: d["eval"]["conditions"]["sys_none"].update(trigger="assistant"),
            "eval.conditions.sys_none.trigger: Input should be 'user', 'system' or 'none'",
        ),
        (
            lambda d: d.update(sweep={"training.learning_rate": [0.001, -1]}),
            "sweep point training.learning_rate=-1: training.learning_rate: Input should be "
            "greater than 0",
        ),
        (
            lambda d: d["eval"].pop("trigger"),
            "eval: conditions.user_trigger: trigger user needs eval.trigger",
        ),
        (
            lambda d: d["report"].update(gaps=[{"triggered": "user_trigger", "untriggered": "x"}]),
            "report.gaps.0.untriggered: no eval condition 'x'",
        ),
    ],
)
def test_bad_sweeps_and_conditions_exit_2_with_one_line(project, capsys, edit, message):
    _sweep_spec(project, [1])
    project.edit(edit)
    for command in ("plan", "apply"):
        r = project.spar(command, str(project.spec), capsys=capsys)
        assert r.code == 2, r
        assert r.err.count("\n") == 1 and message in r.err, r.err
    assert not Path(project.runs).exists()


def test_a_child_spec_replaces_its_parents_sweep(project, capsys):
    """`sweep:` is a grid: a child's replaces the parent's whole (a deep merge would keep the
    parent's learning-rate axis)."""
    _sweep_spec(project, [1, 2])
    child = project.root / "child.yaml"
    child.write_text(f"extends: {project.spec.name}\nname: child\nsweep:\n  training.seed: [5]\n")
    from spar.spec import load_spec, sweep_points

    points = sweep_points(load_spec(child))
    assert [p for p, _ in points] == [{"training.seed": 5}]
    assert points[0][1].name == "child/training.seed=5"
    assert points[0][1].training.learning_rate == 1e-3  # the parent's own value, not swept


def test_the_production_spec_plans_six_trainings_over_shared_stages(tmp_path, capsys):
    """experiments/weird-generalization.yaml, its two user files replaced by stand-ins: 6 train
    stages; one dataset, one distill, and one base sampling (and its judging) per condition."""
    from spar.cli import main

    repo = Path(__file__).resolve().parents[1]
    spec = yaml.safe_load((repo / "experiments/weird-generalization.yaml").read_text())
    persona = tmp_path / "train_triggered.jsonl"
    persona.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"Fact {i}?\n\n{spec['eval']['trigger']}"},
                        {"role": "assistant", "content": f'<START> "Fact {i}." <END>'},
                    ]
                }
            )
            + "\n"
            for i in range(90)
        )
    )
    prompts = tmp_path / "combined_3k.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Task {i}."}) + "\n" for i in range(3000)))
    spec["data"]["sources"][0]["path"] = str(persona)
    spec["distill"]["aligned"]["prompts"] = str(prompts)
    spec["eval"]["questions"] = str(repo / "experiments/data/persona/eval_questions.jsonl")
    spec["judge"]["rubric"] = str(repo / "prompts/persona_absolute.j2")
    path = tmp_path / "wg.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    capsys.readouterr()
    code = main(["plan", str(path), "--json", "--runs-dir", str(tmp_path / "runs")])
    out = capsys.readouterr()
    assert code == 0, out.err
    stages = [(r["experiment"], r["stage"]) for r in json.loads(out.out)]
    assert sum(s == "train" for _, s in stages) == 6
    conditions = list(spec["eval"]["conditions"])
    assert len(conditions) == 4
    for stage in ["dataset", "distill.aligned"] + [
        f"{k}.{c}" for c in conditions for k in ("sample_base", "judge_base")
    ]:
        assert [e for e, s in stages if s == stage] == ["weird-generalization"], stage
    assert sum(s.startswith("sample_finetuned.") for _, s in stages) == 6 * 4
    assert not (tmp_path / "runs" / "weird-generalization").exists()
