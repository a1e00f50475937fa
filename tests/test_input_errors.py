"""Bad input: exit 2, one line naming the file and the field or line, nothing under runs/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def check_rejected(project, capsys, *needles: str, command: str = "apply") -> str:
    r = project.spar(command, str(project.spec), capsys=capsys)
    assert r.code == 2, (r.code, r.out, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1, r.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not project.runs.exists(), list(project.runs.rglob("*"))
    assert project.calls_of("sample") == 0
    return lines[0]


@pytest.mark.parametrize("command", ["plan", "apply"])
def test_unknown_key(project, capsys, command):
    project.edit(lambda d: d["training"].update(learnin_rate=0.1))
    check_rejected(project, capsys, "spec.yaml", "training.learnin_rate", command=command)


def test_wrong_type(project, capsys):
    project.edit(lambda d: d["training"].update(lora_rank="big"))
    check_rejected(project, capsys, "spec.yaml", "training.lora_rank")


def test_missing_docs_file(project, capsys):
    (project.root / "docs.jsonl").unlink()
    check_rejected(project, capsys, "spec.yaml", "data.docs", "docs.jsonl")


def test_malformed_jsonl_line(project, capsys):
    docs = project.root / "docs.jsonl"
    lines = docs.read_text().splitlines()
    lines.insert(3, '{"content": "x", "doc_idea": ')
    docs.write_text("\n".join(lines) + "\n")
    check_rejected(project, capsys, "docs.jsonl", "line 4", "invalid JSON")


def test_record_missing_content(project, capsys):
    docs = project.root / "docs.jsonl"
    lines = docs.read_text().splitlines()
    rec = json.loads(lines[5])
    del rec["content"]
    lines[5] = json.dumps(rec)
    docs.write_text("\n".join(lines) + "\n")
    check_rejected(project, capsys, "docs.jsonl", "line 6", "content")


def test_chat_record_bad_role(project, capsys):
    docs = project.root / "chat.jsonl"
    docs.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}], "metadata": {}})
        + "\n"
        + json.dumps({"messages": [{"role": "robot", "content": "hi"}]})
        + "\n"
    )
    project.edit(lambda d: d["data"].update(docs="chat.jsonl", format="chat"))
    check_rejected(project, capsys, "chat.jsonl", "line 2", "role")


def test_empty_tier(project, capsys):
    project.edit(lambda d: d["eval"]["tiers"].update(close=[]))
    check_rejected(project, capsys, "spec.yaml", "eval.tiers", "close")


def test_questions_file_bad_line(project, capsys):
    q = project.root / "questions.jsonl"
    q.write_text('{"tier": "direct", "question": "Q1?"}\n{"tier": "close"}\n')

    def edit(d):
        del d["eval"]["tiers"]
        d["eval"]["questions"] = "questions.jsonl"

    project.edit(edit)
    check_rejected(project, capsys, "questions.jsonl", "line 2", "question")


def test_rubric_syntax_error(project, capsys):
    (project.root / "rubric.j2").write_text("Score this:\n{{ question }\n")
    check_rejected(project, capsys, "rubric.j2", "line 2", "syntax")


def test_rubric_undefined_variable(project, capsys):
    (project.root / "rubric.j2").write_text("Question: {{ question }}\nAnswer: {{ answr }}\n")
    check_rejected(project, capsys, "rubric.j2", "answr")


def test_absolute_rubric_may_not_use_baseline(project, capsys):
    project.edit(lambda d: d["judge"].update(mode="absolute"))
    check_rejected(project, capsys, "rubric.j2", "baseline_response")


def test_extends_cycle(project, capsys):
    a, b = project.root / "a.yaml", project.root / "b.yaml"
    a.write_text("extends: b.yaml\nname: a\n")
    b.write_text("extends: a.yaml\n")
    project.edit(lambda d: d.update(extends="a.yaml"))
    check_rejected(project, capsys, "extends", "cycle")


def test_empty_file(project, capsys):
    project.spec.write_text("")
    check_rejected(project, capsys, "spec.yaml", "empty")


def test_list_at_top_level(project, capsys):
    project.spec.write_text("- name: x\n- name: y\n")
    check_rejected(project, capsys, "spec.yaml", "mapping")


def test_list_where_mapping_belongs(project, capsys):
    project.edit(lambda d: d.update(training=[1, 2]))
    check_rejected(project, capsys, "spec.yaml", "training")


def test_yaml_syntax_error_names_line(project, capsys):
    project.spec.write_text(project.spec.read_text() + "bad: [unclosed\n")
    check_rejected(project, capsys, "spec.yaml", "line")


def test_unknown_engine(project, capsys):
    project.edit(lambda d: d["model"].update(engine="quantum"))
    check_rejected(project, capsys, "spec.yaml", "model.engine", "quantum")


def test_missing_spec_file(project, capsys, tmp_path: Path):
    project.spec.unlink()
    check_rejected(project, capsys, "spec.yaml", "not found")


def test_second_spec_bad_means_first_not_run(project, capsys):
    """No work starts until every spec given validates."""
    good = project.root / "good.yaml"
    good.write_text(project.spec.read_text().replace("name: exp", "name: good"))
    project.edit(lambda d: d["judge"].update(scale={"min": 5, "max": 1}))
    r = project.spar("apply", str(good), str(project.spec), capsys=capsys)
    assert r.code == 2 and "judge.scale" in r.err
    assert not project.runs.exists()


def test_error_via_subprocess_has_no_traceback(project):
    project.edit(lambda d: d["training"].update(learnin_rate=0.1))
    p = project.spar_proc("apply", str(project.spec))
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


# ----------------------------------------------------------------- found before any work (v2)


def test_unknown_renderer(project, capsys):
    project.edit(lambda d: d["model"].update(renderer="qwen9_turbo"))
    check_rejected(project, capsys, "spec.yaml", "model.renderer", "qwen9_turbo")


def test_missing_local_model_directory(project, capsys, tmp_path):
    project.edit(lambda d: d["model"].update(base_model=str(tmp_path / "no-such-model")))
    check_rejected(project, capsys, "spec.yaml", "model.base_model", "no-such-model")


def test_local_model_directory_without_config(project, capsys, tmp_path):
    (tmp_path / "empty-model").mkdir()
    project.edit(lambda d: d["model"].update(base_model=str(tmp_path / "empty-model")))
    check_rejected(project, capsys, "model.base_model", "config.json")


@pytest.mark.parametrize("command", ["plan", "apply"])
def test_test_size_as_large_as_the_docs(project, capsys, command):
    n = sum(1 for line in (project.root / "docs.jsonl").read_text().splitlines() if line.strip())
    project.edit(lambda d: d["data"].update(test_size=n))
    check_rejected(project, capsys, "docs.jsonl", "data.test_size", command=command)


def test_empty_docs_file(project, capsys):
    (project.root / "docs.jsonl").write_text("\n")
    check_rejected(project, capsys, "docs.jsonl", "no records")


def test_key_given_twice_in_yaml(project, capsys):
    text = project.spec.read_text().replace(
        "  lora_rank: 4\n", "  lora_rank: 4\n  batch_size: 3\n", 1
    )
    assert text.count("batch_size") == 2
    project.spec.write_text(text)
    check_rejected(project, capsys, "spec.yaml", "batch_size", "twice")


def test_duplicated_inline_question(project, capsys):
    project.edit(lambda d: d["eval"]["tiers"]["close"].append(d["eval"]["tiers"]["direct"][0]))
    check_rejected(project, capsys, "spec.yaml", "eval.tiers", "twice")


def test_duplicated_question_in_questions_file(project, capsys):
    q = project.root / "questions.jsonl"
    q.write_text(
        '{"tier": "direct", "question": "Q1?"}\n{"tier": "close", "question": "Q2?"}\n'
        '{"tier": "distant", "question": "Q1?"}\n'
    )

    def edit(d):
        del d["eval"]["tiers"]
        d["eval"]["questions"] = "questions.jsonl"

    project.edit(edit)
    check_rejected(project, capsys, "questions.jsonl", "line 3", "twice", "line 1")


def test_rubric_variable_undefined_only_in_an_untaken_branch(project, capsys):
    (project.root / "rubric.j2").write_text(
        "Q: {{ question }}\n{% if scale_max > 100 %}{{ respnse }}{% endif %}\nA: {{ response }}\n"
    )
    check_rejected(project, capsys, "rubric.j2", "respnse", "line 2")


def test_plan_before_the_first_apply_keeps_its_hash_cache(project, capsys, monkeypatch):
    """A second `spar plan` before any apply reads no input file again."""
    from spar.store import hashing

    reads: list[str] = []
    real = hashing.hash_stream

    def counting(path, check):
        reads.append(path.name)
        return real(path, check)

    monkeypatch.setattr(hashing, "hash_stream", counting)
    assert project.spar("plan", str(project.spec), capsys=capsys).code == 0
    assert "docs.jsonl" in reads and "rubric.j2" in reads
    reads.clear()
    assert project.spar("plan", str(project.spec), capsys=capsys).code == 0
    assert reads == []
    assert not (project.runs / "exp").exists()  # the plan wrote state only, no output


def test_global_options_work_before_or_after_the_command(project, capsys):
    from spar.cli import main
    from spar.errors import InputError

    other = project.root / "elsewhere"
    assert main(["--runs-dir", str(other), "-v", "plan", str(project.spec)]) == 0
    assert main(["plan", str(project.spec), "-v", "--runs-dir", str(other)]) == 0
    assert (other / ".spar" / "state.db").exists() and not project.runs.exists()
    project.edit(lambda d: d["training"].update(learnin_rate=0.1))
    assert main(["plan", str(project.spec)]) == 2  # one line, exit 2
    for argv in (["plan", str(project.spec), "--debug"], ["--debug", "plan", str(project.spec)]):
        with pytest.raises(InputError):  # --debug: the traceback, wherever it was written
            main(argv)


def test_help_speaks_to_users(capsys):
    from spar.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for word in ("plan", "apply", "show", "gc", "schema", "examples:", "Exit codes"):
        assert word in text
