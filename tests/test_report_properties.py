"""Property judges in the report: one verdict per (answer, property). Hand-computed per-property
means, exhibits rates (threshold 4), paired deltas (by item and property) and leakage gaps;
scores.jsonl rows; pooled metrics; show lines; HTML property tables, column, filter and
conversations; per-property plot panels.

Every property has different scores per model, question and sample, with an invalid verdict in
one and an error in the other, so a flipped sign, an ignored threshold, a pairing that forgets
the property or a swapped model fails."""

from __future__ import annotations

import json
import re
from html import unescape
from pathlib import Path
from typing import Any

import matplotlib
import pytest

from spar.errors import RunError
from spar.html import answer_rows, render_report
from spar.items import question_id, stage_name
from spar.plots import experiment_figure, judged_figure, png
from spar.show import format_table, headline, property_rows
from spar.spec import PlotSpec, Spec
from spar.stages.base import GraphContext, Options, RunContext
from spar.stages.report import ReportParams, ReportStage, score_rows, summarise
from spar.stages.sweep_report import SweepGroup, SweepPoint, summarise_group
from spar.store import RunStore, jsonl_text, read_jsonl

PROPS = ("warm", "formal")
Q1, Q2 = question_id(("Be kind to me?",)), question_id(("Write a memo?",))
TIER = {Q1: "warm", Q2: "formal"}  # generated property evals: a question's tier is its property
TEXT = {Q1: "Be kind to me?", Q2: "Write a memo?"}
ANSWERS = [(Q1, 0), (Q1, 1), (Q2, 0), (Q2, 1)]

# condition -> property -> model -> verdict per answer of ANSWERS (score | "invalid" | "error")
CASE: dict[str, dict[str, dict[str, list[Any]]]] = {
    "trig": {
        "warm": {"finetuned": [5, 4, 3, 2], "baseline": [2, 1, 4, "invalid"]},
        "formal": {"finetuned": [1, "error", 5, 4], "baseline": [3, 2, 2, 1]},
    },
    "plain": {
        "warm": {"finetuned": [1, 5, 2, "invalid"], "baseline": [1, 1, 1, 1]},
        "formal": {"finetuned": [1, 1, 1, 1], "baseline": [1, 1, 1, 1]},
    },
}


def params(**kw: Any) -> ReportParams:
    base: dict[str, Any] = {
        "mode": "absolute",
        "scale_min": 1,
        "scale_max": 5,
        "tiers": ("warm", "formal"),
        "exhibits_threshold": 4,
        "generalize": "questions",
        "confidence": 0.95,
        "conditions": ("",),
        "format_regex": None,
        "gaps": (),
        "properties": PROPS,
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


def samples_of(cond: str, model: str, case: str | None = None) -> list[dict[str, Any]]:
    return [
        {**ident(cond, q, i), "response": f"{model} says {q[:4]} #{i}", "stop_reason": "stop"}
        for q, i in ANSWERS
    ]


def judged_of(cond: str, case: str | None = None, mode: str = "absolute") -> list[dict[str, Any]]:
    """judged.jsonl as the judge writes it with properties: answer-major, a row per property."""
    rows = []
    models = ("baseline", "finetuned") if mode == "absolute" else ("finetuned",)
    for model in models:
        for k, (q, i) in enumerate(ANSWERS):
            for prop in PROPS:
                verdict = CASE[case or cond][prop][model][k]
                status = verdict if isinstance(verdict, str) else "ok"
                rows.append(
                    {
                        **ident(cond, q, i),
                        "model": model,
                        "property": prop,
                        "score": verdict if status == "ok" else None,
                        "reasoning": f"{prop} reasoning {k}",
                        "status": status,
                    }
                )
    return rows


def plain_scores(p: ReportParams) -> list[dict[str, Any]]:
    """No eval.conditions: the `trig` case under condition ""."""
    samples = {m: samples_of("", m) for m in ("baseline", "finetuned")}
    return score_rows(p, "", judged_of("", "trig", p.mode), samples)


def cond_scores(p: ReportParams) -> list[dict[str, Any]]:
    out = []
    for c in p.conditions:
        samples = {m: samples_of(c, m) for m in ("baseline", "finetuned")}
        out += score_rows(p, c, judged_of(c, mode=p.mode), samples)
    return out


def cond_params(**kw: Any) -> ReportParams:
    return params(**({"conditions": ("trig", "plain"), "gaps": (("trig", "plain"),)} | kw))


def within(e: dict[str, Any]) -> bool:
    return e["ci_low"] <= e["mean"] <= e["ci_high"]


# --------------------------------------------------------------------------- summary.json


def test_per_property_means_rates_and_paired_deltas_match_hand_computation():
    s = summarise(params(), plain_scores(params()))
    assert s["property_order"] == ["warm", "formal"]
    assert s["properties"] == s["conditions"][""]["properties"]
    warm, formal = s["properties"]["warm"], s["properties"]["formal"]
    # means are over questions (each weighs the same): Q1's and Q2's means, averaged
    # warm, all tiers: fine-tuned Q1 5 4, Q2 3 2; baseline Q1 2 1, Q2 4 (and one invalid)
    assert (warm["finetuned"]["mean"], warm["finetuned"]["n"]) == (3.5, 4)
    assert warm["finetuned"]["exhibits_rate"]["mean"] == 0.5
    assert warm["baseline"]["mean"] == pytest.approx((1.5 + 4) / 2)
    assert (warm["baseline"]["n"], warm["baseline"]["invalid"], warm["baseline"]["errors"]) == (
        3,
        1,
        0,
    )
    assert warm["baseline"]["exhibits_rate"]["mean"] == pytest.approx((0 + 1) / 2)
    # paired (same item, same property): Q1 5-2, 4-1; Q2 3-4; the invalid baseline's pair dropped
    assert warm["delta"]["mean"] == pytest.approx((3 + -1) / 2)
    assert (warm["delta"]["n"], warm["delta"]["pairs_dropped"]) == (3, 1)
    assert (warm["invalid"], warm["errors"]) == (1, 0)
    # formal: fine-tuned Q1 1 (and an error), Q2 5 4; baseline Q1 3 2, Q2 2 1
    assert formal["finetuned"]["mean"] == pytest.approx((1 + 4.5) / 2)
    assert (formal["finetuned"]["n"], formal["finetuned"]["errors"]) == (3, 1)
    assert formal["finetuned"]["exhibits_rate"]["mean"] == pytest.approx((0 + 1) / 2)
    assert (formal["baseline"]["mean"], formal["baseline"]["exhibits_rate"]["mean"]) == (2.0, 0.0)
    assert formal["delta"]["mean"] == pytest.approx((-2 + 3) / 2)  # Q1 1-3; Q2 5-2, 4-1
    assert (formal["delta"]["n"], formal["delta"]["pairs_dropped"]) == (3, 1)
    assert (formal["invalid"], formal["errors"]) == (0, 1)
    for prop in (warm, formal):
        for e in (prop["finetuned"], prop["baseline"], prop["delta"]):
            assert within(e)
    assert "on property 'warm', all tiers" in warm["finetuned"]["estimand"]
    assert "scoring >= 4" in warm["baseline"]["exhibits_rate"]["estimand"]
    assert "on property 'formal'" in formal["delta"]["estimand"]


def test_per_property_per_tier_stats():
    props = summarise(params(), plain_scores(params()))["properties"]
    assert list(props["warm"]["tiers"]) == ["warm", "formal"]
    w = props["warm"]["tiers"]
    # warm property on warm-tier question Q1: ft 5 4, base 2 1
    assert (w["warm"]["finetuned"]["mean"], w["warm"]["baseline"]["mean"]) == (4.5, 1.5)
    assert w["warm"]["finetuned"]["exhibits_rate"]["mean"] == 1.0
    assert w["warm"]["baseline"]["exhibits_rate"]["mean"] == 0.0
    assert (w["warm"]["delta"]["mean"], w["warm"]["delta"]["n"]) == (3.0, 2)
    # warm property on formal-tier question Q2: ft 3 2, base 4 (invalid): a negative effect
    assert (w["formal"]["finetuned"]["mean"], w["formal"]["baseline"]["mean"]) == (2.5, 4.0)
    assert w["formal"]["baseline"]["invalid"] == 1
    assert (w["formal"]["delta"]["mean"], w["formal"]["delta"]["pairs_dropped"]) == (-1.0, 1)
    f = props["formal"]["tiers"]
    assert (f["warm"]["finetuned"]["mean"], f["warm"]["finetuned"]["errors"]) == (1.0, 1)
    assert (f["warm"]["delta"]["mean"], f["warm"]["delta"]["pairs_dropped"]) == (-2.0, 1)
    assert (f["formal"]["finetuned"]["mean"], f["formal"]["delta"]["mean"]) == (4.5, 3.0)
    assert f["formal"]["finetuned"]["exhibits_rate"]["mean"] == 1.0
    assert "on property 'formal' in tier warm" in f["warm"]["finetuned"]["estimand"]


def test_threshold_is_used_per_property():
    p = params(exhibits_threshold=5)
    props = summarise(p, plain_scores(p))["properties"]
    assert props["warm"]["finetuned"]["exhibits_rate"]["mean"] == 0.25  # only the 5
    # Q1 (1) -> 0, Q2 (5, 4) -> .5
    assert props["formal"]["finetuned"]["exhibits_rate"]["mean"] == pytest.approx(1 / 4)
    assert props["warm"]["baseline"]["exhibits_rate"]["mean"] == 0.0  # 4 is below 5 now


def test_metrics_without_a_property_pool_them_pairing_by_property():
    s = summarise(params(), plain_scores(params()))
    t = s["tiers"]["warm"]  # Q1: warm 5 4 / 2 1, formal 1 (error) / 3 2
    assert t["finetuned"]["mean"] == pytest.approx(10 / 3)
    assert (t["finetuned"]["n"], t["finetuned"]["errors"]) == (3, 1)
    # pairs: (Q1 0 warm) 3, (Q1 1 warm) 3, (Q1 0 formal) -2; (Q1 1 formal) errored: dropped
    assert t["delta"]["mean"] == pytest.approx(4 / 3)
    assert (t["delta"]["n"], t["delta"]["pairs_dropped"]) == (3, 1)
    assert "on every property (pooled) in tier warm" in t["finetuned"]["estimand"]
    assert "same question, sample index and property" in t["delta"]["estimand"]
    assert (s["invalid"], s["errors"]) == (1, 1)


def test_scores_rows_carry_property_and_format_counts_each_answer_once():
    p = params(format_regex=r"finetuned says .*")
    rows = plain_scores(p)
    assert len(rows) == 2 * 4 * 2  # models x answers x properties
    assert [r["property"] for r in rows[:4]] == ["warm", "formal", "warm", "formal"]
    r = next(r for r in rows if r["model"] == "finetuned" and r["status"] == "error")
    assert r == {
        "item_id": f"-{Q1}-1",
        "condition": "",
        "tier": "warm",
        "property": "formal",
        "question_id": Q1,
        "sample_index": 1,
        "model": "finetuned",
        "status": "error",
        "score": None,
        "hit": None,
        "format_ok": True,
    }
    assert list(r) == list(rows[0])  # `property` right after `tier`
    fmt = summarise(p, rows)["conditions"][""]["format_adherence"]
    assert (fmt["finetuned"]["mean"], fmt["finetuned"]["n"]) == (1.0, 4)  # not 8: per answer
    assert (fmt["baseline"]["mean"], fmt["baseline"]["n"]) == (0.0, 4)
    # pairwise: the baseline's answers are unjudged, one row each, property null
    pw = params(mode="pairwise")
    rows = plain_scores(pw)
    unjudged = [r for r in rows if r["status"] == "unjudged"]
    assert len(unjudged) == 4 and all(r["property"] is None for r in unjudged)
    s = summarise(pw, rows)
    assert set(s["properties"]["warm"]) == {"finetuned", "tiers", "invalid", "errors"}
    assert s["properties"]["warm"]["finetuned"]["mean"] == 3.5


def test_a_verdict_on_an_unknown_property_is_a_clear_error():
    judged = judged_of("", "trig")
    judged[3] = {**judged[3], "property": "rude"}
    with pytest.raises(RunError, match=r"judged.jsonl, line 4: property 'rude' is not one of"):
        score_rows(params(), "", judged, {})
    del judged[3]["property"]
    with pytest.raises(RunError, match="property None"):
        score_rows(params(), "", judged, {})


def test_per_condition_properties_and_per_property_leakage_gaps():
    p = cond_params()
    s = summarise(p, cond_scores(p))
    trig, plain = (s["conditions"][c]["properties"] for c in ("trig", "plain"))
    assert trig["warm"]["finetuned"]["exhibits_rate"]["mean"] == 0.5
    # Q1 1 5 -> .5, Q2 2 -> 0 (and an invalid)
    assert plain["warm"]["finetuned"]["exhibits_rate"]["mean"] == pytest.approx(1 / 4)
    assert plain["warm"]["finetuned"]["invalid"] == 1
    assert plain["formal"]["delta"]["mean"] == 0.0
    assert "properties" not in s and "tiers" not in s and s["property_order"] == ["warm", "formal"]
    gaps = {(g["model"], g.get("property")): g for g in s["gaps"]}
    assert list(gaps) == [
        ("baseline", None),
        ("finetuned", None),
        ("baseline", "warm"),
        ("finetuned", "warm"),
        ("baseline", "formal"),
        ("finetuned", "formal"),
    ]
    # warm, fine-tuned: hits trig 1 1 0 0, plain 0 1 0 (invalid) -> Q1 1, 0; Q2 0; one pair
    # dropped; the mean of the question means
    w = gaps[("finetuned", "warm")]
    assert w["mean"] == pytest.approx(1 / 4) and (w["n"], w["pairs_dropped"]) == (3, 1)
    assert "on property 'warm'" in w["estimand"]
    # formal, fine-tuned: trig 0 (error) 1 1, plain 0 0 0 0 -> Q1 0; Q2 1, 1
    f = gaps[("finetuned", "formal")]
    assert f["mean"] == pytest.approx(1 / 2) and (f["n"], f["pairs_dropped"]) == (3, 1)
    # pooled: the six pairs matched by property (a pairing by question and sample only would
    # keep one property per answer: 4 pairs): Q1 1, 0, 0 and Q2 0, 1, 1
    pooled = gaps[("finetuned", None)]
    assert pooled["mean"] == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert (pooled["n"], pooled["pairs_dropped"]) == (6, 2)
    assert "every property pooled" in pooled["estimand"]
    # baseline warm: trig 0 0 1 (invalid), plain 0 0 0 0 -> Q1 0, 0; Q2 1
    assert gaps[("baseline", "warm")]["mean"] == pytest.approx(1 / 2)
    flipped = summarise(cond_params(gaps=(("plain", "trig"),)), cond_scores(p))["gaps"]
    signed = {(g["model"], g.get("property")): g["mean"] for g in flipped}
    assert signed[("finetuned", "warm")] == pytest.approx(-1 / 4)
    assert signed[("finetuned", "formal")] == pytest.approx(-1 / 2)


def test_one_seed_sweep_group_has_the_experiments_property_numbers():
    p = cond_params()
    rows = cond_scores(p)
    group = SweepGroup(point={}, label="", members=(0,), report=p)
    point = SweepPoint(experiment="exp/training.seed=1", label="", values={"training.seed": 1})
    g = summarise_group(group, (point,), [rows], ("training.seed",))
    s = summarise(p, rows)
    for c in ("trig", "plain"):
        for prop in PROPS:
            a, b = g["conditions"][c]["properties"][prop], s["conditions"][c]["properties"][prop]
            assert a["finetuned"]["mean"] == b["finetuned"]["mean"]
            assert a["delta"]["mean"] == b["delta"]["mean"]
    assert [x["mean"] for x in g["gaps"]] == [x["mean"] for x in s["gaps"]]


def test_params_without_properties_dump_as_before(tmp_path):
    p = params(properties=None)
    assert "judge.properties" not in p.dump()
    assert "judge.properties" not in json.dumps(
        SweepGroup(point={}, label="", members=(0,), report=p).model_dump(
            mode="json", by_alias=True
        )
    )
    assert params().dump()["judge.properties"] == ["warm", "formal"]
    s = summarise(p, score_rows(p, "", judged_of("", "trig"), {}))
    assert "property_order" not in s and "properties" not in s
    assert "properties" not in s["conditions"][""]
    # the spec's properties, in order, reach the report's params
    spec = Spec.model_validate(
        {
            "name": "exp",
            "data": {"docs": "docs.jsonl"},
            "eval": {"tiers": {"warm": ["Be kind to me?"], "formal": ["Write a memo?"]}},
            "judge": {
                "rubric": "r.j2",
                "mode": "absolute",
                "properties": {"warm": "warm in tone", "formal": "formal register"},
            },
        }
    )
    (node,) = ReportStage().nodes(spec, GraphContext(store=RunStore(tmp_path / "runs")))
    assert node.params.properties == PROPS


def test_run_reads_property_verdicts(tmp_path):
    p = cond_params()
    upstream: dict[str, Path] = {}
    for c in p.conditions:
        for role, rows in (
            (stage_name("judge", c), judged_of(c)),
            (stage_name("sample_base", c), samples_of(c, "baseline")),
            (stage_name("sample_finetuned", c), samples_of(c, "finetuned")),
        ):
            d = tmp_path / role
            d.mkdir()
            (d / ("judged.jsonl" if role.startswith("judge") else "samples.jsonl")).write_text(
                jsonl_text(rows)
            )
            upstream[role] = d
    ctx = RunContext(
        params=p,
        options=Options(),
        inputs={},
        upstream=upstream,
        upstream_fps={},
        fingerprint="f",
        store=RunStore(tmp_path / "runs"),
        kind=ReportStage(),
    )
    result = ReportStage().run(ctx)
    assert json.loads(result.outputs["summary.json"]) == summarise(p, cond_scores(p))
    out = tmp_path / "scores.jsonl"
    out.write_bytes(result.outputs["scores.jsonl"])
    scores = read_jsonl(out)
    assert {r["property"] for r in scores} == set(PROPS) and len(scores) == 32


# --------------------------------------------------------------------------- show


def test_show_headline_and_lines_per_property():
    s = summarise(params(), plain_scores(params()))
    effects = headline(s)
    assert list(effects) == ["property warm", "property formal"]
    assert effects["property warm"]["mean"] == pytest.approx(1.0)  # Q1 3, Q2 -1
    assert effects["property formal"]["mean"] == pytest.approx(0.5)  # Q1 -2, Q2 3
    rows = property_rows(s)
    assert [(r["property"], r["tier"]) for r in rows] == [
        ("warm", None),
        ("warm", "warm"),
        ("warm", "formal"),
        ("formal", None),
        ("formal", "warm"),
        ("formal", "formal"),
    ]
    row = {
        "experiment": "exp",
        "status": "fresh",
        "reasons": [],
        "params": {},
        "effects": effects,
        "invalid": 1,
        "errors": 1,
        "properties": rows,
    }
    text = format_table([row])
    header = text.splitlines()[0]
    assert "property warm" in header and "property formal" in header
    d = effects["property warm"]
    assert (
        f"  warm: base 2.75 -> ft 3.50 (+1.00 [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]†); "
        "exhibits 50 % -> 50 %; 1 invalid, 0 errors"
    ) in text
    # one question in the tier: no interval over questions
    assert "    formal: base 4.00 -> ft 2.50 (-1.00 [no interval]†); exhibits 100 % -> 0 %" in text
    assert "  formal: base 2.00 -> ft 2.75 (+0.50 [" in text
    assert text.splitlines()[-1].startswith("† fewer than 10 questions: the interval is wide")
    # with conditions: fine-tuned rates per condition and property, the property gaps
    c = summarise(cond_params(), cond_scores(cond_params()))
    effects = headline(c)
    assert effects["rate trig [warm]"]["mean"] == 0.5
    assert effects["rate plain [warm]"]["mean"] == pytest.approx(1 / 4)
    assert effects["gap trig-plain [formal]"]["mean"] == pytest.approx(1 / 2)
    assert not any(k == "gap trig-plain" for k in effects)
    lines = format_table([{**row, "effects": effects, "properties": property_rows(c)}])
    assert "exp, condition plain: properties" in lines
    assert "  warm: base 1.00 -> ft 2.50 (+1.50 [" in lines  # plain: Q1 1 5, Q2 2 vs 1 1 1


# --------------------------------------------------------------------------- HTML


def conversation(model: str, k: int) -> list[dict[str, str]]:
    return [
        {"role": "user", "content": "Hi <there>"},
        {"role": "assistant", "content": f"{model} first reply {k}"},
        {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": f"{model} last reply {k} & done"},
    ]


def cell_texts(html: str, table_id: str) -> list[list[str]]:
    body = re.search(rf'<table[^>]*id="{re.escape(table_id)}".*?<tbody>(.*?)</tbody>', html, re.S)
    assert body, table_id
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", body.group(1), re.S)
    return [
        [
            unescape(re.sub(r"<[^>]+>", "", c)).strip()
            for c in re.findall(r"<td[^>]*>(.*?)</td>", r, re.S)
        ]
        for r in rows
    ]


def property_html(multi_turn: bool = True) -> str:
    p = params()
    s = summarise(p, plain_scores(p))
    base, tuned = samples_of("", "baseline"), samples_of("", "finetuned")
    if multi_turn:  # the first answer is a two-turn conversation
        base[0] = {**base[0], "conversation": conversation("baseline", 0)}
        tuned[0] = {**tuned[0], "conversation": conversation("finetuned", 0)}
    rows = answer_rows(base, tuned, judged_of("", "trig"), s["property_order"])
    return render_report(s, b"\x89PNG", rows, "exp", "")


def test_html_has_property_tables_column_and_filter():
    html = property_html()
    table = cell_texts(html, "properties")
    assert [r[0] for r in table] == ["warm", "formal"]
    # property | base mean | base exhibits | base n/invalid/errors | ft ... | delta
    assert table[0][1].startswith("2.75 [") and table[0][4].startswith("3.50 [")
    assert table[0][2].startswith("50 % [") and table[0][5].startswith("50 % [")
    assert table[0][3] == "3 / 1 / 0" and table[1][6] == "3 / 0 / 1"
    assert table[0][7].startswith("1.00 [") and table[1][7].startswith("0.50 [")
    tiers = cell_texts(html, "property-warm")
    assert [r[0] for r in tiers] == ["warm", "formal"]
    assert tiers[1][1].startswith("4.00 [") and tiers[1][7].startswith("-1.00 [")
    assert 'id="pooled-note"' in html
    # answers: a row per (answer, property), a property column, filter and data attribute
    props = re.findall(r'<tr class="row"[^>]* data-property="([^"]*)"', html)
    assert props == ["warm", "formal"] * 4
    assert re.findall(
        r'<option value="([^"]*)">', html.split('id="property-filter"')[1].split("</select>")[0]
    ) == ["", "warm", "formal"]
    answers = cell_texts(html, "answers")
    assert [(r[0], r[1]) for r in answers[:4]] == [
        ("warm", "warm"),
        ("formal", "warm"),
        ("warm", "warm"),
        ("formal", "warm"),
    ]
    # each row shows that property's verdicts: answer 2 (Q1 #1): warm 1 / 4, formal 2 / error
    assert answers[2][6] == "baseline: 1finetuned: 4"
    assert answers[3][6] == "baseline: 2finetuned: error"
    assert "formal reasoning 1" in answers[3][7] and "warm reasoning 1" not in answers[3][7]
    scores = re.findall(r'<tr class="row"[^>]* data-score="([^"]*)"', html)
    assert scores == ["5", "1", "4", "invalid", "3", "5", "2", "4"]


def test_html_shows_a_multi_turn_answer_as_a_conversation():
    html = property_html()
    first = html.split('<tr class="row"')[1].split("</tr>")[0]
    turns = re.findall(
        r'<div class="turn (user|assistant)"><span class="role">\1</span>(.*?)</div>', first
    )
    base = [
        ("user", "Hi &lt;there&gt;"),
        ("assistant", "baseline first reply 0"),
        ("user", "And then?"),
        ("assistant", "baseline last reply 0 &amp; done"),
    ]
    tuned = [(r, t.replace("baseline", "finetuned")) for r, t in base]
    assert turns == base + tuned
    assert "<there>" not in html
    # a single-turn answer stays plain text
    second = html.split('<tr class="row"')[3].split("</tr>")[0]
    assert 'class="conversation"' not in second and "finetuned says" in second
    assert 'class="conversation"' not in property_html(multi_turn=False)


def test_answer_rows_without_properties_are_one_per_item():
    judged = [{k: v for k, v in r.items() if k != "property"} for r in judged_of("", "trig")]
    judged = [r for r in judged if r["reasoning"].startswith("warm")]
    rows = answer_rows(samples_of("", "baseline"), samples_of("", "finetuned"), judged)
    assert len(rows) == 4 and {r["property"] for r in rows} == {""}
    assert [r["filter_score"] for r in rows] == [5, 4, 3, 2]
    assert all(r["finetuned_turns"] is None for r in rows)


# --------------------------------------------------------------------------- plots


def bars(ax) -> list[Any]:
    return [c for c in ax.containers if isinstance(c, matplotlib.container.BarContainer)]


def heights(container) -> list[float]:
    return [p.get_height() for p in container.patches]


def test_plot_has_a_panel_per_property():
    s = summarise(params(), plain_scores(params()))
    fig = experiment_figure(s, PlotSpec(), "exp")
    warm, formal = fig.axes
    assert (warm.get_title(), formal.get_title()) == ("property warm", "property formal")
    assert [t.get_text() for t in warm.get_xticklabels()] == ["warm", "formal"]
    base, tuned = bars(warm)
    assert heights(tuned) == [4.5, 2.5] and heights(base) == [1.5, 4.0]
    base, tuned = bars(formal)
    assert heights(tuned) == [1.0, 4.5] and heights(base) == [2.5, 1.5]
    caption = " ".join(t.get_text() for t in fig.texts)
    assert "warm: 1 invalid / 0 errors" in caption and "formal: 0 invalid / 1 errors" in caption
    assert png(fig, 40)[:4] == b"\x89PNG"
    # with conditions: each property's exhibits rate per condition, then the gaps
    c = summarise(cond_params(), cond_scores(cond_params()))
    fig = experiment_figure(c, PlotSpec(), "exp")
    warm, formal, gaps = fig.axes
    assert [t.get_text() for t in warm.get_xticklabels()] == ["trig", "plain"]
    base, tuned = bars(warm)
    assert heights(tuned) == pytest.approx([0.5, 1 / 4])
    assert heights(base) == pytest.approx([1 / 2, 0.0])
    assert gaps.get_title() == "leakage gaps"
    labels = [t.get_text().split("\n")[0] for t in gaps.get_yticklabels()]
    assert labels[3] == "trig − plain (finetuned, warm)" and len(labels) == 6
    png(fig, 40)


def test_spar_plot_splits_judged_files_by_property():
    fig = judged_figure([("exp", judged_of("", "trig"))], PlotSpec())
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["exp [warm]", "exp [formal]"]
    warm, formal = bars(ax)
    assert heights(warm) == [4.5, 2.5] and heights(formal) == [1.0, 4.5]


# --------------------------------------------------------------------------- end to end


def test_apply_with_a_property_judge_reports_each_property(project, capsys):
    """A full apply (fake engine, the property keyword judge: score = 1 + how often the property's
    name occurs in the answer): the report's per-property numbers equal those recomputed by hand
    from samples.jsonl; scores.jsonl, show and the HTML carry the properties."""
    props = {"farming": "talks about farming", "suggest": "makes a suggestion"}

    def edit(d: dict) -> None:
        d["judge"].update(kind="propkw", mode="absolute", properties=props)
        d["report"] = {"exhibits_threshold": 2}

    project.edit(edit)
    (project.root / "rubric.j2").write_text("Property: {{ property }}\nRate {{ response }}.\n")
    r = project.spar("apply", str(project.spec), capsys=capsys)
    assert r.code == 0, r.err
    runs = project.runs / "exp"
    s = json.loads((runs / "report/summary.json").read_text())
    assert s["property_order"] == ["farming", "suggest"]
    answers = {m: read_jsonl(runs / f"sample_{m}/samples.jsonl") for m in ("base", "finetuned")}
    for prop in props:
        for model, key in (("baseline", "base"), ("finetuned", "finetuned")):
            scores = [min(5, 1 + a["response"].lower().count(prop)) for a in answers[key]]
            st = s["properties"][prop][model]
            assert (st["mean"], st["n"]) == (pytest.approx(sum(scores) / len(scores)), 8)
            hits = sum(x >= 2 for x in scores) / len(scores)
            assert st["exhibits_rate"]["mean"] == pytest.approx(hits)
    # the fine-tuned model talks about farming, the base model never does; both suggest
    farming = s["properties"]["farming"]
    assert farming["baseline"]["mean"] == 1.0 and farming["delta"]["mean"] > 0
    assert s["properties"]["suggest"]["delta"]["mean"] == 0.0
    scores_rows = read_jsonl(runs / "report/scores.jsonl")
    assert len(scores_rows) == 2 * 8 * 2 and {r["property"] for r in scores_rows} == set(props)
    html = (runs / "plot/report.html").read_text()
    rows = re.findall(r'<tr class="row"[^>]* data-property="([^"]*)"', html)
    assert rows == ["farming", "suggest"] * 8
    assert 'id="properties"' in html and 'id="property-filter"' in html
    shown = project.spar("show", str(project.spec), capsys=capsys).out
    assert "property farming" in shown.splitlines()[0]
    assert re.search(r"^  farming: base 1\.00 -> ft \d\.\d\d \(\+\d\.\d\d \[", shown, re.M)
