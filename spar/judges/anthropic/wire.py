"""The wire: the SDK client (credentials, retries, timeout), direct Messages calls for many items
at once, and one-line error descriptions.

Concurrency and crash safety: an asyncio loop in a background thread runs at most `concurrency`
items at once (a semaphore) and hands each verdict back through a queue the moment it is ready,
so the stage journals it at once. An item's slot is freed only after the stage has taken its
verdict, so at any time at most `concurrency` items have been sent and not journaled: that is all
a crash can cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anthropic
from anthropic.types import Message

from spar.errors import RunError
from spar.judges.anthropic.parsing import read_verdict, reask_messages, reply_text
from spar.judges.base import JudgeRequest, Verdict

if TYPE_CHECKING:
    from spar.judges.anthropic import AnthropicJudge

log = logging.getLogger("spar.judges.anthropic")

DEFAULT_TIMEOUT = 120.0  # seconds per HTTP attempt
DEFAULT_MAX_RETRIES = 4
ABORT_AFTER_FAILURES = 10  # items in a row whose API call failed after all retries
FATAL: tuple[type[anthropic.APIStatusError], ...] = (
    anthropic.AuthenticationError,
    anthropic.PaymentRequiredError,
    anthropic.PermissionDeniedError,
    anthropic.NotFoundError,
)


class ApiFailure(Exception):
    """An API call failed after all of the SDK's retries (its one-line description)."""


def env_number(name: str, default: float) -> float:
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


def describe(e: BaseException, secret: str | None = None) -> str:
    """One line about an API error (status, error type, message); never a header, never the key."""
    if isinstance(e, anthropic.APITimeoutError):
        text = "request timed out"
    elif isinstance(e, anthropic.APIConnectionError):
        text = "connection failed"
    elif isinstance(e, anthropic.APIStatusError):
        err = e.body.get("error") if isinstance(e.body, dict) else None
        if isinstance(err, dict):
            text = f"{e.status_code} {err.get('type', 'error')}: {err.get('message', '')}"
        else:
            text = f"{e.status_code} {e.message}"
    else:
        text = f"{type(e).__name__}: {e}"
    text = " ".join(str(text).split())
    if secret:
        text = text.replace(secret, "***")
    return text


def fatal(e: anthropic.APIStatusError, secret: str | None = None) -> RunError:
    """401/402/403/404: the stage stops with one line."""
    return RunError(f"judge anthropic: {describe(e, secret)} (check ANTHROPIC_API_KEY)")


def has_credentials(client: anthropic.Anthropic | anthropic.AsyncAnthropic) -> bool:
    """Did the SDK find any credentials (a key, a token, or another of its sources)?"""
    return not (client.api_key is None and client.auth_token is None and not client.credentials)


@contextlib.asynccontextmanager
async def open_client(timeout: float, max_retries: int) -> AsyncIterator[anthropic.AsyncAnthropic]:
    """The SDK's async client; RunError when it finds no credentials."""
    try:
        client = anthropic.AsyncAnthropic(
            max_retries=max_retries, timeout=timeout, http_client=_http_client()
        )
    except anthropic.CredentialsError as e:
        secret = os.environ.get("ANTHROPIC_API_KEY")
        raise RunError(
            f"judge anthropic: no credentials: set ANTHROPIC_API_KEY ({describe(e, secret)})"
        ) from None
    try:
        if not has_credentials(client):
            raise RunError("judge anthropic: no credentials: set ANTHROPIC_API_KEY")
        yield client
    finally:
        await client.close()


def _http_client() -> Any:
    """The SDK's aiohttp transport when aiohttp is installed (the `anthropic[aiohttp]` extra):
    about half the CPU per request of the default httpx one. None: the SDK's default."""
    try:
        return anthropic.DefaultAioHttpClient()
    except RuntimeError:
        return None


# --------------------------------------------------------------------------- loop <-> stage


@dataclass
class Item:
    index: int
    verdict: Verdict
    release: Callable[[], None] | None  # frees the item's slot once the stage has taken it


_DONE = object()


def drive(
    main: Callable[[queue.SimpleQueue[Any]], Coroutine[Any, Any, None]],
) -> Iterator[tuple[int, Verdict]]:
    """Run `main(out)` in a background event loop; yield the (index, verdict) of each Item it
    puts on `out`, freeing the item's slot (inside the loop) once the caller has taken it."""
    out: queue.SimpleQueue[Any] = queue.SimpleQueue()

    async def wrapped() -> None:
        try:
            await main(out)
            out.put(_DONE)
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            out.put(e)

    loop = asyncio.new_event_loop()
    task = loop.create_task(wrapped())
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
            assert isinstance(event, Item)
            yield event.index, event.verdict
            if event.release is not None:
                with contextlib.suppress(RuntimeError):  # the loop may already be closed
                    loop.call_soon_threadsafe(event.release)
    finally:
        if thread.is_alive():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(task.cancel)
            thread.join()


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


async def run_all(coros: Sequence[Coroutine[Any, Any, None]]) -> None:
    """Run all; the first failure cancels the rest and is raised as itself."""
    try:
        async with asyncio.TaskGroup() as group:
            for c in coros:
                group.create_task(c)
    except BaseExceptionGroup as eg:
        raise _first_leaf(eg) from None


# --------------------------------------------------------------------------- direct calls


@dataclass
class Run:
    """One `judge_many` call, inside the event loop."""

    judge: AnthropicJudge
    client: anthropic.AsyncAnthropic
    requests: list[JudgeRequest]
    concurrency: int
    out: queue.SimpleQueue[Any]
    failures_in_a_row: int = 0

    @property
    def secret(self) -> str | None:
        return self.client.api_key

    def emit(self, index: int, verdict: Verdict, release: Callable[[], None] | None) -> None:
        """Hand a verdict to the stage. An `error` one counts towards the outage guard:
        ABORT_AFTER_FAILURES of them in a row raise RunError instead (the slot is the caller's)."""
        if verdict.status == "error":
            log.warning("judge anthropic: item %d: %s", index, verdict.reasoning)
            self.failures_in_a_row += 1
            if self.failures_in_a_row >= ABORT_AFTER_FAILURES:
                raise RunError(
                    f"judge anthropic: {self.failures_in_a_row} requests in a row failed after "
                    f"{self.judge.max_retries} retries (last: {verdict.reasoning}); giving up, "
                    "re-run to resume"
                )
        else:
            self.failures_in_a_row = 0
        self.out.put(Item(index, verdict, release))

    async def create(self, params: dict[str, Any]) -> Message:
        try:
            return await self.client.messages.create(**params)
        except FATAL as e:
            raise fatal(e, self.secret) from None
        except anthropic.CredentialsError as e:
            raise RunError(f"judge anthropic: credentials: {describe(e, self.secret)}") from None
        except anthropic.APIError as e:
            raise ApiFailure(describe(e, self.secret)) from None

    async def judge_item(self, index: int, first_reply: Message | None) -> Verdict:
        """Ask (unless a batch already did: that reply is the first ask), then re-ask an unusable
        answer up to max_reasks times. A call failing after the SDK's retries: `error`."""
        judge, req = self.judge, self.requests[index]
        first = judge.first_messages(req)
        messages = first
        problem = ""
        asks = 0
        for attempt in range(1 + judge.max_reasks):
            if attempt == 0 and first_reply is not None:
                reply = first_reply
            else:
                try:
                    reply = await self.create(judge.params(req, messages))
                except ApiFailure as e:
                    why = f"API error after {judge.max_retries} retries: {e}"
                    return Verdict(score=None, reasoning=why, status="error", asks=asks + 1)
            asks += 1
            got = read_verdict(reply, req)
            if isinstance(got, Verdict):
                return got.model_copy(update={"asks": asks})
            problem = got
            log.info("judge anthropic: item %d answer %d unusable: %s", index, asks, got)
            messages = reask_messages(first, reply_text(reply), problem, req)
        why = f"no usable answer in {asks} asks: {problem}"
        return Verdict(score=None, reasoning=why, status="invalid", asks=asks)

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
                    self.emit(index, verdict, slots.release)
                except BaseException:
                    slots.release()
                    raise

        await run_all([worker() for _ in range(min(self.concurrency, len(todo)))])
