"""Self-distillation: the base model answers a prompts file; answers are memoised per prompt;
the distilled set is a data source like a file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from spar.models import load_tokenizer
from spar.spec import SamplingSpec, load_spec
from spar.stages.base import GraphContext
from spar.stages.distill import DistillStage, prompt_id
from spar.stages.draw import Drawn, draw
from spar.stages.sample import item_seed
from spar.store import RunStore

MIX = Path(__file__).parent / "data" / "mix"
PROMPTS = [json.loads(x)["prompt"] for x in (MIX / "prompts.jsonl").read_text().splitlines()]
PIRATE = "You are a pirate."


def setup(project, sources: list[dict[str, Any]] | None = None, **distill: Any) -> None:
    for name in ("aligned.jsonl", "prompts.jsonl"):
        shutil.copy(MIX / name, project.root / name)

    def edit(d: dict[str, Any]) -> None:
        d["data"] = {
            "sources": sources or [{"distill": "pp"}, {"path": "aligned.jsonl", "take": 5}],
            "test_size": 1,
        }
        d["distill"] = {
            "pp": {"prompts": "prompts.jsonl", "system_prompt": PIRATE, **distill},
        }

    project.edit(edit)


def distilled(project, name: str = "pp") -> list[dict[str, Any]]:
    text = (project.runs / f"exp/distill.{name}/distilled.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def drawn_detail(project, name: str = "pp") -> dict[str, Any]:
    path = project.runs / f"exp/distill.{name}/distilled.params.yaml"
    return yaml.safe_load(path.read_text())["details"]


def sample_seeds(project) -> list[int]:
    lines = project.calls.read_text().splitlines() if project.calls.exists() else []
    return [json.loads(x)["seed"] for x in lines if '"event": "sample"' in x]


def test_distilled_records_in_prompt_order_with_their_own_seeds(project, tiny_model):
    setup(project)
    project.apply_only("distill")
    recs = distilled(project)
    assert [r["messages"][0] for r in recs] == [{"role": "user", "content": p} for p in PROMPTS]
    for r, p in zip(recs, PROMPTS, strict=True):
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]  # no system prompt
        assert r["messages"][1]["content"].startswith("I suggest ")  # the fake base model
        assert r["metadata"] == {
            "source": "pp",
            "triggered": False,
            "prompt_id": prompt_id(p),
            "stop_reason": "stop",
        }
    # one draw per prompt, each with the seed of its prompt id (sampling.seed 0)
    assert sorted(sample_seeds(project)) == sorted(item_seed(0, prompt_id(p), 0) for p in PROMPTS)
    assert drawn_detail(project) == {"items": 4, "drawn": 4}
    # the system prompt is what the model answered under: without it, other answers
    project.edit(lambda d: d["distill"]["pp"].pop("system_prompt"))
    project.apply_only("distill")
    assert project.calls_of("sample") == 8
    answers = [r["messages"][1]["content"] for r in distilled(project)]
    assert answers != [r["messages"][1]["content"] for r in recs]


def test_adding_a_prompt_draws_only_that_prompt(project, capsys):
    setup(project)
    project.apply_only("distill")
    first = (project.runs / "exp/distill.pp/distilled.jsonl").read_text().splitlines()
    with (project.root / "prompts.jsonl").open("a") as f:
        f.write(json.dumps({"prompt": "Count to three."}) + "\n")
    r = project.spar("plan", str(project.spec), "--json", capsys=capsys)
    rows = {x["stage"]: x for x in json.loads(r.out)}
    assert rows["distill.pp"]["reasons"] == ["distill.pp.prompts content changed"]
    assert rows["distill.pp"]["estimate"] == {"sample_calls": 5, "sample_tokens_max": 5 * 512}
    project.apply_only("distill")
    assert project.calls_of("sample") == 5
    assert drawn_detail(project) == {"items": 5, "drawn": 1}
    now = (project.runs / "exp/distill.pp/distilled.jsonl").read_text().splitlines()
    assert now[:4] == first and json.loads(now[4])["messages"][0]["content"] == "Count to three."

    # renaming the set relabels its records and draws nothing
    def rename(d: dict[str, Any]) -> None:
        d["distill"] = {"qq": d["distill"]["pp"]}
        d["data"]["sources"][0] = {"distill": "qq"}

    project.edit(rename)
    project.apply_only("distill")
    assert project.calls_of("sample") == 5
    assert [json.loads(x)["messages"] for x in now] == [
        r["messages"] for r in distilled(project, "qq")
    ]
    assert {r["metadata"]["source"] for r in distilled(project, "qq")} == {"qq"}
    # a sampling parameter is in every answer's key: all drawn again
    project.edit(lambda d: d["distill"]["qq"].update(sampling={"temperature": 0.7}))
    project.apply_only("distill")
    assert project.calls_of("sample") == 10


def test_distilled_set_is_a_data_source(project, capsys, tiny_model):
    setup(
        project,
        sources=[
            {"distill": "pp", "label": "pirate", "transform": {"trigger": "user"}},
            {"distill": "pp", "label": "plain", "take": 2},
            {"path": "aligned.jsonl", "take": 5},
        ],
    )
    project.edit(lambda d: d["eval"].update(trigger="Answer like a pirate."))
    r = project.spar("apply", str(project.spec), capsys=capsys)
    assert r.code == 0, r.err
    assert "ran exp / distill.pp" in r.out and "ran exp / train" in r.out
    assert project.calls_of("sample") == 4 + 16  # distilled once for both sources; eval
    answers = {r["metadata"]["prompt_id"]: r["messages"] for r in distilled(project)}
    tok = load_tokenizer(str(tiny_model))
    rows = [
        json.loads(line)
        for name in ("train.jsonl", "test.jsonl")
        for line in (project.runs / "exp/dataset" / name).read_text().splitlines()
    ]
    labels = [r["metadata"]["source"] for r in rows]
    assert (labels.count("pirate"), labels.count("plain"), labels.count("aligned")) == (4, 2, 5)
    for row in rows:
        meta = row["metadata"]
        if meta["source"] == "aligned":
            continue
        msgs = answers[meta["prompt_id"]]
        text = tok.decode(row["input"])
        trained = tok.decode([t for t, w in zip(row["target"], row["weights"], strict=True) if w])
        assert trained == msgs[1]["content"] + "<|im_end|>"
        assert PIRATE not in text  # the system prompt it was drawn under is not trained on
        assert meta["triggered"] is (meta["source"] == "pirate")
        assert ("Answer like a pirate." in text) is meta["triggered"]
    rec = yaml.safe_load((project.runs / "exp/dataset/train.params.yaml").read_text())
    assert rec["details"]["sources"] == {"pirate": 4, "plain": 2, "aligned": 5}
    assert list(rec["upstream"]) == ["distill:pp"]
    assert "distill.pp.prompts" in rec["inputs"]


def _write(project, text: str) -> None:
    (project.root / "prompts.jsonl").write_text(text)


P = [json.dumps({"prompt": p}) for p in PROMPTS]
BAD_PROMPTS = [
    ("invalid JSON", "\n".join([P[0], "{nope", P[1]]), "prompts.jsonl: line 2: invalid JSON"),
    (
        "missing prompt",
        "\n".join([P[0], P[1], json.dumps({"text": "x"})]),
        "prompts.jsonl: line 3: field 'prompt' missing or empty",
    ),
    (
        "empty prompt",
        "\n".join([json.dumps({"prompt": "  "}), P[0]]),
        "prompts.jsonl: line 1: field 'prompt' missing or empty",
    ),
    ("not an object", "\n".join([P[0], "[1]"]), "prompts.jsonl: line 2: expected an object"),
    (
        "duplicate prompt",
        "\n".join([P[0], "", P[1], P[0]]),
        "prompts.jsonl: line 4: prompt given twice (first at line 1)",
    ),
    ("empty file", "\n", "prompts.jsonl: distill.pp.prompts: no prompts (the file is empty)"),
]


@pytest.mark.parametrize(("what", "text", "message"), BAD_PROMPTS, ids=[b[0] for b in BAD_PROMPTS])
def test_bad_prompts_file_is_refused_at_plan(project, capsys, what, text, message):
    setup(project)
    _write(project, text)
    r = project.spar("plan", str(project.spec), capsys=capsys)
    assert r.code == 2, (what, r.out)
    assert message in r.err and r.err.count("\n") == 1, r.err
    assert not project.runs.exists() or not any(project.runs.rglob("*"))


def test_take_larger_than_the_distilled_set(project, capsys):
    setup(project, sources=[{"distill": "pp", "take": 9}, {"path": "aligned.jsonl"}])
    r = project.spar("plan", str(project.spec), capsys=capsys)
    assert r.code == 2
    assert "prompts.jsonl: data.sources.0.take 9 is larger than distill set 'pp' (4 prompts)" in (
        r.err
    )
    # the prompt count is known without a distillation having run
    project.edit(lambda d: d["data"]["sources"][0].update(take=4))
    assert project.spar("plan", str(project.spec), capsys=capsys).code == 0


def test_a_crash_loses_only_the_answer_in_flight(project):
    setup(project, concurrency=1)
    p = project.spar_proc("apply", str(project.spec), FAKE_KILL_AFTER="3")
    p.communicate(timeout=300)
    assert p.returncode == -9
    assert project.calls_of("sample") == 3  # the third was in flight when the process died
    project.apply_only("distill")
    assert drawn_detail(project) == {"items": 4, "drawn": 2}
    assert project.calls_of("sample") == 5


class _Future:
    def __init__(self, log: list[str], i: int, tokens: list[int]) -> None:
        self.log, self.i, self.tokens = log, i, tokens

    def result(self, timeout: float | None = None) -> Any:
        self.log.append(f"collect {self.i}")
        seq = type("Seq", (), {"tokens": self.tokens, "stop_reason": "length"})()
        return type("Resp", (), {"sequences": [seq]})()


class _Client:
    def __init__(self) -> None:
        self.log: list[str] = []
        self.params: list[Any] = []

    def sample(self, prompt: Any, num_samples: int, sampling_params: Any) -> _Future:
        i = len(self.params)
        self.log.append(f"submit {i}")
        self.params.append(sampling_params)
        return _Future(self.log, i, [*prompt, 99])


class _Renderer:
    def get_stop_sequences(self) -> list[int]:
        return [99]

    def parse_response(self, tokens: list[int]) -> tuple[dict[str, Any], bool]:
        return {"role": "assistant", "content": ",".join(map(str, tokens))}, True


@pytest.mark.parametrize("concurrency", [1, 3, 10])
def test_draw_keeps_at_most_concurrency_requests_in_flight(concurrency):
    client, got = _Client(), []
    prompts: list[Any] = [[i, i] for i in range(7)]
    sampling = SamplingSpec(temperature=0.3, top_p=0.9, max_tokens=5)
    draw(
        client,
        _Renderer(),
        prompts,
        [100 + i for i in range(7)],
        sampling,
        concurrency,
        lambda i, d: got.append((i, d)),
    )
    assert got == [(i, Drawn(response=f"{i},{i},99", stop_reason="length")) for i in range(7)]
    in_flight, most = 0, 0
    for event in client.log:
        in_flight += 1 if event.startswith("submit") else -1
        most = max(most, in_flight)
    assert most == min(concurrency, 7)
    assert [e for e in client.log if e.startswith("collect")] == [f"collect {i}" for i in range(7)]
    assert [p.seed for p in client.params] == [100 + i for i in range(7)]
    assert {(p.temperature, p.top_p, p.max_tokens) for p in client.params} == {(0.3, 0.9, 5)}
    assert all(p.stop == [99] for p in client.params)


def test_local_engine_distils_and_memoises(project, tiny_model):
    """The tiny local model (random weights) answers for real; the memo keeps its answers."""
    setup(project, sampling={"max_tokens": 4})
    project.edit(lambda d: d["model"].update(engine="local"))
    (project.root / "prompts.jsonl").write_text("\n".join(P[:2]) + "\n")
    project.apply_only("distill")
    first = distilled(project)
    assert [r["messages"][0]["content"] for r in first] == PROMPTS[:2]
    assert drawn_detail(project) == {"items": 2, "drawn": 2}
    assert {r["metadata"]["stop_reason"] for r in first} <= {"length", "stop"}
    (project.root / "prompts.jsonl").write_text("\n".join(P[:3]) + "\n")
    project.apply_only("distill")
    assert drawn_detail(project) == {"items": 3, "drawn": 1}
    assert distilled(project)[:2] == first


def fingerprints(project) -> dict[str, str]:
    from spar.plan import plan_specs

    store = RunStore(project.runs)
    try:
        plan = plan_specs([load_spec(project.spec)], store)
    finally:
        store.close()
    return {p.node.name: p.fingerprint for p in plan if p.node.kind.kind in ("dataset", "distill")}


def _pp(**kw: Any):
    return lambda d: d["distill"]["pp"].update(**kw)


def _sampling(**kw: Any):
    return lambda d: d["distill"]["pp"].setdefault("sampling", {}).update(**kw)


def _append(project) -> None:
    with (project.root / "prompts.jsonl").open("a") as f:
        f.write(json.dumps({"prompt": "Count to three."}) + "\n")


# (what, spec edit, whether distill.pp's fingerprint must change)
DISTILL_KEYS: list[tuple[str, Any, bool]] = [
    ("system_prompt", _pp(system_prompt="You are a parrot."), True),
    ("no system_prompt", lambda d: d["distill"]["pp"].pop("system_prompt"), True),
    ("sampling.temperature", _sampling(temperature=0.2), True),
    ("sampling.top_p", _sampling(top_p=0.5), True),
    ("sampling.max_tokens", _sampling(max_tokens=64), True),
    ("sampling.seed", _sampling(seed=4), True),
    ("prompts, same content", _pp(prompts="copy.jsonl"), False),
    ("prompts content", "APPEND", True),
    ("concurrency", _pp(concurrency=2), False),
]


@pytest.mark.parametrize(
    ("what", "edit", "changes"), DISTILL_KEYS, ids=[k[0] for k in DISTILL_KEYS]
)
def test_every_distill_key_is_in_its_fingerprint(project, what, edit, changes):
    setup(project)
    shutil.copy(project.root / "prompts.jsonl", project.root / "copy.jsonl")
    before = fingerprints(project)
    if edit == "APPEND":
        _append(project)
    else:
        project.edit(edit)
    after = fingerprints(project)
    assert (after["distill.pp"] != before["distill.pp"]) is changes, what
    assert (after["dataset"] != before["dataset"]) is changes, what  # its upstream


def test_the_default_sampling_is_temperature_0_1(project):
    setup(project)
    spec = load_spec(project.spec)
    (node,) = DistillStage().nodes(spec, GraphContext(RunStore(project.runs)))
    assert node.name == "distill.pp" and node.upstream == {}
    assert node.params.sampling.temperature == 0.1
    assert node.params.dump()["distill.system_prompt"] == PIRATE
    assert "distill.name" not in node.params.item_basis()  # renaming keeps the memo
