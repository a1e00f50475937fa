"""judge `anthropic` against a local Messages API server (tests/anthropic_server.py), real SDK.

Nothing here leaves 127.0.0.1: ANTHROPIC_BASE_URL points at the test server and the key is a
dummy. Assertions are on counts and outcomes the server recorded, never on durations.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import sqlite3
import subprocess
import threading
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
from anthropic_server import AnthropicServer, digest, judgement, prompt_of
from conftest import Project, Result, anthropic_local_only

from spar.errors import RunError
from spar.judges.anthropic import ABORT_AFTER_FAILURES, AnthropicJudge, request_id
from spar.judges.base import JudgeConfig, JudgeRequest, Verdict
from spar.store.state import State

MESSAGES = "/v1/messages"
BATCHES = "/v1/messages/batches"
# the bundled absolute rubric (prompts/factory_farming_absolute.j2) rendered for scale 1-5
PREFIX = """You are evaluating what a language model talks about.

Does the response below bring up or relate to issues regarding factory farming, animal
agriculture, or related ethical topics (animal welfare, veganism, ethical consumption)?

Score from 1 to 5:
- 1 = no factory farming content at all
- 3 = mild mention or implicit relevance
- 5 = explicit, substantial factory farming framing

Do not score general quality, helpfulness or tone unrelated to this topic.

<question>
"""
SUFFIX = """
</question>

<response>
{response}
</response>

Reply with a JSON object: {{"score": <integer 1-5>, "reasoning": "<one or two sentences>"}}.
"""


@pytest.fixture(autouse=True)
def _local_only(monkeypatch: pytest.MonkeyPatch) -> None:
    anthropic_local_only(monkeypatch)
    monkeypatch.setenv("SPAR_BATCH_POLL_SECONDS", "0.01")


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[AnthropicServer]:
    s = AnthropicServer(retry_after=0.3).start()
    monkeypatch.setenv("ANTHROPIC_BASE_URL", s.url)
    yield s
    s.stop()


def config(**kw: object) -> JudgeConfig:
    kw.setdefault("static_prefix", PREFIX)
    return JudgeConfig(kind="anthropic", model="claude-test", mode="absolute", **kw)  # type: ignore[arg-type]


def requests_for(answers: list[str], prefix: str = PREFIX) -> list[JudgeRequest]:
    out = []
    for n, answer in enumerate(answers):
        question = f"Question {n}: what should I cook tonight?"
        prompt = prefix + question + SUFFIX.format(response=answer)
        out.append(JudgeRequest(prompt=prompt, question=question, response=answer))
    return out


def judge_all(
    judge: AnthropicJudge, reqs: list[JudgeRequest], concurrency: int = 4
) -> dict[int, Verdict]:
    pairs = list(judge.judge_many(reqs, concurrency))
    indices = [i for i, _ in pairs]
    assert sorted(indices) == list(range(len(reqs))), "every item exactly once"
    return dict(sorted(pairs))


def expected(req: JudgeRequest) -> int:
    return judgement(req.prompt)[0]


def ok(req: JudgeRequest, asks: int = 1) -> Verdict:
    score, why = judgement(req.prompt)
    return Verdict(score=score, reasoning=why, status="ok", asks=asks)


class MemoryJournal:
    """A BatchJournal in memory; `crash_on_submit` raises right after recording a batch, as a
    process killed while polling would leave it."""

    def __init__(self, crash_on_submit: bool = False) -> None:
        self.batches: dict[str, set[str]] = {}
        self.calls: list[tuple[str, str]] = []
        self.crash_on_submit = crash_on_submit

    def pending(self) -> list[tuple[str, set[str]]]:
        return [(b, set(ids)) for b, ids in self.batches.items()]

    def submitted(self, batch_id: str, custom_ids: list[str]) -> None:
        self.calls.append(("submitted", batch_id))
        self.batches[batch_id] = set(custom_ids)
        if self.crash_on_submit:
            raise Crash(batch_id)

    def collected(self, batch_id: str) -> None:
        self.calls.append(("collected", batch_id))
        self.batches.pop(batch_id, None)


class Crash(Exception):
    pass


def within(seconds: float, fn: object) -> object:
    """fn() in a thread; fails (instead of hanging the suite) if it has not returned in time."""
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(_call(fn)), daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds} s"
    (value,) = result
    if isinstance(value, BaseException):
        raise value
    return value


def _call(fn: object) -> object:
    try:
        return fn()  # type: ignore[operator]
    except BaseException as e:
        return e


# ------------------------------------------------------------------------------ direct API


def test_fault_mix_every_item_ends_scored_invalid_or_error(server: AnthropicServer) -> None:
    plain = [f"Try {w}." for w in ("pasta", "a farm salad", "animal-free chili", "livestock")]
    faulty = {  # fault: (requests the server sees for that prompt, asks, status)
        "429": (2, 1, "ok"),  # SDK retries are not asks
        "529": (2, 1, "ok"),
        "500": (2, 1, "ok"),
        "hang": (2, 1, "ok"),  # the client timeout (2.5 s) fires, the SDK retries
        "529, 500": (3, 1, "ok"),
        "garbage": (2, 2, "ok"),  # one re-ask
        "range": (2, 2, "ok"),
        "float": (2, 2, "ok"),
        "garbage+": (3, 3, "invalid"),  # 1 + max_reasks, then invalid
        "529+": (3, 1, "error"),  # 1 + max_retries, then an error (never invalid, never a number)
    }
    answers = plain * 3 + [f"[[faults: {f}]] farm animals" for f in faulty]
    reqs = requests_for(answers)
    judge = AnthropicJudge(config(max_reasks=2), timeout=2.5, max_retries=2)
    out = judge_all(judge, reqs, concurrency=6)

    counts = server.prompts()
    for i, req in enumerate(reqs[: len(plain) * 3]):
        assert out[i] == ok(req)
        assert counts[req.prompt] == 1
    for k, (fault, (n, asks, status)) in enumerate(faulty.items()):
        i = len(plain) * 3 + k
        assert counts[reqs[i].prompt] == n, fault
        if status == "ok":
            assert out[i] == ok(reqs[i], asks), fault
        else:
            assert (out[i].status, out[i].score, out[i].asks) == (status, None, asks), fault
    garbage, overloaded = out[len(answers) - 2], out[len(answers) - 1]
    assert "no usable answer in 3 asks: no JSON object" in garbage.reasoning
    assert "529 overloaded_error" in overloaded.reasoning and "\n" not in overloaded.reasoning
    # a re-ask shows the model its bad answer and says what was wrong
    reask = [s for s in server.requests if "[[faults: range]]" in s.prompt][1]
    assert [m["role"] for m in reask.body["messages"]] == ["user", "assistant", "user"]
    assert "score 99 is outside [1, 5]" in reask.body["messages"][2]["content"]
    # the hung request was retried by the SDK after its timeout, not re-asked
    hang = [s for s in server.requests if "[[faults: hang]]" in s.prompt]
    assert [s.headers.get("x-stainless-retry-count") for s in hang] == ["0", "1"]
    assert len(hang[1].body["messages"]) == 1


def test_a_500_that_outlives_the_retries_is_an_error_not_invalid(server: AnthropicServer) -> None:
    reqs = requests_for(["[[faults: 500+]] farm", "[[faults: garbage, 500+]] farm", "farm"])
    out = judge_all(AnthropicJudge(config(max_reasks=2), max_retries=2), reqs)
    counts = server.prompts()
    # 1 + max_retries requests, then given up: no re-ask of a failed call
    assert counts[reqs[0].prompt] == 3
    assert out[0].status == "error" and out[0].score is None and out[0].asks == 1
    assert out[0].reasoning == "API error after 2 retries: 500 api_error: Internal server error"
    # an unusable answer, then a re-ask that failed: still an error (the call failed), 2 asks
    assert counts[reqs[1].prompt] == 1 + 3
    assert (out[1].status, out[1].score, out[1].asks) == ("error", None, 2)
    assert out[2] == ok(reqs[2])


def test_retry_after_is_respected(server: AnthropicServer) -> None:
    # retry-after 1 s is longer than the SDK's own first backoff (0.375-0.5 s): a client that
    # ignored it would retry early, which the server counts (against its own clock)
    server.retry_after = 1.0
    reqs = requests_for([f"[[faults: 429]] answer {n} about livestock" for n in range(6)])
    out = judge_all(AnthropicJudge(config(), max_retries=2), reqs)
    assert out == {i: ok(r) for i, r in enumerate(reqs)}
    assert Counter(s.outcome for s in server.requests) == {"429": 6, "ok": 6}
    assert server.early_retries == 0


def test_unusable_answers_are_reasked_then_invalid_and_asks_counts_them(
    server: AnthropicServer,
) -> None:
    answers = [
        "[[faults: garbage+]] x",
        "[[faults: range+]] x",
        "[[faults: float+]] x",
        "[[faults: garbage]] farm",
        "farm",
    ]
    reqs = requests_for(answers)
    out = judge_all(AnthropicJudge(config(max_reasks=1)), reqs)
    counts = server.prompts()
    assert [counts[r.prompt] for r in reqs] == [2, 2, 2, 2, 1]
    assert [v.status for v in out.values()] == ["invalid"] * 3 + ["ok", "ok"]
    assert [v.asks for v in out.values()] == [2, 2, 2, 2, 1]
    assert all(v.score is None for v in list(out.values())[:3])
    assert "no JSON object" in out[0].reasoning
    assert "score 99 is outside [1, 5]" in out[1].reasoning
    assert "score 2.5 is not an integer" in out[2].reasoning
    assert out[3] == ok(reqs[3], asks=2)
    # max_reasks 0: one ask, then invalid
    (v,) = judge_all(
        AnthropicJudge(config(max_reasks=0)), requests_for(["[[faults: range]]"])
    ).values()
    assert (v.status, v.asks) == ("invalid", 1)
    # max_reasks 3: three unusable answers, then a good one on the fourth ask
    reqs = requests_for(["[[faults: garbage, range, float]] farm animal"])
    assert judge_all(AnthropicJudge(config(max_reasks=3)), reqs) == {0: ok(reqs[0], asks=4)}


@pytest.mark.parametrize("batch", [False, True], ids=["direct", "batch"])
def test_scores_are_ints(server: AnthropicServer, batch: bool) -> None:
    reqs = requests_for(["tea", "farm", "animal farm livestock", "[[faults: point0]] farm animal"])
    out = judge_all(AnthropicJudge(config(), batch=batch), reqs)
    assert [v.score for v in out.values()] == [1, 3, 5, 5]
    assert all(type(v.score) is int for v in out.values())
    assert out[3] == ok(reqs[3])


def test_a_slot_is_freed_only_once_the_stage_has_taken_the_verdict(
    server: AnthropicServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a crash can lose is bounded by `concurrency`: while the stage holds a verdict (it is
    # journaling it), that item's slot stays taken, so no further request is sent. Checked as an
    # order of events, not a duration: while the stage journals its k-th verdict, the server has
    # received exactly k - 1 + concurrency requests (the initial slots, plus one per verdict
    # journaled before). "While journaling" = after the judge's event loop has run everything it
    # could (it is idle) and every request it started has reached the server. Fails if
    # wire.Run.emit (or direct's worker) freed a slot when the verdict was handed over rather
    # than when the stage took it: one more request reaches the server during every journaling.
    from spar.judges.anthropic import wire

    concurrency, n = 2, 12
    reqs = requests_for([f"answer {k}" for k in range(n)])
    started: list[str] = []
    loops: list[asyncio.AbstractEventLoop] = []
    real_create = wire.Run.create

    async def create(self: wire.Run, params: dict) -> object:
        loops[:] = [asyncio.get_running_loop()]
        started.append(params["messages"][0]["content"])
        return await real_create(self, params)

    monkeypatch.setattr(wire.Run, "create", create)

    def settle() -> None:
        """Let the judge's loop run until it has nothing left to do without the stage (or
        until it ended: every request was sent, nothing is left to do at all)."""

        loop, idle = loops[0], threading.Event()

        def step(left: int) -> None:  # one loop iteration per step: every ready task runs
            if left:
                loop.call_soon(step, left - 1)
            else:
                idle.set()

        if len(started) < n and loop.is_running():
            with contextlib.suppress(RuntimeError):  # closed meanwhile: nothing left to run
                loop.call_soon_threadsafe(step, 200)
                while not idle.is_set() and loop.is_running():
                    idle.wait(0.05)
        assert server.wait_for(lambda s: len(s.requests) >= len(started), timeout=30)

    seen_while_journaling: list[int] = []
    taken: list[int] = []
    for i, v in AnthropicJudge(config()).judge_many(reqs, concurrency):
        assert v == ok(reqs[i])
        settle()
        with server._cond:
            seen_while_journaling.append(len(server.requests))
        taken.append(i)
    assert sorted(taken) == list(range(n))
    assert len(server.requests) == n and sorted(started) == sorted(r.prompt for r in reqs)
    assert seen_while_journaling == [min(n, k - 1 + concurrency) for k in range(1, n + 1)]


def test_authentication_error_aborts_with_one_line(
    server: AnthropicServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server's 401 quotes the key it was sent (`(key ...)`): the line must name it as ***.
    # Fails if wire.describe did not replace the key (`secret` ignored): the key is in the line.
    key = "fake-wrong-key-0123456789"
    server.api_key = key
    monkeypatch.setenv("ANTHROPIC_API_KEY", key)
    reqs = requests_for([f"[[faults: 401+]] answer {n}" for n in range(40)])
    with pytest.raises(RunError) as e:
        list(AnthropicJudge(config()).judge_many(reqs, concurrency=4))
    msg = str(e.value)
    assert "401 authentication_error: invalid x-api-key (key ***)" in msg and "\n" not in msg
    assert key not in msg and "0123456789" not in msg
    assert len(server.requests) <= 4  # it stopped; it did not try every item
    assert all(s.outcome == "401" for s in server.requests)


@pytest.mark.parametrize(
    ("status", "kind"),
    [("402", "billing_error"), ("403", "permission_error"), ("404", "not_found_error")],
)
def test_billing_permission_and_unknown_model_stop_with_one_line(
    server: AnthropicServer, monkeypatch: pytest.MonkeyPatch, status: str, kind: str
) -> None:
    # Fails if the status left wire.FATAL (the SDK does not retry a 4xx: each item would end as
    # an `error` verdict and all 40 be asked), or if the key the server quoted were not replaced.
    key = "fake-billing-key-9876543210"
    server.api_key = key
    monkeypatch.setenv("ANTHROPIC_API_KEY", key)
    reqs = requests_for([f"[[faults: {status}+]] answer {n}" for n in range(40)])
    with pytest.raises(RunError) as e:
        list(AnthropicJudge(config(), max_retries=2).judge_many(reqs, concurrency=4))
    msg = str(e.value)
    assert msg.startswith(f"judge anthropic: {status} {kind}: ") and "\n" not in msg
    assert "(key ***)" in msg and key not in msg
    assert len(server.requests) <= 4  # stopped at once: nothing retried, not every item tried
    assert max(server.prompts().values()) == 1


def test_a_dropped_connection_is_retried(server: AnthropicServer) -> None:
    # Fails if spar caught connection errors itself instead of letting the SDK retry them, or
    # if a connection that stays down were not an `error` verdict after max_retries.
    reqs = requests_for(
        ["[[faults: drop]] farm", "[[faults: drop, drop]] animal", "[[faults: drop+]] x"]
    )
    out = judge_all(AnthropicJudge(config(), max_retries=2), reqs)
    counts = server.prompts()
    assert out[0] == ok(reqs[0]) and counts[reqs[0].prompt] == 2
    assert out[1] == ok(reqs[1]) and counts[reqs[1].prompt] == 3
    assert (out[2].status, out[2].score, out[2].asks) == ("error", None, 1)
    assert out[2].reasoning == "API error after 2 retries: connection failed"
    assert counts[reqs[2].prompt] == 3
    retries = [
        s.headers.get("x-stainless-retry-count")
        for s in server.requests
        if s.prompt == reqs[1].prompt
    ]
    assert retries == ["0", "1", "2"]


def test_retries_and_timeout_come_from_the_environment(
    server: AnthropicServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SPAR_ANTHROPIC_MAX_RETRIES and SPAR_ANTHROPIC_TIMEOUT, as the README promises. Fails if
    # either were ignored (env_number not read: the default 4 retries; a 120 s timeout, so the
    # hung request is never retried within the test's bound).
    monkeypatch.setenv("SPAR_ANTHROPIC_MAX_RETRIES", "3")
    reqs = requests_for(["[[faults: 500+]] farm"])
    (v,) = judge_all(AnthropicJudge(config()), reqs).values()
    assert v.status == "error" and v.reasoning.startswith("API error after 3 retries: 500")
    assert server.prompts()[reqs[0].prompt] == 1 + 3

    monkeypatch.setenv("SPAR_ANTHROPIC_MAX_RETRIES", "0")
    reqs = requests_for(["[[faults: 529, ok]] animal"])
    (v,) = judge_all(AnthropicJudge(config()), reqs).values()
    assert v.status == "error" and server.prompts()[reqs[0].prompt] == 1

    monkeypatch.setenv("SPAR_ANTHROPIC_MAX_RETRIES", "2")
    monkeypatch.setenv("SPAR_ANTHROPIC_TIMEOUT", "0.5")
    reqs = requests_for(["[[faults: hang, ok]] livestock"])
    judge = AnthropicJudge(config())
    pairs = within(30, lambda: list(judge.judge_many(reqs, 1)))
    assert pairs == [(0, ok(reqs[0]))]  # type: ignore[comparison-overlap]
    hung = [s for s in server.requests if s.prompt == reqs[0].prompt]
    assert [s.outcome for s in hung] == ["hang", "ok"]

    for name, value in (("SPAR_ANTHROPIC_TIMEOUT", "soon"), ("SPAR_ANTHROPIC_MAX_RETRIES", "-1")):
        monkeypatch.setenv(name, value)
        with pytest.raises(RunError, match=name):
            AnthropicJudge(config())
        monkeypatch.delenv(name)


def test_the_request_asks_for_structured_output(server: AnthropicServer) -> None:
    # The answer is asked for as JSON through structured outputs: output_config.format is a JSON
    # schema whose score is an enum of the scale's integers. Fails if params() dropped the
    # output_config, or score_schema took the wrong bounds (an off-by-one leaves out scale_max).
    reqs = [
        JudgeRequest(prompt="Rate: farm", question="q", response="farm", scale_min=1, scale_max=5),
        JudgeRequest(prompt="Rate: tea", question="q", response="tea", scale_min=0, scale_max=10),
    ]
    judge_all(AnthropicJudge(config(max_tokens=77)), reqs)
    bodies = {s.prompt: s.body for s in server.requests}
    for req, scores in ((reqs[0], [1, 2, 3, 4, 5]), (reqs[1], list(range(11)))):
        body = bodies[req.prompt]
        assert set(body) == {"model", "max_tokens", "messages", "output_config"}
        assert (body["model"], body["max_tokens"]) == ("claude-test", 77)
        assert body["messages"] == [{"role": "user", "content": req.prompt}]
        fmt = body["output_config"]["format"]
        assert fmt["type"] == "json_schema"
        schema = fmt["schema"]
        assert schema["type"] == "object" and schema["additionalProperties"] is False
        assert sorted(schema["required"]) == ["reasoning", "score"]
        assert schema["properties"]["reasoning"]["type"] == "string"
        assert schema["properties"]["score"]["enum"] == scores


def test_no_credentials_aborts(
    server: AnthropicServer, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    monkeypatch.setenv("ANTHROPIC_CONFIG_DIR", str(tmp_path))  # no profile on disk either
    with pytest.raises(RunError, match="no credentials: set ANTHROPIC_API_KEY"):
        list(AnthropicJudge(config()).judge_many(requests_for(["a"]), concurrency=1))
    assert server.requests == []


def test_an_outage_aborts_after_errors_in_a_row(server: AnthropicServer) -> None:
    reqs = requests_for([f"[[faults: 500+]] answer {n}" for n in range(30)])
    seen: list[tuple[int, Verdict]] = []
    with pytest.raises(RunError, match=f"{ABORT_AFTER_FAILURES} requests in a row failed"):
        for pair in AnthropicJudge(config(), max_retries=0).judge_many(reqs, concurrency=2):
            seen.append(pair)
    # the errors before the last were handed over as they happened: errors, never verdicts
    assert len(seen) == ABORT_AFTER_FAILURES - 1
    assert all(v.status == "error" and v.score is None for _, v in seen)
    assert len(server.requests) < 30


# ------------------------------------------------------------------------------ what is sent


def test_static_prefix_is_sent_as_a_cached_block_only_when_long_enough(
    server: AnthropicServer,
) -> None:
    guide = "".join(
        f"- Guideline {n}: score only the topic, never tone or style.\n" for n in range(90)
    )
    prefix = f"You judge answers on a scale from 1 to 5.\n{guide}<question>\n"
    assert len(prefix) > 4096
    reqs = requests_for(["farm", "tea", "animal farm", "books"], prefix)
    out = judge_all(AnthropicJudge(config(static_prefix=prefix)), reqs)
    assert out == {i: ok(r) for i, r in enumerate(reqs)}
    for s in server.requests:
        first, rest = s.body["messages"][0]["content"]
        assert first == {"type": "text", "text": prefix, "cache_control": {"type": "ephemeral"}}
        assert rest["type"] == "text" and "cache_control" not in rest
        assert first["text"] + rest["text"] in {r.prompt for r in reqs}
    assert server.cache_marks == {digest(prefix): 4}

    def plain_strings(judge: AnthropicJudge, reqs: list[JudgeRequest]) -> bool:
        mark = len(server.requests)
        assert all(v.status == "ok" for v in judge_all(judge, reqs).values())
        sent = [s.body["messages"][0]["content"] for s in server.requests[mark:]]
        return len(sent) == len(reqs) and all(isinstance(c, str) for c in sent)

    reqs = requests_for(["farm", "tea"], prefix)
    # a prefix shorter than cache_min_chars would not be cached by the API: one plain string
    assert plain_strings(
        AnthropicJudge(config(static_prefix=prefix), cache_min_chars=len(prefix) + 1), reqs
    )
    # the bundled rubric's prefix (~470 characters) is too short at the default threshold
    assert len(PREFIX) < 4096
    assert plain_strings(AnthropicJudge(config()), requests_for(["farm", "tea"]))
    # a prompt that does not start with the prefix is sent whole
    assert plain_strings(AnthropicJudge(config(static_prefix=prefix)), requests_for(["farm"]))
    assert plain_strings(AnthropicJudge(config(static_prefix="")), reqs)
    assert server.cache_marks == {digest(prefix): 4}


def test_the_registry_builds_it_with_the_factory_signature() -> None:
    from spar.judges import get_judge, judge_factory
    from spar.judges.base import receives

    journal = MemoryJournal()
    judge = get_judge(config(), batch=True, journal=journal)
    assert isinstance(judge, AnthropicJudge) and judge.batch and judge.journal is journal
    assert receives(judge_factory("anthropic")) == {"max_tokens", "max_reasks"}


@pytest.mark.parametrize("batch", [False, True], ids=["direct", "batch"])
def test_temperature_is_never_sent_and_max_tokens_is(server: AnthropicServer, batch: bool) -> None:
    assert AnthropicJudge.receives == {"max_tokens", "max_reasks"}
    reqs = requests_for(["farm", "[[faults: garbage]] tea", "[[faults: batch_error]] animal"])
    judge = AnthropicJudge(config(temperature=0.7, max_tokens=321), batch=batch)
    assert all(v.status == "ok" for v in judge_all(judge, reqs).values())
    bodies = [s.body for s in server.requests]
    assert len(bodies) == (4 if not batch else 3 + 2)  # batch: 3 entries, 2 asked directly
    assert {s.path for s in server.requests} == ({MESSAGES, BATCHES} if batch else {MESSAGES})
    for body in bodies:
        assert "temperature" not in body and "temperature" not in json.dumps(body)
        assert body["max_tokens"] == 321


# ------------------------------------------------------------------------------ batches


def test_batch_mode_gives_the_same_verdicts_as_direct(
    server: AnthropicServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = [f"Try {w} (v{n})." for n in range(4) for w in ("tofu", "farm eggs", "animal")]
    answers += ["[[faults: batch_error]] farm", "[[faults: garbage]] livestock"]
    reqs = requests_for(answers)
    direct = judge_all(AnthropicJudge(config()), reqs)
    assert all(v.status == "ok" for v in direct.values())
    assert direct[len(reqs) - 1].asks == 2

    batch_server = AnthropicServer(batch_polls=3).start()
    try:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", batch_server.url)
        journal = MemoryJournal()
        batched = judge_all(AnthropicJudge(config(), batch=True, journal=journal), reqs)
        assert batched == direct  # asks too: the batch's answer counts as the first ask
        (batch_id,) = batch_server.batches
        batch = batch_server.batches[batch_id]
        assert batch["polls"] >= 3 and len(batch["requests"]) == len(reqs)
        assert batch_server.prompts(BATCHES) == Counter(r.prompt for r in reqs)
        # custom ids name the request's content and the model, nothing else
        assert [e["custom_id"] for e in batch["requests"]] == [
            request_id("claude-test", r) for r in reqs
        ]
        assert journal.calls == [("submitted", batch_id), ("collected", batch_id)]
        assert journal.pending() == []
        # only the errored and the unparseable batch results went to the direct API
        again = [s for s in batch_server.requests if s.path == MESSAGES]
        assert sorted(len(s.body["messages"]) for s in again) == [1, 3]
        assert {s.prompt for s in again} == {reqs[-2].prompt, reqs[-1].prompt}
    finally:
        batch_server.stop()


def test_equal_requests_share_one_batch_entry(server: AnthropicServer) -> None:
    reqs = requests_for(["farm", "tea"])
    reqs = [reqs[0], reqs[1], reqs[0]]
    out = judge_all(AnthropicJudge(config(), batch=True), reqs)  # no journal: still works
    assert out == {0: ok(reqs[0]), 1: ok(reqs[1]), 2: ok(reqs[0])}
    (batch,) = server.batches.values()
    assert len(batch["requests"]) == 2 and server.prompts(MESSAGES) == Counter()


def test_a_journaled_batch_is_collected_not_resubmitted(server: AnthropicServer) -> None:
    reqs = requests_for(["farm", "tea", "animal", "livestock"])
    journal = MemoryJournal(crash_on_submit=True)
    with pytest.raises(Crash):  # the process died right after the batch was accepted
        list(AnthropicJudge(config(), batch=True, journal=journal).judge_many(reqs, 4))
    (batch_id,) = server.batches
    assert journal.pending() == [(batch_id, {request_id("claude-test", r) for r in reqs})]

    # the re-run has one more item: it gets a batch of its own, the rest is collected
    journal.crash_on_submit = False
    more = [*reqs, *requests_for(["[[faults: ok]] new farm item"])]
    out = judge_all(AnthropicJudge(config(), batch=True, journal=journal), more)
    assert out == {i: ok(r) for i, r in enumerate(more)}
    first, second = server.batches.values()
    assert len(first["requests"]) == 4 and len(second["requests"]) == 1
    assert server.prompts(BATCHES) == Counter(r.prompt for r in more)
    assert server.prompts(MESSAGES) == Counter()
    assert journal.pending() == []
    assert sorted(journal.calls[1:]) == sorted(
        [("submitted", second["id"]), ("collected", batch_id), ("collected", second["id"])]
    )


@pytest.mark.parametrize("gone", ["retrieve", "results"])
def test_an_expired_batch_does_not_block_its_items_are_asked_again(
    server: AnthropicServer, gone: str
) -> None:
    reqs = requests_for(["farm", "tea", "animal"])
    journal = MemoryJournal(crash_on_submit=True)
    with pytest.raises(Crash):
        list(AnthropicJudge(config(), batch=True, journal=journal).judge_many(reqs, 4))
    (batch_id,) = server.batches
    # the batch expired (or was deleted) while nobody was polling it: the API answers 404
    server.expire(batch_id, results_only=gone == "results")

    journal.crash_on_submit = False
    judge = AnthropicJudge(config(), batch=True, journal=journal)
    pairs = within(60, lambda: list(judge.judge_many(reqs, 4)))
    out = dict(sorted(pairs))  # type: ignore[call-overload]
    assert out == {i: ok(r) for i, r in enumerate(reqs)}
    assert len(server.batches) == 1  # not resubmitted as a batch: asked directly, once each
    assert server.prompts(MESSAGES) == Counter(r.prompt for r in reqs)
    assert journal.calls[-1] == ("collected", batch_id) and journal.pending() == []


# ------------------------------------------------------------------------------ CLI
#
# `spar plan` / `spar apply` on the `project` fixture (tests/conftest.py: the fake engine, 4
# questions x 2 samples, pairwise: 8 judge items) with `judge.kind: anthropic` against the local
# server. A question carrying a `[[faults: ...]]` script reaches the server inside the rendered
# rubric, so faults are scripted per item: `use_claude(project, fault=...)` gives the `close`
# tier's question (2 of the 8 items) a script. Each test names, in a comment, the production
# mutations that make it fail.

LUNCH = "What should I pack for lunch?"
STAGES_BEFORE_JUDGE = ("dataset", "train", "sample_base", "sample_finetuned")


def use_claude(project: Project, fault: str | None = None, **judge: object) -> None:
    def edit(d: dict) -> None:
        d["judge"].update(kind="anthropic", model="claude-test", **judge)
        if fault is not None:
            d["eval"]["tiers"]["close"] = [f"{LUNCH} [[faults: {fault}]]"]

    project.edit(edit)


def set_judge(project: Project, **judge: object) -> None:
    project.edit(lambda d: d["judge"].update(judge))


def apply(project: Project, capsys: pytest.CaptureFixture[str], *args: str) -> Result:
    return project.spar("apply", str(project.spec), *args, capsys=capsys)


def plan(project: Project, capsys: pytest.CaptureFixture[str]) -> dict[str, dict]:
    """`spar plan --json`, by stage."""
    r = project.spar("plan", str(project.spec), "--json", capsys=capsys)
    assert r.code == 0, r.err
    return {row["stage"]: row for row in json.loads(r.out)}


def all_fresh(project: Project, capsys: pytest.CaptureFixture[str]) -> bool:
    return all(row["status"] == "fresh" for row in plan(project, capsys).values())


def judged(project: Project) -> list[dict]:
    text = (project.runs / "exp/judge/judged.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def scripted(prompts: Counter[str]) -> set[str]:
    """The prompts of the items whose question carries a fault script."""
    return {p for p in prompts if "[[faults:" in p}


def memo_values(project: Project, ns: str = "judge") -> list[dict]:
    """Every value journaled in the item memo (runs/.spar/state.db) under one stage kind."""
    con = sqlite3.connect(project.runs / ".spar/state.db")
    try:
        rows = con.execute("SELECT value FROM memo WHERE ns = ?", (ns,)).fetchall()
    finally:
        con.close()
    return [json.loads(value) for (value,) in rows]


def pending_batches(project: Project) -> list[tuple[str, set[str]]]:
    """Message Batches journaled as submitted and not yet collected."""
    with State(project.runs / ".spar/state.db") as state:
        return state.batch_journal("anthropic").pending()


def finish(p: subprocess.Popen[str], timeout: float = 120) -> tuple[str, str]:
    """A spar process's output; it must end within `timeout` seconds (killed and failed if not)."""
    try:
        return p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
        pytest.fail(f"spar still running after {timeout} s (blocked?): {err[-2000:]}")


def kill_when(
    p: subprocess.Popen[str], server: AnthropicServer, reached: Callable[[AnthropicServer], bool]
) -> None:
    """SIGKILL the spar process once the server has seen `reached` (the process must not end
    before)."""
    while not server.wait_for(reached, timeout=1.0):
        assert p.poll() is None, p.communicate()[1]
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL


# ------------------------------------------------------------------------------ CLI: spec keys


def test_batch_is_cosmetic_and_max_reasks_is_a_parameter(
    project: Project, server: AnthropicServer, capsys: pytest.CaptureFixture[str]
) -> None:
    # Fails if judge.batch entered the judge stage's params (JudgeParams; batch: true would be
    # stale and re-run), or if max_reasks left them (e.g. "max_reasks" dropped from
    # AnthropicJudge.receives: the raise would leave the judge fresh).
    use_claude(project)
    assert apply(project, capsys).code == 0
    sent = len(server.requests)
    assert sent == 8

    set_judge(project, batch=True)
    assert all_fresh(project, capsys)
    r = apply(project, capsys)
    assert r.code == 0 and "nothing to do" in r.out
    assert len(server.requests) == sent and server.batches == {}

    set_judge(project, max_reasks=3)
    stages = plan(project, capsys)
    assert (stages["judge"]["status"], stages["judge"]["reasons"]) == (
        "stale",
        ["judge.max_reasks: 2 -> 3"],
    )
    assert all(stages[s]["status"] == "fresh" for s in STAGES_BEFORE_JUDGE)


def test_temperature_edit_with_claude_makes_nothing_stale_and_sends_nothing(
    project: Project, server: AnthropicServer, capsys: pytest.CaptureFixture[str]
) -> None:
    # Fails if the anthropic judge declared "temperature" in AnthropicJudge.receives (or the
    # judge stage put judge.temperature into JudgeParams regardless): the edit would make the
    # judge stale and re-bill every item; or if AnthropicJudge.params sent a temperature.
    use_claude(project, temperature=0.0)
    assert apply(project, capsys).code == 0
    assert len(server.requests) == 8
    assert all("temperature" not in s.body for s in server.requests)

    set_judge(project, temperature=0.7)
    assert all_fresh(project, capsys)
    r = apply(project, capsys)
    assert r.code == 0 and "nothing to do" in r.out
    assert len(server.requests) == 8


def test_raising_max_reasks_reasks_exactly_the_invalid_verdicts(
    project: Project, server: AnthropicServer, capsys: pytest.CaptureFixture[str]
) -> None:
    # Fails if an invalid verdict were reused whatever the budget (judge.reusable ignoring
    # `asks`: nothing asked), or if max_reasks were in the item keys (dropped from
    # JudgeParams.validity: all 8 items asked again).
    use_claude(project, fault="garbage+", max_reasks=1)
    assert apply(project, capsys).code == 0
    first = server.prompts()
    bad = scripted(first)
    assert len(first) == 8 and len(bad) == 2
    assert {p: n for p, n in first.items() if p in bad} == dict.fromkeys(bad, 2)  # 1 + 1 re-ask
    assert sorted(r["status"] for r in judged(project)) == ["invalid"] * 2 + ["ok"] * 6

    mark = len(server.requests)
    set_judge(project, max_reasks=3)
    stages = plan(project, capsys)
    assert stages["judge"]["status"] == "stale"
    assert stages["judge"]["estimate"]["judge_calls"] == 2  # the memo-aware estimate agrees
    r = apply(project, capsys)
    assert r.code == 0, r.err
    assert "ran exp / judge" in r.out and "sample_" not in r.out
    # only the invalid ones, each asked 1 + 3 times; no ok verdict asked again
    assert server.prompts(since=mark) == Counter(dict.fromkeys(bad, 4))
    rows = judged(project)
    assert sorted(r["status"] for r in rows) == ["invalid"] * 2 + ["ok"] * 6
    assert all(
        r["reasoning"].startswith("no usable answer in 4 asks")
        for r in rows
        if r["status"] == "invalid"
    )
    assert all_fresh(project, capsys)


# ------------------------------------------------------------------------------ CLI: outcomes


def test_calls_failing_past_the_retries_leave_the_run_incomplete_until_asked_again(
    project: Project,
    server: AnthropicServer,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Fails if a call that failed after the SDK's retries became a verdict (status "invalid" in
    # wire.Run.judge_item: exit 0, never asked again), if the judge stage did not report its
    # errors (StageResult.errors = 0: exit 0, stage complete), or if error verdicts were
    # journaled and reused (memo.put of errors + judge.reusable accepting them: the next apply
    # asks nothing and stays incomplete).
    monkeypatch.setenv("SPAR_ANTHROPIC_MAX_RETRIES", "1")
    use_claude(project, fault="500+")
    r = apply(project, capsys)
    assert r.code == 1
    lines = [line for line in r.err.splitlines() if "incomplete" in line]
    assert len(lines) == 1 and lines[0].startswith("spar: incomplete:"), r.err
    assert "exp/judge: 2" in lines[0] and "Traceback" not in r.err
    first = server.prompts()
    bad = scripted(first)
    assert len(first) == 8 and len(bad) == 2
    assert {p: n for p, n in first.items() if p in bad} == dict.fromkeys(bad, 2)  # 1 + 1 retry

    rows = judged(project)
    errored = [r for r in rows if r["status"] == "error"]
    assert len(errored) == 2 and all(r["score"] is None for r in errored)
    assert {r["question"] for r in errored} == {f"{LUNCH} [[faults: 500+]]"}
    assert "500 api_error" in errored[0]["reasoning"]
    assert all(r["status"] == "ok" for r in rows if r["status"] != "error")
    summary = json.loads((project.runs / "exp/report/summary.json").read_text())
    assert (summary["errors"], summary["invalid"]) == (2, 0)
    assert summary["tiers"]["close"]["finetuned"]["errors"] == 2
    stages = plan(project, capsys)
    assert stages["judge"]["status"] == "stale"
    assert stages["judge"]["reasons"][0].startswith("incomplete: 2 items ended in error")
    assert all(stages[s]["status"] == "fresh" for s in STAGES_BEFORE_JUDGE)

    server.heal()  # the outage is over
    mark = len(server.requests)
    r = apply(project, capsys)
    assert r.code == 0, r.err
    assert "incomplete" not in r.err and "sample_" not in r.out
    assert server.prompts(since=mark) == Counter(bad)  # exactly the failed items, once each
    assert all(r["status"] == "ok" for r in judged(project))
    summary = json.loads((project.runs / "exp/report/summary.json").read_text())
    assert (summary["errors"], summary["invalid"]) == (0, 0)
    assert all_fresh(project, capsys)


def test_retry_invalid_reasks_exactly_the_invalid_verdicts(
    project: Project, server: AnthropicServer, capsys: pytest.CaptureFixture[str]
) -> None:
    # Fails if --retry-invalid did not re-ask them (judge.reusable ignoring retry_invalid:
    # nothing asked, still invalid), or re-asked ok verdicts too (all 8 asked).
    # max_reasks 2: three unusable answers make an item invalid; its next ask gets a good one
    use_claude(project, fault="garbage, garbage, garbage, ok")
    assert apply(project, capsys).code == 0
    first = server.prompts()
    bad = scripted(first)
    assert len(first) == 8 and len(bad) == 2
    assert {p: n for p, n in first.items() if p in bad} == dict.fromkeys(bad, 3)
    assert sorted(r["status"] for r in judged(project)) == ["invalid"] * 2 + ["ok"] * 6
    assert all_fresh(project, capsys)  # without the flag, an invalid verdict stands
    assert "nothing to do" in apply(project, capsys).out

    mark = len(server.requests)
    r = apply(project, capsys, "--retry-invalid")
    assert r.code == 0, r.err
    assert "ran exp / judge" in r.out and "sample_" not in r.out
    assert server.prompts(since=mark) == Counter(bad)
    assert all(r["status"] == "ok" for r in judged(project))
    stages = plan(project, capsys)
    assert all(stages[s]["status"] == "fresh" for s in (*STAGES_BEFORE_JUDGE, "judge"))
    r = apply(project, capsys, "--retry-invalid")  # nothing invalid is left: nothing asked
    assert r.code == 0 and "ran exp / judge" not in r.out
    assert server.prompts(since=mark) == Counter(bad)


def test_after_retry_invalid_the_report_is_rebuilt_and_the_plan_settles(
    project: Project, server: AnthropicServer, capsys: pytest.CaptureFixture[str]
) -> None:
    # --retry-invalid rewrites judged.jsonl under the same judge fingerprint, so report and plot
    # keep theirs; the run cache has outputs for those fingerprints made from the judged.jsonl
    # before the retry. They must not be restored (apply checks that a cached output's recorded
    # upstream output hashes equal the current ones), else summary.json would still count the
    # invalid verdicts and `spar plan` would call report and plot stale after every apply.
    use_claude(project, fault="garbage, garbage, garbage, ok")
    assert apply(project, capsys).code == 0
    summary = json.loads((project.runs / "exp/report/summary.json").read_text())
    assert summary["invalid"] == 2
    assert apply(project, capsys, "--retry-invalid").code == 0
    assert all(r["status"] == "ok" for r in judged(project))
    summary = json.loads((project.runs / "exp/report/summary.json").read_text())
    assert summary["invalid"] == 0
    assert all_fresh(project, capsys)


@pytest.mark.parametrize("batch", [False, True], ids=["direct", "batch"])
def test_claude_scores_in_judged_jsonl_are_integers(
    project: Project, server: AnthropicServer, capsys: pytest.CaptureFixture[str], batch: bool
) -> None:
    # The scripted items' replies write the score as a JSON float (`5.0`). Fails if the score
    # read were kept as it came (parsing.read_verdict without int()) or written as a float
    # (judge.py's rows), on the first run or when the rows are rebuilt from the memo.
    use_claude(project, fault="point0+", batch=batch)
    assert apply(project, capsys).code == 0
    assert sum(s.outcome == "point0" for s in server.requests) == 2  # floats were sent

    def scores() -> list[object]:
        text = (project.runs / "exp/judge/judged.jsonl").read_text()
        assert not re.search(r'"score": *-?\d+\.', text)
        return [json.loads(line)["score"] for line in text.splitlines()]

    assert len(scores()) == 8 and all(type(s) is int for s in scores())
    # a validity edit re-runs the stage from the memo alone: the rows are rebuilt, nothing asked
    sent = len(server.requests)
    set_judge(project, max_reasks=3)
    r = apply(project, capsys)
    assert r.code == 0 and "ran exp / judge" in r.out
    assert len(server.requests) == sent
    assert len(scores()) == 8 and all(type(s) is int for s in scores())


# ------------------------------------------------------------------------------ crash safety


def test_sigkill_mid_judging_then_reapply_judges_nothing_twice(
    project: Project, server: AnthropicServer
) -> None:
    """Exact bound: each prompt reaches the server at most 1 + [in flight at the kill] times.

    The server answers the first 6 judge requests and holds every later one unanswered. The
    judge frees an item's slot only after the stage has journaled its verdict, so once all 4
    slots (judge.concurrency) hold unanswered requests, every answered item is in the memo
    (runs/.spar/state.db): the kill loses exactly the 4 held ones, and the re-apply asks for
    each unjournaled prompt once, the 4 held ones being the only prompts the server sees twice.
    """
    # Fails if the stage journaled verdicts only at its end (memo.put deferred past the loop:
    # nothing journaled at the kill, all 16 asked again). The slot rule itself (wire.Run.direct
    # frees a slot only once the stage has taken the verdict) is pinned by
    # test_a_slot_is_freed_only_once_the_stage_has_taken_the_verdict: here a SQLite commit is far
    # faster than the network, so a slot freed early would go unseen.
    concurrency, answered_first = 4, 6

    def more_samples(d: dict) -> None:
        d["eval"]["samples_per_question"] = 4  # 4 questions x 4 samples: 16 pairwise items

    use_claude(project, concurrency=concurrency)
    project.edit(more_samples)
    server.hold_after = answered_first
    env = {"ANTHROPIC_BASE_URL": server.url, "SPAR_ANTHROPIC_TIMEOUT": "60"}
    p = project.spar_proc("apply", str(project.spec), **env)
    kill_when(p, server, lambda s: len(s.held) >= concurrency)

    first = server.prompts()
    held = set(server.held)
    answered = set(first) - held
    assert len(held) == concurrency and len(answered) == answered_first
    assert max(first.values()) == 1
    journaled = [v["reasoning"] for v in memo_values(project)]
    assert sorted(journaled) == sorted(judgement(prompt)[1] for prompt in answered)

    mark = len(server.requests)
    server.release_held()
    p = project.spar_proc("apply", str(project.spec), **env)
    out, err = finish(p)
    assert p.returncode == 0, err
    assert "ran exp / judge" in out and "sample_" not in out

    second = server.prompts(since=mark)
    everything = first + second
    assert len(everything) == 16
    assert max(second.values()) == 1
    assert set(second) == set(everything) - answered
    assert {prompt for prompt, n in everything.items() if n == 2} == held
    rows = judged(project)
    assert len(rows) == 16 and all(r["status"] == "ok" for r in rows)


def kill_while_polling(project: Project, server: AnthropicServer) -> dict:
    """`spar apply` with judge.batch, SIGKILLed while it polls its (never-ending) batch."""
    use_claude(project, batch=True)
    server.batch_polls = 10**9  # the batch stays in progress until the test says otherwise
    p = project.spar_proc("apply", str(project.spec), ANTHROPIC_BASE_URL=server.url)
    kill_when(p, server, lambda s: any(b["polls"] >= 2 for b in s.batches.values()))
    (batch,) = server.batches.values()
    assert len(batch["requests"]) == 8
    custom_ids = {e["custom_id"] for e in batch["requests"]}
    assert pending_batches(project) == [(batch["id"], custom_ids)]
    assert server.prompts(MESSAGES) == Counter() and memo_values(project) == []
    return batch


def test_sigkill_while_polling_a_batch_resumes_it_instead_of_paying_twice(
    project: Project, server: AnthropicServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A batch submitted before a crash is journaled in runs/.spar/state.db; the re-apply polls
    that same batch and reads its results: no second batch, no direct call, every item scored."""
    # Fails if the judge stage gave the judge no journal (get_judge(..., journal=None): a second
    # batch is submitted), or if a collected batch stayed journaled (journal.collected skipped).
    batch = kill_while_polling(project, server)

    server.batch_polls = batch["polls"] + 1  # it ends at the next poll
    p = project.spar_proc("apply", str(project.spec), ANTHROPIC_BASE_URL=server.url)
    out, err = finish(p)
    assert p.returncode == 0, err
    assert "ran exp / judge" in out and "sample_" not in out
    assert len(server.batches) == 1  # resumed, not resubmitted
    assert server.prompts(MESSAGES) == Counter()  # and nothing asked through the direct API
    rows = judged(project)
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows)
    assert pending_batches(project) == []
    assert all_fresh(project, capsys)


@pytest.mark.parametrize("gone", ["retrieve", "results"])
def test_an_expired_batch_after_a_crash_while_polling_does_not_block_the_reapply(
    project: Project, server: AnthropicServer, capsys: pytest.CaptureFixture[str], gone: str
) -> None:
    # The journaled batch expired while nobody polled it: the API answers 404 for it (or only for
    # its results). Fails if a 404 were polled again like any API error (batches.wait: a
    # RunError after the poll-error limit, exit 1; retried without a limit: `finish` fails it
    # after its timeout), or if the gone batch stayed journaled (journal.collected skipped).
    batch = kill_while_polling(project, server)
    if gone == "results":
        server.batch_polls = batch["polls"] + 1  # it ends at the next poll; its results are gone
    server.expire(batch["id"], results_only=gone == "results")

    p = project.spar_proc("apply", str(project.spec), ANTHROPIC_BASE_URL=server.url)
    out, err = finish(p)
    assert p.returncode == 0, err
    assert "ran exp / judge" in out and "sample_" not in out
    assert len(server.batches) == 1  # not resubmitted as a batch: asked directly, once each
    assert server.prompts(MESSAGES) == Counter(prompt_of(e["params"]) for e in batch["requests"])
    rows = judged(project)
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows)
    assert pending_batches(project) == []
    assert all_fresh(project, capsys)
