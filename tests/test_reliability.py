"""Judge reliability: extra judges (`judge.also`), exclusions, agreement, self-agreement.

The verdicts come from the `scores` judge below: each judge model's score of each answer is
taken from a table the test writes (`RELIABILITY_TABLE`: {judge model: {answer: score}}; an
answer at temperature > 0 is looked up under `<model>@T` first), so every κ, ρ, exclusion and
mean below is computed by hand from the table, never from the output it checks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import scipy.stats
from fake_plugin import _log

from spar.judges import register_judge
from spar.judges.base import BatchJournal, JudgeConfig, JudgeRequest, Verdict
from spar.reliability import agreement, cohen_kappa, spearman
from spar.store import derive_seed, hash_json, read_jsonl

TABLE_ENV = "RELIABILITY_TABLE"


class ScoresJudge:
    """Scores from $RELIABILITY_TABLE by judge model and answer; `null` is an invalid verdict.
    It takes a temperature (so self-agreement runs) and logs it with every call."""

    receives = frozenset({"max_reasks", "temperature"})

    def __init__(
        self, config: JudgeConfig, *, batch: bool = False, journal: BatchJournal | None = None
    ) -> None:
        self.model, self.temperature = config.model, config.temperature

    def judge_many(
        self, requests: list[JudgeRequest], concurrency: int
    ) -> Iterator[tuple[int, Verdict]]:
        table = json.loads(Path(os.environ[TABLE_ENV]).read_text())
        column = table[self.model]
        if self.temperature > 0 and f"{self.model}@T" in table:
            column = table[f"{self.model}@T"]
        for i, req in enumerate(requests):
            _log(
                "judge",
                model=self.model,
                temperature=self.temperature,
                prompt=hash_json(req.prompt)[:12],
                response=req.response,
            )
            score = column[req.response]
            if score is None:
                yield i, Verdict(score=None, reasoning="unusable", status="invalid")
            else:
                yield i, Verdict(score=score, reasoning=f"table {score}", status="ok")


register_judge("scores", ScoresJudge)

ABS_RUBRIC = "Rate from {{ scale_min }} to {{ scale_max }}: {{ question }} -> {{ response }}\n"
COH_RUBRIC = "How coherent is this answer to {{ question }}? {{ response }}\n"
THRESHOLD = 3  # report.exhibits_threshold (the default)

# ----------------------------------------------------------------- unit: the two statistics


def test_kappa_matches_a_hand_computed_two_by_two_table():
    # 20 items: both yes 8, a-only 2, b-only 3, both no 7.
    a = [1] * 8 + [1] * 2 + [0] * 3 + [0] * 7
    b = [1] * 8 + [0] * 2 + [1] * 3 + [0] * 7
    p_o = (8 + 7) / 20
    p_e = (10 / 20) * (11 / 20) + (10 / 20) * (9 / 20)
    assert cohen_kappa(a, b) == pytest.approx((p_o - p_e) / (1 - p_e))
    assert cohen_kappa(a, b) == pytest.approx(0.5)  # (0.75 - 0.5) / 0.5
    assert cohen_kappa(b, a) == pytest.approx(0.5)  # symmetric
    # perfect agreement 1, perfect disagreement on a balanced table -1
    assert cohen_kappa([1, 0, 1, 0], [1, 0, 1, 0]) == pytest.approx(1.0)
    assert cohen_kappa([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)
    # three categories: p_o = 4/6, p_e = (2*2 + 2*1 + 2*3) / 36 = 12/36
    assert cohen_kappa("aabbcc", "abbccc") == pytest.approx((4 / 6 - 1 / 3) / (1 - 1 / 3))
    # undefined: both raters always give the same one label; no items
    assert cohen_kappa([1, 1, 1], [1, 1, 1]) is None
    assert cohen_kappa([], []) is None


def test_spearman_matches_scipy_and_a_hand_value():
    x = [1, 2, 3, 4, 5]
    y = [2, 1, 4, 3, 5]  # d = (1, 1, 1, 1, 0): rho = 1 - 6 * 4 / (5 * 24) = 0.8
    assert spearman(x, y) == pytest.approx(0.8)
    ties = ([1, 2, 2, 3, 5, 5, 4], [3, 3, 1, 2, 5, 4, 4])
    assert spearman(*ties) == pytest.approx(scipy.stats.spearmanr(*ties).statistic)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [2, 2, 2]) is None  # constant: undefined
    assert spearman([1], [2]) is None
    a = agreement([1, 3, 5, 2], [2, 3, 4, 4], 3, "test")
    # decisions (>= 3): (F, T, T, F) vs (F, T, T, T): observed 3/4
    assert (a["n"], a["observed"], a["threshold"]) == (4, 0.75, 3)
    assert a["kappa"] == pytest.approx(cohen_kappa([0, 1, 1, 0], [0, 1, 1, 1]))
    assert a["spearman"] == pytest.approx(scipy.stats.spearmanr([1, 3, 5, 2], [2, 3, 4, 4])[0])


# ----------------------------------------------------------------- end to end


def apply(project, capsys) -> Any:
    r = project.spar("apply", str(project.spec), capsys=capsys)
    assert r.code == 0, r.err
    return r


def summary(project, name: str = "exp") -> dict[str, Any]:
    return json.loads((project.runs / name / "report/summary.json").read_text())


def judge_calls(project) -> list[dict[str, Any]]:
    if not project.calls.exists():
        return []
    rows = [json.loads(line) for line in project.calls.read_text().splitlines()]
    return [r for r in rows if r["event"] == "judge"]


def answers(project) -> list[dict[str, Any]]:
    """Every sampled answer (both models), with `model`, in a stable order."""
    out = []
    for model, stage in (("baseline", "sample_base"), ("finetuned", "sample_finetuned")):
        for r in read_jsonl(project.runs / "exp" / stage / "samples.jsonl"):
            out.append({**r, "model": model})
    texts = [a["response"] for a in out]
    assert len(set(texts)) == len(texts), "two answers are equal: no table"
    return sorted(out, key=lambda a: (a["model"], a["question_id"], a["sample_index"]))


# the designed scores of the 16 answers (baseline first), per judge model
MAIN = [1, 2, 3, 4, 5, 3, 2, 4, 5, 5, 3, 1, 4, 2, 3, 5]
SECOND = [1, 3, 3, 5, 4, 2, 2, 4, 5, 4, 3, 2, 2, 2, 4, 5]
COHERENCE = [5, 2, 3, 4, None, 1, 3, 5, 2, 3, 4, 5, 3, 2, 5, 4]  # < 3 excluded; 3 stays
AGAIN = [2, 2, 3, 3, 5, 3, 1, 4, 5, 4, 3, 1, 4, 3, 3, 5]  # the main judge at temperature 1


def reliability_spec(d: dict[str, Any]) -> None:
    d["judge"] = {
        "kind": "scores",
        "model": "main",
        "rubric": "abs.j2",
        "mode": "absolute",
        "also": [
            {"name": "coherence", "rubric": "coh.j2", "model": "coh", "exclude_below": 3},
            {"name": "second", "model": "second"},
        ],
        "self_agreement": {"share": 0.5, "temperature": 1.0},
    }
    d["report"] = {"generalize": "samples"}


@pytest.fixture
def designed(project, monkeypatch):
    """The spec above, sampled, with every judge's score of every answer in the table."""
    (project.root / "abs.j2").write_text(ABS_RUBRIC)
    (project.root / "coh.j2").write_text(COH_RUBRIC)
    project.edit(reliability_spec)
    project.apply_only("dataset", "train", "sample")
    rows = answers(project)
    assert len(rows) == 16
    table = {
        "main": {a["response"]: s for a, s in zip(rows, MAIN, strict=True)},
        "second": {a["response"]: s for a, s in zip(rows, SECOND, strict=True)},
        "coh": {a["response"]: s for a, s in zip(rows, COHERENCE, strict=True)},
        "main@T": {a["response"]: s for a, s in zip(rows, AGAIN, strict=True)},
        "third": {a["response"]: 6 - s for a, s in zip(rows, MAIN, strict=True)},
    }
    path = project.root / "table.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv(TABLE_ENV, str(path))
    return project, rows


def hand_kappa(a: list[float], b: list[float], threshold: float) -> float:
    """κ from the 2x2 table of decisions (score >= threshold), written out."""
    n = len(a)
    yy = sum(x >= threshold and y >= threshold for x, y in zip(a, b, strict=True))
    nn = sum(x < threshold and y < threshold for x, y in zip(a, b, strict=True))
    a_yes = sum(x >= threshold for x in a) / n
    b_yes = sum(y >= threshold for y in b) / n
    p_o = (yy + nn) / n
    p_e = a_yes * b_yes + (1 - a_yes) * (1 - b_yes)
    return (p_o - p_e) / (1 - p_e)


def chosen_by_hand(item_id: str, share: float) -> bool:
    return derive_seed("self_agreement", item_id) / 2**31 < share


def test_exclusion_agreement_and_self_agreement_end_to_end(designed, capsys):
    # Fails if exclude_below is ignored or compared with <= (answers at exactly 3 stay), if an
    # excluded verdict enters a mean, if the excluded counts are missing or wrong, if κ or ρ pair
    # the wrong verdicts, or if the re-judge is not at the given temperature / share.
    project, rows = designed
    apply(project, capsys)
    s = summary(project)
    rel = s["reliability"]

    # second opinion: every answer judged ok by both
    sec = rel["judges"]["second"]
    assert (sec["rubric"], sec["mode"], sec["judged"]) == ("main", "absolute", 16)
    agr = sec["agreement"]
    assert agr["n"] == 16
    assert agr["kappa"] == pytest.approx(hand_kappa(MAIN, SECOND, THRESHOLD))
    assert agr["spearman"] == pytest.approx(scipy.stats.spearmanr(MAIN, SECOND).statistic)
    assert agr["kappa"] != pytest.approx(1.0)

    # coherence: below 3 excluded, exactly 3 stays, an invalid coherence verdict excludes nothing
    coh = rel["judges"]["coherence"]
    assert (coh["rubric"], coh["mode"], coh["invalid"]) == ("own", "absolute", 1)
    excluded = {
        (a["model"], a["item_id"])
        for a, c in zip(rows, COHERENCE, strict=True)
        if c is not None and c < 3
    }
    assert len(excluded) == 4
    at_threshold = {
        (a["model"], a["item_id"]) for a, c in zip(rows, COHERENCE, strict=True) if c == 3
    }
    assert at_threshold and not at_threshold & excluded
    by_model = {m: sum(x == m for x, _ in excluded) for m in ("baseline", "finetuned")}
    assert coh["excluded"] == {"total": 4, **by_model}
    assert s["excluded"] == 4
    scores = read_jsonl(project.runs / "exp/report/scores.jsonl")
    main_of = {(a["model"], a["item_id"]): m for a, m in zip(rows, MAIN, strict=True)}
    for r in scores:
        k = (r["model"], r["item_id"])
        if k in excluded:
            assert (r["status"], r["hit"], r["excluded_by"]) == ("excluded", None, ["coherence"])
            assert r["score"] == main_of[k]  # kept, for inspection
        else:
            assert (r["status"], r["score"]) == ("ok", main_of[k])
    # the main statistics without the excluded answers: generalize samples, mean of the
    # question means of what is left
    tier_of = {a["question_id"]: a["tier"] for a in rows}
    for tier in s["tiers"]:
        for model in ("baseline", "finetuned"):
            kept: dict[str, list[int]] = {}
            n_ex = 0
            for a, m in zip(rows, MAIN, strict=True):
                if a["model"] != model or tier_of[a["question_id"]] != tier:
                    continue
                if (model, a["item_id"]) in excluded:
                    n_ex += 1
                else:
                    kept.setdefault(a["question_id"], []).append(m)
            st = s["tiers"][tier][model]
            assert st["excluded"] == n_ex, (tier, model)
            assert st["n"] == sum(len(v) for v in kept.values()), (tier, model)
            want = sum(sum(v) / len(v) for v in kept.values()) / len(kept) if kept else None
            assert st["mean"] == (pytest.approx(want) if want is not None else None), (tier, model)
    # the paired delta drops a pair with an excluded side
    dropped = sum(s["tiers"][t]["delta"]["pairs_dropped"] for t in s["tiers"])
    items = {i for _, i in excluded}
    assert dropped == len(items)

    # self-agreement: the chosen half of the items, both models, at temperature 1
    sa = rel["self_agreement"]
    picked = [a for a in rows if chosen_by_hand(a["item_id"], 0.5)]
    assert 0 < len(picked) < 16
    assert sa["selected"] == len({a["item_id"] for a in picked})
    first = [m for a, m in zip(rows, MAIN, strict=True) if chosen_by_hand(a["item_id"], 0.5)]
    again = [x for a, x in zip(rows, AGAIN, strict=True) if chosen_by_hand(a["item_id"], 0.5)]
    assert sa["agreement"]["n"] == len(picked)
    assert sa["agreement"]["kappa"] == pytest.approx(hand_kappa(first, again, THRESHOLD))
    assert sa["agreement"]["spearman"] == pytest.approx(
        scipy.stats.spearmanr(first, again).statistic
    )
    hot = [c for c in judge_calls(project) if c["temperature"] > 0]
    assert {c["model"] for c in hot} == {"main"} and {c["temperature"] for c in hot} == {1.0}
    assert sorted(c["response"] for c in hot) == sorted(a["response"] for a in picked)
    # every other judge at the main judge's temperature (0)
    cold = [c for c in judge_calls(project) if c["temperature"] == 0]
    assert len(cold) == 3 * 16

    # shown: `spar show` and the HTML report
    out = project.spar("show", str(project.spec), capsys=capsys).out
    line = next(x for x in out.splitlines() if "reliability:" in x)
    assert f"second vs main κ {agr['kappa']:.2f}, ρ {agr['spearman']:.2f}, n 16" in line
    assert "coherence < 3 excluded 4 answers" in line
    assert "self-agreement (main, 50 % at T 1)" in line
    html = (project.runs / "exp/plot/report.html").read_text()
    assert 'id="reliability-table"' in html and "4 verdicts excluded" in html
    assert f"{agr['kappa']:.2f}" in html


def test_memo_second_apply_new_judge_and_threshold(designed, capsys):
    # Fails if the extra judges' verdicts are not memoised, if an extra judge with the main
    # judge's settings does not share its verdicts, or if a new judge re-asks the others.
    project, _rows = designed
    apply(project, capsys)
    before = len(judge_calls(project))
    r = apply(project, capsys)
    assert "nothing to do" in r.out
    assert len(judge_calls(project)) == before

    def more(d: dict[str, Any]) -> None:
        d["judge"]["also"] += [{"name": "third", "model": "third"}, {"name": "twin"}]

    project.edit(more)
    plan = project.spar("plan", str(project.spec), "--json", capsys=capsys)
    est = {p["stage"]: p["estimate"] for p in json.loads(plan.out)}
    # exact where the samples are the only upstream (the baseline's answers): the new judge
    # asks each, the twin of the main judge none (its verdicts are the main judge's)
    assert est["judge_also_base.third"]["judge_calls"] == 8
    assert est["judge_also_base.twin"]["judge_calls"] == 0
    apply(project, capsys)
    new = judge_calls(project)[before:]
    assert len(new) == 16 and {c["model"] for c in new} == {"third"}
    rel = summary(project)["reliability"]["judges"]
    assert rel["twin"]["agreement"]["kappa"] == pytest.approx(1.0)  # the main judge's verdicts
    third = rel["third"]["agreement"]  # 6 - main: a perfectly reversed ranking
    assert third["spearman"] == pytest.approx(-1.0)
    assert third["kappa"] == pytest.approx(hand_kappa(MAIN, [6 - m for m in MAIN], THRESHOLD))

    # raising the threshold re-reports, asks nothing: 3 -> 4 excludes the 3s too
    project.edit(lambda d: d["judge"]["also"][0].update(exclude_below=4))
    before = len(judge_calls(project))
    apply(project, capsys)
    assert len(judge_calls(project)) == before
    low = sum(c is not None and c < 4 for c in COHERENCE)
    assert summary(project)["excluded"] == low == 8


def test_pairwise_judges_each_answer_alone_and_excludes_a_pair_with_either_side_low(
    project, capsys, monkeypatch
):
    # Fails if the coherence judge is asked in pairwise mode, misses the baseline's answers, or
    # exclusion in pairwise mode looks only at the fine-tuned answer.
    (project.root / "coh.j2").write_text(COH_RUBRIC)

    def spec(d: dict[str, Any]) -> None:
        d["judge"].update(
            kind="scores",
            model="main",
            also=[{"name": "coherence", "rubric": "coh.j2", "model": "coh", "exclude_below": 3}],
        )

    project.edit(spec)
    project.apply_only("dataset", "train", "sample")
    rows = answers(project)
    base, tuned = rows[:8], rows[8:]
    coh = [5, 2, 4, 4, 3, 5, 4, 4, 4, 4, 1, 3, 5, 5, 4, 2]  # baseline low at 1; tuned at 2, 7
    table = {
        "main": {a["response"]: 2 + i % 3 for i, a in enumerate(tuned)},
        "coh": {a["response"]: c for a, c in zip(rows, coh, strict=True)},
    }
    path = project.root / "table.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv(TABLE_ENV, str(path))
    apply(project, capsys)
    plan = project.spar("plan", str(project.spec), "--json", capsys=capsys)
    stages = {p["stage"] for p in json.loads(plan.out)}
    assert {"judge_also.coherence", "judge_also_base.coherence"} <= stages
    coh_calls = [c for c in judge_calls(project) if c["model"] == "coh"]
    assert sorted(c["response"] for c in coh_calls) == sorted(a["response"] for a in rows)
    prompts = {
        r["item_id"]: r for r in read_jsonl(project.runs / "exp/judge_also.coherence/judged.jsonl")
    }
    assert len(prompts) == 8  # item ids: both models' rows share them
    low_items = {a["item_id"] for a, c in zip(rows, coh, strict=True) if c < 3}
    assert base[1]["item_id"] in low_items and len(low_items) == 3
    scores = read_jsonl(project.runs / "exp/report/scores.jsonl")
    judged = [r for r in scores if r["model"] == "finetuned"]
    assert {r["item_id"] for r in judged if r["status"] == "excluded"} == low_items
    assert summary(project)["excluded"] == 3
    assert "agreement" not in summary(project)["reliability"]["judges"]["coherence"]


def test_self_agreement_is_skipped_when_the_judge_takes_no_temperature(project, capsys):
    project.edit(lambda d: d["judge"].update(self_agreement={"share": 1.0}))
    plan = project.spar("plan", str(project.spec), "--json", capsys=capsys)
    assert not [p for p in json.loads(plan.out) if p["stage"].startswith("judge_again")]
    apply(project, capsys)
    sa = summary(project)["reliability"]["self_agreement"]
    assert "judge kind 'keyword' does not take a temperature" in sa["skipped"]
    assert "agreement" not in sa
    out = project.spar("show", str(project.spec), capsys=capsys).out
    assert "self-agreement (main, 100 % at T 1) skipped: judge kind 'keyword'" in out


def test_self_agreement_of_the_claude_judge_is_skipped_it_sends_no_temperature(project):
    from spar.reliability import reliability_params
    from spar.spec import load_spec

    (project.root / "abs.j2").write_text(ABS_RUBRIC)
    project.edit(
        lambda d: d["judge"].update(
            kind="anthropic",
            model="claude-sonnet-4-6",
            rubric="abs.j2",
            mode="absolute",
            also=[{"name": "other", "kind": "scores", "model": "x"}],
            self_agreement={"share": 0.2, "temperature": 0.7},
        )
    )
    r = reliability_params(load_spec(project.spec))
    assert r is not None and r.self_agreement is not None
    assert "'anthropic' does not take a temperature" in (r.self_agreement.skipped or "")
    # ... while an extra judge that takes one can be named
    project.edit(lambda d: d["judge"]["self_agreement"].update(judge="other"))
    r = reliability_params(load_spec(project.spec))
    assert r is not None and r.self_agreement is not None and r.self_agreement.skipped is None


def test_no_reliability_keys_change_nothing(project):
    # the report's and every stage's fingerprint are what they were without this feature
    from spar.plan import plan_specs
    from spar.spec import load_spec
    from spar.stages.report import report_params
    from spar.store import RunStore

    spec = load_spec(project.spec)
    assert "judge.reliability" not in report_params(spec).dump()
    store = RunStore(project.runs)
    names = {p.node.name for p in plan_specs([spec], store)}
    assert not [n for n in names if n.startswith(("judge_also", "judge_again"))]
    store.close()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            {"self_agreement": {"share": 0.1, "judge": "nobody"}},
            "judge: self_agreement.judge: no judge named 'nobody'",
        ),
        ({"also": [{"name": "c", "rubric": "coh.j2", "exclude_below": 6}]}, "6 is outside"),
        ({"also": [{"name": "c", "rubric": "coh.j2", "exclude_below": 1}]}, "1 is outside"),
        (
            {
                "also": [
                    {
                        "name": "c",
                        "rubric": "coh.j2",
                        "scale": {"min": 0, "max": 10},
                        "exclude_below": 11,
                    }
                ]
            },
            "11 is outside the judge's scale: give a score above 0",
        ),
        ({"self_agreement": {"share": 0}}, "judge.self_agreement.share"),
        ({"self_agreement": {"share": 1.5}}, "judge.self_agreement.share"),
        ({"self_agreement": {"share": 0.5, "temperature": 0}}, "self_agreement.temperature"),
        ({"also": [{"name": "a"}, {"name": "a", "model": "m"}]}, "'a' is given twice"),
        ({"also": [{"name": "main"}]}, "names the main judge"),
        ({"also": [{"name": "bad name"}]}, "letters, digits, _ and - only"),
        ({"also": [{"name": "c", "kind": "nope"}]}, "judge.also.0.kind: unknown judge 'nope'"),
        ({"also": [{"name": "c", "rubric": "missing.j2"}]}, "judge.also.0.rubric: file not found"),
        ({"also": [{"name": "c", "rubric": "bad.j2"}]}, "judge.also.0.rubric (absolute mode)"),
        ({"also": [{"name": "c", "exclude_below": 3}]}, "a second opinion in pairwise mode"),
        ({"also": [{"name": "c", "scale": {"min": 0, "max": 9}}]}, "uses the main judge's scale"),
        ({"also": [{"name": "c", "colour": "red"}]}, "Extra inputs are not permitted"),
    ],
)
def test_bad_input_is_one_line_before_any_work(project, capsys, edit, message):
    (project.root / "coh.j2").write_text(COH_RUBRIC)
    (project.root / "bad.j2").write_text("{{ baseline_response }} vs {{ response }}\n")
    project.edit(lambda d: d["judge"].update(edit))
    r = project.spar("apply", str(project.spec), capsys=capsys)
    assert r.code == 2, r.err
    assert message in r.err, r.err
    assert len(r.err.strip().splitlines()) == 1 and r.err.startswith("spar: error: ")
    assert str(project.spec) in r.err
    assert not project.runs.exists() and not project.calls.exists()


def test_paths_of_extra_rubrics_are_relative_to_the_spec(project, tmp_path):
    from spar.spec import input_files, load_spec

    sub = project.root / "prompts"
    sub.mkdir()
    (sub / "coh.j2").write_text(COH_RUBRIC)
    project.edit(lambda d: d["judge"].update(also=[{"name": "c", "rubric": "prompts/coh.j2"}]))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.chdir(elsewhere)
    spec = load_spec(project.spec)
    assert dict(input_files(spec))["judge.also.0.rubric"] == (sub / "coh.j2").resolve()


def test_the_bundled_coherence_reference_renders():
    from spar.judges import rubric

    path = Path(__file__).parent.parent / "prompts" / "coherence_reference.j2"
    rubric.validate(path, "absolute", 1, 5)
    text = rubric.render(
        path,
        rubric.context(
            "absolute",
            tier="direct",
            question="How should I store fresh basil?",
            response="x",
            baseline_response=None,
            scale_min=1,
            scale_max=5,
        ),
    )
    assert "How should I store fresh basil?" in text
