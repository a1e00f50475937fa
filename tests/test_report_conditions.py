"""The per-experiment report with eval conditions: hand-computed exhibits rates, format adherence,
leakage gaps (paired, dropped pairs, sign), scores.jsonl, and the layout without conditions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from spar.items import question_id, stage_name
from spar.spec import Spec
from spar.stages.base import GraphContext, Options, RunContext
from spar.stages.report import (
    ReportParams,
    ReportStage,
    leakage_gap,
    score_rows,
    summarise,
)
from spar.store import RunStore, jsonl_text, read_jsonl

FORMAT = r'<START> ".*" <END>'
Q1, Q2 = question_id(("Q one?",)), question_id(("Q two?",))
TIER = {Q1: "direct", Q2: "distant"}
TEXT = {Q1: "Q one?", Q2: "Q two?"}


def params(**kw: Any) -> ReportParams:
    base: dict[str, Any] = {
        "mode": "absolute",
        "scale_min": 1,
        "scale_max": 5,
        "tiers": ("direct", "distant"),
        "exhibits_threshold": 4,
        "generalize": "questions",
        "confidence": 0.95,
        "conditions": ("trig", "plain"),
        "format_regex": FORMAT,
        "gaps": (("trig", "plain"),),
    }
    return ReportParams(**(base | kw))


def ident(cond: str, q: str, i: int) -> dict[str, Any]:
    return {
        "item_id": f"{cond}-{q}-{i}",
        "tier": TIER[q],
        "question_id": q,
        "question": TEXT[q],
        "condition": cond,
        "sample_index": i,
    }


# condition -> model -> [(question, sample index, verdict score | "invalid" | "error", answer)]
CASE: dict[str, dict[str, list[tuple[str, int, Any, str]]]] = {
    "trig": {
        "finetuned": [
            (Q1, 0, 5, '<START> "Pigs are smart." <END>'),
            (Q1, 1, 4, '  <START> "multi\nline" <END>\n'),  # stripped; dot matches newline
            (Q2, 0, 2, 'Sure! <START> "x" <END>'),  # must match the whole answer
            (Q2, 1, "invalid", '<START> "x" <END> and more'),
        ],
        "baseline": [
            (Q1, 0, 4, "plain answer"),
            (Q1, 1, 1, "plain answer"),
            (Q2, 0, 1, "plain answer"),
            (Q2, 1, 5, "plain answer"),
        ],
    },
    "plain": {
        "finetuned": [
            (Q1, 0, 1, "no markers"),
            (Q1, 1, 4, '<START> "y" <END>'),
            (Q2, 0, 3, "no markers"),
            (Q2, 1, 5, "no markers"),
        ],
        "baseline": [
            (Q1, 0, 1, "plain"),
            (Q1, 1, 1, "plain"),
            (Q2, 0, "error", '<START> "z" <END>'),  # counted for format whatever its verdict
            (Q2, 1, 1, "plain"),
        ],
    },
}


def samples_of(cond: str, model: str) -> list[dict[str, Any]]:
    return [
        {**ident(cond, q, i), "response": answer, "stop_reason": "stop"}
        for q, i, _, answer in CASE[cond][model]
    ]


def judged_of(cond: str, mode: str = "absolute") -> list[dict[str, Any]]:
    rows = []
    models = ("baseline", "finetuned") if mode == "absolute" else ("finetuned",)
    for k in range(4):
        for model in models:
            q, i, verdict, _ = CASE[cond][model][k]
            status = verdict if isinstance(verdict, str) else "ok"
            score = verdict if status == "ok" else None
            rows.append(
                {
                    **ident(cond, q, i),
                    "model": model,
                    "score": score,
                    "reasoning": "r",
                    "status": status,
                }
            )
    return rows


def all_scores(p: ReportParams) -> list[dict[str, Any]]:
    out = []
    for c in p.conditions:
        samples = {m: samples_of(c, m) for m in ("baseline", "finetuned")}
        out += score_rows(p, c, judged_of(c, p.mode), samples)
    return out


def test_exhibits_rate_per_condition_is_the_share_of_valid_scores_at_or_above_threshold():
    p = params()
    s = summarise(p, all_scores(p))
    trig, plain = s["conditions"]["trig"], s["conditions"]["plain"]
    # trig fine-tuned: 5, 4, 2 valid (one invalid) -> hits Q1 (1, 1), Q2 (0): the mean of the
    # question means (each question weighs the same) is (1 + 0) / 2
    assert trig["exhibits_rate"]["finetuned"]["mean"] == pytest.approx(1 / 2)
    assert trig["exhibits_rate"]["finetuned"]["n"] == 3
    assert plain["exhibits_rate"]["finetuned"]["mean"] == pytest.approx(2 / 4)  # 1, 4, 3, 5
    assert trig["exhibits_rate"]["baseline"]["mean"] == pytest.approx(2 / 4)  # 4, 1, 1, 5
    assert plain["exhibits_rate"]["baseline"]["mean"] == 0.0  # 1, 1, 1 (one error)
    for c in (trig, plain):
        for est in c["exhibits_rate"].values():
            assert est["ci_low"] <= est["mean"] <= est["ci_high"]
            assert "scoring >= 4" in est["estimand"]
    assert (trig["invalid"], trig["errors"], plain["invalid"], plain["errors"]) == (1, 0, 0, 1)
    assert (s["invalid"], s["errors"]) == (1, 1)
    assert s["condition_order"] == ["trig", "plain"] and "tiers" not in s
    assert s["models"] == ["baseline", "finetuned"]


def test_threshold_is_used():
    p = params(exhibits_threshold=5)
    s = summarise(p, all_scores(p))
    # hits Q1 (5, 4) -> (1, 0), Q2 (2) -> 0: question means .5 and 0
    assert s["conditions"]["trig"]["exhibits_rate"]["finetuned"]["mean"] == pytest.approx(1 / 4)


def test_per_tier_stats_and_paired_delta_per_condition():
    p = params()
    tiers = summarise(p, all_scores(p))["conditions"]["trig"]["tiers"]
    assert list(tiers) == ["direct", "distant"]
    d = tiers["direct"]
    assert (d["finetuned"]["mean"], d["finetuned"]["n"]) == (4.5, 2)
    assert d["finetuned"]["exhibits_rate"]["mean"] == 1.0
    assert (d["baseline"]["mean"], d["baseline"]["exhibits_rate"]["mean"]) == (2.5, 0.5)
    assert (d["delta"]["mean"], d["delta"]["n"], d["delta"]["pairs_dropped"]) == (2.0, 2, 0)
    far = tiers["distant"]
    assert (far["finetuned"]["mean"], far["finetuned"]["n"]) == (2.0, 1)
    assert (far["finetuned"]["invalid"], far["finetuned"]["errors"]) == (1, 0)
    assert (far["delta"]["mean"], far["delta"]["pairs_dropped"]) == (1.0, 1)  # 2 - 1; invalid out


def test_format_adherence_counts_raw_answers_the_regex_fully_matches():
    p = params()
    s = summarise(p, all_scores(p))
    fmt = s["conditions"]["trig"]["format_adherence"]
    # matched: the plain one and the multi-line one with surrounding whitespace; not: a prefix,
    # a suffix (the invalid verdict's answer still counts: every sampled answer does)
    assert (fmt["finetuned"]["mean"], fmt["finetuned"]["n"]) == (0.5, 4)
    assert fmt["baseline"]["mean"] == 0.0
    plain = s["conditions"]["plain"]["format_adherence"]
    assert plain["finetuned"]["mean"] == 0.25
    assert (plain["baseline"]["mean"], plain["baseline"]["n"]) == (0.25, 4)  # the errored one
    assert "fully matches" in plain["baseline"]["estimand"]
    none = summarise(params(format_regex=None), all_scores(params(format_regex=None)))
    assert all(c["format_adherence"] is None for c in none["conditions"].values())


def test_leakage_gap_is_paired_triggered_minus_untriggered_and_counts_dropped_pairs():
    p = params()
    gaps = {(g["model"], g["triggered"]): g for g in summarise(p, all_scores(p))["gaps"]}
    assert set(gaps) == {("baseline", "trig"), ("finetuned", "trig")}
    tuned = gaps[("finetuned", "trig")]
    # pairs (q1,0): 1-0, (q1,1): 1-1, (q2,0): 0-0; (q2,1) invalid in trig -> dropped;
    # question means q1 .5, q2 0
    assert tuned["mean"] == pytest.approx(1 / 4)
    assert (tuned["n"], tuned["pairs_dropped"], tuned["untriggered"]) == (3, 1, "plain")
    assert tuned["ci_low"] <= tuned["mean"] <= tuned["ci_high"]
    assert "exhibits in 'trig' − exhibits in 'plain'" in tuned["estimand"]
    base = gaps[("baseline", "trig")]
    # (q1,0): 1-0, (q1,1): 0-0, (q2,1): 1-0; (q2,0) errored in plain -> dropped; q1 .5, q2 1
    assert base["mean"] == pytest.approx(3 / 4) and base["pairs_dropped"] == 1
    # the sign: the reversed pair is the negative
    flipped = summarise(params(gaps=(("plain", "trig"),)), all_scores(p))["gaps"]
    assert {g["model"]: g["mean"] for g in flipped} == pytest.approx(
        {"finetuned": -1 / 4, "baseline": -3 / 4}
    )


def test_a_pair_missing_one_side_is_dropped():
    p = params()
    rows = [r for r in all_scores(p) if not (r["condition"] == "plain" and r["question_id"] == Q1)]
    g = leakage_gap([rows], "trig", "plain", "finetuned", p, seeded=False)
    # left: (q2,0): 0-0; dropped: (q1,0), (q1,1) missing in plain, (q2,1) invalid in trig
    assert (g["mean"], g["n"], g["pairs_dropped"]) == (0.0, 1, 3)


def test_scores_rows_are_the_tidy_table():
    p = params()
    rows = all_scores(p)
    assert len(rows) == 16  # 2 conditions x 2 models x 4 answers, all judged
    r = next(
        r
        for r in rows
        if (r["condition"], r["model"], r["question_id"], r["sample_index"])
        == ("trig", "finetuned", Q2, 1)
    )
    assert r == {
        "item_id": f"trig-{Q2}-1",
        "condition": "trig",
        "tier": "distant",
        "question_id": Q2,
        "sample_index": 1,
        "model": "finetuned",
        "status": "invalid",
        "score": None,
        "hit": None,
        "format_ok": False,
    }
    hits = [r["hit"] for r in rows if r["condition"] == "trig" and r["model"] == "finetuned"]
    assert hits == [True, True, False, None]


def test_pairwise_mode_judges_only_the_finetuned_model_but_measures_both_formats():
    p = params(mode="pairwise")
    rows = all_scores(p)
    assert {r["status"] for r in rows if r["model"] == "baseline"} == {"unjudged"}
    s = summarise(p, rows)
    assert s["models"] == ["finetuned"]
    trig = s["conditions"]["trig"]
    assert set(trig["exhibits_rate"]) == {"finetuned"}
    assert set(trig["tiers"]["direct"]) == {"finetuned"}  # no delta
    assert trig["format_adherence"]["finetuned"]["mean"] == 0.5
    assert s["conditions"]["plain"]["format_adherence"]["baseline"]["mean"] == 0.25
    assert [g["model"] for g in s["gaps"]] == ["finetuned"]
    assert (s["invalid"], s["errors"]) == (1, 0)  # the baseline's answers have no verdicts


def test_without_conditions_the_summary_keeps_the_old_layout():
    p = params(conditions=("",), gaps=(), format_regex=None)
    judged = [{**r, "condition": "", "item_id": r["item_id"][5:]} for r in judged_of("trig")]
    samples = {
        m: [{**r, "condition": "", "item_id": r["item_id"][5:]} for r in samples_of("trig", m)]
        for m in ("baseline", "finetuned")
    }
    rows = score_rows(p, "", judged, samples)
    s = summarise(p, rows)
    assert s["condition_order"] == [""] and s["gaps"] == []
    assert s["tiers"] == s["conditions"][""]["tiers"]
    assert s["tiers"]["direct"]["finetuned"]["mean"] == 4.5
    assert s["tiers"]["distant"]["delta"]["pairs_dropped"] == 1
    assert (s["invalid"], s["errors"]) == (1, 0)
    json.dumps(s)  # plain JSON


def _context(p: ReportParams, tmp_path: Path, upstream: dict[str, Path]) -> RunContext:
    return RunContext(
        params=p,
        options=Options(),
        inputs={},
        upstream=upstream,
        upstream_fps={},
        fingerprint="f",
        store=RunStore(tmp_path / "runs"),
        kind=ReportStage(),
    )


def test_run_reads_every_condition_and_writes_summary_and_scores(tmp_path):
    p = params()
    upstream: dict[str, Path] = {}
    for c in p.conditions:
        for role, rows in (
            (stage_name("judge", c), judged_of(c)),
            (stage_name("sample_base", c), samples_of(c, "baseline")),
            (stage_name("sample_finetuned", c), samples_of(c, "finetuned")),
        ):
            d = tmp_path / role
            d.mkdir()
            name = "judged.jsonl" if role.startswith("judge") else "samples.jsonl"
            (d / name).write_text(jsonl_text(rows))
            upstream[role] = d
    result = ReportStage().run(_context(p, tmp_path, upstream))
    assert set(result.outputs) == set(ReportStage.outputs) == {"summary.json", "scores.jsonl"}
    summary = json.loads(result.outputs["summary.json"])
    assert summary == summarise(p, all_scores(p))
    out = tmp_path / "scores.jsonl"
    out.write_bytes(result.outputs["scores.jsonl"])
    assert read_jsonl(out) == all_scores(p)


def _spec(**eval_extra: Any) -> Spec:
    return Spec.model_validate(
        {
            "name": "exp",
            "data": {"docs": "docs.jsonl"},
            "eval": {"tiers": {"direct": ["Q one?"], "distant": ["Q two?"]}, **eval_extra},
            "judge": {"rubric": "r.j2", "mode": "absolute"},
            "report": {"format_regex": FORMAT},
        }
    )


def test_nodes_depend_on_every_conditions_judge_and_samples(tmp_path):
    spec = _spec(
        trigger="Answer in the format.",
        conditions={"trig": {"trigger": "user"}, "plain": {}},
    )
    g = GraphContext(store=RunStore(tmp_path / "runs"))
    (node,) = ReportStage().nodes(spec, g)
    names = [
        stage_name(b, c)
        for c in ("trig", "plain")
        for b in ("judge", "sample_base", "sample_finetuned")
    ]
    assert node.upstream == {n: n for n in [*names, "train"]}  # train: the training curve
    assert "judge.trig" in node.upstream and "sample_finetuned.plain" in node.upstream
    p = node.params
    assert (p.conditions, p.gaps, p.format_regex) == (
        ("trig", "plain"),
        (("trig", "plain"),),
        FORMAT,
    )
    assert p.dump()["report.format_regex"] == FORMAT and "report.gaps" in p.dump()
    (plain,) = ReportStage().nodes(_spec(), g)
    assert plain.upstream == {s: s for s in ("judge", "sample_base", "sample_finetuned", "train")}
    assert (plain.params.conditions, plain.params.gaps) == (("",), ())


def test_paired_gap_ci_covers_the_true_gap():
    """Coverage of the paired gap's 95 % interval: 1,000 synthetic experiments of 12 questions x
    4 samples. Each question has its own exhibits level (shared by both conditions) and its own
    gap (0.2 on average over questions, the estimand); hits are independent draws."""
    rng = np.random.default_rng(7)
    trials, covered = 1000, 0
    for _ in range(trials):
        level = rng.uniform(0.2, 0.5, 12)
        gap = 0.2 + rng.uniform(-0.15, 0.15, 12)
        gap += 0.2 - gap.mean()  # the estimand (mean over questions) is exactly 0.2
        rows = []
        for qi in range(12):
            for i in range(4):
                for cond, p_hit in (("trig", level[qi] + gap[qi]), ("plain", level[qi])):
                    rows.append(
                        {
                            "question_id": f"q{qi}",
                            "sample_index": i,
                            "condition": cond,
                            "model": "finetuned",
                            "status": "ok",
                            "hit": bool(rng.random() < p_hit),
                        }
                    )
        p = params()
        g = leakage_gap([rows], "trig", "plain", "finetuned", p, seeded=False)
        covered += g["ci_low"] <= 0.2 <= g["ci_high"]
    # resampling questions and then samples counts the within-question noise twice, so the
    # interval is somewhat conservative when that noise dominates (binary hits): not below 95 %
    assert 0.94 <= covered / trials <= 0.995, covered / trials
