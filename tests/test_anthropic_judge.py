"""judge `anthropic` against a local Messages API server (tests/anthropic_server.py), real SDK.

Nothing here leaves 127.0.0.1: ANTHROPIC_BASE_URL points at the test server and the key is a
dummy. Assertions are on counts and outcomes the server recorded, never on durations.
"""

from __future__ import annotations

import json
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from anthropic_server import AnthropicServer, digest, judgement

from spar.errors import RunError
from spar.judges.anthropic import AnthropicJudge, static_prefix
from spar.judges.base import JudgeRequest, Verdict
from spar.judges.rubric import context, render
from spar.plan import build_graph
from spar.spec import JudgeSpec, load_spec

ABSOLUTE = Path(__file__).resolve().parents[1] / "prompts/factory_farming_absolute.j2"
MESSAGES = "/v1/messages"


@pytest.fixture(autouse=True)
def _local_only(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "ANTHROPIC_AUTH_TOKEN",
        "ANTHROPIC_PROFILE",
        "ANTHROPIC_CUSTOM_HEADERS",
        "ANTHROPIC_IDENTITY_TOKEN",
        "ANTHROPIC_IDENTITY_TOKEN_FILE",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", "http://127.0.0.1:9")  # until a server replaces it
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    monkeypatch.setenv("SPAR_BATCH_POLL_SECONDS", "0.01")


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[AnthropicServer]:
    s = AnthropicServer(retry_after=0.3).start()
    monkeypatch.setenv("ANTHROPIC_BASE_URL", s.url)
    yield s
    s.stop()


def judge_spec(rubric: Path = ABSOLUTE, **kw: object) -> JudgeSpec:
    return JudgeSpec(kind="anthropic", model="claude-test", rubric=rubric, mode="absolute", **kw)  # type: ignore[arg-type]


def requests_for(answers: list[str], rubric: Path = ABSOLUTE) -> list[JudgeRequest]:
    out = []
    for n, answer in enumerate(answers):
        question = f"Question {n}: what should I cook tonight?"
        ctx = context(
            "absolute",
            tier="close",
            question=question,
            response=answer,
            baseline_response=None,
            scale_min=1,
            scale_max=5,
        )
        out.append(JudgeRequest(prompt=render(rubric, ctx), question=question, response=answer))
    return out


def judge_all(
    judge: AnthropicJudge, reqs: list[JudgeRequest], concurrency: int = 4
) -> dict[int, Verdict]:
    pairs = list(judge.judge_many(reqs, concurrency))
    indices = [i for i, _ in pairs]
    assert sorted(indices) == list(range(len(reqs))), "every item exactly once"
    return dict(sorted(pairs))


def expected(req: JudgeRequest) -> float:
    return float(judgement(req.prompt)[0])


# ------------------------------------------------------------------------------ direct API


def test_fault_mix_every_item_ends_scored_or_invalid(server: AnthropicServer) -> None:
    plain = [f"Try {w}." for w in ("pasta", "a farm salad", "animal-free chili", "livestock")]
    faulty = {
        "429": 2,  # requests the server sees for that prompt
        "529": 2,
        "500": 2,
        "hang": 2,  # the client timeout (2.5 s) fires, the SDK retries
        "529, 500": 3,
        "garbage": 2,  # one re-ask
        "range": 2,
        "float": 2,
        "garbage+": 3,  # 1 + max_reasks, then invalid
        "529+": 3,  # 1 + max_retries, then invalid (never a number)
    }
    answers = plain * 3 + [f"[[faults: {f}]] farm animals" for f in faulty]
    reqs = requests_for(answers)
    judge = AnthropicJudge(judge_spec(max_reasks=2), timeout=2.5, max_retries=2)
    out = judge_all(judge, reqs, concurrency=6)

    counts = server.prompts()
    for i, req in enumerate(reqs[: len(plain) * 3]):
        assert out[i].status == "ok" and out[i].score == expected(req)
        assert counts[req.prompt] == 1
    for k, (fault, n) in enumerate(faulty.items()):
        i = len(plain) * 3 + k
        assert counts[reqs[i].prompt] == n, fault
        if fault in ("garbage+", "529+"):
            assert out[i].status == "invalid" and out[i].score is None, fault
        else:
            assert out[i] == Verdict(
                score=expected(reqs[i]), reasoning=judgement(reqs[i].prompt)[1], status="ok"
            ), fault
    garbage, overloaded = out[len(answers) - 2], out[len(answers) - 1]
    assert "no usable answer in 3 asks: no JSON object" in garbage.reasoning
    assert "529 overloaded_error" in overloaded.reasoning
    # a re-ask shows the model its bad answer and says what was wrong
    reask = [s for s in server.requests if "[[faults: range]]" in s.prompt][1]
    assert [m["role"] for m in reask.body["messages"]] == ["user", "assistant", "user"]
    assert "score 99 is outside [1, 5]" in reask.body["messages"][2]["content"]
    # the hung request was retried by the SDK after its timeout, not re-asked
    hang = [s for s in server.requests if "[[faults: hang]]" in s.prompt]
    assert [s.headers.get("x-stainless-retry-count") for s in hang] == ["0", "1"]
    assert len(hang[1].body["messages"]) == 1


def test_retry_after_is_respected(server: AnthropicServer) -> None:
    # retry-after 1 s is longer than the SDK's own first backoff (0.375-0.5 s): a client that
    # ignored it would retry early, which the server counts (against its own clock)
    server.retry_after = 1.0
    reqs = requests_for([f"[[faults: 429]] answer {n} about livestock" for n in range(6)])
    out = judge_all(AnthropicJudge(judge_spec(), max_retries=2), reqs)
    assert all(v.status == "ok" and v.score == expected(reqs[i]) for i, v in out.items())
    assert Counter(s.outcome for s in server.requests) == {"429": 6, "ok": 6}
    assert server.early_retries == 0


def test_unusable_answers_are_reasked_then_invalid(server: AnthropicServer) -> None:
    answers = [
        "[[faults: garbage+]] x",
        "[[faults: range+]] x",
        "[[faults: float+]] x",
        "[[faults: garbage]] farm",
    ]
    reqs = requests_for(answers)
    out = judge_all(AnthropicJudge(judge_spec(max_reasks=1)), reqs)
    counts = server.prompts()
    assert [counts[r.prompt] for r in reqs] == [2, 2, 2, 2]
    assert [v.status for v in out.values()] == ["invalid"] * 3 + ["ok"]
    assert "no JSON object" in out[0].reasoning
    assert "score 99 is outside [1, 5]" in out[1].reasoning
    assert "score 2.5 is not an integer" in out[2].reasoning
    assert out[3].score == expected(reqs[3])
    # max_reasks 0: one ask, then invalid
    out = judge_all(AnthropicJudge(judge_spec(max_reasks=0)), requests_for(["[[faults: range]]"]))
    assert out[0].status == "invalid"


def test_a_slot_is_freed_only_once_the_stage_has_taken_the_verdict(
    server: AnthropicServer,
) -> None:
    # What a crash can lose is bounded by `concurrency`: while the stage holds a verdict (it is
    # journaling it), that item's slot stays taken, so no further request is sent.
    reqs = requests_for([f"answer {n}" for n in range(10)])
    verdicts = AnthropicJudge(judge_spec()).judge_many(reqs, concurrency=2)
    first = next(verdicts)
    assert not server.wait_for(lambda s: len(s.requests) > 2, timeout=1.0)
    rest = list(verdicts)
    assert sorted(i for i, _ in [first, *rest]) == list(range(10))
    assert len(server.requests) == 10


def test_authentication_error_aborts_with_one_line(
    server: AnthropicServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "fake-wrong-key-0123456789")
    reqs = requests_for([f"answer {n}" for n in range(40)])
    with pytest.raises(RunError) as e:
        list(AnthropicJudge(judge_spec()).judge_many(reqs, concurrency=4))
    msg = str(e.value)
    assert "401 authentication_error" in msg and "\n" not in msg
    assert "sk-ant-wrong" not in msg
    assert len(server.requests) <= 4  # it stopped; it did not try every item


def test_no_credentials_aborts(
    server: AnthropicServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    monkeypatch.setenv("ANTHROPIC_CONFIG_DIR", str(tmp_path))  # no profile on disk either
    with pytest.raises(RunError, match="no credentials: set ANTHROPIC_API_KEY"):
        list(AnthropicJudge(judge_spec()).judge_many(requests_for(["a"]), concurrency=1))
    assert server.requests == []


def test_an_outage_aborts_instead_of_memoising_invalids(server: AnthropicServer) -> None:
    reqs = requests_for([f"[[faults: 500+]] answer {n}" for n in range(30)])
    seen: list[tuple[int, Verdict]] = []
    with pytest.raises(RunError, match="10 requests in a row failed"):
        for pair in AnthropicJudge(judge_spec(), max_retries=0).judge_many(reqs, concurrency=2):
            seen.append(pair)
    assert seen == []  # nothing was handed to the stage to journal
    assert len(server.requests) < 30


# ------------------------------------------------------------------------------ prompt caching


def test_static_rubric_prefix_is_sent_as_a_cached_block(
    server: AnthropicServer, tmp_path: Path
) -> None:
    guide = "".join(
        f"- Guideline {n}: score only the topic, never tone or style.\n" for n in range(90)
    )
    rubric = tmp_path / "long.j2"
    rubric.write_text(
        f"You judge answers on a scale from {{{{ scale_min }}}} to {{{{ scale_max }}}}.\n{guide}"
        "<question>\n{{ question }}\n</question>\n<response>\n{{ response }}\n</response>\n"
    )
    spec = judge_spec(rubric)
    prefix = static_prefix(spec)
    assert len(prefix) > 4096 and prefix.endswith("<question>\n")
    reqs = requests_for(["farm", "tea", "animal farm", "books"], rubric)
    out = judge_all(AnthropicJudge(spec), reqs)
    assert [v.score for v in out.values()] == [expected(r) for r in reqs]
    for s in server.requests:
        first, rest = s.body["messages"][0]["content"]
        assert first == {"type": "text", "text": prefix, "cache_control": {"type": "ephemeral"}}
        assert rest["type"] == "text" and "cache_control" not in rest
        assert first["text"] + rest["text"] in {r.prompt for r in reqs}
    assert server.cache_marks == {digest(prefix): 4}

    # the bundled rubric's prefix (~470 characters) is too short to be cached: one plain string
    server.requests.clear()
    judge_all(AnthropicJudge(judge_spec()), requests_for(["farm"]))
    assert isinstance(server.requests[0].body["messages"][0]["content"], str)


# ------------------------------------------------------------------------------ batches


def test_batch_mode_gives_the_same_verdicts_as_direct(
    server: AnthropicServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = [f"Try {w} (v{n})." for n in range(4) for w in ("tofu", "farm eggs", "animal")]
    answers += ["[[faults: batch_error]] farm", "[[faults: garbage]] livestock"]
    reqs = requests_for(answers)
    direct = judge_all(AnthropicJudge(judge_spec()), reqs)
    assert all(v.status == "ok" for v in direct.values())

    batch_server = AnthropicServer(batch_polls=3).start()
    try:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", batch_server.url)
        batched = judge_all(AnthropicJudge(judge_spec(batch=True)), reqs)
        assert batched == direct
        (batch,) = batch_server.batches.values()
        assert batch["polls"] >= 3 and len(batch["requests"]) == len(reqs)
        assert batch_server.prompts("/v1/messages/batches") == Counter(r.prompt for r in reqs)
        # only the errored and the unparseable batch results went to the direct API
        again = [s for s in batch_server.requests if s.path == MESSAGES]
        assert sorted(len(s.body["messages"]) for s in again) == [1, 3]
        assert {s.prompt for s in again} == {reqs[-2].prompt, reqs[-1].prompt}
    finally:
        batch_server.stop()


# ------------------------------------------------------------------------------ spec keys


def test_batch_is_cosmetic_and_max_reasks_is_a_parameter(project) -> None:
    spec = load_spec(project.spec)

    def judge_params(**update: object) -> dict:
        s = spec.model_copy(update={"judge": spec.judge.model_copy(update=update)})
        return next(n.params for n in build_graph(s) if n.name == "judge")

    assert judge_params(batch=True) == judge_params(batch=False)
    assert judge_params(max_reasks=5) != judge_params(max_reasks=2)


# ------------------------------------------------------------------------------ crash safety


def test_sigkill_mid_judging_then_reapply_judges_nothing_twice(project, server) -> None:
    """Exact bound: each prompt reaches the server at most 1 + [in flight at the kill] times.

    The server answers the first 6 judge requests and holds every later one unanswered. The
    judge frees an item's slot only after the stage has journaled its verdict, so once all 4
    slots (judge.concurrency) hold unanswered requests, every answered item is in the journal:
    the kill loses exactly the 4 held ones, and the re-apply asks for each unjournaled prompt
    once, the 4 held ones being the only prompts the server ever sees twice.
    """
    concurrency, answered_first = 4, 6

    def to_anthropic(d: dict) -> None:
        d["judge"].update(kind="anthropic", model="claude-test", concurrency=concurrency)
        d["eval"]["samples_per_question"] = 4  # 4 questions x 4 samples: 16 pairwise items

    project.edit(to_anthropic)
    server.hold_after = answered_first
    env = {"ANTHROPIC_BASE_URL": server.url, "SPAR_ANTHROPIC_TIMEOUT": "60"}
    p = project.spar_proc("apply", str(project.spec), **env)
    while not server.wait_for(lambda s: len(s.held) >= concurrency, timeout=1.0):
        assert p.poll() is None, p.communicate()[1]
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL

    first = server.prompts()
    held = set(server.held)
    answered = set(first) - held
    assert len(held) == concurrency and len(answered) == answered_first
    assert max(first.values()) == 1
    journal = project.runs / ".spar/memo/judgments.jsonl"
    journaled = [
        json.loads(line)["value"]["reasoning"] for line in journal.read_text().splitlines()
    ]
    assert sorted(journaled) == sorted(judgement(prompt)[1] for prompt in answered)

    mark = len(server.requests)
    server.release_held()
    p = project.spar_proc("apply", str(project.spec), **env)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert "ran exp / judge" in out and "sample_" not in out

    second = server.prompts(since=mark)
    everything = first + second
    assert len(everything) == 16
    assert max(second.values()) == 1
    assert set(second) == set(everything) - answered
    assert {prompt for prompt, n in everything.items() if n == 2} == held
    assert all(n <= 1 + (prompt in held) for prompt, n in everything.items())
    rows = [
        json.loads(r) for r in (project.runs / "exp/judge/judged.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 16 and all(r["status"] == "ok" for r in rows)


def test_sigkill_while_polling_a_batch_resumes_it_instead_of_paying_twice(project, server) -> None:
    """A batch submitted before a crash is journaled under runs/.spar/; the re-apply polls that
    same batch and reads its results: no second batch, no direct call, every item scored."""

    def to_batch(d: dict) -> None:
        d["judge"].update(kind="anthropic", model="claude-test", batch=True)

    project.edit(to_batch)
    server.batch_polls = 10**9  # the batch stays in progress until the test says otherwise
    env = {"ANTHROPIC_BASE_URL": server.url}
    p = project.spar_proc("apply", str(project.spec), **env)
    while not server.wait_for(
        lambda s: any(b["polls"] >= 2 for b in s.batches.values()), timeout=1.0
    ):
        assert p.poll() is None, p.communicate()[1]
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    (batch,) = server.batches.values()
    assert len(batch["requests"]) == 8

    server.batch_polls = batch["polls"] + 1  # it ends at the next poll
    p = project.spar_proc("apply", str(project.spec), **env)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert "ran exp / judge" in out and "sample_" not in out
    assert len(server.batches) == 1  # resumed, not resubmitted
    assert server.prompts(MESSAGES) == Counter()  # and nothing asked through the direct API
    rows = [
        json.loads(r) for r in (project.runs / "exp/judge/judged.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows)
    log = project.runs / ".spar/judges/anthropic/batches.jsonl"
    assert [json.loads(line).get("done", False) for line in log.read_text().splitlines()] == [
        False,
        True,
    ]
