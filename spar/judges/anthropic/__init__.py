"""judge `anthropic`: Claude through the `anthropic` SDK (Messages API; optional Message Batches).

- **Credentials and address** are the SDK's own: `ANTHROPIC_API_KEY` (or the SDK's other
  credential sources) and `ANTHROPIC_BASE_URL`. spar never reads, logs or stores the key.
- **The question** is the rendered rubric (`JudgeRequest.prompt`) as the only user message. The
  answer is asked for as a JSON object `{"reasoning", "score"}` through structured outputs
  (`output_config.format`, a JSON schema whose score is an enum of the scale's integers). Parsing
  is lenient anyway: a JSON object anywhere in the text (or a tool_use input) is accepted. Scores
  are ints.
- **What is sent** of the judge's settings (`receives`): `max_tokens` and `max_reasks`. Not
  `temperature`: the installed SDK speaks API version 2026-10-21, which has no sampling
  parameters (it rejects `temperature` with a 400).
- **Retries** are the SDK's: 408/409/429 (honouring `retry-after`), 5xx and 529 overloaded,
  connection errors and timeouts, up to `SPAR_ANTHROPIC_MAX_RETRIES` (default 4) times, each
  attempt limited to `SPAR_ANTHROPIC_TIMEOUT` seconds (default 120) so a hung connection is
  retried, never waited on forever.
- **Re-asks**: an answer that does not parse, or whose score is not an integer in
  [scale_min, scale_max], is re-asked up to `max_reasks` times (the bad answer is shown back with
  what was wrong), then the verdict is `invalid` with the problem as its reasoning. `asks` counts
  the calls an item took (a batch result counts as one).
- **Failures**: 401/402/403/404 (bad key, billing, permission, unknown model) or no credentials
  raise RunError: the stage aborts with one line. Any other API error left after the retries gives
  that item an `error` verdict (not a verdict to keep: the stage asks again next run), yielded as
  it happens; ABORT_AFTER_FAILURES of them in a row (an outage) abort the stage with RunError.
- **Concurrency and crash safety**: see `wire`: at most `concurrency` items in flight, and an
  item's slot is freed only once the stage has taken its verdict.
- **Prompt caching**: the rubric's static prefix (`JudgeConfig.static_prefix`, computed by the
  stage) is sent as its own text block with `cache_control: ephemeral`, the rest of the prompt as
  a second block, when the prefix is at least `cache_min_chars` characters (CACHE_MIN_CHARS
  ~1,024 tokens, the smallest prefix Sonnet/Opus cache; shorter ones would be ignored by the API)
  and the prompt starts with it; otherwise the prompt is sent as one string.
- **`batch=True`** sends everything as Message Batches (half price), polls every
  `SPAR_BATCH_POLL_SECONDS` (default 30); see `batches`.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Iterator
from typing import Any, ClassVar

from spar.judges.anthropic.batches import DEFAULT_POLL_SECONDS, judge_in_batches, request_id
from spar.judges.anthropic.parsing import score_schema
from spar.judges.anthropic.wire import (
    ABORT_AFTER_FAILURES,
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    Run,
    drive,
    env_number,
    open_client,
)
from spar.judges.base import BatchJournal, JudgeConfig, JudgeRequest, Verdict

__all__ = ["ABORT_AFTER_FAILURES", "CACHE_MIN_CHARS", "AnthropicJudge", "request_id"]

log = logging.getLogger(__name__)

# ~1,024 tokens at ~4 characters per token: the smallest prefix any current model caches (Sonnet
# 1,024-2,048, Opus 4.5+ and Haiku 4.5 4,096). A shorter marked prefix is silently not cached.
CACHE_MIN_CHARS = 4096


class AnthropicJudge:
    # the optional `judge:` settings this judge sends (see spar.judges.base.receives)
    receives: ClassVar[frozenset[str]] = frozenset({"max_tokens", "max_reasks"})

    def __init__(
        self,
        config: JudgeConfig,
        *,
        batch: bool = False,
        journal: BatchJournal | None = None,
        timeout: float | None = None,
        max_retries: int | None = None,
        poll_seconds: float | None = None,
        cache_min_chars: int = CACHE_MIN_CHARS,
    ) -> None:
        self.model = config.model
        self.max_tokens = config.max_tokens
        self.max_reasks = config.max_reasks
        self.batch = batch
        self.journal = journal  # submitted Message Batches, so a crash while polling resumes them
        self.timeout = (
            timeout
            if timeout is not None
            else env_number("SPAR_ANTHROPIC_TIMEOUT", DEFAULT_TIMEOUT)
        )
        self.max_retries = (
            max_retries
            if max_retries is not None
            else int(env_number("SPAR_ANTHROPIC_MAX_RETRIES", DEFAULT_MAX_RETRIES))
        )
        self.poll_seconds = (
            poll_seconds
            if poll_seconds is not None
            else env_number("SPAR_BATCH_POLL_SECONDS", DEFAULT_POLL_SECONDS)
        )
        prefix = config.static_prefix
        self.prefix = prefix if len(prefix) >= cache_min_chars and prefix.strip() else ""
        if self.prefix:
            log.info("caching the rubric's static prefix (%d characters)", len(self.prefix))

    # ----------------------------------------------------------------- request building

    def content(self, prompt: str) -> str | list[dict[str, Any]]:
        """The user message: the static prefix as a cached block, then the rest."""
        p = self.prefix
        if p and prompt.startswith(p) and prompt[len(p) :].strip():
            return [
                {"type": "text", "text": p, "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": prompt[len(p) :]},
            ]
        return prompt

    def first_messages(self, req: JudgeRequest) -> list[dict[str, Any]]:
        return [{"role": "user", "content": self.content(req.prompt)}]

    def params(self, req: JudgeRequest, messages: list[dict[str, Any]]) -> dict[str, Any]:
        """One messages.create call (also a batch entry's params). Never a temperature."""
        return {
            "model": self.model,
            "max_tokens": self.max_tokens,
            "messages": messages,
            "output_config": {
                "format": {
                    "type": "json_schema",
                    "schema": score_schema(req.scale_min, req.scale_max),
                }
            },
        }

    # ----------------------------------------------------------------- the judge interface

    def judge_many(
        self, requests: list[JudgeRequest], concurrency: int
    ) -> Iterator[tuple[int, Verdict]]:
        """Yield (index, verdict) as each finishes, in any order; see the module docstring."""
        if not requests:
            return
        yield from drive(lambda out: self._main(requests, max(1, concurrency), out))

    async def _main(
        self, requests: list[JudgeRequest], concurrency: int, out: queue.SimpleQueue[Any]
    ) -> None:
        async with open_client(self.timeout, self.max_retries) as client:
            run = Run(self, client, requests, concurrency, out)
            if self.batch:
                await judge_in_batches(run, self.journal, self.poll_seconds)
            else:
                await run.direct([(i, None) for i in range(len(requests))])
