"""judge `anthropic`: Claude through the `anthropic` SDK (Messages API; optional Message Batches).

- **Credentials and address** are the SDK's own: `ANTHROPIC_API_KEY` (or the SDK's other
  credential sources) and `ANTHROPIC_BASE_URL`. spar never reads, logs or stores the key.
- **The question** is the rendered rubric (`JudgeRequest.prompt`) as the only user message. The
  answer is asked for as a JSON object `{"reasoning", "score"}` through structured outputs
  (`output_config.format`, a JSON schema whose score is an enum of the scale's integers). Parsing
  is lenient anyway: a JSON object anywhere in the text (or a tool_use input) is accepted.
- **No temperature**: `judge.temperature` is not sent. The installed SDK speaks API version
  2026-10-21, which has no sampling parameters (it rejects `temperature` with a 400).
- **Retries** are the SDK's: 408/409/429 (honouring `retry-after`), 5xx and 529 overloaded,
  connection errors and timeouts, up to `SPAR_ANTHROPIC_MAX_RETRIES` (default 4) times, each
  attempt limited to `SPAR_ANTHROPIC_TIMEOUT` seconds (default 120) so a hung connection is
  retried, never waited on forever.
- **Re-asks**: an answer that does not parse, or whose score is not an integer in
  [scale_min, scale_max], is re-asked up to `judge.max_reasks` times (the bad answer is shown back
  with what was wrong), then recorded as `invalid` with the problem as its reasoning.
- **Failures**: 401/402/403/404 (bad key, billing, permission, unknown model) or no credentials
  raise RunError: the stage aborts with one line. Any other API error left after the retries makes
  that item `invalid` (never a number); those verdicts are held back and yielded last, and
  ABORT_AFTER_FAILURES such items in a row (an outage) abort the stage with RunError instead, so
  an outage leaves nothing in the memo and a re-run picks up where it stopped.
- **Concurrency and crash safety**: an asyncio loop in a background thread runs at most
  `concurrency` items at once (a semaphore) and hands each verdict back through a queue the moment
  it is ready, so the stage journals it at once. An item's slot is freed only after the stage has
  taken (journaled) its verdict, so at any time at most `concurrency` items have been sent and not
  journaled: that is all a crash can cost.
- **Prompt caching**: the rubric's static prefix (what every item's prompt shares: the template
  rendered with two different sentinel items, common prefix) is sent as its own text block with
  `cache_control: ephemeral`, the rest of the prompt as a second block. Only when the prefix is at
  least CACHE_MIN_CHARS characters (~1,024 tokens, the smallest prefix Sonnet/Opus cache; shorter
  ones would be ignored by the API); otherwise the prompt is sent as one string.
- **`judge.batch: true`** sends everything as Message Batches (half price), polls every
  `SPAR_BATCH_POLL_SECONDS` (default 30) with a progress bar, and yields each result as the results
  file streams in. Items whose batch result errored, expired or did not parse are asked again
  through the direct API (with the same re-ask budget), then `invalid`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import queue
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
from anthropic.types import Message

from spar.errors import RunError
from spar.judges import rubric
from spar.judges.base import JudgeRequest, Verdict
from spar.spec import JudgeSpec
from spar.store import hash_json

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 120.0  # seconds per HTTP attempt
DEFAULT_MAX_RETRIES = 4
DEFAULT_POLL_SECONDS = 30.0
# ~1,024 tokens at ~4 characters per token: the smallest prefix any current model caches (Sonnet
# 1,024-2,048, Opus 4.5+ and Haiku 4.5 4,096). A shorter marked prefix is silently not cached.
CACHE_MIN_CHARS = 4096
ABORT_AFTER_FAILURES = 10  # items in a row whose API call failed after all retries
MAX_BATCH_REQUESTS = 100_000  # API limit per batch
MAX_BATCH_BYTES = 200_000_000  # API limit is 256 MB per batch
_SENTINELS = ("\u00a7\u2460\u00a7", "\u00b6\u2461\u00b6")  # differ at their first character
_FATAL: tuple[type[anthropic.APIStatusError], ...] = (
    anthropic.AuthenticationError,
    anthropic.PaymentRequiredError,
    anthropic.PermissionDeniedError,
    anthropic.NotFoundError,
)
REASK = (
    "Your reply could not be used: {problem}. Reply again with only a JSON object "
    '{{"reasoning": "<one or two sentences>", "score": <integer from {lo} to {hi}>}}.'
)


# --------------------------------------------------------------------------- pure helpers


def request_id(model: str, req: JudgeRequest) -> str:
    """A batch custom_id naming the request by content, so a resumed run can match results."""
    return "r-" + hash_json({"model": model, **req.model_dump()})[:40]


def static_prefix(spec: JudgeSpec) -> str:
    """The part of every rendered prompt that does not depend on the item.

    The template is rendered for two sentinel items that differ in every per-item variable (tier,
    question, answers) but share the run's constants (mode, scale); their common prefix is what
    every item's prompt starts with. Callers still check `prompt.startswith(prefix)`.
    """
    renders = []
    for s in _SENTINELS:
        ctx = rubric.context(
            spec.mode,
            tier=s,
            question=s,
            response=s,
            baseline_response=s,
            scale_min=spec.scale.min,
            scale_max=spec.scale.max,
        )
        renders.append(rubric.render(spec.rubric, ctx))
    a, b = renders
    n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return a[:n]


@functools.cache
def score_schema(lo: int, hi: int) -> dict[str, Any]:
    """JSON schema of the answer, in the form the API's structured outputs accept."""
    return anthropic.transform_schema(
        {
            "type": "object",
            "properties": {
                "reasoning": {"type": "string", "description": "one or two sentences"},
                "score": {
                    "type": "integer",
                    "enum": list(range(lo, hi + 1)),
                    "description": f"an integer from {lo} to {hi}",
                },
            },
            "required": ["reasoning", "score"],
            "additionalProperties": False,
        }
    )


def find_json_object(text: str) -> dict[str, Any] | None:
    """The whole text as a JSON object, else the first object in it that has a `score`."""
    text = text.strip()
    with contextlib.suppress(ValueError):
        obj = json.loads(text)
        if isinstance(obj, dict):
            return obj
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        with contextlib.suppress(ValueError):
            obj, _ = decoder.raw_decode(text, start)
            if isinstance(obj, dict) and "score" in obj:
                return obj
        start = text.find("{", start + 1)
    return None


def reply_text(msg: Message) -> str:
    return "".join(b.text for b in msg.content if b.type == "text")


def read_verdict(msg: Message, req: JudgeRequest) -> Verdict | str:
    """The verdict in a reply, or what is wrong with the reply."""
    obj: dict[str, Any] | None = None
    for block in msg.content:
        if block.type == "tool_use" and isinstance(block.input, dict) and "score" in block.input:
            obj = block.input
    text = reply_text(msg)
    if obj is None:
        obj = find_json_object(text)
    if obj is None:
        if msg.stop_reason == "refusal":
            return "the model refused to answer"
        if msg.stop_reason == "max_tokens":
            return "the reply was cut off at max_tokens before a complete JSON object"
        shown = " ".join(text.split())[:80]
        return f"no JSON object with a score in the reply ({shown!r})"
    score = obj.get("score")
    if isinstance(score, bool) or not isinstance(score, int | float):
        return f"score {score!r} is not a number"
    if isinstance(score, float) and not score.is_integer():
        return f"score {score} is not an integer"
    if not req.scale_min <= score <= req.scale_max:
        return f"score {score:g} is outside [{req.scale_min}, {req.scale_max}]"
    reasoning = obj.get("reasoning", "")
    if not isinstance(reasoning, str):
        reasoning = json.dumps(reasoning)
    return Verdict(score=float(score), reasoning=reasoning, status="ok")


def describe(e: anthropic.APIError) -> str:
    """One line about an API error (status, error type, message); never a header."""
    if isinstance(e, anthropic.APITimeoutError):
        return "request timed out"
    if isinstance(e, anthropic.APIConnectionError):
        return "connection failed"
    if isinstance(e, anthropic.APIStatusError):
        err = e.body.get("error") if isinstance(e.body, dict) else None
        if isinstance(err, dict):
            return f"{e.status_code} {err.get('type', 'error')}: {err.get('message', '')}".strip()
        return f"{e.status_code} {e.message}"
    return type(e).__name__


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise RunError(f"{name}: expected a number, got {raw!r}") from None
    if value < 0:
        raise RunError(f"{name}: must not be negative")
    return value


class _ApiFailure(Exception):
    """An API call for one item failed after all of the SDK's retries."""


_DONE = object()


@dataclass
class _Item:
    index: int
    verdict: Verdict
    release: Callable[[], None] | None  # frees the item's slot once the stage has journaled it


# --------------------------------------------------------------------------- the judge


class AnthropicJudge:
    def __init__(
        self,
        spec: JudgeSpec,
        workdir: Path | None = None,
        *,
        timeout: float | None = None,
        max_retries: int | None = None,
        poll_seconds: float | None = None,
        cache_min_chars: int = CACHE_MIN_CHARS,
    ) -> None:
        self.model = spec.model
        self.batch = spec.batch
        # submitted Message Batches, so a crash while polling resumes them instead of paying twice
        self.batch_log = workdir / "batches.jsonl" if workdir is not None else None
        self.max_reasks = spec.max_reasks
        self.timeout = (
            timeout
            if timeout is not None
            else _env_number("SPAR_ANTHROPIC_TIMEOUT", DEFAULT_TIMEOUT)
        )
        self.max_retries = (
            max_retries
            if max_retries is not None
            else int(_env_number("SPAR_ANTHROPIC_MAX_RETRIES", DEFAULT_MAX_RETRIES))
        )
        self.poll_seconds = (
            poll_seconds
            if poll_seconds is not None
            else _env_number("SPAR_BATCH_POLL_SECONDS", DEFAULT_POLL_SECONDS)
        )
        try:
            prefix = static_prefix(spec)
        except Exception as e:  # the stage validated the template; caching is only an optimisation
            log.debug("no cacheable rubric prefix: %s", e)
            prefix = ""
        self.prefix = prefix if len(prefix) >= cache_min_chars and prefix.strip() else ""
        if spec.temperature != 0.0:
            log.warning("judge anthropic: judge.temperature is not sent (API 2026-10-21 has none)")
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

    def params(self, req: JudgeRequest, messages: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "model": self.model,
            "max_tokens": req.max_tokens,
            "messages": messages,
            "output_config": {
                "format": {
                    "type": "json_schema",
                    "schema": score_schema(req.scale_min, req.scale_max),
                }
            },
        }

    def first_messages(self, req: JudgeRequest) -> list[dict[str, Any]]:
        return [{"role": "user", "content": self.content(req.prompt)}]

    @staticmethod
    def reask_messages(
        first: list[dict[str, Any]], reply: str, problem: str, req: JudgeRequest
    ) -> list[dict[str, Any]]:
        follow = REASK.format(problem=problem, lo=req.scale_min, hi=req.scale_max)
        if not reply.strip():
            return [*first[:1], {"role": "user", "content": follow}]
        return [
            *first[:1],
            {"role": "assistant", "content": reply.strip()},
            {"role": "user", "content": follow},
        ]

    # ----------------------------------------------------------------- the sync interface

    def pending_batches(self) -> list[tuple[str, set[str]]]:
        """Batches submitted earlier whose results were not all collected: (id, custom ids)."""
        if self.batch_log is None or not self.batch_log.exists():
            return []
        submitted: dict[str, set[str]] = {}
        for line in self.batch_log.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError):
                row = json.loads(line)
                if row.get("done"):
                    submitted.pop(row["batch_id"], None)
                else:
                    submitted[row["batch_id"]] = set(row["custom_ids"])
        return list(submitted.items())

    def record_batch(self, batch_id: str, custom_ids: list[str], done: bool = False) -> None:
        """Journal a submitted batch (flushed at once), or that its results were all collected."""
        if self.batch_log is None:
            return
        self.batch_log.parent.mkdir(parents=True, exist_ok=True)
        row = (
            {"batch_id": batch_id, "done": True}
            if done
            else {
                "batch_id": batch_id,
                "custom_ids": custom_ids,
            }
        )
        with self.batch_log.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def judge_many(
        self, requests: list[JudgeRequest], concurrency: int
    ) -> Iterator[tuple[int, Verdict]]:
        """Yield (index, verdict) as each finishes; see the module docstring."""
        if not requests:
            return
        out: queue.SimpleQueue[Any] = queue.SimpleQueue()
        loop = asyncio.new_event_loop()
        task = loop.create_task(self._main(requests, max(1, concurrency), out))
        thread = threading.Thread(
            target=_run_loop, args=(loop, task), name="spar-anthropic-judge", daemon=True
        )
        thread.start()
        try:
            while True:
                event = out.get()
                if event is _DONE:
                    break
                if isinstance(event, BaseException):
                    raise event
                assert isinstance(event, _Item)
                yield event.index, event.verdict
                if event.release is not None:
                    with contextlib.suppress(RuntimeError):  # the loop may already be closed
                        loop.call_soon_threadsafe(event.release)
        finally:
            if thread.is_alive():
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(task.cancel)
                thread.join()

    async def _main(
        self, requests: list[JudgeRequest], concurrency: int, out: queue.SimpleQueue[Any]
    ) -> None:
        try:
            try:
                client = anthropic.AsyncAnthropic(
                    max_retries=self.max_retries, timeout=self.timeout, http_client=_http_client()
                )
            except anthropic.CredentialsError as e:
                raise RunError(
                    f"judge anthropic: no credentials: set ANTHROPIC_API_KEY ({e})"
                ) from None
            try:
                if client.api_key is None and client.auth_token is None and not client.credentials:
                    raise RunError("judge anthropic: no credentials: set ANTHROPIC_API_KEY")
                run = _Run(self, client, requests, concurrency, out)
                if self.batch:
                    await run.batch()
                else:
                    await run.direct([(i, None) for i in range(len(requests))])
                run.flush_failures()
            finally:
                await client.close()
            out.put(_DONE)
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            out.put(e)


def _http_client() -> Any:
    """The SDK's aiohttp transport when aiohttp is installed (the `anthropic[aiohttp]` extra):
    about half the CPU per request of the default httpx one. None: the SDK's default."""
    try:
        return anthropic.DefaultAioHttpClient()
    except RuntimeError:
        return None


def _run_loop(loop: asyncio.AbstractEventLoop, task: asyncio.Task[None]) -> None:
    asyncio.set_event_loop(loop)
    try:
        with contextlib.suppress(BaseException):
            loop.run_until_complete(task)
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()


def _first_leaf(e: BaseException) -> BaseException:
    while isinstance(e, BaseExceptionGroup):
        e = e.exceptions[0]
    return e


async def _all(coros: Sequence[Coroutine[Any, Any, None]]) -> None:
    """Run all; the first failure cancels the rest and is raised as itself."""
    try:
        async with asyncio.TaskGroup() as group:
            for c in coros:
                group.create_task(c)
    except BaseExceptionGroup as eg:
        raise _first_leaf(eg) from None


@dataclass
class _Run:
    """One `judge_many` call, inside the event loop."""

    judge: AnthropicJudge
    client: anthropic.AsyncAnthropic
    requests: list[JudgeRequest]
    concurrency: int
    out: queue.SimpleQueue[Any]
    failed: list[tuple[int, str]] = field(default_factory=list)
    failures_in_a_row: int = 0

    def emit(self, index: int, verdict: Verdict, release: Callable[[], None] | None) -> None:
        self.failures_in_a_row = 0
        self.out.put(_Item(index, verdict, release))

    def fail(self, index: int, problem: str) -> None:
        """An item whose API call failed after the retries: held back, yielded last."""
        log.warning("judge anthropic: item %d failed after retries: %s", index, problem)
        self.failed.append((index, problem))
        self.failures_in_a_row += 1
        if self.failures_in_a_row >= ABORT_AFTER_FAILURES:
            raise RunError(
                f"judge anthropic: {self.failures_in_a_row} requests in a row failed after "
                f"{self.judge.max_retries} retries (last: {problem}); giving up, re-run to resume"
            )

    def flush_failures(self) -> None:
        for index, problem in self.failed:
            why = f"API error after {self.judge.max_retries} retries: {problem}"
            self.out.put(_Item(index, Verdict(score=None, reasoning=why, status="invalid"), None))
        self.failed.clear()

    async def create(self, params: dict[str, Any]) -> Message:
        try:
            return await self.client.messages.create(**params)
        except _FATAL as e:
            raise RunError(f"judge anthropic: {describe(e)} (check ANTHROPIC_API_KEY)") from None
        except anthropic.CredentialsError as e:
            raise RunError(f"judge anthropic: credentials: {e}") from None
        except anthropic.APIError as e:
            raise _ApiFailure(describe(e)) from None

    async def judge_item(self, index: int, first_reply: Message | None) -> Verdict:
        """Ask (unless the batch already did), then re-ask up to max_reasks times."""
        req = self.requests[index]
        first = self.judge.first_messages(req)
        messages = first
        problem = ""
        for attempt in range(1 + self.judge.max_reasks):
            if attempt == 0 and first_reply is not None:
                reply = first_reply
            else:
                reply = await self.create(self.judge.params(req, messages))
            got = read_verdict(reply, req)
            if isinstance(got, Verdict):
                return got
            problem = got
            log.info("judge anthropic: item %d answer %d unusable: %s", index, attempt + 1, got)
            messages = self.judge.reask_messages(first, reply_text(reply), problem, req)
        n = 1 + self.judge.max_reasks
        why = f"no usable answer in {n} asks: {problem}"
        return Verdict(score=None, reasoning=why, status="invalid")

    async def direct(self, todo: list[tuple[int, Message | None]]) -> None:
        """`concurrency` workers; a slot is freed when the stage has taken the verdict."""
        if not todo:
            return
        slots = asyncio.Semaphore(self.concurrency)
        items = iter(todo)

        async def worker() -> None:
            for index, first_reply in items:
                await slots.acquire()
                try:
                    verdict = await self.judge_item(index, first_reply)
                except _ApiFailure as e:
                    slots.release()
                    self.fail(index, str(e))
                    continue
                except BaseException:
                    slots.release()
                    raise
                self.emit(index, verdict, slots.release)

        await _all([worker() for _ in range(min(self.concurrency, len(todo)))])

    # ----------------------------------------------------------------- batches

    def chunks(self, indices: list[int]) -> list[list[int]]:
        out: list[list[int]] = [[]]
        size = 0
        for i in indices:
            n = len(self.requests[i].prompt.encode()) + 1024
            if out[-1] and (len(out[-1]) >= MAX_BATCH_REQUESTS or size + n > MAX_BATCH_BYTES):
                out.append([])
                size = 0
            out[-1].append(i)
            size += n
        return out

    async def batch(self) -> None:
        from tqdm import tqdm

        judge = self.judge
        cid = [request_id(judge.model, r) for r in self.requests]
        ids: list[tuple[str, list[int]]] = []
        covered: set[int] = set()
        for batch_id, custom_ids in judge.pending_batches():
            chunk = [i for i, c in enumerate(cid) if c in custom_ids and i not in covered]
            if chunk:  # submitted (and paid for) by an interrupted run: collect, don't resubmit
                log.info(
                    "judge anthropic: resuming message batch %s (%d items)", batch_id, len(chunk)
                )
                ids.append((batch_id, chunk))
                covered.update(chunk)
        remaining = [i for i in range(len(self.requests)) if i not in covered]
        for chunk in self.chunks(remaining) if remaining else []:
            reqs = [
                {
                    "custom_id": cid[i],
                    "params": judge.params(
                        self.requests[i], judge.first_messages(self.requests[i])
                    ),
                }
                for i in chunk
            ]
            try:
                created = await self.client.messages.batches.create(requests=reqs)  # type: ignore[arg-type]
            except _FATAL as e:
                raise RunError(
                    f"judge anthropic: {describe(e)} (check ANTHROPIC_API_KEY)"
                ) from None
            except anthropic.APIError as e:
                raise RunError(
                    f"judge anthropic: could not create a batch: {describe(e)}"
                ) from None
            log.info("judge anthropic: message batch %s: %d requests", created.id, len(chunk))
            judge.record_batch(created.id, [cid[i] for i in chunk])
            ids.append((created.id, chunk))
        again: list[tuple[int, Message | None]] = []
        bar = tqdm(total=len(self.requests), desc="judge batch", unit="req", leave=False)
        try:
            done = 0
            for batch_id, chunk in ids:
                await self.wait(batch_id, lambda n, base=done: bar.update(base + n - bar.n))
                done += len(chunk)
                seen: set[int] = set()
                by_cid: dict[str, list[int]] = {}
                for i in chunk:
                    by_cid.setdefault(cid[i], []).append(i)
                async for index, reply in self.results(batch_id, by_cid):
                    seen.add(index)
                    got = read_verdict(reply, self.requests[index]) if reply else None
                    if isinstance(got, Verdict):
                        self.emit(index, got, None)
                    else:
                        again.append((index, reply))
                again += [(i, None) for i in chunk if i not in seen]
                judge.record_batch(batch_id, [], done=True)
        finally:
            bar.close()
        if again:
            log.info("judge anthropic: asking %d items again through the direct API", len(again))
        await self.direct(again)

    async def wait(self, batch_id: str, progress: Callable[[int], object]) -> None:
        """Poll until the batch has ended, reporting how many of its requests are done."""
        errors = 0
        while True:
            try:
                b = await self.client.messages.batches.retrieve(batch_id)
            except _FATAL as e:
                raise RunError(
                    f"judge anthropic: {describe(e)} (check ANTHROPIC_API_KEY)"
                ) from None
            except anthropic.APIError as e:
                errors += 1
                if errors >= ABORT_AFTER_FAILURES:
                    raise RunError(
                        f"judge anthropic: cannot poll batch {batch_id}: {describe(e)}"
                    ) from None
                log.warning("judge anthropic: polling batch %s: %s", batch_id, describe(e))
            else:
                errors = 0
                c = b.request_counts
                progress(c.succeeded + c.errored + c.canceled + c.expired)
                if b.processing_status == "ended":
                    return
            await asyncio.sleep(self.judge.poll_seconds)

    async def results(
        self, batch_id: str, by_cid: dict[str, list[int]]
    ) -> AsyncIterator[tuple[int, Message | None]]:
        """(index, reply or None if the request errored/expired/was canceled), as they stream."""
        try:
            lines = await self.client.messages.batches.results(batch_id)
            async for line in lines:
                for index in by_cid.get(line.custom_id, []):
                    if line.result.type == "succeeded":
                        yield index, line.result.message
                    else:
                        detail = line.result.type
                        if line.result.type == "errored":
                            detail += f": {line.result.error.error.type}"
                        log.info("judge anthropic: batch item %d %s", index, detail)
                        yield index, None
        except _FATAL as e:
            raise RunError(f"judge anthropic: {describe(e)} (check ANTHROPIC_API_KEY)") from None
        except anthropic.APIError as e:
            # what did not arrive is asked through the direct API
            log.warning("judge anthropic: reading results of batch %s: %s", batch_id, describe(e))
