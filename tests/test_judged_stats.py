"""`spar stats`: the report's statistics for judged files from any source."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
import scipy.stats

from spar.cli import main
from spar.items import question_id
from spar.stages.report import ReportParams, score_rows, summarise

T1 = scipy.stats.t.ppf(0.975, 1)


def write(path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["stats", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


# the seed scripts' rows: {tier, question, score, reasoning}; samples share a question
SEED_ROWS = [
    {"tier": "distant", "question": "Zoos?", "score": 2, "reasoning": "r"},
    {"tier": "direct", "question": "Farms?", "score": 5, "reasoning": "r"},
    {"tier": "direct", "question": "Farms?", "score": 3, "reasoning": "r"},
    {"tier": "direct", "question": "Meat?", "score": 2, "reasoning": "r"},
    {"tier": "distant", "question": "Trees?", "score": None, "reasoning": "unparseable"},
    {"tier": "distant", "question": "Trees?", "score": 4, "reasoning": "r"},
]


def test_seed_rows_get_a_t_interval_over_question_means(tmp_path, capsys):
    f = tmp_path / "judged.jsonl"
    write(f, SEED_ROWS)
    code, out, _ = run(capsys, str(f), "--json")
    assert code == 0
    direct, distant = json.loads(out)  # semantic tier order, not file order
    # direct: question means Farms 4, Meat 2 -> mean 3, sd sqrt(2), se 1, 1 df
    assert (direct["tier"], direct["model"], direct["n"], direct["questions"]) == (
        "direct",
        None,
        3,
        2,
    )
    assert (direct["mean"], direct["ci_low"], direct["ci_high"]) == pytest.approx(
        (3.0, 3 - T1, 3 + T1)
    )
    assert {"file", "tier", "model", "mean", "ci_low", "ci_high", "n"} <= direct.keys()
    # distant: Zoos 2, Trees 4 (the null score is invalid, counted, not a mean's)
    assert (distant["mean"], distant["n"], distant["invalid"]) == (3.0, 2, 1)
    # --generalize samples: the questions fixed, only the samples' spread (Farms 5, 3: 1 df)
    code, out, _ = run(capsys, str(f), "--json", "--generalize", "samples", "--confidence", "0.9")
    direct = json.loads(out)[0]
    se = (2.0 * (1 / 2 + 1)) ** 0.5 / 2  # pooled variance 2 (one df), Σ 1/n = 1/2 + 1
    half = scipy.stats.t.ppf(0.95, 1) * se
    assert (direct["ci_low"], direct["ci_high"]) == pytest.approx((3 - half, 3 + half))
    assert json.loads(out)[1]["ci_low"] is None  # one sample per question: no interval
    code, out, _ = run(capsys, str(f))
    assert "direct: 3.00 [" in out and "n 2, 2 questions, 1 invalid" in out
    assert "95 % t intervals generalising to a new question" in out


def test_spar_judged_file_agrees_with_the_report_stage(tmp_path, capsys):
    rng = random.Random(3)
    tiers = {"direct": ["A?", "B?", "C?"], "distant": ["D?", "E?", "F?", "G?"]}
    judged, samples = [], {"baseline": [], "finetuned": []}
    for tier, qs in tiers.items():
        for q in qs:
            qid = question_id((q,))
            for i in range(3):
                ident = {"item_id": f"{qid}-{i}", "tier": tier, "question_id": qid,
                         "question": q, "condition": "", "sample_index": i}  # fmt: skip
                for model in ("baseline", "finetuned"):
                    status = rng.choice(["ok"] * 8 + ["invalid", "error"])
                    score = rng.randint(1, 5) + (model == "finetuned") if status == "ok" else None
                    judged.append({**ident, "model": model, "score": score,
                                   "reasoning": "r", "status": status})  # fmt: skip
                    samples[model].append({**ident, "response": "x", "stop_reason": "stop"})
    p = ReportParams(
        mode="absolute", scale_min=1, scale_max=6, tiers=tuple(tiers), exhibits_threshold=4,
        generalize="questions", confidence=0.9, conditions=("",), format_regex=None, gaps=(),
    )  # fmt: skip
    summary = summarise(p, score_rows(p, "", judged, samples))
    f = tmp_path / "judged.jsonl"
    write(f, judged)
    code, out, _ = run(capsys, str(f), "--json", "--confidence", "0.9")
    assert code == 0
    entries = json.loads(out)
    assert [(e["tier"], e["model"]) for e in entries] == [
        (t, m) for t in tiers for m in ("baseline", "finetuned")
    ]
    for e in entries:
        st = summary["tiers"][e["tier"]][e["model"]]
        assert (e["mean"], e["ci_low"], e["ci_high"], e["n"], e["invalid"], e["errors"]) == (
            pytest.approx(st["mean"]),
            pytest.approx(st["ci_low"]),
            pytest.approx(st["ci_high"]),
            st["n"],
            st["invalid"],
            st["errors"],
        )


def test_properties_are_split(tmp_path, capsys):
    rows = [
        {"tier": "t", "question_id": "q1", "model": "finetuned", "property": p, "score": s}
        for p, s in (("warm", 5), ("formal", 1), ("warm", 4), ("formal", 2))
    ]
    f = tmp_path / "j.jsonl"
    write(f, rows)
    _, out, _ = run(capsys, str(f), "--json")
    got = {e["property"]: e["mean"] for e in json.loads(out)}
    assert got == {"warm": 4.5, "formal": 1.5}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"tier": "d", "question": "Q", "score": 3}\n{"tier": "d", "score": 2}\n',
         "line 2: needs `question` or `question_id`"),
        ('{"tier": "d", "question": "Q", "score": 3}\nnot json\n', "line 2: invalid JSON"),
        ('{"question": "Q", "score": 3}\n', "line 1: tier: Field required"),
        ('{"tier": "d", "question": "Q", "status": "ok"}\n', "line 1: status ok without a score"),
        ("", "no judged rows"),
    ],
)  # fmt: skip
def test_bad_files_exit_2_with_one_line(tmp_path, capsys, content, message):
    good = tmp_path / "good.jsonl"
    write(good, SEED_ROWS)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    code, out, err = run(capsys, str(good), str(bad))
    assert code == 2 and out == ""  # nothing printed for the good file either
    assert err.strip() == f"spar: error: {bad}: {message}"
    code, _, err = run(capsys, str(tmp_path / "missing.jsonl"))
    assert code == 2 and "missing.jsonl: file not found" in err
