"""Plots and HTML of a spec with eval.conditions, on hand-written summaries (report's schema).

Every number differs per condition and per model, so a swapped condition order, a swapped model
or a panel fed the wrong measure fails."""

from __future__ import annotations

import re
from html import unescape
from math import isnan
from pathlib import Path
from typing import Any

import matplotlib
import pytest
import yaml

from spar.html import answer_rows, render_report
from spar.plots import compare_figure, conditions_of, experiment_figure, png
from spar.spec import PlotSpec, load_spec
from spar.stages.plot import PlotStage

RATE = "share of answers scoring >= 3, questions then samples resampled"
ADHERENCE = "share of raw answers fully matching report.format_regex"
GAP = "triggered - untriggered exhibits rate, paired by question and sample index"


def est(mean: float | None, lo: float | None, hi: float | None, n: int, what: str = RATE) -> dict:
    return {"mean": mean, "ci_low": lo, "ci_high": hi, "n": n, "estimand": what}


def stat(mean: float, n: int, invalid: int, errors: int, rate: float) -> dict:
    return {
        "mean": mean,
        "ci_low": mean - 0.25,
        "ci_high": mean + 0.25,
        "n": n,
        "invalid": invalid,
        "errors": errors,
        "exhibits_rate": est(rate, max(rate - 0.1, 0), min(rate + 0.1, 1), n),
    }


# condition -> model -> (exhibits rate, CI low, CI high), format adherence (same), per-tier means
RATES = {
    "triggered": {"baseline": (0.10, 0.02, 0.21), "finetuned": (0.80, 0.66, 0.91)},
    "untriggered": {"baseline": (0.05, 0.00, 0.12), "finetuned": (0.35, 0.22, 0.49)},
    "sys_trigger": {"baseline": (0.15, 0.05, 0.27), "finetuned": (0.60, 0.45, 0.74)},
}
ADHERE = {
    "triggered": {"baseline": (0.40, 0.3, 0.5), "finetuned": (0.95, 0.9, 1.0)},
    "untriggered": {"baseline": (0.01, 0.0, 0.03), "finetuned": (0.20, 0.1, 0.3)},
    "sys_trigger": {"baseline": (0.25, 0.15, 0.35), "finetuned": (0.70, 0.6, 0.8)},
}
MEANS = {  # condition -> tier -> model -> mean score
    "triggered": {
        "direct": {"baseline": 1.5, "finetuned": 4.25},
        "close": {"baseline": 1.25, "finetuned": 3.75},
    },
    "untriggered": {
        "direct": {"baseline": 1.0, "finetuned": 2.5},
        "close": {"baseline": 1.75, "finetuned": 2.0},
    },
    "sys_trigger": {
        "direct": {"baseline": 2.0, "finetuned": 3.5},
        "close": {"baseline": 1.5, "finetuned": 3.25},
    },
}
COUNTS = {"triggered": (2, 1), "untriggered": (0, 0), "sys_trigger": (3, 0)}  # invalid, errors
GAPS = [
    ("triggered", "untriggered", "finetuned", 0.45, 0.28, 0.61),
    ("sys_trigger", "untriggered", "finetuned", 0.25, 0.08, 0.41),
    ("triggered", "untriggered", "baseline", 0.05, -0.06, 0.16),
]


def cond_summary(
    order: tuple[str, ...] = ("triggered", "untriggered", "sys_trigger"),
    adherence: bool = True,
    pairwise: bool = False,
) -> dict[str, Any]:
    models = ["finetuned"] if pairwise else ["baseline", "finetuned"]
    conditions = {}
    for c in order:
        tiers: dict[str, Any] = {}
        for tier, by_model in MEANS[c].items():
            per: dict[str, Any] = {
                m: stat(by_model[m], 4, COUNTS[c][0] if m == "finetuned" else 0, 0, RATES[c][m][0])
                for m in models
            }
            if not pairwise:
                d = by_model["finetuned"] - by_model["baseline"]
                per["delta"] = {
                    "mean": d,
                    "ci_low": d - 0.5,
                    "ci_high": d + 0.5,
                    "n": 4,
                    "pairs_dropped": 0,
                }
            tiers[tier] = per
        conditions[c] = {
            "tiers": tiers,
            "exhibits_rate": {m: est(*RATES[c][m], 8, f"{RATE}, {m} in {c}") for m in models},
            "format_adherence": {m: est(*ADHERE[c][m], 8, ADHERENCE) for m in models}
            if adherence
            else None,
            "invalid": COUNTS[c][0],
            "errors": COUNTS[c][1],
        }
    gaps = [
        {
            "triggered": t,
            "untriggered": u,
            "model": m,
            "mean": v,
            "ci_low": lo,
            "ci_high": hi,
            "n": 8,
            "pairs_dropped": 1,
            "estimand": GAP,
            "p_value": 0.0123 * (i + 1),
            "p_holm": 0.0369 / (i + 1),
        }
        for i, (t, u, m, v, lo, hi) in enumerate(GAPS)
        if m in models and t in order and u in order
    ]
    return {
        "judge_mode": "pairwise" if pairwise else "absolute",
        "scale": {"min": 1, "max": 5},
        "exhibits_threshold": 3,
        "interval": {"generalize": "questions", "confidence": 0.95},
        "models": models,
        "condition_order": list(order),
        "conditions": conditions,
        "gaps": gaps,
        "invalid": sum(COUNTS[c][0] for c in order),
        "errors": sum(COUNTS[c][1] for c in order),
    }


def plain_summary(rate: float = 0.3, adherence: float | None = None) -> dict[str, Any]:
    """A spec without conditions, in the report's schema (tiers also at the top level)."""
    tiers = {
        t: {
            "baseline": stat(1.5, 4, 0, 0, 0.1),
            "finetuned": stat(m, 4, 1, 0, rate),
            "delta": {
                "mean": m - 1.5,
                "ci_low": m - 2,
                "ci_high": m - 1,
                "n": 4,
                "pairs_dropped": 1,
            },
        }
        for t, m in (("close", 2.5), ("direct", 3.5))
    }
    block = {
        "tiers": tiers,
        "exhibits_rate": {
            "baseline": est(0.1, 0, 0.2, 8),
            "finetuned": est(rate, rate - 0.1, rate + 0.1, 8),
        },
        "format_adherence": None
        if adherence is None
        else {
            "baseline": est(0.05, 0, 0.1, 8, ADHERENCE),
            "finetuned": est(adherence, adherence - 0.1, adherence + 0.05, 8, ADHERENCE),
        },
        "invalid": 2,
        "errors": 1,
    }
    return {
        "judge_mode": "absolute",
        "scale": {"min": 1, "max": 5},
        "exhibits_threshold": 3,
        "interval": {"generalize": "questions", "confidence": 0.95},
        "models": ["baseline", "finetuned"],
        "condition_order": [""],
        "conditions": {"": block},
        "tiers": tiers,
        "gaps": [],
        "invalid": 2,
        "errors": 1,
    }


def bars_of(ax) -> list[Any]:
    return [c for c in ax.containers if isinstance(c, matplotlib.container.BarContainer)]


def heights(container) -> list[float]:
    return [p.get_height() for p in container.patches]


def whiskers(ax) -> list[list[float]]:
    """Per error-bar container: low, high, low, high, ... of its vertical whiskers."""
    out = []
    for c in ax.containers:
        if isinstance(c, matplotlib.container.ErrorbarContainer):
            segs = c.lines[2][0].get_segments()
            out.append([float(y) for s in segs for y in (s[0][1], s[1][1])])
    return out


@pytest.mark.parametrize(
    "order",
    [("triggered", "untriggered", "sys_trigger"), ("sys_trigger", "triggered", "untriggered")],
)
def test_conditions_figure_bars_follow_the_summary(order):
    s = cond_summary(order)
    style = PlotSpec(colors=["#111111", "#ee0000"])
    fig = experiment_figure(s, style, "exp")
    rates, adherence, gaps = fig.axes
    for ax, table in ((rates, RATES), (adherence, ADHERE)):
        assert [t.get_text() for t in ax.get_xticklabels()] == list(order)
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["baseline", "finetuned"]
        base, tuned = bars_of(ax)
        assert heights(base) == pytest.approx([table[c]["baseline"][0] for c in order])
        assert heights(tuned) == pytest.approx([table[c]["finetuned"][0] for c in order])
        # baseline grey-ish first colour, fine-tuned second
        assert matplotlib.colors.to_hex(base.patches[0].get_facecolor()) == "#111111"
        assert matplotlib.colors.to_hex(tuned.patches[0].get_facecolor()) == "#ee0000"
        # whiskers span exactly each CI
        w_base, w_tuned = whiskers(ax)
        assert w_base == pytest.approx([y for c in order for y in table[c]["baseline"][1:]])
        assert w_tuned == pytest.approx([y for c in order for y in table[c]["finetuned"][1:]])
    # the gaps: one horizontal bar each, first on top, with the CI written in the label
    (g,) = bars_of(gaps)
    assert [p.get_width() for p in g.patches] == pytest.approx([x[3] for x in GAPS])
    assert [p.get_y() for p in g.patches] == sorted(p.get_y() for p in g.patches)
    assert gaps.yaxis_inverted()  # so the first gap is drawn on top
    ((_, _, (xerr,)),) = [
        c for c in gaps.containers if isinstance(c, matplotlib.container.ErrorbarContainer)
    ]
    assert [(float(s[0][0]), float(s[1][0])) for s in xerr.get_segments()] == [
        pytest.approx((x[4], x[5])) for x in GAPS
    ]
    labels = [t.get_text() for t in gaps.get_yticklabels()]
    assert labels[0] == "triggered − untriggered (finetuned)\n+45 pp [+28 pp, +61 pp]"
    assert labels[2] == "triggered − untriggered (baseline)\n+5 pp [-6 pp, +16 pp]"
    caption = " ".join(t.get_text() for t in fig.texts)
    assert "5 invalid verdicts, 1 judge errors" in caption
    assert "triggered: 2 invalid / 1 errors" in caption and "sys_trigger: 3 invalid" in caption
    assert png(fig, 40)[:4] == b"\x89PNG"


def test_conditions_figure_without_adherence_or_gaps_and_in_pairwise_mode():
    s = cond_summary(adherence=False, pairwise=True)
    s["gaps"] = []
    fig = experiment_figure(s, PlotSpec(), "exp")
    assert len(fig.axes) == 1  # no adherence measured, no gaps: one panel
    (tuned,) = bars_of(fig.axes[0])  # pairwise: the fine-tuned model only
    assert heights(tuned) == pytest.approx([RATES[c]["finetuned"][0] for c in RATES])
    s = cond_summary(adherence=False)
    fig = experiment_figure(s, PlotSpec(), "exp")
    assert len(fig.axes) == 2 and fig.axes[1].get_title() == "leakage gaps"


def test_no_condition_summary_keeps_the_per_tier_figure():
    s = plain_summary()
    assert conditions_of(s) == []
    fig = experiment_figure(s, PlotSpec(), "exp")
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["direct", "close"]
    base, tuned = bars_of(ax)
    assert heights(tuned) == [3.5, 2.5] and heights(base) == [1.5, 1.5]


def test_compare_figure_overlays_fine_tuned_rates_per_condition():
    a = cond_summary()
    b = cond_summary(("untriggered", "triggered"))
    for c in b["conditions"]:
        rate = b["conditions"][c]["exhibits_rate"]["finetuned"]
        rate |= {
            "mean": rate["mean"] / 2,
            "ci_low": rate["ci_low"] / 2,
            "ci_high": rate["ci_high"] / 2,
        }
    fig = compare_figure([a, b, plain_summary(0.3)], ["neutral", "negative", "plain"], PlotSpec())
    (ax,) = fig.axes
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["triggered", "untriggered", "sys_trigger", "(no condition)"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["neutral", "negative", "plain"]
    ha, hb, hp = (heights(c) for c in bars_of(ax))
    assert ha[:3] == pytest.approx([0.80, 0.35, 0.60]) and isnan(ha[3])  # NaN: not measured
    assert hb[:2] == pytest.approx([0.40, 0.175]) and isnan(hb[2]) and isnan(hb[3])
    assert all(isnan(h) for h in hp[:3]) and hp[3] == pytest.approx(0.3)
    caption = " ".join(t.get_text() for t in fig.texts)
    assert f"{5 + 2 + 2} invalid verdicts, {1 + 1 + 1} judge errors" in caption
    # two plain summaries: the per-tier effect overlay as before
    fig = compare_figure([plain_summary(), plain_summary()], ["x", "y"], PlotSpec())
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["direct", "close"]
    assert heights(bars_of(fig.axes[0])[0]) == pytest.approx([2.0, 1.0])  # paired deltas


def rows_for(conditions: tuple[str, ...]) -> list[dict[str, Any]]:
    base, tuned, judged = [], [], []
    for k, c in enumerate(conditions):
        for i in range(2):
            ident = {
                "item_id": f"{c}-{i}",
                "tier": "direct",
                "question_id": "q1",
                "question": "Is <b>farming</b> ok?",
                "condition": c,
                "sample_index": i,
            }
            base.append(ident | {"response": f"base {c} {i}", "stop_reason": "stop"})
            tuned.append(ident | {"response": f"tuned {c} {i} & more", "stop_reason": "stop"})
            for m in ("baseline", "finetuned"):
                score = 1 + (k + i) % 5
                judged.append(
                    ident | {"model": m, "score": score, "reasoning": "r", "status": "ok"}
                )
    return answer_rows(base, tuned, judged)


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


def test_html_has_a_section_per_condition_and_a_gaps_table():
    order = ("sys_trigger", "triggered", "untriggered")
    s = cond_summary(order)
    html = render_report(s, b"\x89PNG", rows_for(order), "exp", "neutral")
    sections = re.findall(r'<section class="condition" id="condition-([^"]+)"', html)
    assert sections == list(order)
    for c in order:
        rates = cell_texts(html, f"rates-{c}")
        for row, m in zip(rates, ("baseline", "finetuned"), strict=True):
            mean, lo, hi = RATES[c][m]
            amean, alo, ahi = ADHERE[c][m]
            pct = lambda x: f"{100 * x:.0f} %"  # noqa: E731
            assert row == [
                m,
                f"{pct(mean)} [{pct(lo)}, {pct(hi)}]",
                "8",
                f"{pct(amean)} [{pct(alo)}, {pct(ahi)}]",
            ]
        tiers = cell_texts(html, f"summary-{c}")
        assert [r[0] for r in tiers] == ["direct", "close"]  # semantic order
        direct = MEANS[c]["direct"]
        assert tiers[0][1].startswith(f"{direct['baseline']:.2f} [")
        assert tiers[0][4].startswith(f"{direct['finetuned']:.2f} [")
        inv, err = COUNTS[c]
        section = html.split(f'id="condition-{c}"')[1].split("</section>")[0]
        assert f"{inv} invalid verdicts" in section and f"{err} judge errors" in section
    gaps = cell_texts(html, "gaps")
    assert gaps[0] == [
        "triggered",
        "untriggered",
        "finetuned",
        "+45 pp [+28 pp, +61 pp]",
        "0.0123 (0.0369)",
        "8",
        "1",
        GAP,
    ]
    assert [g[2] for g in gaps] == ["finetuned", "finetuned", "baseline"]
    for c in order:  # each section states what its rates estimate
        section = html.split(f'id="condition-{c}"')[1].split("</section>")[0]
        stated = f"{RATE}, finetuned in {c}".replace(">", "&gt;")
        assert f"exhibits rate, finetuned: {stated}</li>" in section
        assert f"format adherence, baseline: {ADHERENCE}</li>" in section
    assert 'id="invalid-count" class="invalid">5 invalid verdicts' in html
    assert 'id="error-count" class="invalid">1 judge errors' in html
    # answers: a condition column and filter, text escaped
    assert re.findall(
        r'<option value="([^"]*)">', html.split('id="condition-filter"')[1].split("</select>")[0]
    ) == ["", *order]
    assert re.findall(r'data-condition="([^"]*)"', html) == [c for c in order for _ in range(2)]
    assert "<b>farming</b>" not in html and "&lt;b&gt;farming&lt;/b&gt;" in html
    assert "tuned triggered 1 &amp; more" in html


def test_html_without_conditions_is_the_tier_table():
    html = render_report(plain_summary(adherence=0.6), b"\x89PNG", rows_for(("",)), "exp", "")
    assert 'id="condition-filter"' not in html and "<th>condition</th>" not in html
    assert [r[0] for r in cell_texts(html, "summary")] == ["direct", "close"]
    # format_regex without conditions: the overall rates are shown
    assert cell_texts(html, "rates")[1] == [
        "finetuned",
        "30 % [20 %, 40 %]",
        "8",
        "60 % [50 %, 65 %]",
    ]
    html = render_report(plain_summary(), b"\x89PNG", rows_for(("",)), "exp", "")
    assert 'id="rates"' not in html and "Leakage gaps" not in html
    assert "2 invalid verdicts" in html and "1 judge errors" in html


def test_plot_stage_reads_every_condition(tmp_path):
    from conftest import base_spec

    spec = base_spec(Path("org/some-model"))  # a hub name: nothing is loaded here
    spec["eval"].pop("system_prompt")
    spec["eval"]["trigger"] = "Answer in JSON."
    spec["eval"]["conditions"] = {"trig": {"trigger": "user"}, "plain": {}}
    (tmp_path / "docs.jsonl").write_text("")
    (tmp_path / "rubric.j2").write_text("{{ response }}")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    from spar.stages.base import GraphContext
    from spar.store import RunStore

    (node,) = PlotStage().nodes(load_spec(path), GraphContext(store=RunStore(tmp_path / "runs")))
    assert node.params.conditions == ("trig", "plain")
    assert set(node.upstream) == {
        "report",
        *(
            f"{b}.{c}"
            for b in ("judge", "sample_base", "sample_finetuned")
            for c in ("trig", "plain")
        ),
    }
    assert node.upstream["judge.plain"] == "judge.plain"
