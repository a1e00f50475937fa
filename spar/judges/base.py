"""What a judge is: rendered rubric prompt (+ the answers) in, verdict out.

A judge kind declares which optional `judge:` settings it really sends to its provider
(`receives`): only those enter the judge stage's fingerprint and item keys, so editing a setting
a provider never sees re-bills nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar, Literal, Protocol

from pydantic import BaseModel, ConfigDict

# The `judge:` settings a judge kind may receive; `kind`, `model`, `mode`, `scale` and the rubric
# always count. A judge kind lists the ones it uses in its `receives` attribute.
OPTIONAL_SETTINGS: tuple[str, ...] = ("max_tokens", "temperature", "max_reasks")


class JudgeConfig(BaseModel):
    """What a judge is built from: the judge stage's parameters (plus the rubric's static prefix,
    which a provider may cache). Never the whole spec, never a path."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: str
    model: str
    mode: Literal["pairwise", "absolute"] = "absolute"
    scale_min: int = 1
    scale_max: int = 5
    max_tokens: int = 1024
    temperature: float = 0.0
    max_reasks: int = 2
    # what every rendered prompt starts with (the rubric before its first per-item variable)
    static_prefix: str = ""


class JudgeRequest(BaseModel):
    """One item to judge: exactly what a judge may use to produce its verdict."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt: str  # the rubric template rendered for this item
    question: str
    response: str  # the answer being judged (pairwise: the fine-tuned one)
    baseline_response: str | None = None  # pairwise only
    scale_min: int = 1
    scale_max: int = 5


class Verdict(BaseModel):
    """`ok`: a score. `invalid`: the judge answered, but nothing usable after its re-asks (never a
    number). `error`: the call itself failed after the provider's retries — not a verdict: it is
    never journaled, and the next `spar apply` asks again."""

    model_config = ConfigDict(extra="forbid")

    score: int | float | None
    reasoning: str
    status: Literal["ok", "invalid", "error"]
    asks: int = 1  # calls this verdict took (first ask + re-asks); `invalid` with fewer asks
    # than 1 + max_reasks is asked again when max_reasks is raised


class BatchJournal(Protocol):
    """Where a judge journals submitted provider batches (runs/.spar state), so a crash while
    polling collects the same batch instead of paying for a second one."""

    def pending(self) -> list[tuple[str, set[str]]]:
        """Batches submitted and not yet collected: (batch id, custom ids)."""
        ...

    def submitted(self, batch_id: str, custom_ids: list[str]) -> None:
        """Record a batch the moment the provider accepted it (committed at once)."""
        ...

    def collected(self, batch_id: str) -> None:
        """Every result of the batch was read (or the batch is gone): never wait on it again."""
        ...


class Judge(Protocol):
    def judge_many(
        self, requests: list[JudgeRequest], concurrency: int
    ) -> Iterator[tuple[int, Verdict]]:
        """Yield (index into requests, verdict) as each finishes, in any order."""
        ...


class JudgeFactory(Protocol):
    # the optional settings (OPTIONAL_SETTINGS) this judge kind sends; missing: all of them
    receives: ClassVar[frozenset[str]]

    def __call__(
        self, config: JudgeConfig, *, batch: bool = False, journal: BatchJournal | None = None
    ) -> Judge:
        """Build a judge. `batch`: use the provider's batch API if it has one (cosmetic: same
        verdicts). `journal`: where submitted batches are kept across crashes."""
        ...


def receives(factory: object) -> frozenset[str]:
    """The optional settings a judge kind declares it sends (all of them when undeclared)."""
    declared = getattr(factory, "receives", None)
    return frozenset(OPTIONAL_SETTINGS) if declared is None else frozenset(declared)
