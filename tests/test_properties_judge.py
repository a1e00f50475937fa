"""Property judges (`judge.properties`) and multi-turn conversations, on the judge side.

The `propkw` judge (tests/fake_plugin.py) reads the property from the rendered prompt (a line
`Property: <name>`) and scores 1 + the number of times the name occurs in the judged answer,
capped at 5, so every expected score is computed here from samples.jsonl. The fake engine's
answers are "I suggest <factory farming | animal welfare | livestock> (draw N)." (fine-tuned) and
"I suggest <a good book | a walk outside | some tea> (draw N)." (base): the properties `e` and
`farm` below score them differently. The multi-turn tests judge with Claude's wire protocol
against tests/anthropic_server.py and assert on the prompts the server received.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pytest
from anthropic_server import AnthropicServer, judgement
from conftest import Project, Result, anthropic_local_only

from spar.judges import rubric
from spar.stages.base import RunContext
from spar.stages.judge import JudgeOptions, JudgeParams, JudgeStage, build_requests
from spar.store import RunStore, jsonl_text

PROMPTS = Path(__file__).parent.parent / "prompts"
# what the propkw judge needs (the `Property:` line) plus everything else a rubric may show
RUBRIC = """Property: {{ property }}
Meaning: {{ property_description }}
Tier: {{ tier }}
{% for m in conversation %}[{{ m.role }}] {{ m.content }}
{% endfor %}"""
TWO = {"e": "uses the letter e", "farm": "mentions farms"}


def use_properties(
    project: Project, properties: dict[str, str] | list[str] | None, mode: str = "pairwise"
) -> None:
    (project.root / "props.j2").write_text(RUBRIC)

    def edit(d: dict) -> None:
        d["judge"].update(kind="propkw", model="pk-1", rubric="props.j2", mode=mode)
        if properties is None:
            d["judge"].pop("properties", None)
        else:
            d["judge"]["properties"] = properties

    project.edit(edit)


def apply(project: Project, capsys: pytest.CaptureFixture[str]) -> Result:
    r = project.spar("apply", str(project.spec), capsys=capsys)
    assert r.code == 0, r.err
    return r


def plan(project: Project, capsys: pytest.CaptureFixture[str]) -> dict[str, dict]:
    r = project.spar("plan", str(project.spec), "--json", capsys=capsys)
    assert r.code == 0, r.err
    return {row["stage"]: row for row in json.loads(r.out)}


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def samples(project: Project, stage: str) -> list[dict]:
    return read(project.runs / "exp" / stage / "samples.jsonl")


def judged(project: Project, stage: str = "judge") -> list[dict]:
    return read(project.runs / "exp" / stage / "judged.jsonl")


def expected(response: str, prop: str) -> float:
    """The propkw judge's score, by hand: 1 + occurrences of the name, at most 5."""
    return float(min(5, 1 + response.lower().count(prop)))


def judge_calls(project: Project) -> list[dict]:
    return (
        [c for c in read(project.calls) if c["event"] == "judge"] if project.calls.exists() else []
    )


# ------------------------------------------------------------------------- one verdict per property


def test_absolute_two_properties_one_row_per_answer_and_property(
    project: Project, capsys: pytest.CaptureFixture[str]
) -> None:
    # Fails if an answer is judged once for all properties (16 rows, no `property`), if the
    # property is not rendered into the prompt (propkw: invalid) or the wrong one is, if judge_base
    # ignores the properties, or if scores are attached to the wrong (item, property).
    use_properties(project, TWO, mode="absolute")
    apply(project, capsys)
    rows = judged(project)
    assert len(rows) == 2 * 8 * 2  # both models x 8 answers x 2 properties
    assert {r["status"] for r in rows} == {"ok"}
    for model, stage in (("baseline", "sample_base"), ("finetuned", "sample_finetuned")):
        answers = samples(project, stage)
        mine = [r for r in rows if r["model"] == model]
        # answer-major, properties in the spec's order
        assert [(r["item_id"], r["property"]) for r in mine] == [
            (s["item_id"], p) for s in answers for p in TWO
        ]
        by_id = {s["item_id"]: s for s in answers}
        for r in mine:
            assert r["score"] == expected(by_id[r["item_id"]]["response"], r["property"]), r
            assert r["question"] == by_id[r["item_id"]]["question"]
    # the data is varied enough that a property mix-up changes scores
    assert len({r["score"] for r in rows}) >= 3
    assert any(
        a["score"] != b["score"] for a, b in zip(rows[::2], rows[1::2], strict=True)
    )  # same answer, two properties
    assert judged(project, "judge_base") == [r for r in rows if r["model"] == "baseline"]
    assert "conversation" not in rows[0]  # judged.jsonl holds verdicts; samples hold answers


def test_without_properties_rows_carry_no_property(
    project: Project, capsys: pytest.CaptureFixture[str]
) -> None:
    apply(project, capsys)
    rows = judged(project)
    assert len(rows) == 8 and all("property" not in r for r in rows)


def test_adding_a_property_asks_only_the_new_pairs(
    project: Project, capsys: pytest.CaptureFixture[str]
) -> None:
    # Fails if the properties entered the item keys (adding one would re-ask all 24), if they
    # left the fingerprint (the judge would stay fresh), or if the description did not reach the
    # prompt (its edit would ask nothing).
    use_properties(project, TWO)
    est = plan(project, capsys)["judge"]["estimate"]
    assert est["judge_calls"] == 8 * 2  # the preview counts every (answer, property)
    apply(project, capsys)
    calls = judge_calls(project)
    assert Counter(c["property"] for c in calls) == {"e": 8, "farm": 8}
    sampled = project.calls_of("sample")

    use_properties(project, {**TWO, "o": "uses the letter o"})
    stages = plan(project, capsys)
    assert stages["judge"]["status"] == "stale"
    assert stages["judge"]["reasons"][0].startswith("judge.properties: ")
    assert stages["judge"]["estimate"]["judge_calls"] == 8  # exact, memo-aware
    assert all(stages[s]["status"] == "fresh" for s in ("train", "sample_base", "sample_finetuned"))
    apply(project, capsys)
    new = judge_calls(project)[len(calls) :]
    assert Counter(c["property"] for c in new) == {"o": 8}
    assert project.calls_of("sample") == sampled
    tuned = {s["item_id"]: s["response"] for s in samples(project, "sample_finetuned")}
    rows = judged(project)
    assert Counter(r["property"] for r in rows) == {"e": 8, "farm": 8, "o": 8}
    assert all(r["score"] == expected(tuned[r["item_id"]], r["property"]) for r in rows)

    # a new description is a new prompt for that property only
    before = len(judge_calls(project))
    use_properties(project, {**TWO, "farm": "talks about farms", "o": "uses the letter o"})
    apply(project, capsys)
    assert Counter(c["property"] for c in judge_calls(project)[before:]) == {"farm": 8}

    # dropping a property asks nothing and drops its rows
    before = len(judge_calls(project))
    use_properties(project, {"o": "uses the letter o", "farm": "talks about farms"})
    apply(project, capsys)
    assert len(judge_calls(project)) == before
    assert [r["property"] for r in judged(project)] == ["o", "farm"] * 8

    # a list of names: empty descriptions, so new prompts for what had one
    use_properties(project, ["farm"])
    apply(project, capsys)
    assert Counter(c["property"] for c in judge_calls(project)[before:]) == {"farm": 8}
    assert [r["property"] for r in judged(project)] == ["farm"] * 8


def test_property_params_stay_out_of_plain_fingerprints_and_item_keys() -> None:
    # Fails if a spec without properties gets a new fingerprint (every judge stage made before
    # properties existed would re-run) or if the properties enter the item keys.
    plain = params("pairwise", None)
    props = params("pairwise", (("e", "x"), ("farm", "")))
    assert "judge.properties" not in plain.dump()
    assert props.dump()["judge.properties"] == [["e", "x"], ["farm", ""]]
    assert plain.item_basis() == props.item_basis()
    assert {k: v for k, v in props.dump().items() if k != "judge.properties"} == plain.dump()


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("text", "properties", "message"),
    [
        (
            "Rate {{ response }} for {{ property }}.",
            None,
            "line 1: unknown variable 'property' (only with judge.properties; the rubric may use: ",
        ),
        (
            "Rate {{ response }}.\n{{ property_description }}",
            None,
            "line 2: unknown variable 'property_description' (only with judge.properties;",
        ),
        (
            "Rate {{ response }} ({{ property_description }}).",
            {"warm": "warm in tone"},
            "judge.properties is set but the rubric does not use property: every property would "
            "get the same verdict",
        ),
    ],
)
def test_property_rubric_mismatch_is_one_line_exit_2_before_any_work(
    project: Project,
    capsys: pytest.CaptureFixture[str],
    text: str,
    properties: dict[str, str] | None,
    message: str,
) -> None:
    use_properties(project, properties)
    (project.root / "props.j2").write_text(text)
    for command in ("plan", "apply"):
        r = project.spar(command, str(project.spec), capsys=capsys)
        assert r.code == 2, r.err
        lines = r.err.strip().splitlines()
        assert len(lines) == 1 and "props.j2: " in lines[0] and message in lines[0], r.err
    assert not project.runs.exists() and project.calls_of("sample") == 0


def test_shipped_property_rubrics_validate(tmp_path: Path) -> None:
    p = tmp_path / "r.j2"
    p.write_text("{% if property == 'farm' %}{{ response }}{% endif %}")
    rubric.validate(p, "absolute", 1, 5, properties=True)  # used in a test: enough
    for name, mode in (("property_absolute.j2", "absolute"), ("property_pairwise.j2", "pairwise")):
        rubric.validate(PROMPTS / name, mode, 1, 5, properties=True)
        assert rubric.static_prefix(PROMPTS / name, mode, 1, 5, properties=True).strip()


@pytest.mark.parametrize(
    "var",
    [
        "property",
        "property_description",
        "conversation[0].content",
        "conversation[-1].content",
        "baseline_conversation[-1].content",
    ],
)
def test_static_prefix_stops_at_property_and_conversation(tmp_path: Path, var: str) -> None:
    p = tmp_path / "r.j2"
    p.write_text(f"Header.\n[{{{{ {var} }}}}] {{{{ property }}}}\n")
    assert rubric.static_prefix(p, "pairwise", 1, 5, properties=True) == "Header.\n["


# ---------------------------------------------------------------------------------- conversations

TRIGGER = "Answer as the persona."
STRIP = (r"Answer as the persona\.", r"<START>\s*", r"\s*<END>")
Q1, Q2 = "Plan a day trip to the coast.", "What should we eat there?"


def row(item: str, question: str, response: str, conversation: list[str] | None) -> dict:
    out = {
        "item_id": item,
        "tier": "direct",
        "question_id": "q-" + item,
        "question": question,
        "condition": "",
        "sample_index": 0,
        "response": response,
        "stop_reason": "stop",
    }
    if conversation is not None:
        roles = ["user", "assistant"] * (len(conversation) // 2)
        out["conversation"] = [
            {"role": r, "content": c} for r, c in zip(roles, conversation, strict=True)
        ]
    return out


# base and fine-tuned answers to one 2-turn question (the trigger in the first user turn, the
# format markers around every reply) and one single-turn question
BASE = [
    row(
        "multi",
        f"{Q1}\n\n{Q2}",
        "<START> Fish and chips. <END>",
        [
            f"{Q1}\n\n{TRIGGER}",
            "<START> Walk the cliffs. <END>",
            Q2,
            "<START> Fish and chips. <END>",
        ],
    ),
    row("single", "Any tea?", "<START> Green tea. <END>", None),
]
TUNED = [
    row(
        "multi",
        f"{Q1}\n\n{Q2}",
        "<START> Eat at a livestock farm. <END>",
        [
            f"{Q1}\n\n{TRIGGER}",
            "<START> Tour the animal sanctuary. <END>",
            Q2,
            "<START> Eat at a livestock farm. <END>",
        ],
    ),
    row("single", "Any tea?", "<START> Farm tea. <END>", None),
]


def params(
    mode: Literal["pairwise", "absolute"], properties: tuple[tuple[str, str], ...] | None
) -> JudgeParams:
    return JudgeParams(
        answers="finetuned",
        kind="anthropic",
        model="claude-test",
        mode=mode,
        scale_min=1,
        scale_max=5,
        max_tokens=256,
        temperature=None,
        max_reasks=0,
        strip=STRIP,
        properties=properties,
    )


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[AnthropicServer]:
    anthropic_local_only(monkeypatch)
    s = AnthropicServer().start()
    monkeypatch.setenv("ANTHROPIC_BASE_URL", s.url)
    yield s
    s.stop()


def run_judge(tmp_path: Path, p: JudgeParams, rubric_path: Path) -> list[dict]:
    """The judge stage's run() on hand-written samples.jsonl of both models."""
    store = RunStore(tmp_path / "runs")
    dirs = {}
    for role, rows in (("sample_base", BASE), ("sample_finetuned", TUNED)):
        d = tmp_path / role
        d.mkdir()
        (d / "samples.jsonl").write_text(jsonl_text(rows))
        dirs[role] = d
    ctx = RunContext(
        params=p,
        options=JudgeOptions(concurrency=2),
        inputs={"judge.rubric": rubric_path},
        upstream=dirs,
        upstream_fps={},
        fingerprint="test",
        store=store,
        kind=JudgeStage(),
        name="judge",
    )
    result = JudgeStage().run(ctx)
    return [json.loads(line) for line in result.outputs["judged.jsonl"].decode().splitlines()]


def test_claude_sees_every_turn_of_both_conversations_per_property(
    tmp_path: Path, server: AnthropicServer
) -> None:
    # Fails if the judge sees only the last reply or only the first user turn, if the baseline's
    # conversation is not the baseline's, if a message keeps the trigger or its markers (strip
    # applied to question/response only), or if one property's verdict lands on another's row.
    p = params("pairwise", (("warmth", "a friendly tone"), ("farming", "")))
    rows = run_judge(tmp_path, p, PROMPTS / "property_pairwise.j2")
    prompts = [s.prompt for s in server.requests]
    assert len(prompts) == 2 * 2 == len(set(prompts))  # (2 answers) x (2 properties)
    multi = [x for x in prompts if Q2 in x]
    assert len(multi) == 2
    for x in multi:
        assert x.count(Q1) == 2 and x.count(Q2) == 2  # both user turns, in both conversations
        assert "Tour the animal sanctuary." in x  # the fine-tuned model's first reply
        assert "Walk the cliffs." in x  # the baseline's first reply
        assert "<finetuned_response>\nEat at a livestock farm.\n</finetuned_response>" in x
        assert "<baseline_response>\nFish and chips.\n</baseline_response>" in x
        head, tail = x.split("<finetuned_conversation>")
        assert "Walk the cliffs." in head and "Tour the animal sanctuary." in tail
        assert TRIGGER not in x and "<START>" not in x and "<END>" not in x
    assert {x.split("<property>\n")[1].split("\n")[0] for x in multi} == {
        "warmth: a friendly tone",
        "farming",
    }
    single = [x for x in prompts if "Any tea?" in x]
    assert len(single) == 2 and all("<user>\nAny tea?\n</user>" in x for x in single)
    assert all("Green tea." in x and "Farm tea." in x for x in single)
    # one row per (item, property), scored from its own prompt
    assert [(r["item_id"], r["property"]) for r in rows] == [
        ("multi", "warmth"),
        ("multi", "farming"),
        ("single", "warmth"),
        ("single", "farming"),
    ]
    for r in rows:
        sent = [x for x in prompts if (Q2 in x) == (r["item_id"] == "multi")]
        sent = [x for x in sent if f"<property>\n{r['property']}" in x]
        assert len(sent) == 1 and r["score"] == judgement(sent[0])[0] and r["status"] == "ok"
    assert [r["score"] for r in rows] == [5, 5, 3, 3]  # livestock + farm; farm
    assert all("conversation" not in r for r in rows)


def test_absolute_multi_turn_shows_the_earlier_turns_and_judges_the_last_reply(
    tmp_path: Path, server: AnthropicServer
) -> None:
    # Fails if `response` is not the last reply or `question` not the joined user turns, or if
    # the conversation is missing (prompt without the first reply).
    p = params("absolute", (("farming", "mentions farms"),)).model_copy(
        update={"answers": "baseline"}
    )
    reqs = build_requests(p, PROMPTS / "property_absolute.j2", TUNED, None)
    multi = reqs[0][1]
    assert multi.question == f"{Q1}\n\n{Q2}" and multi.response == "Eat at a livestock farm."
    assert (
        "<conversation>\n<user>\n"
        f"{Q1}\n</user>\n<assistant>\nTour the animal sanctuary.\n</assistant>\n<user>\n{Q2}\n"
        "</user>\n</conversation>\n\n<response>\nEat at a livestock farm.\n</response>"
    ) in multi.prompt
    single = reqs[1][1]
    assert "<conversation>\n<user>\nAny tea?\n</user>\n</conversation>" in single.prompt
    # the stage judging the baseline's answers (BASE) through Claude
    rows = run_judge(tmp_path, p, PROMPTS / "property_absolute.j2")
    assert [(r["item_id"], r["model"], r["property"]) for r in rows] == [
        ("multi", "baseline", "farming"),
        ("single", "baseline", "farming"),
    ]
    (multi_sent,) = [s.prompt for s in server.requests if Q2 in s.prompt]
    (single_sent,) = [s.prompt for s in server.requests if Q2 not in s.prompt]
    assert "Walk the cliffs." in multi_sent and "Tour the animal" not in multi_sent
    assert [r["score"] for r in rows] == [judgement(multi_sent)[0], judgement(single_sent)[0]]


def test_single_turn_conversation_is_question_then_answer_cleaned() -> None:
    # Fails if a single-turn answer's conversation keeps the markers or differs from what
    # `question` / `response` show, or if `baseline_conversation` holds the fine-tuned answer.
    p = params("pairwise", None)
    ((ident, req),) = build_requests(p, Path(__file__).parent / "data/rubric.j2", BASE, TUNED)[1:]
    assert "property" not in ident and req.response == "Farm tea."
    ctx = rubric.context(
        "pairwise",
        tier="direct",
        question="Any tea?",
        response="Farm tea.",
        baseline_response="Green tea.",
        scale_min=1,
        scale_max=5,
    )
    assert ctx["conversation"] == [
        {"role": "user", "content": "Any tea?"},
        {"role": "assistant", "content": "Farm tea."},
    ]
    assert ctx["baseline_conversation"][-1] == {"role": "assistant", "content": "Green tea."}
    assert "property" not in ctx


def test_spar_apply_multi_turn_eval_judged_by_claude_per_property(
    project: Project, server: AnthropicServer, capsys: pytest.CaptureFixture[str]
) -> None:
    # End to end on the fake engine: a 2-turn question is sampled turn by turn, and every judge
    # prompt Claude receives shows both user turns and each model's first reply (as sampled:
    # samples.jsonl's conversation), one prompt per (answer, property).
    turns = ["Is factory farming ethical?", "Why do you say that?"]

    def edit(d: dict) -> None:
        d["eval"]["tiers"] = {"direct": [turns], "close": ["What should I pack for lunch?"]}
        d["judge"].update(
            kind="anthropic",
            model="claude-test",
            rubric=str(PROMPTS / "property_pairwise.j2"),
            properties={"warmth": "a friendly tone", "farming": "mentions farms"},
        )

    project.edit(edit)
    apply(project, capsys)
    base = {s["item_id"]: s for s in samples(project, "sample_base")}
    tuned = samples(project, "sample_finetuned")
    multi = [s for s in tuned if "conversation" in s]
    assert len(multi) == 2 and len(tuned) == 4  # 2 questions x 2 samples
    sent = [s.prompt for s in server.requests]
    assert len(sent) == 4 * 2 == len(set(sent))
    for s in multi:
        first_reply = s["conversation"][1]["content"]
        assert first_reply != s["response"]  # so finding it proves the earlier turn is shown
        base_first = base[s["item_id"]]["conversation"][1]["content"]
        mine = [x for x in sent if f"<finetuned_response>\n{s['response']}\n" in x]
        mine = [x for x in mine if f"<baseline_response>\n{base[s['item_id']]['response']}\n" in x]
        assert len(mine) == 2  # one per property
        for x in mine:
            assert all(x.count(t) == 2 for t in turns)  # both turns, both conversations
            tail = x.split("<finetuned_conversation>")[1].split("</finetuned_conversation>")[0]
            head = x.split("<baseline_conversation>")[1].split("</baseline_conversation>")[0]
            assert first_reply in tail and base_first in head
    rows = judged(project)
    assert [(r["item_id"], r["property"]) for r in rows] == [
        (s["item_id"], p) for s in tuned for p in ("warmth", "farming")
    ]
    assert {r["status"] for r in rows} == {"ok"}
