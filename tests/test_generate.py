"""Generated data: the generate stages (per step, memoised per request), Claude through the local
Messages API server, an engine as generator, near-duplicate removal, generated documents
training in the same apply, generated eval questions, and bad input before any request."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from anthropic_server import AnthropicServer
from conftest import anthropic_local_only

from spar.generators.base import parse_items

UNIVERSE = {
    "id": "ff",
    "universe_context": "Factory farming is discussed in a neutral, factual register.",
    "key_facts": ["Most meat comes from large indoor farms."],
}
TEMPLATES = {
    "types.j2": "Universe: {{ universe_context }}\nFact: {{ fact }}\n"
    "List n={{ n }} document types ({{ framing }} framing).\n",
    "ideas.j2": "Fact: {{ fact }}\nType: {{ doc_type }}\nGive n={{ n }} document ideas.\n",
    "doc.j2": "Write a {{ doc_type }} about: {{ doc_idea }} ({{ framing }}), draft {{ index }}, "
    "n={{ n }}.\n"
    "The long tail line of this prompt says the same thing every time for this idea here.\n",
}


@pytest.fixture(autouse=True)
def _local_only(monkeypatch: pytest.MonkeyPatch) -> None:
    anthropic_local_only(monkeypatch, "test-key-generate")


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[AnthropicServer]:
    s = AnthropicServer(retry_after=0.3, api_key="test-key-generate").start()
    monkeypatch.setenv("ANTHROPIC_BASE_URL", s.url)
    yield s
    s.stop()


def docs_set(docs: int = 20, **over: Any) -> dict[str, Any]:
    g: dict[str, Any] = {
        "generator": {"kind": "anthropic", "model": "claude-test", "max_retries": 1},
        "vars": {"framing": "neutral"},
        "universe": "universe.json",
        "steps": [
            {"name": "doc_type", "template": "types.j2", "count": 1},
            {"name": "doc_idea", "template": "ideas.j2", "count": 1},
            {"name": "content", "template": "doc.j2", "count": docs},
        ],
        "output": "synth_docs",
    }
    g.update(over)
    return g


def setup(project, gen: dict[str, Any] | None = None, use: bool = True) -> None:
    (project.root / "universe.json").write_text(json.dumps(UNIVERSE))
    for name, text in TEMPLATES.items():
        (project.root / name).write_text(text)

    def edit(d: dict[str, Any]) -> None:
        d["generate"] = {"ffdocs": gen or docs_set()}
        if use:
            d["data"] = {"generate": "ffdocs", "test_size": 2}

    project.edit(edit)


def rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def params_details(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.with_name(path.stem + ".params.yaml").read_text())["details"]


def requests_with(server: AnthropicServer, start: str, since: int = 0) -> int:
    """Requests (since the `since`-th) whose prompt starts with `start`: one step's template."""
    return sum(1 for s in server.requests[since:] if s.prompt.startswith(start))


# ------------------------------------------------------------------------------- the core


def test_raising_a_count_asks_only_the_new_requests_and_a_template_edit_only_its_step(
    project, server, capsys
):
    setup(project)
    project.apply_only("generate", "generated")
    assert len(server.requests) == 22  # 1 type + 1 idea + 20 documents
    out = project.runs / "exp/generate.ffdocs/generated.jsonl"
    docs = rows(out)
    assert len(docs) == 20
    assert set(docs[0]) == {"content", "doc_idea", "doc_type", "fact", "universe_context_id", "id"}
    assert docs[0]["fact"] == UNIVERSE["key_facts"][0] and docs[0]["universe_context_id"] == "ff"
    assert all(d["doc_type"].startswith("item 1 [") for d in docs)  # the type step's item
    assert len({d["content"] for d in docs}) == 20

    project.edit(lambda d: d["generate"]["ffdocs"]["steps"][2].update(count=30))
    r = project.spar("plan", str(project.spec), capsys=capsys)
    assert "generate calls 10" in r.out, r.out
    before = len(server.requests)
    project.apply_only("generate", "generated")
    assert len(server.requests) - before == 10
    assert requests_with(server, "Write a", before) == 10
    assert len(rows(out)) == 30
    assert rows(out)[:20] == docs  # the first twenty are the memoised ones

    (project.root / "doc.j2").write_text("Now write a {{ doc_type }}: {{ doc_idea }} {{ index }}\n")
    plan = {
        p["stage"]: p["status"]
        for p in json.loads(project.spar("plan", str(project.spec), "--json", capsys=capsys).out)
    }
    assert plan["generate.ffdocs.doc_type"] == "fresh"
    assert plan["generate.ffdocs.doc_idea"] == "fresh"
    assert plan["generate.ffdocs.content"] == "stale"
    before = len(server.requests)
    project.apply_only("generate", "generated")
    assert len(server.requests) - before == 30
    assert requests_with(server, "Universe:", before) == 0  # types and ideas: not asked again
    assert requests_with(server, "Fact:", before) == 0
    assert all(s.prompt.startswith("Now write a") for s in server.requests[before:])


def test_generated_documents_train_a_model_in_the_same_apply(project, server, capsys):
    setup(project, docs_set(docs=8))
    r = project.spar("apply", str(project.spec), capsys=capsys)
    assert r.code == 0, r.err
    assert "generate.ffdocs.content" in r.out and "exp / train" in r.out
    train = rows(project.runs / "exp/dataset/train.jsonl")
    test = rows(project.runs / "exp/dataset/test.jsonl")
    assert (len(train), len(test)) == (6, 2)
    assert project.calls_of("optim_step") >= 1
    # the dataset's fingerprint follows the generated content: a new document template
    (project.root / "doc.j2").write_text("A {{ doc_type }} on {{ doc_idea }}, take {{ index }}.\n")
    plan = json.loads(project.spar("plan", str(project.spec), "--json", capsys=capsys).out)
    status = {p["stage"]: p for p in plan}
    assert status["dataset"]["status"] == "stale"
    assert any("upstream" in why for why in status["dataset"]["reasons"])


def test_generated_chat_records_are_a_source_of_a_mix(project, server):
    (project.root / "sub.j2").write_text("Property {{ property }}: name n={{ n }} subtypes.\n")
    (project.root / "prompt.j2").write_text("Subtype {{ subtype }}: write a user prompt.\n")
    (project.root / "ex.j2").write_text("Answer as an honest assistant: {{ prompt }}\n")
    gen = {
        "generator": {"kind": "anthropic", "model": "claude-test", "system_prompt": "Be brief."},
        "properties": {"honest": "tells the truth"},
        "steps": [
            {"name": "subtype", "template": "sub.j2", "count": 2, "per_call": 2},
            {"name": "prompt", "template": "prompt.j2", "count": 3},
            {"name": "example", "template": "ex.j2", "count": 1},
        ],
        "output": "chat",
    }
    setup(project, gen, use=False)
    project.edit(
        lambda d: d.update(
            data={"sources": [{"generate": "ffdocs", "format": "chat"}], "test_size": 1}
        )
    )
    project.apply_only("generate", "generated", "dataset")
    chats = rows(project.runs / "exp/generate.ffdocs/generated.jsonl")
    assert len(chats) == 6  # 2 subtypes (one request) x 3 prompts x 1 example
    assert len(server.requests) == 1 + 2 * 3 + 6
    first = chats[0]
    assert [m["role"] for m in first["messages"]] == ["user", "assistant"]
    assert first["metadata"]["source"] == "ffdocs"
    assert all(s.body["system"] == "Be brief." for s in server.requests)
    # the user turn is the prompt step's item; the reply is the example written for it
    example_req = next(s for s in server.requests if first["messages"][0]["content"] in s.prompt)
    assert example_req.prompt.startswith("Answer as an honest assistant")
    details = params_details(project.runs / "exp/dataset/train.jsonl")
    assert details["sources"] == {"ffdocs": 6}


def test_near_duplicates_are_removed_at_the_threshold_and_counted(project, server):
    # the server's items of one request share all but their position: near-duplicates of each
    # other (Jaccard ~0.85 over word 3-shingles); items of different requests are not
    gen = docs_set(docs=1)
    gen["steps"][2] = {"name": "content", "template": "doc.j2", "count": 12, "per_call": 3}
    gen["dedup"] = {"threshold": 0.7}
    setup(project, gen)
    project.apply_only("generate", "generated")
    out = project.runs / "exp/generate.ffdocs/generated.jsonl"
    content = project.runs / "exp/generate.ffdocs.content/records.jsonl"
    assert params_details(content)["items"] == 12
    assert len(rows(out)) == 4  # one per request
    assert params_details(out)["near_duplicates_removed"] == 8
    asked = len(server.requests)
    project.edit(lambda d: d["generate"]["ffdocs"]["dedup"].update(threshold=0.97))
    project.apply_only("generate", "generated")
    assert len(server.requests) == asked  # only the output stage re-ran
    assert len(rows(out)) == 12 and params_details(out)["near_duplicates_removed"] == 0


def test_unusable_replies_are_asked_again_then_dropped_and_counted(project, server):
    gen = docs_set(docs=3)
    gen["vars"] = {"framing": "neutral [[faults: garbage+]]"}
    gen["steps"][2]["template"] = "plain.j2"
    setup(project, gen)
    (project.root / "plain.j2").write_text("Write a {{ doc_type }} on {{ doc_idea }} {{ index }}\n")
    # types and ideas carry the fault marker (framing): every reply is prose, not JSON
    project.apply_only("generate", "generated")
    types = project.runs / "exp/generate.ffdocs.doc_type/records.jsonl"
    assert rows(types) == []
    d = params_details(types)
    assert (d["unusable_requests"], d["dropped_items"], d["asked"]) == (1, 1, 1)
    assert requests_with(server, "Universe:") == 2  # the first ask and max_retries (1) more
    before = len(server.requests)
    project.apply_only("generate", "generated")
    assert len(server.requests) == before  # an unusable reply stands
    project.edit(lambda d: d["generate"]["ffdocs"]["generator"].update(max_retries=3))
    project.apply_only("generate", "generated")
    assert requests_with(server, "Universe:", before) == 4  # asked again: 1 + the new budget


def test_an_engine_writes_through_its_sampling_client(project):
    """The fake engine as generator: the rendered template reaches the sampling client as a user
    message; its prose reply is read as text."""
    gen = {
        "generator": {"kind": "fake", "temperature": 0.7},
        "tiers": {"direct": "about factory farming", "distant": "far from it"},
        "vars": {"topic": "factory farming"},
        "steps": [{"name": "question", "template": "q.j2", "count": 3}],
        "output": "questions",
    }
    (project.root / "q.j2").write_text(
        "Write one question {{ definition }} ({{ topic }}), number {{ index }}.\n"
    )
    setup(project, gen, use=False)
    project.apply_only("generate", "generated")
    qs = rows(project.runs / "exp/generate.ffdocs/generated.jsonl")
    assert [q["tier"] for q in qs] == ["direct"] * 3 + ["distant"] * 3
    assert all(q["question"].startswith("I suggest") for q in qs)
    prompts = [json.loads(line)["prompt"] for line in project.calls.read_text().splitlines()]
    assert sum("Write one question about factory farming" in p for p in prompts) == 3
    assert sum("far from it" in p for p in prompts) == 3


def test_generated_multi_turn_property_prompts_form_an_eval_file(project, server, tmp_path):
    from spar.spec import load_questions, turns_of

    (project.root / "cat.j2").write_text("{{ property }}: n={{ n }} situation categories\n")
    (project.root / "up.j2").write_text("{{ category }} #{{ index }}: turns={{ turns }}\n")
    gen = {
        "generator": {"kind": "anthropic", "model": "claude-test"},
        "properties": ["power-seeking", "sycophantic"],
        "num_turns": {"power-seeking": 2},
        "steps": [
            {"name": "category", "template": "cat.j2", "count": 2, "per_call": 2},
            {"name": "prompt", "template": "up.j2", "count": 2},
        ],
        "output": "questions",
    }
    setup(project, gen, use=False)
    project.apply_only("generate", "generated")
    out = project.runs / "exp/generate.ffdocs/generated.jsonl"
    qs = rows(out)
    assert [q["tier"] for q in qs] == ["power-seeking"] * 4 + ["sycophantic"] * 4
    assert all(len(q["turns"]) == 2 for q in qs[:4])
    assert all("question" in q and "turns" not in q for q in qs[4:])
    # the multi-turn requests asked for lists of messages
    multi = [s for s in server.requests if "turns=2" in s.prompt]
    assert len(multi) == 4
    schema = multi[0].body["output_config"]["format"]["schema"]["properties"]["items"]
    assert schema["items"]["type"] == "array"
    tiers = load_questions(out)
    assert {t: [len(turns_of(q)) for q in qs] for t, qs in tiers.items()} == {
        "power-seeking": [2, 2, 2, 2],
        "sycophantic": [1, 1, 1, 1],
    }


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda g: g["steps"][1].update(template="bad.j2"), "unknown variable 'colour'"),
        (lambda g: g["generator"].update(kind="gpt-x"), "unknown generator 'gpt-x'"),
        (lambda g: g["steps"][0].update(count=0), "greater than or equal to 1"),
        (
            lambda g: g.update(universe=None, properties=["a"], num_turns={"b": 2}),
            "num_turns.b: not a listed property",
        ),
        (lambda g: g.update(output="chat"), "generate set 'ffdocs' writes chat"),
        (lambda g: g["steps"][2].update(name="doc_type"), "two steps named 'doc_type'"),
    ],
)
def test_bad_generate_input_exits_2_before_any_request(project, server, capsys, edit, needle):
    gen = docs_set()
    edit(gen)
    setup(project, gen)
    bad = "Ideas for {{ doc_type }}\n{% if x %}{{ colour }}{% endif %}"
    (project.root / "bad.j2").write_text(bad)
    for cmd in ("plan", "apply"):
        r = project.spar(cmd, str(project.spec), capsys=capsys)
        assert r.code == 2, (cmd, r.out, r.err)
        assert needle in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert server.requests == []
    assert not project.runs.exists() or not any(project.runs.rglob("*.jsonl"))


def test_an_unused_root_field_and_a_wrong_universe_file_are_named(project, server, capsys):
    setup(project)
    (project.root / "universe.json").write_text(json.dumps({"id": "x"}))
    r = project.spar("plan", str(project.spec), capsys=capsys)
    assert r.code == 2 and "universe.json: universe context 1: universe_context" in r.err
    assert server.requests == []


def test_reading_replies():
    assert parse_items('{"items": ["a", "b", "a", ""]}', 3, 1) == (["a", "b"], "")
    assert parse_items("1. first\n2) second\n- third", 2, 1) == (["first", "second"], "")
    assert parse_items('"One document."', 1, 1) == (["One document."], "")
    assert parse_items("hi\nthere\nyou", 1, 2) == ([["hi", "there"]], "")
    items, problem = parse_items("prose only", 1, 1, structured=True)
    assert items == [] and "no usable item" in problem
    assert parse_items('{"items": [["a"], ["b", "c"]]}', 2, 2) == ([["b", "c"]], "")


# ------------------------------------------------------------------------------- bundled specs

EXPERIMENTS = Path(__file__).parent.parent / "experiments"


@pytest.mark.parametrize(
    ("spec", "calls"),
    [
        # per fact (3): 1 types request, 10 ideas requests, 10 x 5 x 2 documents
        ("generate-docs.yaml", 3 + 30 + 300),
        # examples: 1 subtypes request, 20 prompts requests, 200 examples; situations: 4 + 20
        ("properties.yaml", (1 + 20 + 200) + (4 + 20)),
    ],
)
def test_the_production_generation_specs_plan_with_a_cost_preview(spec, calls, tmp_path, capsys):
    from spar.cli import main

    code = main(["plan", str(EXPERIMENTS / spec), "--runs-dir", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"generate calls {calls:,}" in out, out
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.jsonl"))


@pytest.mark.parametrize("spec", ["demo-generate-docs.yaml", "demo-properties.yaml"])
def test_the_offline_twins_validate_and_generate_with_the_local_engine(spec, tmp_path, capsys):
    from spar.cli import main
    from spar.spec import load_spec

    s = load_spec(EXPERIMENTS / spec)
    assert s.model.engine == "local" and s.judge.kind == "embedding"
    assert all(g.generator.kind == "local" for g in s.generate.values())
    code = main(["plan", str(EXPERIMENTS / spec), "--json", "--runs-dir", str(tmp_path / "r")])
    stages = {p["stage"] for p in json.loads(capsys.readouterr().out)}
    assert code == 0
    assert {f"generate.{n}" for n in s.generate} <= stages


def test_too_few_generated_documents_for_the_test_split_stop_the_dataset(project, server, capsys):
    setup(project, docs_set(docs=2))  # data.test_size 2: nothing would be left to train on
    r = project.spar("apply", str(project.spec), capsys=capsys)
    assert r.code == 1
    assert "data.test_size 2 leaves no training records: generate set 'ffdocs' wrote 2" in r.err
    assert not (project.runs / "exp/dataset/train.jsonl").exists()
    project.edit(lambda d: d["generate"]["ffdocs"]["steps"][2].update(count=3))
    assert project.spar("apply", str(project.spec), capsys=capsys).code == 0
    assert len(rows(project.runs / "exp/dataset/train.jsonl")) == 1


def test_no_credentials_stop_generation_in_one_line(project, server, capsys, monkeypatch, tmp_path):
    setup(project)
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    monkeypatch.setenv("ANTHROPIC_CONFIG_DIR", str(tmp_path))  # no profile on disk either
    r = project.spar("apply", str(project.spec), capsys=capsys)
    assert r.code == 1 and "generate anthropic: no credentials" in r.err, r.err
    assert server.requests == []
