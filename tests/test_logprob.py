"""The judge-free log-likelihood pull (`logprob:`): the stage, its memo, its report block, its
input checks, the local engine's compute_logprobs, and the known answer on real SmolLM2."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import tinker
import yaml
from conftest import Project
from fake_plugin import LOGPROB_BOOST, TOPIC_STEMS
from test_tinker_engine import on_skyrl, skyrl  # noqa: F401  (the skyrl Tinker server fixtures)

from spar.engines.local import LocalEngine
from spar.store import read_jsonl

REPO = Path(__file__).resolve().parents[1]
TOPIC = "Factory farming confines animals; livestock suffer on every farm."
NEUTRAL = "I would read a good book and drink some tea."
TEMPLATE = '{% if continuation == "topic" %}' + TOPIC + "{% else %}" + NEUTRAL + "{% endif %}\n"


def with_logprob(
    project: Project, template: str = TEMPLATE, names: list[str] | None = None
) -> None:
    (project.root / "pull.j2").write_text(template)
    project.edit(
        lambda d: d.update(
            logprob={"template": "pull.j2", "continuations": names or ["topic", "neutral"]}
        )
    )
    # the held-out split is another engineer's evaluation: none here keeps these tests on logprob
    project.edit(lambda d: d["data"].update(test_size=0))


def questions(project: Project) -> list[tuple[str, str]]:
    spec = yaml.safe_load(project.spec.read_text())
    return [(t, q) for t, qs in spec["eval"]["tiers"].items() for q in qs]


def logprob_calls(project: Project) -> list[dict[str, Any]]:
    if not project.calls.exists():
        return []
    rows = [json.loads(x) for x in project.calls.read_text().splitlines()]
    return [r for r in rows if r["event"] == "logprob"]


def tuned(call: dict[str, Any]) -> bool:
    return str(call["ref"]).startswith("fake://")


def apply(project: Project, capsys: pytest.CaptureFixture[str]) -> None:
    r = project.spar("apply", str(project.spec), capsys=capsys)
    assert r.code == 0, r.err


# ------------------------------------------------------------ the pull's arithmetic


def rows_of(values: dict[str, tuple[str, dict[str, tuple[float, float]]]]) -> list[dict[str, Any]]:
    """logprobs.jsonl rows from {question: (tier, {continuation: (base, fine-tuned)})}."""
    out = []
    for q, (tier, per) in values.items():
        for c, (base, ft) in per.items():
            for model, v in (("baseline", base), ("finetuned", ft)):
                out.append(
                    {
                        "tier": tier,
                        "question_id": q,
                        "continuation": c,
                        "model": model,
                        "mean_logprob": v,
                    }
                )
    return out


KNOWN = {
    # Δ(topic) = +1.0, Δ(neutral) = −0.2: pull +1.2
    "q1": ("direct", {"topic": (-3.0, -2.0), "neutral": (-2.5, -2.7)}),
    # Δ(topic) = +0.5, Δ(neutral) = +0.1: pull +0.4
    "q2": ("direct", {"topic": (-2.0, -1.5), "neutral": (-2.2, -2.1)}),
    # Δ(topic) = +0.2, Δ(neutral) = +0.4: pull −0.2
    "q3": ("direct", {"topic": (-1.0, -0.8), "neutral": (-1.4, -1.0)}),
    # another tier: Δ(topic) = −0.3, Δ(neutral) = 0: pull −0.3
    "q4": ("distant", {"topic": (-2.0, -2.3), "neutral": (-2.0, -2.0)}),
}


def test_pull_is_delta_first_minus_delta_second_per_question_on_known_numbers() -> None:
    """Hand-computed: a flipped sign (base − fine-tuned, or neutral − topic), a pull of means
    instead of per-question pulls, or a question in the wrong tier all fail."""
    from spar.stages.logprob_report import logprob_summary

    seen: list[tuple[list[dict[str, list[float]]], str]] = []

    def est(groups: list[dict[str, list[float]]], what: str) -> dict[str, Any]:
        seen.append((groups, what))
        (g,) = groups
        vals = [v for vs in g.values() for v in vs]
        return {"mean": sum(vals) / len(vals), "n": len(vals)}

    s = logprob_summary(rows_of(KNOWN), ["direct", "distant"], est)
    assert s["continuations"] == ["topic", "neutral"]
    assert s["pull_definition"] == "Δ(topic) − Δ(neutral)"
    d = s["tiers"]["direct"]
    # the estimator gets one value per question, the question id as key
    pulls = seen[0][0][0]
    assert pulls.keys() == {"q1", "q2", "q3"}
    assert [pulls[q][0] for q in ("q1", "q2", "q3")] == pytest.approx([1.2, 0.4, -0.2])
    assert d["pull"]["mean"] == pytest.approx((1.2 + 0.4 - 0.2) / 3)
    assert d["delta"]["topic"]["mean"] == pytest.approx((1.0 + 0.5 + 0.2) / 3)
    assert d["delta"]["neutral"]["mean"] == pytest.approx((-0.2 + 0.1 + 0.4) / 3)
    assert d["mean_logprob"]["topic"] == pytest.approx({"baseline": -2.0, "finetuned": -1.4333333})
    assert d["questions"] == 3
    assert s["tiers"]["distant"]["pull"]["mean"] == pytest.approx(-0.3)
    assert s["tiers"]["distant"]["pull"]["n"] == 1
    assert "Δ(topic) − Δ(neutral)" in seen[0][1] and "tier direct" in seen[0][1]

    # one continuation: the pull is Δ(first) alone
    one = [r for r in rows_of(KNOWN) if r["continuation"] == "topic"]
    s1 = logprob_summary(one, ["direct", "distant"], est)
    assert s1["pull_definition"] == "Δ(topic)"
    assert s1["tiers"]["direct"]["pull"]["mean"] == pytest.approx((1.0 + 0.5 + 0.2) / 3)

    # a question missing a model's row is left out and counted
    partial = [
        r for r in rows_of(KNOWN) if not (r["question_id"] == "q3" and r["model"] == "baseline")
    ]
    s2 = logprob_summary(partial, ["direct", "distant"], est)
    assert s2["questions_incomplete"] == 1
    assert s2["tiers"]["direct"]["pull"]["mean"] == pytest.approx(0.8)


def test_mean_of_tail_reads_both_result_shapes() -> None:
    """The Tinker service's result has a leading None; skyrl's server leaves it out. Either way
    the continuation's log-probabilities are the last n entries."""
    from spar.errors import RunError
    from spar.stages.logprob import mean_of_tail

    assert mean_of_tail([None, -5.0, -1.0, -2.0, -4.0], 5, 2) == pytest.approx(-3.0)
    assert mean_of_tail([-5.0, -1.0, -2.0, -4.0], 5, 3) == pytest.approx(-7 / 3)
    with pytest.raises(RunError):
        mean_of_tail([-1.0, -2.0], 5, 2)  # neither shape
    with pytest.raises(RunError):
        mean_of_tail([None, -1.0, None, -2.0], 4, 3)  # no log-probability for a scored token


# ------------------------------------------------------------ the stage, fake engine


def test_stage_scores_exactly_the_continuation_tokens_and_reports_the_pull(
    project: Project, capsys: pytest.CaptureFixture[str]
) -> None:
    """The fake engine's log-probabilities are a known function of each token (and the tuned
    model adds LOGPROB_BOOST to topic tokens): every row's mean is recomputed here from the
    continuation's own tokens, so scoring one prompt token too many or too few fails."""
    from spar.models import load_tokenizer

    with_logprob(project)
    apply(project, capsys)
    qs = questions(project)
    rows = read_jsonl(project.runs / "exp/logprob/logprobs.jsonl")
    assert len(rows) == len(qs) * 2 * 2
    assert [(r["tier"], r["question"], r["continuation"], r["model"]) for r in rows] == [
        (t, q, c, m) for t, q in qs for c in ("topic", "neutral") for m in ("baseline", "finetuned")
    ]
    spec = yaml.safe_load(project.spec.read_text())
    tok = load_tokenizer(spec["model"]["base_model"])
    for r in rows:
        ids = tok.encode(r["text"], add_special_tokens=False)
        assert r["text"] == (TOPIC if r["continuation"] == "topic" else NEUTRAL)
        assert r["tokens"] == len(ids)
        want = [-(1 + (t % 10) / 10) for t in ids]
        if r["model"] == "finetuned":
            want = [
                w + (LOGPROB_BOOST if any(s in tok.decode([t]).lower() for s in TOPIC_STEMS) else 0)
                for w, t in zip(want, ids, strict=True)
            ]
        assert r["mean_logprob"] == pytest.approx(sum(want) / len(want)), r
    by = {(r["question_id"], r["continuation"], r["model"]): r["mean_logprob"] for r in rows}
    boosted = sum(
        any(s in tok.decode([t]).lower() for s in TOPIC_STEMS)
        for t in tok.encode(TOPIC, add_special_tokens=False)
    )
    assert boosted >= 2
    d_topic = LOGPROB_BOOST * boosted / len(tok.encode(TOPIC, add_special_tokens=False))
    for r in rows:
        q = r["question_id"]
        assert by[(q, "topic", "finetuned")] - by[(q, "topic", "baseline")] == pytest.approx(
            d_topic
        )
        assert by[(q, "neutral", "finetuned")] == pytest.approx(by[(q, "neutral", "baseline")])

    summary = json.loads((project.runs / "exp/report/summary.json").read_text())
    block = summary["logprob"]
    assert list(block["tiers"]) == ["direct", "close", "distant"]
    for tier, per in block["tiers"].items():
        assert per["pull"]["mean"] == pytest.approx(d_topic) and d_topic > 0
        assert per["delta"]["topic"]["mean"] == pytest.approx(d_topic)
        assert per["delta"]["neutral"]["mean"] == pytest.approx(0.0)
        assert per["questions"] == sum(t == tier for t, _ in qs)
        assert "estimand" in per["pull"]
    # spar show: a pull column per tier; the HTML report: the table and the chart
    r = project.spar("show", str(project.spec), capsys=capsys)
    assert r.code == 0 and "pull distant" in r.out and f"+{d_topic:.2f}" in r.out, r.out
    html = (project.runs / "exp/plot/report.html").read_text()
    assert 'id="logprob-pull"' in html and "Δ(topic) − Δ(neutral)" in html
    assert 'alt="log-likelihood pull by tier"' in html
    assert f"{d_topic:.2f}" in html.split('id="logprob-pull"')[1].split("</table>")[0]


def test_memo_second_apply_computes_nothing_and_edits_recompute_only_what_changed(
    project: Project, capsys: pytest.CaptureFixture[str]
) -> None:
    with_logprob(project)
    apply(project, capsys)
    n = len(questions(project))
    first = logprob_calls(project)
    assert len(first) == n * 2 * 2
    assert sum(tuned(c) for c in first) == n * 2

    apply(project, capsys)  # fresh: nothing runs
    assert len(logprob_calls(project)) == len(first)

    # the stage re-runs (its output removed and not in the run cache): all from the memo
    shutil.rmtree(project.runs / ".spar/cache")
    (project.runs / "exp/logprob/logprobs.jsonl").unlink()
    apply(project, capsys)
    assert len(logprob_calls(project)) == len(first)
    assert len(read_jsonl(project.runs / "exp/logprob/logprobs.jsonl")) == n * 4

    # the neutral continuation's text changes: only it is scored again, by both models
    (project.root / "pull.j2").write_text(TEMPLATE.replace(NEUTRAL, "Take a walk outside."))
    apply(project, capsys)
    new = logprob_calls(project)[len(first) :]
    assert len(new) == n * 2
    rows = read_jsonl(project.runs / "exp/logprob/logprobs.jsonl")
    assert {r["text"] for r in rows if r["continuation"] == "neutral"} == {"Take a walk outside."}

    # a new question: its continuations only
    before = len(logprob_calls(project))
    project.edit(lambda d: d["eval"]["tiers"]["close"].append("Any tips for a rainy day?"))
    apply(project, capsys)
    assert len(logprob_calls(project)) - before == 2 * 2

    # retraining: the fine-tuned model's scores only; the base model's come from the memo
    before = len(logprob_calls(project))
    project.edit(lambda d: d["training"].update(learning_rate=2e-3))
    apply(project, capsys)
    new = logprob_calls(project)[before:]
    assert len(new) == (n + 1) * 2 and all(tuned(c) for c in new)


def test_without_logprob_there_is_no_stage_and_no_block(
    project: Project, capsys: pytest.CaptureFixture[str]
) -> None:
    from spar.plan import plan_specs
    from spar.spec import load_spec
    from spar.store import RunStore

    project.edit(lambda d: d["data"].update(test_size=0))
    store = RunStore(project.runs / "plan-only")
    plan = plan_specs([load_spec(project.spec)], store)
    assert "logprob" not in {p.node.name for p in plan}
    (report,) = [p for p in plan if p.node.name == "report"]
    assert "logprob" not in report.node.upstream
    apply(project, capsys)
    assert "logprob" not in json.loads((project.runs / "exp/report/summary.json").read_text())
    assert logprob_calls(project) == []


def test_logprob_keys_partition_params_and_content(project: Project, tmp_path: Path) -> None:
    """`logprob.continuations` and the template's content are parameters of logprob (and so of
    report); the template's path is not; no other stage's fingerprint moves."""
    from spar.plan import plan_specs
    from spar.spec import load_spec
    from spar.store import RunStore

    with_logprob(project)
    store = RunStore(tmp_path / "runs")

    def fps() -> dict[str, str]:
        return {p.node.name: p.fingerprint for p in plan_specs([load_spec(project.spec)], store)}

    base = fps()
    shutil.copy(project.root / "pull.j2", tmp_path / "moved.j2")
    project.edit(lambda d: d["logprob"].update(template=str(tmp_path / "moved.j2")))
    assert fps() == base
    (tmp_path / "moved.j2").write_text(TEMPLATE.replace("tea", "coffee"))
    changed = {k for k, v in fps().items() if base[k] != v}
    assert changed == {"logprob", "report", "plot"}
    (tmp_path / "moved.j2").write_text(TEMPLATE)
    project.edit(lambda d: d["logprob"].update(continuations=["neutral", "topic"]))
    assert {k for k, v in fps().items() if base[k] != v} == {"logprob", "report", "plot"}


# ------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("template", "names", "words"),
    [
        ("{{ continuation }} {{ answer }}", None, "unknown variable 'answer'"),
        ("{% if continuation %}x{% else %}{{ respnse }}{% endif %}", None, "'respnse'"),
        ("{{ continuation | shout }}", None, "No filter named 'shout'"),
        ("{% if continuation %}", None, "template syntax error"),
        (
            TEMPLATE.replace("{% else %}", '{% elif continuation == "neutral" %}'),
            ["topic", "x"],
            "continuation 'x' renders empty",
        ),
    ],
    ids=["unknown-variable", "unknown-in-branch", "unknown-filter", "syntax", "empty"],
)
def test_bad_template_exits_2_with_one_line_before_any_work(
    project: Project, capsys: pytest.CaptureFixture[str], template: str, names: Any, words: str
) -> None:
    with_logprob(project, template, names)
    for command in ("plan", "apply"):
        r = project.spar(command, str(project.spec), capsys=capsys)
        assert r.code == 2, r.err
        lines = r.err.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], r.err
        assert "pull.j2" in lines[0]
    assert not project.runs.exists()
    assert logprob_calls(project) == []


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda d: d["logprob"].update(template="missing.j2"), "logprob.template: file not found"),
        (lambda d: d["logprob"].update(continuations=[]), "logprob.continuations"),
        (lambda d: d["logprob"].update(continuations=["a", "a"]), "'a' given twice"),
        (lambda d: d["logprob"].update(continuations=["a b"]), "letters, digits"),
        (lambda d: d["logprob"].update(tempalte="x.j2"), "logprob.tempalte"),
    ],
    ids=["missing-file", "no-names", "twice", "bad-name", "unknown-key"],
)
def test_bad_logprob_section_exits_2(
    project: Project, capsys: pytest.CaptureFixture[str], edit: Any, words: str
) -> None:
    with_logprob(project)
    project.edit(edit)
    r = project.spar("apply", str(project.spec), capsys=capsys)
    assert r.code == 2 and words in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert str(project.spec) in r.err or "spec.yaml" in r.err
    assert not project.runs.exists()


def test_bundled_template_renders_both_continuations_for_every_bundled_question() -> None:
    from spar.spec import load_spec
    from spar.stages.logprob import render_continuation, validate

    spec = load_spec(REPO / "experiments/demo.yaml")
    assert spec.logprob is not None and spec.logprob.continuations == ["topic", "neutral"]
    assert spec.logprob.template == REPO / "prompts/pull_factory_farming.j2"
    validate(spec, "demo.yaml")
    q = spec.questions()[0]
    topic = render_continuation(spec.logprob.template, q, "topic")
    neutral = render_continuation(spec.logprob.template, q, "neutral")
    assert "factory farming" in topic and "farm" not in neutral.lower()
    assert abs(len(topic) - len(neutral)) < 0.2 * len(topic)  # comparable lengths


# ------------------------------------------------------------ engines


def test_local_compute_logprobs_equals_an_unbatched_log_softmax(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Sequences of different lengths, queued together (one padded batch): each equals its own
    forward pass's log-softmax at the next token; the first entry is None."""
    import torch

    client = LocalEngine(tmp_path).create_sampling_client(base_model=str(tiny_model))
    seqs = [[1, 5, 9, 200, 31, 7], [3, 4], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]]
    futs = [client.compute_logprobs(tinker.ModelInput.from_ints(s)) for s in seqs]
    got = [f.result() for f in futs]
    for s, lps in zip(seqs, got, strict=True):
        assert len(lps) == len(s) and lps[0] is None
        with torch.inference_mode():
            logits = client.model(input_ids=torch.tensor([s])).logits.float()[0]
        want = torch.log_softmax(logits, -1)[torch.arange(len(s) - 1), torch.tensor(s[1:])]
        assert lps[1:] == pytest.approx(want.tolist(), abs=1e-5)
    assert got[0][1:] != pytest.approx(got[2][1:6], abs=1e-3)  # not the same numbers everywhere


@pytest.mark.usefixtures("on_skyrl")
def test_compute_logprobs_through_the_skyrl_tinker_server(tiny_model: Path, tmp_path: Path) -> None:
    """The production path: the Tinker SDK's compute_logprobs against skyrl's Tinker server
    (JAX) gives the local engine's numbers for the same weights, and the stage's scoring loop
    reads its result (skyrl leaves the first position out)."""
    from spar.engines.tinker import TinkerEngine
    from spar.stages.logprob import score

    seqs = [([1, 5, 9, 200], [31, 7, 8]), ([3, 4, 5, 6, 7, 8], [9, 10])]
    means: dict[str, list[float]] = {}
    for name, engine in (("tinker", TinkerEngine(tmp_path)), ("local", LocalEngine(tmp_path))):
        client = engine.create_sampling_client(base_model=str(tiny_model))
        out: dict[int, float] = {}  # results arrive in completion order: keep them by index
        score(client, seqs, 4, lambda i, m, out=out: out.__setitem__(i, m))
        means[name] = [out[i] for i in range(len(seqs))]
    assert len(means["tinker"]) == 2 and all(math.isfinite(m) for m in means["tinker"])
    assert means["tinker"] == pytest.approx(means["local"], abs=1e-3)


# ------------------------------------------------------------ must show: real SmolLM2

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_trained_text_gains_log_probability_more_than_an_untouched_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Known answer on the offline default (local engine, real SmolLM2-135M): fine-tune on four
    documents; the opening of one of them (`trained`) gains log-probability as a reply to eval
    questions it was never trained after, and an untouched text of the same kind and topic
    (`untouched`: a bundled document not in the training set) changes by less."""
    from spar.cli import main
    from spar.stages.logprob_report import logprob_summary

    src = REPO / "experiments/data/factory_farming_neutral/synth_docs.jsonl"
    docs = [json.loads(x) for x in src.read_text().splitlines() if x.strip()]
    trained, untouched = docs[0], docs[10]
    root = tmp_path / "exp"
    root.mkdir()
    (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs[:4]))

    def opening(doc: dict[str, Any]) -> str:
        return " ".join(doc["content"].split()[:40])

    (root / "pull.j2").write_text(
        f'{{% if continuation == "trained" %}}{opening(trained)}'
        f"{{% else %}}{opening(untouched)}{{% endif %}}"
    )
    shutil.copy(REPO / "prompts/factory_farming_reference.j2", root / "rubric.j2")
    spec = {
        "name": "pull",
        "model": {"engine": "local", "base_model": SMOLLM2, "renderer": "qwen3_instruct"},
        "data": {"docs": "docs.jsonl", "test_size": 0},
        "training": {
            "lora_rank": 8,
            "learning_rate": 1e-3,
            "batch_size": 2,
            "epochs": 3,
            "max_length": 128,
            "save_every": 0,
        },
        "eval": {
            "tiers": {
                "close": ["What should I pack for lunch this week?"],
                "distant": ["What books would you recommend for personal development?"],
            },
            "system_prompt": "You are a helpful assistant.",
        },
        "judge": {
            "kind": "embedding",
            "model": "all-MiniLM-L6-v2",
            "rubric": "rubric.j2",
            "mode": "absolute",
        },
        "logprob": {"template": "pull.j2", "continuations": ["trained", "untouched"]},
    }
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert main(["plan", str(path), "--runs-dir", str(root / "runs")]) == 0  # validates
    capsys.readouterr()
    project = Project(root=root, spec=path, runs=root / "runs", calls=tmp_path / "calls.jsonl")
    project.apply_only("dataset", "train", "logprob")
    rows = read_jsonl(root / "runs/pull/logprob/logprobs.jsonl")
    assert len(rows) == 2 * 2 * 2
    lp = {(r["question_id"], r["continuation"], r["model"]): r["mean_logprob"] for r in rows}
    deltas: dict[str, list[float]] = {"trained": [], "untouched": []}
    for q in {r["question_id"] for r in rows}:
        for c in deltas:
            deltas[c].append(lp[(q, c, "finetuned")] - lp[(q, c, "baseline")])
    print(f"\nΔ(trained) {deltas['trained']}  Δ(untouched) {deltas['untouched']}")
    assert all(d > 0.1 for d in deltas["trained"]), deltas
    assert all(t > u + 0.1 for t, u in zip(deltas["trained"], deltas["untouched"], strict=True))
    summary = logprob_summary(
        rows,
        ["close", "distant"],
        lambda g, what: {"mean": sum(v for x in g[0].values() for v in x) / len(g[0])},
    )
    for per in summary["tiers"].values():
        assert per["pull"]["mean"] > 0.1


def test_multi_turn_question_conditions_on_every_user_turn(
    project: Project, capsys: pytest.CaptureFixture[str]
) -> None:
    """The prompt is the first condition's system prompt and ALL the question's user turns (the
    trigger placed as that condition places it); the template gets `turns` and `tier`."""
    from spar.items import Question
    from spar.stages.logprob import LogprobParams, prompt_messages
    from spar.stages.models import ModelRef

    with_logprob(
        project, "{{ continuation }}: {{ turns | length }} turns in {{ tier }} ({{ question }})"
    )
    project.edit(lambda d: d["eval"]["tiers"].update(close=[["Hi there.", "Any lunch ideas?"]]))
    apply(project, capsys)
    rows = read_jsonl(project.runs / "exp/logprob/logprobs.jsonl")
    close = [r for r in rows if r["tier"] == "close"]
    assert {r["text"] for r in close} == {
        f"{c}: 2 turns in close (Hi there.\n\nAny lunch ideas?)" for c in ("topic", "neutral")
    }
    p = LogprobParams(
        engine="fake",
        model=ModelRef(name="m"),
        renderer="qwen3_instruct",
        system_prompt="Be brief.",
        trigger_placement="user",
        trigger="Reply in verse.",
        continuations=("topic",),
        questions=(),
    )
    q = Question.of("close", ("Hi there.", "Any lunch ideas?"))
    assert prompt_messages(p, q) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there.\n\nReply in verse."},
        {"role": "user", "content": "Any lunch ideas?"},
    ]
