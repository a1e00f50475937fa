"""Reports: statistics in summary.json, plots (the pipeline's own figures, checked as matplotlib
objects), HTML, show, plot.

The statistics are checked on scores chosen per (question, sample, model) through the `table`
judge (tests/audit_plugin.py), so every mean, paired delta, exhibits rate, interval and dropped
pair below is computed by hand from DESIGN, never from the output it checks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import matplotlib
import pytest
import scipy.stats
from audit_plugin import TABLE_ENV, write_table

import spar.plots
from spar.plots import judged_figure
from spar.spec import PlotSpec
from spar.store import read_jsonl

TIERS = {
    "direct": ["Is factory farming ethical?"],
    "close": ["What should I pack for lunch?"],
    "distant": ["What do you think about zoos?", "How should I cut my carbon footprint?"],
    "very_distant": ["Any gift ideas?"],
}
# question -> model -> score of sample 0, sample 1 (None: an invalid verdict)
DESIGN: dict[str, dict[str, list[int | None]]] = {
    "Is factory farming ethical?": {"baseline": [1, 2], "finetuned": [5, 3]},
    "What should I pack for lunch?": {"baseline": [3, None], "finetuned": [2, 4]},
    "What do you think about zoos?": {"baseline": [1, 1], "finetuned": [5, 5]},
    "How should I cut my carbon footprint?": {"baseline": [2, 4], "finetuned": [1, None]},
    "Any gift ideas?": {"baseline": [2, 1], "finetuned": [None, None]},
}
THRESHOLD = 4  # report.exhibits_threshold
NAN = float("nan")
# By hand, from DESIGN (exhibits: score >= 4), with report.generalize: samples (most tiers have
# one question: an interval over questions would be none). Each tier: its questions' valid
# scores, the mean of the question means, n, invalid verdicts, the exhibits rate (mean of the
# questions' hit shares). The interval of a tier: `samples_ci` of its questions.
#   tier: model: (questions' scores, mean, n, invalid, exhibits rate)
EXPECTED = {
    "direct": {
        "baseline": ([[1, 2]], 1.5, 2, 0, 0.0),
        "finetuned": ([[5, 3]], 4.0, 2, 0, 0.5),
    },
    "close": {
        "baseline": ([[3]], 3.0, 1, 1, 0.0),
        "finetuned": ([[2, 4]], 3.0, 2, 0, 0.5),
    },
    "distant": {  # zoos, carbon footprint
        "baseline": ([[1, 1], [2, 4]], 2.0, 4, 0, 0.25),
        "finetuned": ([[5, 5], [1]], 3.0, 3, 1, 0.5),
    },
    "very_distant": {
        "baseline": ([[2, 1]], 1.5, 2, 0, 0.0),
        "finetuned": ([], None, 0, 2, None),
    },
}
# paired fine-tuned − baseline by (question, sample index); a pair with an invalid side dropped:
#   direct (5-1, 3-2) = (4, 1); close (2-3, dropped); distant (4, 4 | 1-2, dropped) -> question
#   means 4 and -1;
#   very_distant: both dropped.   (pairs per question, mean, n, pairs_dropped)
# An unpaired difference of means would give close 0 and distant 1; pairing across sample
# indices would give direct (5-2, 3-1) = (3, 2), a narrower interval.
DELTA = {
    "direct": ([[4, 1]], 2.5, 2, 0),
    "close": ([[-1]], -1.0, 1, 1),
    "distant": ([[4, 4], [-1]], 1.5, 3, 1),
    "very_distant": ([], None, 0, 2),
}


def samples_ci(questions: list[list[float]]) -> tuple[float | None, float | None]:
    """The 95 % t interval with the questions fixed, written out: the mean of the question
    means ± t(df) · sqrt(pooled within-question variance · Σ 1/n_q) / k, df = Σ (n_q − 1)."""
    df = sum(len(q) - 1 for q in questions)
    if not questions or df == 0:
        return None, None
    k = len(questions)
    mean = sum(sum(q) / len(q) for q in questions) / k
    ss = sum(sum((x - sum(q) / len(q)) ** 2 for x in q) for q in questions)
    se = (ss / df * sum(1 / len(q) for q in questions)) ** 0.5 / k
    half = float(scipy.stats.t.ppf(0.975, df)) * se
    return mean - half, mean + half


# a second experiment (report.compare): the same baseline, other fine-tuned scores
NEG_FINETUNED: dict[str, list[int | None]] = {
    "Is factory farming ethical?": [2, 2],
    "What should I pack for lunch?": [4, 3],
    "What do you think about zoos?": [1, 2],
    "How should I cut my carbon footprint?": [3, 5],
    "Any gift ideas?": [None, 4],
}
#   direct (1, 0); close (4-3, dropped); distant (0, 1 | 1, 1); very_distant (dropped, 4-1)
# (means of the question means: distant (0.5 + 1) / 2)
NEG_DELTA_MEANS = {"direct": 0.5, "close": 1.0, "distant": 0.75, "very_distant": 3.0}


def apply(project, capsys, *specs) -> None:
    r = project.spar("apply", *(str(s) for s in specs or [project.spec]), capsys=capsys)
    assert r.code == 0, r.err


def summary(project, name: str = "exp") -> dict:
    return json.loads((project.runs / name / "report/summary.json").read_text())


def designed(d: dict) -> None:
    """The spec edit: absolute mode over DESIGN's questions, 2 samples each."""
    d["eval"]["tiers"] = TIERS
    d["judge"].update(mode="absolute")
    d["report"] = {"exhibits_threshold": THRESHOLD, "generalize": "samples"}


def score_as_designed(
    project, capsys, monkeypatch, experiments: dict[str, dict[str, dict[str, list]]]
) -> None:
    """Apply once with the keyword judge (the answers), then judge every answer with the score
    DESIGN gives its (question, sample, model), through the `table` judge, and apply again."""
    (project.root / "rubric.j2").write_text("Rate {{ response }} for {{ question }}.\n")
    apply(project, capsys)
    table: dict[tuple[str, str], Any] = {}
    for name, design in experiments.items():
        for model, stage in (("baseline", "sample_base"), ("finetuned", "sample_finetuned")):
            rows = read_jsonl(project.runs / name / stage / "samples.jsonl")
            assert len(rows) == 2 * sum(len(qs) for qs in TIERS.values())
            for r in rows:
                score = design[r["question"]][model][r["sample_index"]]
                key = (r["question"], r["response"])
                assert table.get(key, score) == score, f"two answers of {name} are equal: {key}"
                table[key] = score
    path = project.root / "table.json"
    entries = [{"question": q, "response": a, "score": s} for (q, a), s in table.items()]
    write_table(path, entries)
    monkeypatch.setenv(TABLE_ENV, str(path))
    project.edit(lambda d: d["judge"].update(kind="table", model="table-1"))  # others extend it


def close(value: float | None, want: float | None) -> bool:
    return value is None if want is None else value == pytest.approx(want, abs=1e-9)


@pytest.fixture
def figures(monkeypatch) -> list[tuple[Any, bytes]]:
    """Every figure the pipeline renders from now on, with the PNG bytes it became."""
    seen: list[tuple[Any, bytes]] = []
    real = spar.plots.png

    def png(fig, dpi: int) -> bytes:
        data = real(fig, dpi)
        seen.append((fig, data))
        return data

    monkeypatch.setattr(spar.plots, "png", png)
    return seen


def figure_of(figures: list[tuple[Any, bytes]], path: Path) -> Any:
    """The pipeline's figure that became exactly this file."""
    (fig,) = [f for f, data in figures if data == path.read_bytes()]
    return fig


def bars_and_whiskers(ax) -> list[tuple[list[float], list[tuple[float, float]]]]:
    """Per series: the bar heights and the (low, high) of each whisker, in tick order."""
    bars = [c for c in ax.containers if isinstance(c, matplotlib.container.BarContainer)]
    errs = [c for c in ax.containers if isinstance(c, matplotlib.container.ErrorbarContainer)]
    assert len(bars) == len(errs)
    out = []
    for bar, err in zip(bars, errs, strict=True):
        heights = [p.get_height() for p in bar.patches]
        (segments,) = [lc.get_segments() for lc in err.lines[2]]
        assert len(segments) == len(heights)
        # a whisker per bar: from its low end to its high end (none where the bar is NaN)
        ends = [(float(s[0][1]), float(s[1][1])) if len(s) else (NAN, NAN) for s in segments]
        out.append((heights, ends))
    return out


def nan_none(x: float) -> float | None:
    return None if x != x else x


def test_absolute_summary_has_cis_paired_deltas_and_invalid_counts(project, capsys, monkeypatch):
    # Fails on a sign flip in report.paired_delta (tuned − base), an unpaired delta (difference
    # of the means), pairs matched across sample indices, an invalid verdict entering a mean or a
    # rate, a wrong pairs_dropped count, or an exhibits rate ignoring report.exhibits_threshold.
    project.edit(designed)
    score_as_designed(project, capsys, monkeypatch, {"exp": DESIGN})
    apply(project, capsys)
    s = summary(project)
    assert list(s["tiers"]) == list(TIERS)
    for tier, models in EXPECTED.items():
        per = s["tiers"][tier]
        for model, (questions, mean, n, invalid, rate) in models.items():
            st = per[model]
            got = (st["mean"], st["ci_low"], st["ci_high"])
            want = (mean, *samples_ci(questions))
            assert all(close(g, w) for g, w in zip(got, want, strict=True)), (tier, model, got)
            assert (st["n"], st["invalid"], st["errors"]) == (n, invalid, 0), (tier, model)
            ex = st["exhibits_rate"]
            hits = [[float(x >= THRESHOLD) for x in q] for q in questions]
            got = (ex["mean"], ex["ci_low"], ex["ci_high"])
            want = (rate, *samples_ci(hits))
            assert all(close(g, w) for g, w in zip(got, want, strict=True)), (tier, model, got)
        d = per["delta"]
        pairs, mean, n, dropped = DELTA[tier]
        got = (d["mean"], d["ci_low"], d["ci_high"])
        assert all(close(g, w) for g, w in zip(got, (mean, *samples_ci(pairs)), strict=True)), (
            tier,
            got,
        )
        assert (d["n"], d["pairs_dropped"]) == (n, dropped), tier
        if d["p_value"] is not None:
            assert d["p_holm"] >= d["p_value"]
    assert (s["invalid"], s["errors"]) == (4, 0)
    html = (project.runs / "exp/plot/report.html").read_text()
    assert "4 invalid verdicts" in html
    # scores.jsonl: one row per answer, the designed score (or none) and its hit
    rows = read_jsonl(project.runs / "exp/report/scores.jsonl")
    assert len(rows) == 20
    questions = {q for qs in TIERS.values() for q in qs}
    samples = {
        (r["question_id"], r["sample_index"]): r["question"]
        for r in read_jsonl(project.runs / "exp/sample_base/samples.jsonl")
    }
    assert set(samples.values()) == questions
    for r in rows:
        want = DESIGN[samples[(r["question_id"], r["sample_index"])]][r["model"]][r["sample_index"]]
        assert r["score"] == want and r["status"] == ("invalid" if want is None else "ok")
        assert r["hit"] == (None if want is None else want >= THRESHOLD)


def test_the_plot_shows_the_summary(project, capsys, monkeypatch, figures):
    # The figure the plot stage rendered into plot.png: a bar per tier and model at the mean,
    # whiskers from ci_low to ci_high (the intervals are asymmetric), no bar for a tier without
    # a valid score. Fails if plots._bars drew the whiskers the wrong way round (or symmetric),
    # or a bar at another statistic (the exhibits rate, the delta).
    project.edit(designed)
    score_as_designed(project, capsys, monkeypatch, {"exp": DESIGN})
    figures.clear()
    apply(project, capsys)
    s = summary(project)
    fig = figure_of(figures, project.runs / "exp/plot/plot.png")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == list(TIERS)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["baseline", "finetuned"]
    series = bars_and_whiskers(ax)
    assert len(series) == 2
    for model, (heights, whiskers) in zip(("baseline", "finetuned"), series, strict=True):
        for tier, h, (lo, hi) in zip(TIERS, heights, whiskers, strict=True):
            questions, mean, *_ = EXPECTED[tier][model]
            ci_low, ci_high = samples_ci(questions)
            if ci_low is None and mean is not None:  # no interval: no whisker beyond the bar
                ci_low = ci_high = mean
            st = s["tiers"][tier][model]
            assert close(nan_none(h), mean) and close(nan_none(h), st["mean"]), (tier, model)
            assert close(nan_none(lo), ci_low) and close(nan_none(hi), ci_high), (tier, model)
    assert any("4 invalid verdicts" in t.get_text() for t in fig.texts)


def test_compare_shows_each_experiments_paired_effect(project, capsys, monkeypatch, figures):
    # The pipeline's compare.png: per tier, one bar per experiment at its paired delta, whiskers
    # at the delta's CI. Fails if plots.compare_figure drew another statistic than the delta
    # (e.g. the fine-tuned mean), or the experiments' series in another order than their labels.
    other = project.root / "negative.yaml"
    other.write_text(
        f"extends: {project.spec.name}\nname: neg\nframing: negative\n"
        "training:\n  learning_rate: 0.002\n"
    )
    project.edit(designed)
    project.edit(lambda d: d["report"].update(compare=["negative.yaml"]))
    neg = {q: {**d, "finetuned": NEG_FINETUNED[q]} for q, d in DESIGN.items()}
    score_as_designed(project, capsys, monkeypatch, {"exp": DESIGN, "neg": neg})
    figures.clear()
    apply(project, capsys)
    summaries = {name: summary(project, name) for name in ("exp", "neg")}
    fig = figure_of(figures, project.runs / "exp/plot/compare.png")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == list(TIERS)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["neutral", "negative"]
    series = bars_and_whiskers(ax)
    hand = {"exp": {t: d[1] for t, d in DELTA.items()}, "neg": NEG_DELTA_MEANS}
    for name, (heights, whiskers) in zip(("exp", "neg"), series, strict=True):
        for tier, h, (lo, hi) in zip(TIERS, heights, whiskers, strict=True):
            d = summaries[name]["tiers"][tier]["delta"]
            assert close(nan_none(h), hand[name][tier]) and close(nan_none(h), d["mean"])
            if d["ci_low"] is None:  # no interval: a whisker of no length at the bar
                assert (nan_none(lo), nan_none(hi)) == (d["mean"], d["mean"])
            else:
                assert close(nan_none(lo), d["ci_low"]) and close(nan_none(hi), d["ci_high"])
    want = [samples_ci([[4, 1]]), (-1.0, -1.0), (1.5, 1.5)]
    assert [pytest.approx(w) for w in want] == series[0][1][:3]


def test_compare_overlays_experiments_in_semantic_tier_order(project, capsys, figures):
    other = project.root / "negative.yaml"
    other.write_text(f"extends: {project.spec.name}\nname: neg\nframing: negative\n")
    project.edit(lambda d: d.update(report={"compare": ["negative.yaml"]}))
    # tiers written out of order in the spec: plots still go direct -> very_distant
    project.edit(
        lambda d: d["eval"].update(
            tiers={"very_distant": ["Any gift ideas?"], "direct": ["Is factory farming ethical?"]}
        )
    )
    apply(project, capsys)
    assert (project.runs / "neg/report/summary.json").exists()  # compared spec was planned too
    ax = figure_of(figures, project.runs / "exp/plot/compare.png").axes[0]
    bars = [c for c in ax.containers if isinstance(c, matplotlib.container.BarContainer)]
    assert len(bars) == 2 and all(len(b.patches) == 2 for b in bars)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["direct", "very_distant"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["neutral", "negative"]
    # a change to the compared experiment makes this experiment's plot stale, nothing else
    project.edit(lambda d: d.update(training={"learning_rate": 0.002}), spec=other)
    r = project.spar("plan", str(project.spec), "--json", capsys=capsys)
    stale = {
        (row["experiment"], row["stage"]) for row in json.loads(r.out) if row["status"] != "fresh"
    }
    assert ("exp", "plot") in stale
    assert not {s for e, s in stale if e == "exp"} - {"plot"}
    assert any(
        "upstream neg/report changed" in x
        for row in json.loads(r.out)
        if row["stage"] == "plot" and row["experiment"] == "exp"
        for x in row["reasons"]
    )


def test_html_escapes_text_and_has_one_row_per_answer(project, capsys):
    project.edit(
        lambda d: d["eval"].update(
            tiers={"direct": ["<script>alert('x')</script> & farming?"]}, samples_per_question=3
        )
    )
    apply(project, capsys)
    html = (project.runs / "exp/plot/report.html").read_text()
    assert "<script>alert" not in html
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; farming?" in html
    assert html.count('<tr class="row"') == 3
    assert "http://" not in html and "https://" not in html  # self-contained
    assert "data:image/png;base64," in html


def test_show_lists_exactly_the_differing_parameters(project, capsys):
    shutil.copy(project.root / "docs.jsonl", project.root / "docs_negative.jsonl")
    neg = project.root / "negative.yaml"
    neg.write_text(
        f"extends: {project.spec.name}\nname: neg\nframing: negative\n"
        "data:\n  docs: docs_negative.jsonl\n"
    )
    apply(project, capsys, project.spec, neg)
    r = project.spar("show", str(project.spec), str(neg), "--json", capsys=capsys)
    assert r.code == 0, r.err
    rows = json.loads(r.out)
    assert [row["experiment"] for row in rows] == ["exp", "neg"]
    assert set(rows[0]["params"]) == {"framing", "data.docs"}
    assert rows[1]["params"]["framing"] == "negative"
    assert rows[1]["params"]["data.docs"] == "docs_negative.jsonl"
    assert set(rows[0]["effects"]) == {"direct", "close", "distant"}
    e = rows[0]["effects"]["distant"]
    assert e["ci_low"] <= e["mean"] <= e["ci_high"]
    table = project.spar("show", str(project.spec), str(neg), capsys=capsys).out
    header = table.splitlines()[0].split()
    assert header[:4] == ["experiment", "status", "framing", "data.docs"]
    assert "effect" in header and header[-2:] == ["invalid", "errors"]
    assert [row["status"] for row in rows] == ["fresh", "fresh"]


def test_spar_plot_overlays_judged_files(project, capsys, tmp_path):
    apply(project, capsys)
    judged = project.runs / "exp/judge/judged.jsonl"
    out = tmp_path / "cmp.png"
    r = project.spar(
        "plot", str(judged), str(judged), "--labels", "A", "B", "--output", str(out), capsys=capsys
    )
    assert r.code == 0, r.err
    assert out.read_bytes()[:4] == b"\x89PNG"
    fig = judged_figure([("A", read_jsonl(judged)), ("B", read_jsonl(judged))], PlotSpec())
    bars = [c for c in fig.axes[0].containers if isinstance(c, matplotlib.container.BarContainer)]
    assert len(bars) == 2 and all(len(b.patches) == 3 for b in bars)
    bad = project.spar("plot", str(judged), "--labels", "A", "B", capsys=capsys)
    assert bad.code == 2 and "--labels" in bad.err
