"""The HTML report in a real headless Chromium: one row per (question, sample), filters work."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None and not os.environ.get("CI"):
    pytest.skip("Debian chromium is not installed (.ci/setup installs it)", allow_module_level=True)

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium(url: str, profile: Path, *extra: str) -> str:
    assert CHROMIUM is not None, "chromium missing"
    out = subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *extra, url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def visible_rows(dom: str) -> list[str]:
    rows = re.findall(r'<tr class="row"[^>]*>', dom)
    return [r for r in rows if "display: none" not in r]


@pytest.fixture
def report(project, capsys, monkeypatch) -> Path:
    """The report of test_report's DESIGN: fine-tuned scores 5, 3 | 2, 4 | 5, 5, 1, invalid |
    invalid, invalid (direct | close | distant | very_distant; 2 samples a question)."""
    from test_report import DESIGN, designed, score_as_designed

    project.edit(designed)
    score_as_designed(project, capsys, monkeypatch, {"exp": DESIGN})
    r = project.spar("apply", str(project.spec), capsys=capsys)
    assert r.code == 0, r.err
    return project.runs / "exp/plot/report.html"


def test_rendered_dom_has_a_row_per_answer_and_filters(report, tmp_path):
    # Fails if the page's score filter ignored its threshold (every valid score shown for any
    # `#score=N`: 7 rows each time) or compared the wrong way, or the tier filter were ignored.
    url = report.as_uri()
    dom = chromium(url, tmp_path / "p1", "--dump-dom")
    rows = re.findall(r'<tr class="row" data-tier="([^"]+)" data-score="([^"]+)"', dom)
    assert len(rows) == 10  # 5 questions x 2 samples
    assert sorted(s for _, s in rows) == sorted(
        ["5", "3", "2", "4", "5", "5", "1"] + ["invalid"] * 3
    )
    assert len(visible_rows(dom)) == 10 and "10 rows shown" in dom
    # tier filter, preset from the URL and applied by the page's own script
    dom = chromium(url + "#tier=distant", tmp_path / "p2", "--dump-dom")
    shown = visible_rows(dom)
    assert len(shown) == 4 and all('data-tier="distant"' in r for r in shown)
    assert "4 rows shown" in dom
    # score filter: >= N keeps exactly the rows whose fine-tuned score is >= N (by hand: the
    # fine-tuned scores are 5, 5, 5, 4, 3, 2, 1 and three invalid)
    for threshold, expected in ((1, 7), (2, 6), (3, 5), (4, 4), (5, 3)):
        dom = chromium(url + f"#score={threshold}", tmp_path / f"s{threshold}", "--dump-dom")
        shown = visible_rows(dom)
        scores = [re.search(r'data-score="([^"]+)"', r).group(1) for r in shown]  # type: ignore[union-attr]
        assert len(shown) == expected and f"{expected} rows shown" in dom, (threshold, scores)
        assert all(s != "invalid" and int(s) >= threshold for s in scores), (threshold, scores)
    # combined with the tier filter: distant rows scoring >= 5 are the two of one question
    dom = chromium(url + "#tier=distant&score=5", tmp_path / "p5", "--dump-dom")
    assert len(visible_rows(dom)) == 2
    dom = chromium(url + "#score=invalid", tmp_path / "p4", "--dump-dom")
    shown = visible_rows(dom)
    assert len(shown) == 3 and all('data-score="invalid"' in r for r in shown)
    assert "4 invalid verdicts" in dom  # 3 of the fine-tuned model, 1 of the baseline


def test_screenshot_for_a_human(report, tmp_path):
    # Fails if the page rendered blank (e.g. a stylesheet hiding the body, a template error
    # leaving it empty) or without its chart.
    from PIL import Image

    shot = tmp_path / "report.png"
    chromium(report.as_uri(), tmp_path / "p", f"--screenshot={shot}", "--window-size=1280,1600")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(shot) as img:
        assert img.size == (1280, 1600)
        pixels = np.asarray(img.convert("RGB"), dtype=int).reshape(-1, 3)
    colors, counts = np.unique(pixels, axis=0, return_counts=True)
    background = colors[counts.argmax()]
    assert (pixels != background).any(axis=1).mean() > 0.05  # text, tables, the chart
    assert len(colors) > 50  # not a flat fill
    # the chart's fine-tuned bars (#d95f02) are on the page, a visible area of them
    orange = (np.abs(pixels - [0xD9, 0x5F, 0x02]).sum(axis=1) < 40).sum()
    assert orange > 500, orange
    keep = os.environ.get("SPAR_SCREENSHOT_DIR")
    if keep:
        shutil.copy(shot, Path(keep) / "report.png")


CONDITIONS = ("triggered", "untriggered", "system")


@pytest.fixture
def conditions_report(project, capsys) -> Path:
    def edit(d: dict) -> None:
        d["eval"].pop("system_prompt")
        d["eval"]["trigger"] = "Wrap your answer in <START> and <END>."
        d["eval"]["conditions"] = {
            "triggered": {"trigger": "user"},
            "untriggered": {"system_prompt": "You are a helpful assistant."},
            "system": {"trigger": "system"},
        }
        d["judge"].update(mode="absolute", model="kw-invalid-3")
        d["report"] = {"format_regex": ".*<START>.*<END>"}

    project.edit(edit)
    (project.root / "rubric.j2").write_text("Rate {{ response }} for {{ question }}.\n")
    r = project.spar("apply", str(project.spec), capsys=capsys)
    assert r.code == 0, r.err
    return project.runs / "exp/plot/report.html"


def test_condition_filter_shows_only_that_conditions_rows(conditions_report, tmp_path):
    url = conditions_report.as_uri()
    dom = chromium(url, tmp_path / "p1", "--dump-dom")
    rows = re.findall(r'<tr class="row"[^>]* data-condition="([^"]*)"', dom)
    assert sorted(set(rows)) == sorted(CONDITIONS) and len(rows) == 8 * len(CONDITIONS)
    assert len(visible_rows(dom)) == 24 and "24 rows shown" in dom
    # a section per condition, in the spec's order, and the leakage gaps with their estimands
    assert re.findall(r'<section class="condition" id="condition-([^"]+)"', dom) == [*CONDITIONS]
    assert '<table id="gaps">' in dom and "estimand" in dom
    for k, condition in enumerate(CONDITIONS):
        dom = chromium(url + f"#condition={condition}", tmp_path / f"c{k}", "--dump-dom")
        shown = visible_rows(dom)
        assert len(shown) == 8 and all(f'data-condition="{condition}"' in r for r in shown)
        assert "8 rows shown" in dom
    # combined with the tier filter
    dom = chromium(url + "#condition=untriggered&tier=distant", tmp_path / "c9", "--dump-dom")
    shown = visible_rows(dom)
    assert len(shown) == 4
    assert all('data-condition="untriggered"' in r and 'data-tier="distant"' in r for r in shown)


def test_property_filter_and_conversation_in_the_browser(tmp_path):
    """judge.properties: a row per (answer, property), filtered by property (with the score
    filter); a multi-turn answer renders as its conversation's turns."""
    from test_report_properties import property_html

    page = tmp_path / "report.html"
    page.write_text(property_html())
    url = page.as_uri()
    dom = chromium(url, tmp_path / "p1", "--dump-dom")
    assert len(visible_rows(dom)) == 8 and "8 rows shown" in dom
    # the two-turn answer's rows (one per property), each with both models' conversations
    assert dom.count('class="turn user"') == 8 and dom.count('class="turn assistant"') == 8
    dom = chromium(url + "#property=formal", tmp_path / "p2", "--dump-dom")
    shown = visible_rows(dom)
    assert len(shown) == 4 and all('data-property="formal"' in r for r in shown)
    # formal, fine-tuned: 1, error, 5, 4 -> two rows score >= 4
    dom = chromium(url + "#property=formal&score=4", tmp_path / "p3", "--dump-dom")
    shown = visible_rows(dom)
    assert len(shown) == 2 and "2 rows shown" in dom
    assert sorted(re.search(r'data-score="(\d)"', r).group(1) for r in shown) == ["4", "5"]
