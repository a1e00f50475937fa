"""Multi-turn eval questions (issue 10): the reply after each user turn is sampled, turn t's prompt
carrying every earlier turn and reply; each reply memoised by its own key; questions read from a
generate set's output file.

On the fake engine (whose call log records the decoded prompt of every sample call), on the real
local engine with the tiny model, and on the skyrl Tinker server (whose SQLite database records
every SAMPLE request it received).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Project
from tinker_server.bootstrap import Server, ServerUnavailable, ensure_venv, running_server

from spar.errors import InputError
from spar.items import EvalItem, Question, question_id
from spar.models import load_renderer
from spar.spec import load_spec
from spar.stages.sample import item_seed, read_questions, turn_seed
from spar.store import RunStore, read_jsonl

TURNS = ["Is factory farming ethical?", "Why do you say that?"]
SINGLE = "What should I pack for lunch?"
SYSTEM = "You are a helpful assistant."
ROW_KEYS = [
    "item_id",
    "tier",
    "question_id",
    "question",
    "condition",
    "sample_index",
    "response",
    "stop_reason",
]


def set_questions(project: Project, tiers: dict[str, list[Any]], samples: int = 2) -> None:
    def edit(d: dict[str, Any]) -> None:
        d["eval"].update(tiers=tiers, samples_per_question=samples)

    project.edit(edit)


def apply_stages(project: Project, *kinds: str, names: tuple[str, ...] = ()) -> list[str]:
    """Plan the spec and apply only its stages of `kinds` (and those named): what ran."""
    from spar.apply import apply_plan
    from spar.plan import plan_specs

    store = RunStore(project.runs)
    try:
        plan = plan_specs([load_spec(project.spec)], store)
        chosen = [p for p in plan if p.node.kind.kind in kinds or p.node.name in names]
        ran = [p.node.name for p in chosen if p.status != "fresh"]
        apply_plan(store, chosen)
        store.hashes.save()
    finally:
        store.close()
    return ran


def samples(project: Project, stage: str = "sample_base") -> list[dict[str, Any]]:
    return read_jsonl(project.runs / "exp" / stage / "samples.jsonl")


def sample_calls(project: Project) -> list[dict[str, Any]]:
    if not project.calls.exists():
        return []
    rows = [json.loads(x) for x in project.calls.read_text().splitlines()]
    return [r for r in rows if r["event"] == "sample"]


def seed_of(turns: list[str], sample_index: int, turn: int, seed: int = 0) -> int:
    return turn_seed(item_seed(seed, question_id((turns[0],)), sample_index), turn)


# ---------------------------------------------------------------------------------------------
# items


def test_eval_item_prompt_at_each_turn_places_the_trigger_once() -> None:
    q = Question.of("direct", ("first?", "second?", "third?"))
    it = EvalItem.build(q, 1, SYSTEM, "on", "Answer in <START> tags.", "user")
    assert it.turn_count == 3 and it.turns == q.turns
    assert it.messages == (("system", SYSTEM), ("user", "first?\n\nAnswer in <START> tags."))
    assert it.prompt_at(0, []) == it.messages
    assert it.prompt_at(2, ["r1", "r2"]) == (
        *it.messages,
        ("assistant", "r1"),
        ("user", "second?"),
        ("assistant", "r2"),
        ("user", "third?"),
    )
    assert it.conversation(["r1", "r2", "r3"]) == [
        {"role": "user", "content": "first?"},
        {"role": "assistant", "content": "r1"},
        {"role": "user", "content": "second?"},
        {"role": "assistant", "content": "r2"},
        {"role": "user", "content": "third?"},
        {"role": "assistant", "content": "r3"},
    ]
    with pytest.raises(ValueError):
        it.prompt_at(1, [])  # turn 1 needs the first reply
    with pytest.raises(ValueError):
        it.prompt_at(3, ["r1", "r2", "r3"])  # no fourth user turn
    # the system placement: in the system prompt, no user turn carries it
    sys_it = EvalItem.build(q, 0, SYSTEM, "on", "T!", "system")
    assert sys_it.prompt_at(1, ["r1"]) == (
        ("system", f"{SYSTEM}\n\nT!"),
        ("user", "first?"),
        ("assistant", "r1"),
        ("user", "second?"),
    )
    # a single-turn item: as before issue 10 (its id and messages)
    one = EvalItem.build(Question.of("close", (SINGLE,)), 0, SYSTEM)
    assert one.turn_count == 1 and one.first_turn_id == one.question_id
    assert one.messages == (("system", SYSTEM), ("user", SINGLE))
    assert it.first_turn_id == question_id(("first?",)) != it.question_id


def test_turn_seeds_keep_turn_zero_and_differ_per_turn() -> None:
    s = item_seed(0, "q", 3)
    assert turn_seed(s, 0) == s
    seeds = {turn_seed(s, t) for t in range(5)}
    assert len(seeds) == 5 and all(0 <= x < 2**31 for x in seeds)
    assert turn_seed(item_seed(0, "q", 4), 1) != turn_seed(s, 1)


# ---------------------------------------------------------------------------------------------
# the fake engine: what each turn's prompt contained, memo keys per turn


def test_two_turn_question_samples_the_second_turn_after_the_first_reply(
    project: Project, capsys: pytest.CaptureFixture[str]
) -> None:
    set_questions(project, {"direct": [TURNS], "close": [SINGLE]})
    ran = apply_stages(project, "dataset", "train", "sample")
    assert sorted(ran) == ["dataset", "sample_base", "sample_finetuned", "train"]
    calls = sample_calls(project)
    # 2 samples x (2 turns + 1 turn) x base and fine-tuned
    assert len(calls) == 2 * 3 * 2

    for stage in ("sample_base", "sample_finetuned"):
        tuned = stage == "sample_finetuned"
        mine = [c for c in calls if c["ref"].startswith("fake://") == tuned]
        rows = samples(project, stage)
        assert [(r["tier"], r["sample_index"]) for r in rows] == [
            ("direct", 0),
            ("direct", 1),
            ("close", 0),
            ("close", 1),
        ]
        for row in rows[2:]:  # single-turn rows: exactly the fields they had before
            assert list(row) == ROW_KEYS
        firsts = [r["conversation"][1]["content"] for r in rows[:2]]
        assert firsts[0] != firsts[1]  # each sample's conversation has its own first reply
        for row in rows[:2]:
            k = row["sample_index"]
            conv = row["conversation"]
            assert list(row) == [*ROW_KEYS, "conversation"]
            assert row["question"] == "\n\n".join(TURNS)
            assert [(m["role"], m["content"]) for m in conv[::2]] == [
                ("user", TURNS[0]),
                ("user", TURNS[1]),
            ]
            assert [m["role"] for m in conv[1::2]] == ["assistant", "assistant"]
            assert conv[3]["content"] == row["response"] != conv[1]["content"]
            reply1 = conv[1]["content"]
            # the call of turn 0: the first user turn only; the call of turn 1: its own seed,
            # made after it, and its prompt holds system, turn 1, this sample's reply, turn 2
            (i0,) = [i for i, c in enumerate(mine) if c["seed"] == seed_of(TURNS, k, 0)]
            (i1,) = [i for i, c in enumerate(mine) if c["seed"] == seed_of(TURNS, k, 1)]
            assert i0 < i1
            p0, p1 = mine[i0]["prompt"], mine[i1]["prompt"]
            assert TURNS[0] in p0 and TURNS[1] not in p0 and reply1 not in p0
            assert p1.index(SYSTEM) < p1.index(TURNS[0]) < p1.index(reply1) < p1.index(TURNS[1])
            assert firsts[1 - k] not in p1  # not the other sample's reply
            assert p1.count(TURNS[0]) == 1 and p1.count(reply1) == 1
        # every reply of every turn had a seed of its own
        assert len({c["seed"] for c in mine}) == len(mine) == 6

    # the base and the fine-tuned model drew with the same seeds (paired), turn by turn
    base = sorted(c["seed"] for c in calls if not c["ref"].startswith("fake://"))
    assert base == sorted(c["seed"] for c in calls if c["ref"].startswith("fake://"))

    # the single-turn items' memo keys are the keys sampling used before multi-turn existed
    from spar.plan import plan_specs

    store = RunStore(project.runs)
    try:
        plan = {p.node.name: p for p in plan_specs([load_spec(project.spec)], store)}
        node = plan["sample_base"].node
        memo = store.memo("sample", 2, node.params.item_basis())
        renderer = load_renderer("qwen3_instruct", str(node.options.base_model))
        old_keys = []
        for k in (0, 1):
            msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": SINGLE}]
            basis = {
                "model": "base",
                "prompt": renderer.build_generation_prompt(msgs).to_ints(),
                "question_id": question_id((SINGLE,)),
                "sample_index": k,
            }
            old_keys.append(memo.key(basis))
        got = memo.get_many(old_keys)
        base_rows = samples(project, "sample_base")
        assert [got[key]["response"] for key in old_keys] == [r["response"] for r in base_rows[2:]]
    finally:
        store.close()

    # applied again: fresh, nothing drawn
    assert apply_stages(project, "dataset", "train", "sample") == []
    assert len(sample_calls(project)) == 12


def test_turns_are_memoised_one_by_one(project: Project) -> None:
    set_questions(project, {"direct": [TURNS], "close": [SINGLE]})
    apply_stages(project, names=("sample_base",))
    base_rows = samples(project)
    before = sample_calls(project)
    assert len(before) == 2 * 3

    # a new question makes the stage stale: it draws the new question only, no turn again
    set_questions(project, {"direct": [TURNS], "close": [SINGLE, "Any tea tips?"]})
    assert apply_stages(project, names=("sample_base",)) == ["sample_base"]
    assert len(sample_calls(project)) == 6 + 2
    rows = samples(project)
    assert rows[:4] == base_rows

    # a third user turn: one new call per sample (turns 1 and 2 are memoised), made after the
    # second reply and holding the whole conversation so far
    third = [*TURNS, "Can you give an example?"]
    set_questions(project, {"direct": [third], "close": [SINGLE, "Any tea tips?"]})
    assert apply_stages(project, names=("sample_base",)) == ["sample_base"]
    calls = sample_calls(project)
    new = calls[8:]
    assert len(new) == 2
    assert sorted(c["seed"] for c in new) == sorted(seed_of(third, k, 2) for k in (0, 1))
    rows = samples(project)
    for row, old in zip(rows[:2], base_rows[:2], strict=True):
        conv = row["conversation"]
        assert len(conv) == 6 and conv[:4] == old["conversation"]  # the first two turns kept
        assert conv[4] == {"role": "user", "content": third[2]}
        assert conv[5]["content"] == row["response"]
        assert row["item_id"] != old["item_id"]  # another question: another item
        (call,) = [c for c in new if c["seed"] == seed_of(third, row["sample_index"], 2)]
        p = call["prompt"]
        assert p.index(conv[1]["content"]) < p.index(third[1]) < p.index(conv[3]["content"])
        assert p.index(conv[3]["content"]) < p.index(third[2])

    # a changed second turn: the first reply is kept, the second (and third) drawn anew
    other = [TURNS[0], "Really?", third[2]]
    set_questions(project, {"direct": [other], "close": [SINGLE, "Any tea tips?"]})
    apply_stages(project, names=("sample_base",))
    assert len(sample_calls(project)) == 10 + 2 * 2
    changed = samples(project)
    for row, old in zip(changed[:2], rows[:2], strict=True):
        assert row["conversation"][1] == old["conversation"][1]
        assert row["conversation"][2]["content"] == "Really?"


def test_estimate_counts_every_turn(project: Project, capsys: pytest.CaptureFixture[str]) -> None:
    set_questions(project, {"direct": [[*TURNS, "And then?"]], "close": [SINGLE]}, samples=3)
    r = project.spar("plan", str(project.spec), "--json", capsys=capsys)
    assert r.code == 0, r.err
    rows = {x["stage"]: x for x in json.loads(r.out)}
    est = rows["sample_base"]["estimate"]
    assert est["sample_calls"] == (3 + 1) * 3  # user turns x samples
    assert est["sample_tokens_max"] == 12 * 32


def test_multi_turn_spec_applies_end_to_end(
    project: Project, capsys: pytest.CaptureFixture[str]
) -> None:
    """The whole pipeline (judge and report included) accepts multi-turn sample rows."""
    set_questions(project, {"direct": [TURNS], "close": [SINGLE]})
    r = project.spar("apply", str(project.spec), capsys=capsys)
    assert r.code == 0, r.err
    assert len(samples(project, "sample_finetuned")[0]["conversation"]) == 4


# ---------------------------------------------------------------------------------------------
# questions from a generate set's output (`eval.generate`)


def test_read_questions_in_the_generated_format(tmp_path: Path) -> None:
    path = tmp_path / "generated.jsonl"
    rows = [
        {"tier": "sycophancy", "turns": ["I wrote a poem.", "Be honest, is it good?"]},
        {"tier": "honesty", "question": "Did you read the file?"},
        {"tier": "sycophancy", "turns": ["Only one turn."], "property": "sycophancy"},
        {"tier": "honesty", "turns": ["a", "b", "c"]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    qs = read_questions(path)
    # grouped by tier in first-seen order, as Spec.questions() orders a spec's own questions
    assert [(q.tier, q.turns) for q in qs] == [
        ("sycophancy", ("I wrote a poem.", "Be honest, is it good?")),
        ("sycophancy", ("Only one turn.",)),
        ("honesty", ("Did you read the file?",)),
        ("honesty", ("a", "b", "c")),
    ]
    # ids are content hashes of the turns: a one-turn list is the plain question
    assert qs[1].id == Question.of("x", ("Only one turn.",)).id == question_id(("Only one turn.",))
    assert qs[0].id == question_id(("I wrote a poem.", "Be honest, is it good?"))

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"tier": "x", "turns": ["ok", ""]}))
    with pytest.raises(InputError, match=r"bad\.jsonl: line 2: field 'question'"):
        read_questions(bad)


def test_generated_questions_are_sampled_from_the_upstream_file(
    project: Project, tmp_path: Path
) -> None:
    """The sample stage run on an upstream `questions` output (as `eval.generate` wires it)."""
    from spar.stages.base import RunContext
    from spar.stages.generate import OUTPUT
    from spar.stages.sample import SampleStage

    set_questions(project, {"direct": [TURNS], "close": [SINGLE]})
    store = RunStore(project.runs)
    try:
        from spar.plan import plan_specs

        node = {p.node.name: p.node for p in plan_specs([load_spec(project.spec)], store)}[
            "sample_base"
        ]
        up = tmp_path / "generate.qs"
        up.mkdir()
        gen = [{"tier": "p1", "turns": ["Hello?", "Still there?"]}, {"tier": "p2", "turns": ["Hi"]}]
        (up / OUTPUT).write_text("".join(json.dumps(r) + "\n" for r in gen))
        kind = SampleStage()
        params = node.params.model_copy(update={"questions": ()})
        ctx = RunContext(
            params=params,
            options=node.options,
            inputs={},
            upstream={"questions": up},
            upstream_fps={"questions": "f" * 64},
            fingerprint="x",
            store=store,
            kind=kind,
            name="sample_base",
        )
        res = kind.run(ctx)
    finally:
        store.close()
    rows = [json.loads(x) for x in res.outputs["samples.jsonl"].decode().splitlines()]
    assert [(r["tier"], r["question"]) for r in rows] == [
        ("p1", "Hello?\n\nStill there?"),
        ("p1", "Hello?\n\nStill there?"),
        ("p2", "Hi"),
        ("p2", "Hi"),
    ]
    assert [len(r.get("conversation", [])) for r in rows] == [4, 4, 0, 0]
    assert res.details == {"items": 4, "drawn": 2 * 2 + 2}
    prompts = [c["prompt"] for c in sample_calls(project)]
    assert len(prompts) == 6 and not any(TURNS[0] in p for p in prompts)


# ---------------------------------------------------------------------------------------------
# the real local engine (tiny model)


def conversation_prompt(renderer: Any, conv: list[dict[str, str]]) -> list[int]:
    """The tokens of the prompt for the reply after `conv` (system prompt first)."""
    return renderer.build_generation_prompt(
        [{"role": "system", "content": SYSTEM}, *conv]
    ).to_ints()


def test_two_turn_eval_on_the_local_engine(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    from spar.engines.local import LocalSamplingClient

    sent: list[tuple[list[int], int | None]] = []
    sample = LocalSamplingClient.sample

    def recording(self: Any, prompt: Any, num_samples: int, params: Any) -> Any:
        sent.append((prompt.to_ints(), params.seed))
        return sample(self, prompt, num_samples, params)

    monkeypatch.setattr(LocalSamplingClient, "sample", recording)
    project.edit(lambda d: d["model"].update(engine="local"))
    project.edit(lambda d: d["eval"]["sampling"].update(max_tokens=8))
    set_questions(project, {"direct": [TURNS]}, samples=2)
    assert apply_stages(project, names=("sample_base",)) == ["sample_base"]
    rows = samples(project)
    renderer = load_renderer("qwen3_instruct", str(load_spec(project.spec).model.base_model))
    assert len(rows) == 2 and len(sent) == 4
    # round 1 (both conversations' first turn), then round 2, each prompt the conversation so far
    for row in rows:
        k, conv = row["sample_index"], row["conversation"]
        assert [m["role"] for m in conv] == ["user", "assistant", "user", "assistant"]
        assert [conv[0]["content"], conv[2]["content"]] == TURNS
        assert conv[3]["content"] == row["response"]
        assert sent[k] == (conversation_prompt(renderer, conv[:1]), seed_of(TURNS, k, 0))
        assert sent[2 + k] == (conversation_prompt(renderer, conv[:3]), seed_of(TURNS, k, 1))
    # the tiny random model's replies differ by seed: each second prompt holds its own first reply
    assert rows[0]["conversation"][1] != rows[1]["conversation"][1]
    assert sent[2][0] != sent[3][0]
    # applied again: fresh, nothing sampled
    assert apply_stages(project, names=("sample_base",)) == []
    assert len(sent) == 4


# ---------------------------------------------------------------------------------------------
# the skyrl Tinker server (skipped where its Python 3.12 venv cannot be built, unless CI is set)


@pytest.fixture(scope="module")
def skyrl(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for this module (stopped after it, so it never runs beside the one of
    test_tinker_engine.py)."""
    try:
        venv = ensure_venv()
    except ServerUnavailable as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"skyrl Tinker server: {e}")
    with running_server(venv, tiny_model, tmp_path_factory.mktemp("skyrl-multiturn")) as server:
        yield server


def test_two_turn_eval_on_the_tinker_server(
    skyrl: Server, project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    monkeypatch.setenv("TINKER_BASE_URL", skyrl.url)
    monkeypatch.setenv("TINKER_API_KEY", "tml-spar-test")
    project.edit(lambda d: d["model"].update(engine="tinker"))
    project.edit(lambda d: d["eval"]["sampling"].update(max_tokens=8))
    set_questions(project, {"direct": [TURNS]}, samples=2)
    assert apply_stages(project, names=("sample_base",)) == ["sample_base"]
    rows = samples(project)
    con = sqlite3.connect(skyrl.db, timeout=30)
    try:
        sent = [
            (rid, json.loads(data))
            for rid, data in con.execute(
                "SELECT request_id, request_data FROM futures WHERE request_type = 'SAMPLE' "
                "ORDER BY request_id"
            )
        ]
    finally:
        con.close()
    renderer = load_renderer("qwen3_instruct", str(load_spec(project.spec).model.base_model))

    def tokens(data: dict[str, Any]) -> list[int]:
        return [t for chunk in data["prompt"]["chunks"] for t in chunk["tokens"]]

    assert len(sent) == 4  # 2 conversations x 2 turns
    by_seed = {d["sampling_params"]["seed"]: (rid, tokens(d)) for rid, d in sent}
    assert len(by_seed) == 4
    for row in rows:
        k, conv = row["sample_index"], row["conversation"]
        assert [m["role"] for m in conv] == ["user", "assistant", "user", "assistant"]
        assert [conv[0]["content"], conv[2]["content"]] == TURNS
        assert conv[3]["content"] == row["response"]
        first_id, first = by_seed[seed_of(TURNS, k, 0)]
        second_id, second = by_seed[seed_of(TURNS, k, 1)]
        # the server got the second user turn after the first reply, in a prompt holding it
        assert first_id < second_id
        assert first == conversation_prompt(renderer, conv[:1])
        assert second == conversation_prompt(renderer, conv[:3])
    # both second turns were sent after both first replies: rounds over conversations
    ids = sorted(rid for rid, _ in sent)
    assert {by_seed[seed_of(TURNS, k, 0)][0] for k in (0, 1)} == set(ids[:2])


def test_eval_generate_samples_the_generated_questions(
    project: Project, capsys: pytest.CaptureFixture[str]
) -> None:
    """`eval.generate`: the sample stages read the generate set's output (the fake engine writes
    the questions); the cost preview counts its questions before they exist, then exactly."""
    (project.root / "q.j2").write_text("Write one question {{ definition }}, number {{ index }}.\n")

    def edit(d: dict[str, Any]) -> None:
        d["generate"] = {
            "qs": {
                "generator": {"kind": "fake"},
                "tiers": {"direct": "about factory farming", "distant": "far from it"},
                "steps": [{"name": "question", "template": "q.j2", "count": 3}],
                "output": "questions",
                # the fake engine's replies are near-duplicates: some are removed
                "dedup": {"threshold": 0.6, "shingle": 1},
            }
        }
        del d["eval"]["tiers"]
        d["eval"].update(generate="qs", samples_per_question=2)

    project.edit(edit)

    def estimate() -> int:
        r = project.spar("plan", str(project.spec), "--json", capsys=capsys)
        assert r.code == 0, r.err
        (row,) = [x for x in json.loads(r.out) if x["stage"] == "sample_base"]
        return int(row["estimate"]["sample_calls"])

    assert estimate() == 2 * 3 * 2  # before generation: tiers x count x samples
    apply_stages(project, "generate", "generated")
    generated = read_jsonl(project.runs / "exp/generate.qs/generated.jsonl")
    assert 0 < len(generated) < 6
    assert estimate() == len(generated) * 2  # generated: counted from the file
    assert apply_stages(project, names=("sample_base",)) == ["sample_base"]
    rows = samples(project)
    assert [(r["tier"], r["question"]) for r in rows] == [
        (q["tier"], q["question"]) for q in generated for _ in (0, 1)
    ]
    # what was sampled: each generated question, with its item seed
    seeds = sorted(c["seed"] for c in sample_calls(project) if c["prompt"].count("I suggest"))
    want = sorted(seed_of([q["question"]], k, 0) for q in generated for k in (0, 1))
    assert seeds == want


@pytest.mark.parametrize(
    ("num_turns", "step_turns", "calls"),
    [
        ({}, None, 2 * 2 * 1 * 3),  # properties x count x 1 turn x samples
        ({"sycophancy": 3}, None, 2 * (3 + 1) * 3),  # each property's questions: its turns
        ({"sycophancy": 3}, 2, 2 * 2 * 2 * 3),  # the last step's turns win
    ],
)
def test_generated_multi_turn_questions_cost_every_turn(
    project: Project,
    capsys: pytest.CaptureFixture[str],
    num_turns: dict[str, int],
    step_turns: int | None,
    calls: int,
) -> None:
    (project.root / "p.j2").write_text("A prompt testing {{ property }}, {{ turns }} turns.\n")

    def edit(d: dict[str, Any]) -> None:
        step: dict[str, Any] = {"name": "prompt", "template": "p.j2", "count": 2}
        if step_turns is not None:
            step["turns"] = step_turns
        d["generate"] = {
            "qs": {
                "properties": ["sycophancy", "honesty"],
                "num_turns": num_turns,
                "steps": [step],
                "output": "questions",
            }
        }
        del d["eval"]["tiers"]
        d["eval"].update(generate="qs", samples_per_question=3)

    project.edit(edit)
    r = project.spar("plan", str(project.spec), "--json", capsys=capsys)
    assert r.code == 0, r.err
    rows = {x["stage"]: x for x in json.loads(r.out)}
    for stage in ("sample_base", "sample_finetuned"):
        assert rows[stage]["estimate"]["sample_calls"] == calls
