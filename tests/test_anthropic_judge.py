"""judge `anthropic` against a local Messages API server (tests/anthropic_server.py), real SDK.

Nothing here leaves 127.0.0.1: ANTHROPIC_BASE_URL points at the test server and the key is a
dummy. Assertions are on counts and outcomes the server recorded, never on durations.
"""

from __future__ import annotations

import json
import signal
import threading
from collections import Counter
from collections.abc import Iterator

import pytest
from anthropic_server import AnthropicServer, digest, judgement

from spar.errors import RunError
from spar.judges.anthropic import ABORT_AFTER_FAILURES, AnthropicJudge, request_id
from spar.judges.base import JudgeConfig, JudgeRequest, Verdict

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
    server: AnthropicServer,
) -> None:
    # What a crash can lose is bounded by `concurrency`: while the stage holds a verdict (it is
    # journaling it), that item's slot stays taken, so no further request is sent.
    reqs = requests_for([f"answer {n}" for n in range(10)])
    verdicts = AnthropicJudge(config()).judge_many(reqs, concurrency=2)
    first = next(verdicts)
    assert not server.wait_for(lambda s: len(s.requests) > 2, timeout=1.0)
    rest = list(verdicts)
    assert sorted(i for i, _ in [first, *rest]) == list(range(10))
    assert len(server.requests) == 10


def test_authentication_error_aborts_with_one_line(
    server: AnthropicServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = "fake-wrong-key-0123456789"
    monkeypatch.setenv("ANTHROPIC_API_KEY", key)
    reqs = requests_for([f"answer {n}" for n in range(40)])
    with pytest.raises(RunError) as e:
        list(AnthropicJudge(config()).judge_many(reqs, concurrency=4))
    msg = str(e.value)
    assert "401 authentication_error" in msg and "\n" not in msg
    assert key not in msg and "0123456789" not in msg
    assert len(server.requests) <= 4  # it stopped; it did not try every item


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


# ------------------------------------------------------------------------------ spec keys


@pytest.mark.skip(reason="core v2: lead rewrites")
def test_batch_is_cosmetic_and_max_reasks_is_a_parameter(project) -> None:
    from spar.plan import build_graph
    from spar.spec import load_spec

    spec = load_spec(project.spec)

    def judge_params(**update: object) -> dict:
        s = spec.model_copy(update={"judge": spec.judge.model_copy(update=update)})
        return next(n.params for n in build_graph(s) if n.name == "judge")

    assert judge_params(batch=True) == judge_params(batch=False)
    assert judge_params(max_reasks=5) != judge_params(max_reasks=2)


# ------------------------------------------------------------------------------ crash safety


@pytest.mark.skip(reason="core v2: lead rewrites")
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


@pytest.mark.skip(reason="core v2: lead rewrites")
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
