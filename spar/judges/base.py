"""What a judge is: rendered rubric prompt (+ the answers) in, verdict out."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict

from spar.spec import JudgeSpec


class JudgeRequest(BaseModel):
    model_config = ConfigDict(frozen=True)

    prompt: str  # the rubric template rendered for this item
    question: str
    response: str  # the answer being judged (pairwise: the fine-tuned one)
    baseline_response: str | None = None  # pairwise only
    scale_min: int = 1
    scale_max: int = 5
    max_tokens: int = 1024
    temperature: float = 0.0


class Verdict(BaseModel):
    """An unparseable answer is `invalid` with score None: never a number."""

    model_config = ConfigDict(extra="forbid")

    score: float | None
    reasoning: str
    status: Literal["ok", "invalid"]


class Judge(Protocol):
    def judge_many(
        self, requests: list[JudgeRequest], concurrency: int
    ) -> Iterator[tuple[int, Verdict]]:
        """Yield (index into requests, verdict) as each finishes, in any order."""
        ...


class JudgeFactory(Protocol):
    def __call__(self, spec: JudgeSpec, workdir: Path | None = None) -> Judge:
        """Build a judge from the spec's `judge:` section (kind, model, concurrency, ...).
        `workdir` (under runs/.spar/) is where a judge may keep state across crashes."""
        ...
