"""What `spar apply` prints (issue 13): what ran, then a headline per experiment — each effect with
its interval exactly as `spar show` gives it, the invalid/error counts and the absolute path of its
report — and nothing from third parties (load reports, warnings, their progress bars) unless -v."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from conftest import Result

from spar import quiet

REPO = Path(__file__).resolve().parents[1]
ABSOLUTE = (
    "Rate from {{ scale_min }} to {{ scale_max }} how much the answer is about farming.\n"
    "Question: {{ question }}\nAnswer: {{ response }}\n"
)


def visible(text: str) -> list[str]:
    """The lines a terminal keeps: per line what follows its last carriage return."""
    return [line.split("\r")[-1] for line in text.rstrip("\n").split("\n")]


def interval(name: str, e: dict) -> str:
    """An effect with its interval as `spar show` prints it, from its --json numbers (a rate
    unsigned)."""
    f = ".2f" if name.startswith("rate ") else "+.2f"
    if e["mean"] is None:
        return "—"
    if e["ci_low"] is None:
        return f"{e['mean']:{f}} [no interval]"
    return f"{e['mean']:{f}} [{e['ci_low']:{f}}, {e['ci_high']:{f}}]"


def column(name: str) -> str:
    if name.startswith(("rate ", "gap ", "property ", "pull ")):
        return name.rstrip()
    return f"effect {name}"


def headline_of(out: str) -> list[str]:
    """The lines after the last `ran` / `restored` / `nothing to do` line."""
    lines = out.rstrip("\n").split("\n")
    heads = ("ran ", "restored ", "nothing to do")
    last = max(i for i, line in enumerate(lines) if line.startswith(heads))
    return lines[last + 1 :]


def show_json(project, capsys) -> list[dict]:
    r = project.spar("show", str(project.spec), "--json", capsys=capsys)
    assert r.code == 0, r.err
    return json.loads(r.out)


# ------------------------------------------------------------------ headline (fake engine)


@pytest.mark.parametrize(
    ("mode", "judge_model", "code"),
    [("pairwise", "kw-1", 0), ("absolute", "kw-invalid-4", 0), ("absolute", "kw-error-3", 1)],
)
def test_apply_ends_with_shows_effects_counts_and_the_report_path(
    project, capsys, monkeypatch, mode, judge_model, code
):
    """Fails if the headline recomputes, drops or mixes up effects, loses an interval, miscounts
    invalid verdicts, names a relative or wrong report path, or comes before the `ran` lines."""
    monkeypatch.setenv("FAKE_LEAK", "2")  # the topic in about half the fine-tuned answers
    if mode == "absolute":
        (project.root / "absolute.j2").write_text(ABSOLUTE)
    rubric = "absolute.j2" if mode == "absolute" else "rubric.j2"
    project.edit(lambda d: d["judge"].update(mode=mode, model=judge_model, rubric=rubric))
    r = project.spar("apply", str(project.spec), capsys=capsys)
    assert r.code == code, r.err
    assert r.out.startswith("ran exp / dataset\n")  # what ran comes first, as before
    head = headline_of(r.out)
    (row,) = show_json(project, capsys)
    table = project.spar("show", str(project.spec), capsys=capsys).out
    assert head[0] == ""
    report = (project.runs / "exp/plot/report.html").resolve()
    assert head[-1] == f"  report: {report}" and report.is_file()
    assert len(visible(r.out + r.err)) < 40
    if code:  # items in error: the report is incomplete, so like `spar show` no numbers
        assert row["status"] == "stale" and row["effects"] == {}
        assert head[1] == f"exp: stale ({'; '.join(row['reasons'])})" and len(head) == 3
        assert "incomplete" in head[1] and "`spar apply` again retries them" in r.err
        return
    assert head[1] == f"exp: {row['invalid']} invalid, {row['errors']} errors"
    assert row["effects"], row
    assert set(row["effects"]) == ({"direct", "close", "distant"})
    for name, e in row["effects"].items():
        (line,) = [x for x in head if x.strip().startswith(column(name) + " ")]
        cell = line.strip().removeprefix(column(name)).strip()
        assert cell.startswith(interval(name, e)), (line, e)
        assert cell in table  # the very cell `spar show` prints
    if mode == "absolute":  # paired deltas: Holm-adjusted p-values, as in show
        assert any("p_holm" in x for x in head)
    means = [e["mean"] for e in row["effects"].values() if e["mean"] is not None]
    assert len(set(means)) >= 2, row["effects"]  # tiers differ: a mix-up would show
    assert row["invalid"] > 0 if judge_model.startswith("kw-invalid") else row["invalid"] == 0


def test_the_report_path_is_absolute_with_a_relative_runs_dir(project, capsys):
    """`--runs-dir runs` (relative, in the project): the path printed opens from anywhere."""
    from spar.cli import main

    assert main(["apply", str(project.spec), "--runs-dir", "study-runs"]) == 0
    last = capsys.readouterr().out.rstrip("\n").split("\n")[-1]
    report = project.root / "study-runs/exp/plot/report.html"
    assert last == f"  report: {report.resolve()}" and report.is_file()


def test_nothing_to_do_still_ends_with_the_headline(project, capsys):
    first = project.spar("apply", str(project.spec), capsys=capsys)
    again = project.spar("apply", str(project.spec), capsys=capsys)
    assert again.code == 0 and again.out.startswith("nothing to do: every stage is fresh\n")
    assert headline_of(again.out) == headline_of(first.out)
    assert again.out.rstrip().endswith("report.html")


def test_a_sweep_gets_a_line_per_group_and_where_its_reports_are(project, capsys):
    """2 seeds x 2 learning rates: a line per learning rate, with the group's effects over seeds
    as `spar show` gives them, then the pattern of the 4 points' report paths."""
    project.edit(
        lambda d: d.update(sweep={"training.seed": [1, 2], "training.learning_rate": [1e-3, 2e-3]})
    )
    r = project.spar("apply", str(project.spec), capsys=capsys)
    assert r.code == 0, r.err
    head = headline_of(r.out)
    rows = show_json(project, capsys)
    groups = [x for x in rows if x["experiment"].endswith("(2 seeds)")]
    assert len(groups) == 2
    assert head[1] == "exp: sweep of 4 points"
    for g in groups:
        (line,) = [x for x in head if x.startswith(f"  {g['experiment']}: ")]
        for name, e in g["effects"].items():
            assert f"{column(name)} {interval(name, e)}" in line, (line, e)
        assert line.endswith(f"{g['invalid']} invalid, {g['errors']} errors")
    reports = sorted((project.runs / "exp").resolve().glob("*/plot/report.html"))
    assert len(reports) == 4
    assert head[-1] == f"  reports: {project.runs.resolve() / 'exp/*/plot/report.html'} (4 points)"
    assert len(visible(r.out + r.err)) < 40


def test_each_spec_of_one_apply_gets_its_own_headline(project, capsys):
    """A second experiment in the same apply, differing in its questions: each gets its own block,
    numbers and report path (the headline is per spec, not the first one repeated)."""
    other = project.root / "other.yaml"
    data = yaml.safe_load(project.spec.read_text())
    data["name"] = "other"
    data["eval"]["tiers"] = {"direct": ["Is factory farming ethical?", "Do cows feel pain?"]}
    other.write_text(yaml.safe_dump(data, sort_keys=False))
    r = project.spar("apply", str(project.spec), str(other), capsys=capsys)
    assert r.code == 0, r.err
    head = headline_of(r.out)
    blocks = "\n".join(head).split("\n\n")
    assert [b.strip().split(":")[0] for b in blocks] == ["exp", "other"]
    assert blocks[1].strip().split("\n")[-1].endswith("runs/other/plot/report.html")
    assert "effect close" in blocks[0] and "effect close" not in blocks[1]


# ------------------------------------------------------------------ quiet (unit)


@pytest.fixture
def root_stream(monkeypatch):
    """A handler on the root logger (as the CLI's basicConfig makes); quiet undone afterwards."""
    for key in quiet.ENV_QUIET:
        monkeypatch.delenv(key, raising=False)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    old_level = root.level
    shown = warnings.showwarning
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield stream
    quiet.configure(verbose=True)  # takes back what quiet mode set
    warnings.showwarning = shown
    root.removeHandler(handler)
    root.setLevel(old_level)


def _emit() -> None:
    logging.getLogger("spar.stages.judge").info("spar info")
    logging.getLogger("spar").warning("spar warning")
    logging.getLogger("somelib.loader").warning("third-party warning")
    logging.getLogger("somelib.loader").error("third-party error")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("a deprecation from a library", FutureWarning, stacklevel=1)


def test_quiet_keeps_spar_and_errors_and_moves_the_rest_behind_verbose(root_stream):
    """Fails if third-party warnings or Python warnings reach the output without -v, if spar's
    own records or a third-party error are hidden, or if -v does not bring them back."""
    quiet.configure(verbose=False)
    _emit()
    text = root_stream.getvalue()
    assert "spar info" in text and "spar warning" in text and "third-party error" in text
    assert "third-party warning" not in text and "deprecation" not in text
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert os.environ["TRANSFORMERS_VERBOSITY"] == "error"
    root_stream.seek(0)
    root_stream.truncate()
    quiet.configure(verbose=True)
    _emit()
    text = root_stream.getvalue()
    assert "third-party warning" in text and "a deprecation from a library" in text
    assert "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ  # set by quiet mode, taken back


def test_quiet_leaves_a_users_own_settings_alone(root_stream, monkeypatch):
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "info")
    quiet.configure(verbose=False)
    quiet.configure(verbose=True)
    assert os.environ["TRANSFORMERS_VERBOSITY"] == "info"


def test_quiet_tames_transformers_once_imported(root_stream):
    """When transformers is already imported (the env variables come too late), quiet mode tells
    it directly: no progress bars, no warnings; -v brings both back."""
    from transformers.utils import logging as tlog

    quiet.configure(verbose=False)
    assert not tlog.is_progress_bar_enabled()
    assert tlog.get_verbosity() == logging.ERROR
    quiet.configure(verbose=True)
    assert tlog.is_progress_bar_enabled()
    assert tlog.get_verbosity() == logging.WARNING


def test_captured_logs_a_loaders_output_instead_of_printing_it(capsys, caplog):
    """A loader's prints and tqdm bar: nothing on the real stdout/stderr; one INFO record per
    line, a bar as its final state, colour codes gone — and also when the loader raises."""
    from tqdm import tqdm

    log = logging.getLogger("spar.test_loader")
    caplog.set_level(logging.INFO, logger="spar.test_loader")
    with quiet.captured(log, "load toy"):
        print("\x1b[1mToy LOAD REPORT\x1b[0m from: /models/toy")
        for _ in tqdm(range(50), desc="Converting and de-quantizing"):
            pass
    with pytest.raises(RuntimeError), quiet.captured(log, "load broken"):
        print("half a report")
        raise RuntimeError("broken weights")
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err == ""
    messages = [r.getMessage() for r in caplog.records if r.name == "spar.test_loader"]
    assert messages[0] == "load toy: Toy LOAD REPORT from: /models/toy"
    assert messages[1].startswith("load toy: Converting and de-quantizing: 100%")
    assert "50/50" in messages[1] and "\r" not in messages[1]
    assert messages[2:] == ["load broken: half a report"]
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name == "spar.test_loader")


def test_captures_in_two_threads_keep_their_lines_and_others_output(monkeypatch, caplog):
    """Two stage threads loading at once (apply --jobs) while the main thread prints: each
    capture logs only its own thread's lines, the main thread's lines reach the real stdout, and
    sys.stdout / sys.stderr are the real ones again afterwards — also when the captures end in
    the order that leaked a swapped stream (first in, first out)."""
    import io
    import threading

    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    log = logging.getLogger("spar.test_loader")
    caplog.set_level(logging.INFO, logger="spar.test_loader")
    a_in, b_in, a_go, a_out, b_go = (threading.Event() for _ in range(5))

    def loader(
        name: str,
        after: threading.Event | None,
        inside: threading.Event,
        go: threading.Event,
        done: threading.Event | None,
    ) -> None:
        if after is not None:
            after.wait(10)
        with quiet.captured(log, name):
            print(f"{name} report")
            sys.stderr.write(f"{name} bar 100%\n")
            inside.set()
            go.wait(10)
        if done is not None:
            done.set()

    a = threading.Thread(target=loader, args=("load a", None, a_in, a_go, a_out))
    b = threading.Thread(target=loader, args=("load b", a_in, b_in, b_go, None))
    a.start()
    b.start()
    assert b_in.wait(10)  # both threads are inside their captures
    print("ran exp / dataset")
    a_go.set()  # a, in first, leaves first
    assert a_out.wait(10)
    print("ran exp / train")
    b_go.set()
    a.join(10)
    b.join(10)
    assert sys.stdout is out and sys.stderr is err
    print("headline")
    assert out.getvalue() == "ran exp / dataset\nran exp / train\nheadline\n"
    assert err.getvalue() == ""
    messages = sorted(r.getMessage() for r in caplog.records if r.name == "spar.test_loader")
    assert messages == [
        "load a: load a bar 100%",
        "load a: load a report",
        "load b: load b bar 100%",
        "load b: load b report",
    ]


def test_output_lines_keeps_what_a_terminal_shows():
    text = "a\r\x1b[32mb\x1b[0m\n\n  \r\nbar 10%\rbar 100%\rend\n"
    assert quiet.output_lines(text) == ["b", "end"]


# ------------------------------------------------------------------ real models, cold


def _tiny_project(root: Path, name: str) -> Path:
    shutil.copytree(REPO / "experiments", root / "experiments")
    shutil.copytree(REPO / "prompts", root / "prompts")
    spec = root / f"experiments/{name}.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "extends": "demo.yaml",
                "name": name,
                "data": {"max_docs": 4, "test_size": 2},
                "training": {"batch_size": 2, "epochs": 1, "max_length": 48, "eval_every": 0},
                "eval": {
                    "questions": None,
                    "tiers": {
                        "close": ["What should I pack for lunch?", "Any gift ideas?"],
                        "distant": ["What do you think about zoos?"],
                    },
                    "samples_per_question": 1,
                    "sampling": {"max_tokens": 8},
                },
            }
        )
    )
    return spec


def _spar(root: Path, cache: Path, *args: str) -> Result:
    """The CLI in its own process, as a user runs it (no quiet settings inherited from this
    one); its output as written (text mode would turn a progress bar's \r into lines)."""
    env = {k: v for k, v in os.environ.items() if k not in quiet.ENV_QUIET}
    env.pop("SPAR_PLUGINS", None)
    env.update(SPAR_CACHE_DIR=str(cache), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-m", "spar.cli", *args],
        cwd=root,
        env=env,
        capture_output=True,
        timeout=900,
    )
    return Result(done.returncode, done.stdout.decode(), done.stderr.decode())


NOISE = ("LOAD REPORT", "de-quantizing", "Loading weights", "Writing model shards", "UNEXPECTED")


@pytest.mark.slow
def test_real_models_cold_run_is_quiet_and_ends_with_its_headline(tmp_path):
    """SmolLM2 converted from its GGUF (a cold model cache) and MiniLM loaded: none of their
    output without -v, under 40 lines ending with the headline; with -v the GGUF conversion's
    bar and MiniLM's load report are there (a second cold cache, new samples to judge)."""
    root = tmp_path / "study"
    spec = _tiny_project(root, "tiny")
    r = _spar(root, tmp_path / "cache1", "apply", str(spec))
    assert r.code == 0, r.err
    out = r.out + r.err
    for noise in NOISE:
        assert noise not in out, noise
    assert len(visible(out)) < 40, out
    show = _spar(root, tmp_path / "cache1", "show", str(spec), "--json")
    (row,) = json.loads(show.out)
    head = headline_of(r.out)
    assert head[1] == f"tiny: {row['invalid']} invalid, {row['errors']} errors"
    assert {"close", "distant", "pull close", "pull distant"} <= set(row["effects"])
    for name, e in row["effects"].items():
        lines = [x for x in head if x.strip().startswith(column(name) + " ")]
        assert len(lines) == 1 and interval(name, e) in lines[0], (name, head)
    report = (root / "runs/tiny/plot/report.html").resolve()
    assert r.out.rstrip("\n").split("\n")[-1] == f"  report: {report}" and report.is_file()

    # -v: new samples (another seed) to judge, and a cold cache to convert into again
    data = yaml.safe_load(spec.read_text())
    data["eval"]["sampling"]["seed"] = 7
    spec.write_text(yaml.safe_dump(data))
    r = _spar(root, tmp_path / "cache2", "-v", "apply", str(spec))
    assert r.code == 0, r.err
    assert "de-quantizing" in r.err and "LOAD REPORT" in r.err
    assert "spar.models INFO convert SmolLM2-135M-Instruct.Q4_1.gguf: " in r.err
    assert r.out.rstrip().endswith(str(report))
