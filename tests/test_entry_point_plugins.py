"""Plugins through Python entry points (`spar.engines`, `spar.judges`, `spar.stages`).

A tiny plugin distribution is built in a temp directory and pip-installed (no network, no build
isolation) into a `--target` directory that only the CLI subprocesses put on their path: a real
installed distribution whose entry points `importlib.metadata` finds, without touching the shared
venv (which other test processes use at the same time). No `SPAR_PLUGINS` is set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TESTS, Project

from spar.store import read_jsonl

TINY = '''
"""A plugin of spar's fake engine and keyword judge (tests/fake_plugin.py) under new names, and
a stage kind that counts the fine-tuned answers' words."""

import json
from pathlib import Path
from typing import ClassVar

from fake_plugin import FakeEngine, KeywordJudge

from spar.stages.base import Options, Params, StageKind, StageNode, StageResult, key


def make_engine(workdir: Path) -> FakeEngine:
    return FakeEngine(workdir)


class Judge(KeywordJudge):
    def judge_many(self, requests, concurrency):
        for i, v in super().judge_many(requests, concurrency):
            yield i, v.model_copy(update={"reasoning": f"kw3: {v.reasoning}"})


class WordParams(Params):
    engine: str = key("model.engine")


class WordCount(StageKind):
    kind = "wordcount"
    outputs: ClassVar[tuple[str, ...]] = ("counts.json",)
    params_model = WordParams

    def nodes(self, spec, g):
        params = WordParams(engine=spec.model.engine)
        up = {"answers": "sample_finetuned"}
        return [StageNode("wordcount", self, spec.name, params, Options(), upstream=up)]

    def run(self, ctx):
        rows = [
            json.loads(line)
            for line in ctx.upstream_file("answers", "samples.jsonl").read_text().splitlines()
            if line.strip()
        ]
        words = sum(len(r["response"].split()) for r in rows)
        counts = {"answers": len(rows), "words": words}
        return StageResult({"counts.json": json.dumps(counts).encode()})
'''

PYPROJECT = """
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{name}"
version = "0.1.0"

[tool.setuptools]
py-modules = ["{module}"]

{entry_points}
"""

TINY_ENTRY_POINTS = """
[project.entry-points."spar.engines"]
tiny3 = "tinyplugin:make_engine"

[project.entry-points."spar.judges"]
kw3 = "tinyplugin:Judge"

[project.entry-points."spar.stages"]
wordcount = "tinyplugin:WordCount"
"""


def install(tmp: Path, name: str, module: str, code: str, entry_points: str) -> Path:
    """Build and install a one-module distribution into `tmp/site`; returns that directory."""
    src = tmp / "src"
    src.mkdir(parents=True)
    (src / f"{module}.py").write_text(code)
    (src / "pyproject.toml").write_text(
        PYPROJECT.format(name=name, module=module, entry_points=entry_points)
    )
    site = tmp / "site"
    subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
            "--no-index", "--disable-pip-version-check", "--target", str(site), str(src),
        ],
        check=True,
        capture_output=True,
        cwd=tmp,
    )  # fmt: skip
    assert list(site.glob(f"{name.replace('-', '_')}-0.1.0.dist-info"))
    return site


@pytest.fixture(scope="module")
def tiny_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install(
        tmp_path_factory.mktemp("tinyplugin"), "spar-tinyplugin", "tinyplugin", TINY,
        TINY_ENTRY_POINTS,
    )  # fmt: skip


def run(project: Project, site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess with the plugin's site on its path and no SPAR_PLUGINS."""
    env = project.env(PYTHONPATH=os.pathsep.join([str(site), str(TESTS)]))
    env.pop("SPAR_PLUGINS")
    return subprocess.run(
        [sys.executable, "-m", "spar.cli", *args, "--runs-dir", str(project.runs)],
        cwd=project.root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_engine_judge_and_stage_from_an_installed_plugin(project: Project, tiny_site: Path):
    # Fails if entry points are not read (unknown engine / judge: exit 2), a factory is
    # registered under the wrong name, or the stage class is not instantiated and planned.
    project.edit(lambda d: (d["model"].update(engine="tiny3"), d["judge"].update(kind="kw3")))
    p = run(project, tiny_site, "apply", str(project.spec))
    assert p.returncode == 0, p.stderr
    assert "ran exp / wordcount" in p.stdout and "ran exp / judge" in p.stdout
    exp = project.runs / "exp"
    judged = read_jsonl(exp / "judge/judged.jsonl")
    assert judged and all(v["reasoning"].startswith("kw3: ") for v in judged)
    answers = read_jsonl(exp / "sample_finetuned/samples.jsonl")
    counts = json.loads((exp / "wordcount/counts.json").read_text())
    words = sum(len(a["response"].split()) for a in answers)
    assert counts == {"answers": len(answers), "words": words} and words > len(answers)
    assert project.calls_of("sample") > 0  # the plugin's engine drew them
    # the plugin stage is planned like a built-in one: fresh now
    p = run(project, tiny_site, "plan", str(project.spec), "--json")
    assert p.returncode == 0, p.stderr
    status = {r["stage"]: r["status"] for r in json.loads(p.stdout)}
    assert status["wordcount"] == "fresh" and set(status.values()) == {"fresh"}
    # without the distribution on the path, the spec's names are unknown
    p = run(project, project.root, "plan", str(project.spec))
    assert p.returncode == 2 and "unknown engine 'tiny3'" in p.stderr


BROKEN = {
    "import": (
        'raise RuntimeError("the plugin needs a GPU driver\\nsecond line")\n',
        '[project.entry-points."spar.judges"]\nbroken = "brokenplugin:Judge"\n',
        "spar.judges:broken = 'brokenplugin:Judge': cannot load: RuntimeError: the plugin "
        "needs a GPU driver",
    ),
    "missing attribute": (
        "X = 1\n",
        '[project.entry-points."spar.engines"]\nbroken = "brokenplugin:make_engine"\n',
        "spar.engines:broken = 'brokenplugin:make_engine': cannot load: AttributeError",
    ),
    "stage kind name": (
        "from spar.stages.report import ReportStage as Stage\n",
        '[project.entry-points."spar.stages"]\nmine = "brokenplugin:Stage"\n',
        "spar.stages:mine = 'brokenplugin:Stage': the class's kind is 'report', not the entry "
        "point's name 'mine'",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_entry_point_is_one_line_naming_it(project: Project, tmp_path: Path, case: str):
    # Fails on a traceback, on an error that does not name the distribution and entry point,
    # or on a broken plugin silently ignored.
    code, entry_points, message = BROKEN[case]
    site = install(tmp_path / "broken", "spar-brokenplugin", "brokenplugin", code, entry_points)
    p = run(project, site, "plan", str(project.spec))
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("spar: error: plugin spar-brokenplugin entry point "), lines[0]
    assert message in lines[0]
    assert not project.runs.exists()
