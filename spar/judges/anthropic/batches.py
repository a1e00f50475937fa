"""Message Batches: submit every item (half price), poll, read the results as they stream.

Every submitted batch is journaled through the injected BatchJournal (`submitted` the moment the
API accepted it, `collected` once its results were all read), so a run interrupted while polling
collects the same batch when re-run instead of paying for a second one. A batch the API no longer
knows (404: expired or deleted) is given up (`collected`) and its items are asked again through the
direct API, so it never blocks the stage. Items whose batch result errored, expired or did not
parse are asked again through the direct API too (with the rest of their re-ask budget).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import anthropic
from anthropic.types import Message

from spar.errors import RunError
from spar.judges.anthropic.parsing import read_verdict
from spar.judges.anthropic.wire import ABORT_AFTER_FAILURES, FATAL, Run, describe, fatal, log
from spar.judges.base import BatchJournal, JudgeRequest, Verdict
from spar.progress import label

DEFAULT_POLL_SECONDS = 30.0
MAX_BATCH_REQUESTS = 100_000  # API limit per batch
MAX_BATCH_BYTES = 200_000_000  # API limit is 256 MB per batch


def request_id(model: str, req: JudgeRequest) -> str:
    """A batch custom_id naming the request by its content and the model (never a path), so a
    resumed run can match a journaled batch's results to its items."""
    blob = json.dumps(
        {"model": model, **req.model_dump()},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return "r-" + hashlib.sha256(blob.encode()).hexdigest()[:40]


class BatchGone(Exception):
    """The API answered 404 for a batch: expired, deleted, or never this key's."""


def chunks(sizes: dict[str, int]) -> list[list[str]]:
    """Custom ids split into batches within the API's count and size limits."""
    out: list[list[str]] = [[]]
    size = 0
    for cid, n in sizes.items():
        if out[-1] and (len(out[-1]) >= MAX_BATCH_REQUESTS or size + n > MAX_BATCH_BYTES):
            out.append([])
            size = 0
        out[-1].append(cid)
        size += n
    return out


async def judge_in_batches(run: Run, journal: BatchJournal | None, poll_seconds: float) -> None:
    """Every request of `run` through Message Batches (resuming journaled ones), then what is left
    through the direct API."""
    from tqdm import tqdm

    judge, requests = run.judge, run.requests
    by_cid: dict[str, list[int]] = {}  # equal requests share one custom id (and one batch entry)
    for i, r in enumerate(requests):
        by_cid.setdefault(request_id(judge.model, r), []).append(i)

    batches: list[tuple[str, list[str]]] = []
    covered: set[str] = set()
    for batch_id, custom_ids in journal.pending() if journal is not None else []:
        mine = [c for c in by_cid if c in custom_ids and c not in covered]
        if mine:  # submitted (and paid for) by an interrupted run: collect, don't resubmit
            log.info(
                "judge anthropic: resuming message batch %s (%d requests)", batch_id, len(mine)
            )
            batches.append((batch_id, mine))
            covered.update(mine)
    sizes = {
        c: len(requests[ix[0]].prompt.encode()) + 1024
        for c, ix in by_cid.items()
        if c not in covered
    }
    for chunk in chunks(sizes) if sizes else []:
        entries = [
            {
                "custom_id": c,
                "params": judge.params(
                    requests[by_cid[c][0]], judge.first_messages(requests[by_cid[c][0]])
                ),
            }
            for c in chunk
        ]
        try:
            created = await run.client.messages.batches.create(requests=entries)  # type: ignore[arg-type]
        except FATAL as e:
            raise fatal(e, run.secret) from None
        except anthropic.APIError as e:
            raise RunError(
                f"judge anthropic: could not create a batch: {describe(e, run.secret)}"
            ) from None
        if journal is not None:
            journal.submitted(created.id, chunk)
        log.info("judge anthropic: message batch %s: %d requests", created.id, len(chunk))
        batches.append((created.id, chunk))

    again: list[tuple[int, Message | None]] = []
    bar = tqdm(total=len(by_cid), desc=label("judge batch"), unit="req", leave=False)
    try:
        done = 0
        for batch_id, chunk in batches:
            wanted = set(chunk)
            seen: set[str] = set()
            try:
                progress = functools.partial(_advance, bar, done, len(chunk))
                await wait(run, batch_id, poll_seconds, progress)
                async for cid, reply in results(run, batch_id):
                    if cid not in wanted or cid in seen:
                        continue
                    seen.add(cid)
                    for index in by_cid[cid]:
                        got = read_verdict(reply, requests[index]) if reply is not None else None
                        if isinstance(got, Verdict):
                            run.emit(index, got, None)  # asks=1: the batch's ask
                        else:
                            again.append((index, reply))
            except BatchGone as e:
                log.warning(
                    "judge anthropic: message batch %s is gone (%s); asking its %d requests again",
                    batch_id,
                    e,
                    len(wanted - seen),
                )
            again += [(i, None) for c in chunk if c not in seen for i in by_cid[c]]
            if journal is not None:
                journal.collected(batch_id)
            done += len(chunk)
            bar.update(done - bar.n)
    finally:
        bar.close()
    if again:
        log.info("judge anthropic: asking %d items again through the direct API", len(again))
    await run.direct(again)


def _advance(bar: Any, base: int, size: int, n: int) -> None:
    """Progress: `n` requests of a batch of `size` done, after `base` done in earlier batches."""
    bar.update(base + min(n, size) - bar.n)


async def wait(
    run: Run, batch_id: str, poll_seconds: float, progress: Callable[[int], object]
) -> None:
    """Poll until the batch has ended, reporting how many of its requests are done."""
    errors = 0
    while True:
        try:
            b = await run.client.messages.batches.retrieve(batch_id)
        except anthropic.NotFoundError as e:
            raise BatchGone(describe(e, run.secret)) from None
        except FATAL as e:
            raise fatal(e, run.secret) from None
        except anthropic.APIError as e:
            errors += 1
            if errors >= ABORT_AFTER_FAILURES:
                raise RunError(
                    f"judge anthropic: cannot poll batch {batch_id}: {describe(e, run.secret)}"
                ) from None
            log.warning("judge anthropic: polling batch %s: %s", batch_id, describe(e, run.secret))
        else:
            errors = 0
            c = b.request_counts
            progress(c.succeeded + c.errored + c.canceled + c.expired)
            if b.processing_status == "ended":
                return
        await asyncio.sleep(poll_seconds)


async def results(run: Run, batch_id: str) -> AsyncIterator[tuple[str, Message | None]]:
    """(custom id, reply or None if the request errored/expired/was canceled), as they stream.
    A failure part-way is logged: what did not arrive is asked through the direct API."""
    try:
        lines = await run.client.messages.batches.results(batch_id)
        async for line in lines:
            if line.result.type == "succeeded":
                yield line.custom_id, line.result.message
            else:
                detail = line.result.type
                if line.result.type == "errored":
                    detail += f": {line.result.error.error.type}"
                log.info("judge anthropic: batch request %s %s", line.custom_id, detail)
                yield line.custom_id, None
    except anthropic.NotFoundError as e:
        raise BatchGone(describe(e, run.secret)) from None
    except FATAL as e:
        raise fatal(e, run.secret) from None
    except anthropic.AnthropicError as e:
        log.warning(
            "judge anthropic: reading results of batch %s: %s", batch_id, describe(e, run.secret)
        )
