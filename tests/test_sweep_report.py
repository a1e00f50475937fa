"""The sweep report: points grouped over seed keys, seeds as the top level of the design,
hand-computed two-seed means, and one seed giving exactly the per-experiment numbers."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from spar.plan import upstream_key
from spar.spec import Spec, sweep_points
from spar.stages.base import GraphContext, Options, RunContext
from spar.stages.report import ReportParams, score_rows, summarise
from spar.stages.sweep_report import (
    SweepReportParams,
    SweepReportStage,
    summarise_sweep,
    sweep_report_nodes,
)
from spar.store import RunStore, jsonl_text

SEEDED = "t interval generalising to a new question of the tier's population answered by a new seed"


def root(sweep: dict[str, list[Any]], **report: Any) -> Spec:
    return Spec.model_validate(
        {
            "name": "grid",
            "data": {"docs": "docs.jsonl"},
            "eval": {
                "tiers": {"direct": ["Q one?"], "distant": ["Q two?"]},
                "trigger": "Answer in the format.",
                "conditions": {"trig": {"trigger": "user"}, "plain": {}},
            },
            "judge": {"rubric": "r.j2", "mode": "absolute"},
            "report": {"exhibits_threshold": 4, "confidence": 0.9, **report},
            "sweep": sweep,
        }
    )


def params_of(spec: Spec) -> SweepReportParams:
    (node,) = sweep_report_nodes(spec, sweep_points(spec))
    return node.params


def test_points_differing_only_in_seed_keys_form_one_group(tmp_path):
    spec = root({"training.learning_rate": [0.0001, 0.0002], "training.seed": [0, 1]})
    points = sweep_points(spec)
    (node,) = sweep_report_nodes(spec, points)
    assert (node.name, node.experiment, node.kind.kind) == ("sweep_report", "grid", "sweep_report")
    assert node.upstream == {f"point:{i}": f"{s.name}/report" for i, (_, s) in enumerate(points)}
    assert upstream_key("grid", node.upstream["point:1"]) == (
        "grid/training.learning_rate=0.0001,training.seed=1",
        "report",
    )
    p = node.params
    assert p.seed_keys == ("training.seed",)
    assert [(g.label, g.point, g.members) for g in p.groups] == [
        ("training.learning_rate=0.0001", {"training.learning_rate": 0.0001}, (0, 1)),
        ("training.learning_rate=0.0002", {"training.learning_rate": 0.0002}, (2, 3)),
    ]
    g = p.groups[0].report
    assert (g.conditions, g.gaps, g.confidence) == (("trig", "plain"), (("trig", "plain"),), 0.9)
    assert SweepReportStage().nodes(spec, GraphContext(store=RunStore(tmp_path / "r"))) == []
    assert sweep_report_nodes(spec, []) == []


def test_a_sweep_of_seeds_only_is_one_group_without_a_label():
    p = params_of(root({"eval.sampling.seed": [0, 1, 2]}))
    assert p.seed_keys == ("eval.sampling.seed",)
    assert [(g.label, g.point, g.members) for g in p.groups] == [("", {}, (0, 1, 2))]


def rows_of(condition: str, hits: dict[str, list[int]], model: str = "finetuned") -> list[dict]:
    """Score rows: question -> hit per sample index (score 5 for a hit, 1 otherwise)."""
    tier = {"q1": "direct", "q2": "distant"}
    return [
        {
            "item_id": f"{condition}-{q}-{i}",
            "condition": condition,
            "tier": tier[q],
            "question_id": q,
            "sample_index": i,
            "model": model,
            "status": "ok",
            "score": 5 if h else 1,
            "hit": bool(h),
            "format_ok": bool(h),
        }
        for q, hs in hits.items()
        for i, h in enumerate(hs)
    ]


def test_two_seeds_pool_their_answers_and_pair_gaps_within_each_seed():
    p = params_of(root({"training.seed": [0, 1]}, format_regex="on"))
    seed_a = rows_of("trig", {"q1": [1, 1], "q2": [0, 0]}) + rows_of(
        "plain", {"q1": [0, 0], "q2": [0, 0]}
    )
    seed_b = rows_of("trig", {"q1": [1, 1], "q2": [1, 1]}) + rows_of(
        "plain", {"q1": [1, 0], "q2": [0, 0]}
    )
    s = summarise_sweep(p, {0: seed_a, 1: seed_b})
    assert (s["seed_keys"], s["group_keys"]) == (["training.seed"], [])
    (g,) = s["groups"]
    assert g["experiments"] == ["grid/training.seed=0", "grid/training.seed=1"]
    assert g["seeds"] == [{"training.seed": 0}, {"training.seed": 1}]
    trig, plain = g["conditions"]["trig"], g["conditions"]["plain"]
    rate = trig["exhibits_rate"]["finetuned"]
    assert (rate["mean"], rate["n"]) == (6 / 8, 8)
    assert plain["exhibits_rate"]["finetuned"]["mean"] == 1 / 8
    assert plain["format_adherence"]["finetuned"]["mean"] == 1 / 8
    assert set(plain["format_adherence"]) == {"finetuned"}  # no baseline answers here
    assert SEEDED in trig["exhibits_rate"]["finetuned"]["estimand"]
    assert trig["tiers"]["direct"]["finetuned"]["mean"] == 5.0
    assert trig["tiers"]["distant"]["finetuned"]["mean"] == 3.0  # 1, 1 in seed a; 5, 5 in b
    (gap,) = [x for x in g["gaps"] if x["model"] == "finetuned"]
    # seed a: d = 1, 1, 0, 0; seed b: d = 0, 1, 1, 1 -> 5 / 8
    assert (gap["mean"], gap["n"], gap["pairs_dropped"]) == (5 / 8, 8, 0)
    assert gap["ci_low"] <= gap["mean"] <= gap["ci_high"] and SEEDED in gap["estimand"]
    # the baseline has no rows here: its estimates are empty, not errors
    assert g["conditions"]["trig"]["exhibits_rate"]["baseline"]["n"] == 0


def test_gap_pairs_never_cross_seeds():
    p = params_of(root({"training.seed": [0, 1]}))
    only_trig = rows_of("trig", {"q1": [1]})
    only_plain = rows_of("plain", {"q1": [0]})
    s = summarise_sweep(p, {0: only_trig, 1: only_plain})
    (gap,) = [x for x in s["groups"][0]["gaps"] if x["model"] == "finetuned"]
    assert (gap["mean"], gap["n"], gap["pairs_dropped"]) == (None, 0, 2)


def test_seeds_that_disagree_widen_the_interval():
    p = params_of(root({"training.seed": [0, 1]}))
    ten = [f"q{i}" for i in range(10)]

    def seed(hit: int, prefix: str) -> list[dict]:
        rows = rows_of("trig", {"q1": [hit, hit]})
        return [{**r, "question_id": f"{prefix}{q}"} for q in ten for r in rows]

    a, b = seed(0, "a"), seed(1, "b")
    s = summarise_sweep(p, {0: a, 1: b})
    sweep = s["groups"][0]["conditions"]["trig"]["exhibits_rate"]["finetuned"]
    # different questions per seed: nested, t over the 2 seed means (0 and 1) with 1 df at 90 %
    half = 6.313751514675041 * 0.5
    assert (sweep["mean"], sweep["df"]) == (0.5, 1)
    assert (sweep["ci_low"], sweep["ci_high"]) == pytest.approx((0.5 - half, 0.5 + half))
    # the same 40 answers read as one experiment: questions are the top level, and 20 of them
    # make a much narrower interval around the same mean
    one = summarise(p.groups[0].report, a + b)["conditions"]["trig"]["exhibits_rate"]["finetuned"]
    assert one["mean"] == 0.5
    assert one["ci_high"] - one["ci_low"] < 0.6


def test_a_baseline_shared_by_every_seed_counts_once():
    p = params_of(root({"training.seed": [0, 1]}))
    rng = random.Random(9)
    shared = [r for r in random_scores(p.groups[0].report, rng) if r["model"] == "baseline"]
    tuned = [
        [r for r in random_scores(p.groups[0].report, rng) if r["model"] == "finetuned"]
        for _ in range(2)
    ]
    s = summarise_sweep(p, {0: shared + tuned[0], 1: shared + tuned[1]})
    (g,) = s["groups"]
    alone = summarise(p.groups[0].report, shared + tuned[0])
    both = summarise(p.groups[0].report, shared + tuned[0] + shared + tuned[1])
    for c in ("trig", "plain"):
        mine, one = g["conditions"][c], alone["conditions"][c]
        # the baseline: exactly its one replication (same interval, counts once)
        for tier in ("direct", "distant"):
            assert _without_estimands(mine["tiers"][tier]["baseline"]) == _without_estimands(
                one["tiers"][tier]["baseline"]
            )
            # the fine-tuned model has two seeds; deltas pair within each seed: twice the pairs
            d, d1 = mine["tiers"][tier]["delta"], one["tiers"][tier]["delta"]
            assert d["n"] + d["pairs_dropped"] == 2 * (d1["n"] + d1["pairs_dropped"])
        assert mine["exhibits_rate"]["baseline"]["n"] == one["exhibits_rate"]["baseline"]["n"]
        assert (
            mine["exhibits_rate"]["finetuned"]["n"]
            == both["conditions"][c]["exhibits_rate"]["finetuned"]["n"]
        )
    base_invalid = sum(r["status"] in ("invalid", "error") for r in shared)
    tuned_invalid = sum(r["status"] in ("invalid", "error") for t in tuned for r in t)
    assert g["invalid"] + g["errors"] == base_invalid + tuned_invalid


def _without_estimands(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _without_estimands(v) for k, v in x.items() if k != "estimand"}
    if isinstance(x, list):
        return [_without_estimands(v) for v in x]
    return x


def random_scores(rp: ReportParams, rng: random.Random) -> list[dict]:
    """Judged rows and samples with every status, through the report's own score_rows."""
    out = []
    for c in rp.conditions:
        samples: dict[str, list[dict]] = {"baseline": [], "finetuned": []}
        judged = []
        for q, tier in (("q1", "direct"), ("q2", "distant"), ("q3", "distant")):
            for i in range(3):
                ident = {
                    "item_id": f"{c}-{q}-{i}",
                    "tier": tier,
                    "question_id": q,
                    "question": q,
                    "condition": c,
                    "sample_index": i,
                }
                for m in ("baseline", "finetuned"):
                    answer = rng.choice(['<S> "a" <E>', "plain", ' <S> "b"\n<E> '])
                    samples[m].append({**ident, "response": answer, "stop_reason": "stop"})
                    status = rng.choice(["ok"] * 6 + ["invalid", "error"])
                    score = rng.randint(1, 5) if status == "ok" else None
                    judged.append(
                        {**ident, "model": m, "score": score, "reasoning": "", "status": status}
                    )
        out += score_rows(rp, c, judged, samples)
    return out


def test_one_seed_gives_exactly_the_experiments_numbers(tmp_path):
    spec = root({"training.learning_rate": [0.0001, 0.0002]}, format_regex=r'<S> ".*" <E>')
    p = params_of(spec)
    assert [g.members for g in p.groups] == [(0,), (1,)]
    rng = random.Random(3)
    scores = {i: random_scores(p.groups[i].report, rng) for i in range(2)}
    s = summarise_sweep(p, scores)
    for i, g in enumerate(s["groups"]):
        exp = summarise(p.groups[i].report, scores[i])
        assert g["seeds"] == [{}] and g["label"] == f"training.learning_rate={0.0001 * (i + 1):g}"
        assert _without_estimands(g["conditions"]) == _without_estimands(exp["conditions"])
        assert _without_estimands(g["gaps"]) == _without_estimands(exp["gaps"])
        assert (g["invalid"], g["errors"]) == (exp["invalid"], exp["errors"])
        assert g["invalid"] > 0 and g["errors"] > 0
        assert g["gaps"] and g["conditions"]["trig"]["format_adherence"]["baseline"]["n"] == 9
    assert s["groups"][0]["conditions"] != s["groups"][1]["conditions"]  # different data


def test_run_reads_every_points_scores(tmp_path):
    spec = root({"training.learning_rate": [0.0001, 0.0002], "training.seed": [0, 1]})
    p = params_of(spec)
    rng = random.Random(5)
    upstream: dict[str, Path] = {}
    scores = {}
    for i in range(4):
        scores[i] = random_scores(p.groups[0].report, rng)
        d = tmp_path / f"p{i}"
        d.mkdir()
        (d / "scores.jsonl").write_text(jsonl_text(scores[i]))
        upstream[f"point:{i}"] = d
    ctx = RunContext(
        params=p,
        options=Options(),
        inputs={},
        upstream=upstream,
        upstream_fps={},
        fingerprint="f",
        store=RunStore(tmp_path / "runs"),
        kind=SweepReportStage(),
    )
    result = SweepReportStage().run(ctx)
    summary = json.loads(result.outputs["summary.json"])
    assert summary == json.loads(json.dumps(summarise_sweep(p, scores)))
    assert [len(g["seeds"]) for g in summary["groups"]] == [2, 2]
    assert summary["group_keys"] == ["training.learning_rate"]


@pytest.mark.parametrize("mode", ["pairwise", "absolute"])
def test_models_follow_the_judge_mode(mode):
    spec = root({"training.seed": [0, 1]}).model_copy(deep=True)
    spec = Spec.model_validate(
        {**spec.model_dump(mode="json"), "judge": {"rubric": "r.j2", "mode": mode}}
    )
    (g,) = params_of(spec).groups
    assert g.report.models == (("finetuned",) if mode == "pairwise" else ("baseline", "finetuned"))
