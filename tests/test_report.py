"""Reports: statistics in summary.json, plots (checked as matplotlib objects), HTML, show, plot."""

from __future__ import annotations

import json
import shutil

import matplotlib

from spar.plots import compare_figure, experiment_figure, judged_figure
from spar.spec import PlotSpec
from spar.store import read_jsonl


def apply(project, capsys, *specs) -> None:
    r = project.spar("apply", *(str(s) for s in specs or [project.spec]), capsys=capsys)
    assert r.code == 0, r.err


def summary(project, name: str = "exp") -> dict:
    return json.loads((project.runs / name / "report/summary.json").read_text())


def test_absolute_summary_has_cis_paired_deltas_and_invalid_counts(project, capsys):
    project.edit(lambda d: d["judge"].update(mode="absolute", model="kw-invalid-3"))
    (project.root / "rubric.j2").write_text("Rate {{ response }} for {{ question }}.\n")
    apply(project, capsys)
    s = summary(project)
    judged = read_jsonl(project.runs / "exp/judge/judged.jsonl")
    invalid = [j for j in judged if j["status"] == "invalid"]
    assert invalid and all(j["score"] is None for j in invalid)
    assert s["invalid"] == len(invalid)
    for tier, per in s["tiers"].items():
        for model in ("baseline", "finetuned"):
            sel = [j for j in judged if j["tier"] == tier and j["model"] == model]
            ok = [j["score"] for j in sel if j["status"] == "ok"]
            st = per[model]
            assert st["invalid"] == len(sel) - len(ok)
            assert st["n"] == len(ok)
            if ok:  # invalid verdicts never change a mean
                assert st["mean"] == sum(ok) / len(ok)
                assert st["ci_low"] <= st["mean"] <= st["ci_high"]
                assert st["exhibits_rate"]["mean"] == sum(x >= 3 for x in ok) / len(ok)
        d = per["delta"]
        if d["mean"] is not None:
            assert d["ci_low"] <= d["mean"] <= d["ci_high"]
            assert d["n"] + d["pairs_dropped"] == len([j for j in judged if j["tier"] == tier]) // 2
    html = (project.runs / "exp/plot/report.html").read_text()
    assert f"{len(invalid)} invalid verdicts" in html


def test_experiment_figure_bars_and_whiskers(project, capsys):
    project.edit(lambda d: d["judge"].update(mode="absolute", model="kw-invalid-3"))
    (project.root / "rubric.j2").write_text("Rate {{ response }}.\n")
    apply(project, capsys)
    s = summary(project)
    fig = experiment_figure(s, PlotSpec(), "exp")
    ax = fig.axes[0]
    bars = [c for c in ax.containers if isinstance(c, matplotlib.container.BarContainer)]
    assert len(bars) == 2  # baseline, fine-tuned
    assert all(len(b.patches) == 3 for b in bars)  # direct, close, distant
    errorbars = [c for c in ax.containers if isinstance(c, matplotlib.container.ErrorbarContainer)]
    assert len(errorbars) == 2
    assert [t.get_text() for t in ax.get_xticklabels()] == ["direct", "close", "distant"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["baseline", "finetuned"]
    heights = [p.get_height() for p in bars[1].patches]
    means = [s["tiers"][t]["finetuned"]["mean"] for t in ("direct", "close", "distant")]
    assert [None if h != h else h for h in heights] == means  # NaN height: no valid score
    assert any(f"{s['invalid']} invalid verdicts" in t.get_text() for t in fig.texts)


def test_compare_overlays_experiments_in_semantic_tier_order(project, capsys):
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
    summaries = [summary(project, "exp"), summary(project, "neg")]
    fig = compare_figure(summaries, ["neutral", "negative"], PlotSpec())
    ax = fig.axes[0]
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
