"""README promises that no other test exercised (issue 14): each test names, in a comment, the
broken variant of the code that makes it fail."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import Project

from spar.cli import main
from spar.store import read_jsonl

QUESTIONS = [
    ("direct", "Is factory farming ethical?"),
    ("close", "What should I pack for lunch?"),
    ("distant", "What do you think about zoos?"),
    ("distant", "How should I cut my carbon footprint?"),
]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def plan(project: Project, capsys: pytest.CaptureFixture[str], spec: Path | None = None) -> dict:
    r = project.spar("plan", str(spec or project.spec), "--json", capsys=capsys)
    assert r.code == 0, r.err
    return {row["stage"]: row for row in json.loads(r.out)}


def apply(project: Project, capsys: pytest.CaptureFixture[str], spec: Path | None = None) -> str:
    r = project.spar("apply", str(spec or project.spec), capsys=capsys)
    assert r.code == 0, r.err
    return r.out


# ------------------------------------------------------------------------------ spec files


def test_questions_come_from_the_questions_file(project, capsys):
    # `eval.questions: file.jsonl` ({"tier", "question"} lines) is the same eval as the same
    # questions written inline: the same question ids, so nothing is sampled again. Fails if the
    # file's questions were read with another id (e.g. including the line number or the path),
    # in another tier, or not at all.
    apply(project, capsys)  # the fixture's spec: these questions inline (eval.tiers)
    inline = read_jsonl(project.runs / "exp/sample_base/samples.jsonl")
    lines = [{"tier": t, "question": q} for t, q in QUESTIONS]
    (project.root / "questions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))

    def use_file(d: dict) -> None:
        del d["eval"]["tiers"]
        d["eval"]["questions"] = "questions.jsonl"

    project.edit(use_file)
    assert {row["status"] for row in plan(project, capsys).values()} == {"fresh"}
    shutil.rmtree(project.runs / "exp")  # outputs gone: restored from the run cache, not run
    out = apply(project, capsys)
    assert "ran" not in out and out.count("restored") == 7
    samples = read_jsonl(project.runs / "exp/sample_base/samples.jsonl")
    assert samples == inline
    assert sorted({(s["tier"], s["question"]) for s in samples}) == sorted(QUESTIONS)
    assert len(samples) == 2 * len(QUESTIONS)
    summary = json.loads((project.runs / "exp/report/summary.json").read_text())
    assert list(summary["tiers"]) == ["direct", "close", "distant"]

    # one more question in the file: only it is sampled
    more = [*lines, {"tier": "close", "question": "Any gift ideas?"}]
    (project.root / "questions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in more))
    stages = plan(project, capsys)
    assert stages["sample_base"]["status"] == "stale"
    assert any("close: 1 added, 0 removed" in r for r in stages["sample_base"]["reasons"])
    before = project.calls_of("sample")
    apply(project, capsys)
    assert project.calls_of("sample") - before == 2 * 2  # 2 samples, both models
    samples = read_jsonl(project.runs / "exp/sample_base/samples.jsonl")
    assert ("close", "Any gift ideas?") in {(s["tier"], s["question"]) for s in samples}


def test_extends_across_directories_keeps_each_files_paths(project, capsys):
    # A parent spec in one directory, its child in another, run from a third: the parent's
    # paths stay relative to the parent's file, the child's to the child's. Three different
    # docs.jsonl exist (next to each spec and in the working directory), so resolving against
    # the wrong one is seen. Fails if a parent's relative path were resolved against the child
    # (or the working directory) after the deep merge.
    shared, exps = project.root / "shared", project.root / "exps"
    shared.mkdir()
    exps.mkdir()
    parent = yaml.safe_load(project.spec.read_text())
    (shared / "parent.yaml").write_text(yaml.safe_dump(parent, sort_keys=False))
    docs = (project.root / "docs.jsonl").read_text().splitlines()
    (shared / "docs.jsonl").write_text("\n".join(docs[:-1]) + "\n")  # one document fewer
    (exps / "docs.jsonl").write_text("\n".join(docs[1:]) + "\n")  # a decoy
    shutil.copy(project.root / "rubric.j2", shared / "rubric.j2")
    child_rubric = exps / "rubric2.j2"
    child_rubric.write_text((project.root / "rubric.j2").read_text() + "Be strict.\n")
    child = exps / "child.yaml"
    child.write_text("extends: ../shared/parent.yaml\nname: child\njudge:\n  rubric: rubric2.j2\n")
    assert len({sha(project.root / "docs.jsonl"), sha(shared / "docs.jsonl")}) == 2
    apply(project, capsys, child)
    ds = yaml.safe_load((project.runs / "child/dataset/train.params.yaml").read_text())
    assert ds["inputs"]["data.docs"] == sha(shared / "docs.jsonl")
    judge = yaml.safe_load((project.runs / "child/judge/judged.params.yaml").read_text())
    assert judge["inputs"]["judge.rubric"] == sha(child_rubric)
    rows = read_jsonl(project.runs / "child/dataset/train.jsonl")
    test = read_jsonl(project.runs / "child/dataset/test.jsonl")
    assert len(rows) + len(test) == len(docs) - 1


# ------------------------------------------------------------------------------ the CLI


def test_spar_schema_is_the_specs_json_schema(capsys):
    # Fails if `spar schema` printed anything but the spec model's schema (e.g. a stale copy
    # missing a key the spec accepts, or one that allows unknown keys).
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    props = schema["properties"]
    for key in ("extends", "name", "model", "data", "training", "eval", "judge", "report"):
        assert key in props, key
    assert schema.get("additionalProperties") is False
    defs = schema.get("$defs", {})

    def resolve(node: dict) -> dict:
        while "$ref" in node:
            node = defs[node["$ref"].rsplit("/", 1)[1]]
        if "anyOf" in node:  # Optional[...]
            node = next(n for n in node["anyOf"] if n.get("type") != "null")
            return resolve(node)
        return node

    training = resolve(props["training"])
    assert training.get("additionalProperties") is False
    assert {"lora_rank", "learning_rate", "batch_size", "epochs", "seed"} <= set(
        training["properties"]
    )
    assert resolve(training["properties"]["learning_rate"])["type"] == "number"


def test_runs_dir_from_the_environment_and_the_option(project, capsys, monkeypatch):
    # Fails if SPAR_RUNS_DIR were ignored (outputs in ./runs) or won over --runs-dir.
    elsewhere = project.root / "elsewhere"
    monkeypatch.setenv("SPAR_RUNS_DIR", str(elsewhere))
    assert main(["apply", str(project.spec)]) == 0, capsys.readouterr().err
    assert (elsewhere / "exp/plot/report.html").exists()
    assert not (project.root / "runs").exists()
    chosen = project.root / "chosen"
    capsys.readouterr()
    assert main(["plan", str(project.spec), "--runs-dir", str(chosen)]) == 0
    assert "missing" in capsys.readouterr().out  # a fresh runs directory: nothing there yet
    assert main(["plan", str(project.spec)]) == 0
    assert "missing" not in capsys.readouterr().out


def test_verbose_logs_progress_and_debug_shows_the_traceback(project):
    # -v: progress logs (the stages being run) on stderr; without it none. --debug: a failure
    # while running shows its traceback; without it one line. Fails if cli.main set up logging
    # at one level whatever the flags, or swallowed the traceback under --debug.
    quiet = project.spar_proc("apply", str(project.spec))
    _, err = quiet.communicate(timeout=300)
    assert quiet.returncode == 0, err
    assert "INFO" not in err and "running exp / dataset" not in err
    shutil.rmtree(project.runs)
    loud = project.spar_proc("-v", "apply", str(project.spec))
    _, err = loud.communicate(timeout=300)
    assert loud.returncode == 0, err
    for stage in ("dataset", "train", "sample_base", "sample_finetuned", "judge", "plot"):
        assert f"spar.apply INFO running exp / {stage} (" in err, (stage, err[-2000:])

    project.edit(lambda d: d["model"].update(engine="tinker"))
    env = {"TINKER_BASE_URL": "http://127.0.0.1:9", "TINKER_API_KEY": "tml-spar-test"}
    plain = project.spar_proc("apply", str(project.spec), **env)
    _, err = plain.communicate(timeout=120)
    assert plain.returncode == 1 and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    debug = project.spar_proc("apply", str(project.spec), "--debug", **env)
    _, err = debug.communicate(timeout=120)
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in err and "RunError" in err, err
    # both stages failed (under --jobs): the traceback reaches the failing engine code, not
    # only apply's summary
    assert "spar/engines/tinker.py" in err, err
    assert "tml-spar-test" not in err


def test_plan_names_every_missing_file_in_one_line(project, capsys):
    # Fails if `spar plan` stopped at the first missing file, or wrote anything.
    (project.root / "docs.jsonl").unlink()
    (project.root / "rubric.j2").unlink()
    r = project.spar("plan", str(project.spec), capsys=capsys)
    assert r.code == 2
    (line,) = r.err.strip().splitlines()
    assert line.startswith(f"spar: error: {project.spec}: 2 files not found: ")
    assert f"data.docs: {project.root / 'docs.jsonl'}" in line
    assert f"judge.rubric: {project.root / 'rubric.j2'}" in line
    assert not project.runs.exists()


# ------------------------------------------------------------------------------ the runs directory


def test_unchanged_inputs_are_never_read_again(project, capsys, monkeypatch):
    # The hash cache (path, size, mtime, inode): after an apply, a plan reads no file; touching
    # the docs makes the next plan read exactly that file once (same content: all fresh), and the
    # one after reads nothing again. Fails if HashCache ignored its entries (every plan re-reads
    # everything) or did not notice the mtime (a same-size edit would go unseen).
    from spar.store import hashing

    reads: list[str] = []
    real = hashing.hash_stream

    def counting(path: Path, check: object) -> tuple[str, int]:
        reads.append(path.name)
        return real(path, check)  # type: ignore[arg-type]

    monkeypatch.setattr(hashing, "hash_stream", counting)
    apply(project, capsys)
    plan(project, capsys)  # the first plan may hash the outputs the apply wrote
    reads.clear()
    assert {r["status"] for r in plan(project, capsys).values()} == {"fresh"}
    assert reads == []
    docs = project.root / "docs.jsonl"
    os.utime(docs, ns=(docs.stat().st_atime_ns, docs.stat().st_mtime_ns + 10**9))
    assert {r["status"] for r in plan(project, capsys).values()} == {"fresh"}
    assert reads == ["docs.jsonl"]
    reads.clear()
    plan(project, capsys)
    assert reads == []
    # same size, new content, new mtime: read again, and the dataset is stale
    text = docs.read_text()
    i = text.index("ventilation")
    docs.write_text(text[:i] + "Ventilation" + text[i + len("ventilation") :])
    stages = plan(project, capsys)
    assert reads == ["docs.jsonl"]
    assert stages["dataset"]["status"] == "stale"


def test_a_params_file_appears_after_its_output(project, capsys, monkeypatch):
    # Every output is renamed into place before its params file, and an old params file is
    # removed before its output is replaced: a params file on disk always describes the output
    # beside it. Fails if RunStore.write_output wrote the params file first, or left the old
    # one in place while replacing the output.
    events: list[tuple[str, str]] = []
    real_replace, real_unlink = os.replace, Path.unlink

    def replace(src: object, dst: object, *a: object, **k: object) -> None:
        events.append(("replace", str(dst)))
        real_replace(src, dst, *a, **k)  # type: ignore[arg-type]

    def unlink(self: Path, missing_ok: bool = False) -> None:
        events.append(("unlink", str(self)))
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(Path, "unlink", unlink)
    apply(project, capsys)
    outputs = [
        p
        for p in (project.runs / "exp").rglob("*")
        if p.is_file() and not p.name.endswith(".params.yaml")
    ]
    assert len(outputs) == 13  # 12 output names, samples.jsonl twice
    placed = [dst for kind, dst in events if kind == "replace"]
    for out in outputs:
        params = out.with_name(out.name.split(".", 1)[0] + ".params.yaml")
        assert placed.index(str(out)) < placed.index(str(params)), out

    # a re-run of the judge: old params file gone, then the output, then the new params file
    (project.root / "rubric.j2").write_text(
        (project.root / "rubric.j2").read_text() + "Be strict.\n"
    )
    events.clear()
    apply(project, capsys)
    judged = project.runs / "exp/judge/judged.jsonl"
    params = str(judged.with_name("judged.params.yaml"))
    mine = [e for e in events if e[1] in (str(judged), params)]
    assert mine == [("unlink", params), ("replace", str(judged)), ("replace", params)]


def test_smollm2_is_converted_once(tmp_path, monkeypatch):
    # The GGUF is de-quantised once into SPAR_CACHE_DIR/models/, keyed by the GGUF's hash; later
    # calls (and processes) reuse it. Fails if smollm2_dir converted again when the directory is
    # there, or keyed it by something else than the GGUF's content.
    import spar.models as models
    from spar.store import hash_path

    converted: list[Path] = []

    def convert(gguf: Path, dest: Path) -> None:  # stands in for the minutes-long conversion
        converted.append(dest)
        dest.mkdir(parents=True)
        (dest / "config.json").write_text("{}")

    monkeypatch.setenv("SPAR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(models, "_convert_gguf", convert)
    first = models.smollm2_dir()
    assert models.smollm2_dir() == first and models.local_model_dir(models.SMOLLM2) == first
    assert converted == [first]
    digest = hash_path(models.smollm2_gguf())[:16]
    assert first == tmp_path / "models" / f"SmolLM2-135M-Instruct-{digest}"
    # another process with the same cache directory converts nothing either
    code = (
        "import spar.models as m, sys\n"
        "m._convert_gguf = lambda g, d: sys.exit('converted again')\n"
        "print(m.smollm2_dir())\n"
    )
    env = {**os.environ, "SPAR_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(first)
