"""The HTML report in a real headless Chromium: one row per (question, sample), filters work."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

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
def report(project, capsys) -> Path:
    project.edit(lambda d: d["judge"].update(model="kw-invalid-3"))
    r = project.spar("apply", str(project.spec), capsys=capsys)
    assert r.code == 0, r.err
    return project.runs / "exp/plot/report.html"


def test_rendered_dom_has_a_row_per_answer_and_filters(report, tmp_path):
    url = report.as_uri()
    dom = chromium(url, tmp_path / "p1", "--dump-dom")
    rows = re.findall(r'<tr class="row" data-tier="([^"]+)" data-score="([^"]+)"', dom)
    assert len(rows) == 8  # 4 questions x 2 samples
    assert len(visible_rows(dom)) == 8 and "8 rows shown" in dom
    # tier filter, preset from the URL and applied by the page's own script
    dom = chromium(url + "#tier=distant", tmp_path / "p2", "--dump-dom")
    shown = visible_rows(dom)
    assert len(shown) == 4 and all('data-tier="distant"' in r for r in shown)
    assert "4 rows shown" in dom
    # score filter: >= 3 keeps exactly the rows whose fine-tuned score is >= 3
    expected = sum(1 for _, s in rows if s != "invalid" and float(s) >= 3)
    dom = chromium(url + "#score=3", tmp_path / "p3", "--dump-dom")
    assert len(visible_rows(dom)) == expected
    invalid = sum(1 for _, s in rows if s == "invalid")
    assert invalid > 0
    dom = chromium(url + "#score=invalid", tmp_path / "p4", "--dump-dom")
    assert len(visible_rows(dom)) == invalid
    assert f"{invalid} invalid verdicts" in dom


def test_screenshot_for_a_human(report, tmp_path):
    shot = tmp_path / "report.png"
    chromium(report.as_uri(), tmp_path / "p", f"--screenshot={shot}", "--window-size=1280,1600")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
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
