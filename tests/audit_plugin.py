"""Test-only engine, judges and a lock trace for the audit tests (issue 14), registered through
`SPAR_PLUGINS=fake_plugin,audit_plugin` (and imported by the tests that run spar in-process).

- judge `table`: the score of each answer comes from a table the test wrote ($AUDIT_JUDGE_TABLE,
  a JSON list of `{"question", "response", "score"}`; `score: null` is an invalid verdict), so
  a test can give every (question, sample, model) a score of its choosing and compute the
  report's numbers by hand. An answer missing from the table fails the run.
- engine `saying` / judge `saying`: the fake engine and the keyword judge, except that every
  answer (engine) or reasoning (judge, `ok` and `error` verdicts alike) ends with $AUDIT_SAY: a
  model that repeats a secret it saw, a provider that quotes one in an error.
- $AUDIT_TRACE_LOCK=1 (set before import): `RunStore.lock` appends `lock_wait` before it tries
  the runs directory's lock, `lock_acquired` once it holds it and `lock_released` after, with the
  process id, to $FAKE_CALL_LOG; so a test can see that an apply reached the lock and waited.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from fake_plugin import FakeEngine, FakeSampling, KeywordJudge, _Resp

from spar.engines import register_engine
from spar.judges import register_judge
from spar.judges.base import BatchJournal, JudgeConfig, JudgeRequest, Verdict
from spar.store import RunStore

TABLE_ENV = "AUDIT_JUDGE_TABLE"
SAY_ENV = "AUDIT_SAY"


def write_table(path: Path, entries: list[dict[str, Any]]) -> None:
    """The table judge's scores: one entry per (question, response); pairs must be unique."""
    keys = [(e["question"], e["response"]) for e in entries]
    assert len(set(keys)) == len(keys), "two answers to one question are equal: no table"
    path.write_text(json.dumps(entries))


class TableJudge:
    receives = frozenset({"max_reasks"})

    def __init__(
        self, config: JudgeConfig, *, batch: bool = False, journal: BatchJournal | None = None
    ) -> None:
        self.model = config.model

    def judge_many(
        self, requests: list[JudgeRequest], concurrency: int
    ) -> Iterator[tuple[int, Verdict]]:
        entries = json.loads(Path(os.environ[TABLE_ENV]).read_text())
        table = {(e["question"], e["response"]): e["score"] for e in entries}
        for i, req in enumerate(requests):
            key = (req.question, req.response)
            if key not in table:
                raise AssertionError(f"table judge: no score for {key!r}")
            score = table[key]
            if score is None:
                yield i, Verdict(score=None, reasoning="table: invalid", status="invalid")
            else:
                yield i, Verdict(score=score, reasoning=f"table: {score}", status="ok")


def _say() -> str:
    return os.environ.get(SAY_ENV, "")


class SayingSampling(FakeSampling):
    def sample(self, prompt: Any, num_samples: int, sampling_params: Any) -> Future:
        (seq,) = super().sample(prompt, num_samples, sampling_params).result().sequences
        text = self.tok.decode(seq.tokens[:-1]) + " " + _say()
        out: Future = Future()
        out.set_result(_Resp([*self.tok.encode(text, add_special_tokens=False), seq.tokens[-1]]))
        return out


class SayingEngine(FakeEngine):
    def create_sampling_client(
        self, model_path: str | None = None, base_model: str | None = None
    ) -> SayingSampling:
        return SayingSampling(model_path, base_model)


class SayingJudge(KeywordJudge):
    def judge_many(
        self, requests: list[JudgeRequest], concurrency: int
    ) -> Iterator[tuple[int, Verdict]]:
        for i, v in super().judge_many(requests, concurrency):
            yield i, v.model_copy(update={"reasoning": f"{v.reasoning}: {_say()}"})


def _trace(event: str) -> None:
    path = os.environ.get("FAKE_CALL_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"event": event, "pid": os.getpid()}) + "\n")


if os.environ.get("AUDIT_TRACE_LOCK"):
    _lock = RunStore.lock

    @contextlib.contextmanager
    def _traced_lock(self: RunStore, wait: float | None = None) -> Iterator[None]:
        _trace("lock_wait")
        with _lock(self, wait):
            _trace("lock_acquired")
            try:
                yield
            finally:
                _trace("lock_released")

    RunStore.lock = _traced_lock  # type: ignore[method-assign]


register_judge("table", TableJudge)
register_engine("saying", SayingEngine)
register_judge("saying", SayingJudge)
