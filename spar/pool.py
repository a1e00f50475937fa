"""The one request pool every per-item remote call goes through (sampling, log-probabilities,
generators): `concurrency` requests in flight at all times, not waves.

`run_pool(n, submit, concurrency, on_result)` calls `submit(i)` for i in 0..n-1, keeping
`min(concurrency, remaining)` requests in flight: as soon as any one completes, the next is
submitted, whatever the others are doing (a slow request holds only its own slot). Results are
collected in completion order and each is handed to `on_result(i, result)` in the caller's thread
as soon as it is collected, before its slot is refilled, so a caller that commits it there (the
item memo) loses at most `concurrency` requests if the process dies. The first failure (a
request's or `on_result`'s) stops submitting, cancels what can be cancelled and is raised; what
was handed over before stays handed over.

A request is any future-like `submit` returns:

- a `concurrent.futures.Future` (`run_threads`: work in a thread pool);
- a Tinker SDK `APIFuture` (its `.future()` is a `concurrent.futures.Future`, which the pool
  waits on, and cancels on a failure);
- a future that resolves only when asked (`.result()`) — the local engine's, which runs every
  queued request in batches when the first of them is asked. Such futures cannot be waited on:
  the pool asks the oldest, then collects every one that is `done()`, so a whole batch is
  collected (and its slots refilled) at once.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from spar.progress import label

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Pending(Protocol[T_co]):
    """What `submit` returns: anything with `.result()` (see the module's docstring)."""

    def result(self, timeout: float | None = None) -> T_co: ...


def waitable(fut: Any) -> cf.Future[Any] | None:
    """The `concurrent.futures.Future` to wait on for `fut`, or None when it has none."""
    inner = getattr(fut, "future", None)  # the Tinker SDK's APIFuture
    if callable(inner):
        got = inner()
        if isinstance(got, cf.Future):
            return got
    return fut if isinstance(fut, cf.Future) else None


def run_pool(
    n: int | Callable[[], int],
    submit: Callable[[int], Pending[T]],
    concurrency: int,
    on_result: Callable[[int, T], None],
    desc: str | None = None,
    stop: Callable[[], bool] | None = None,
) -> None:
    """Run requests 0..n-1 (`submit(i)`), at most `concurrency` in flight, refilled as each
    completes; `on_result(i, result)` for each in completion order (ties: by index). Raises the
    first failure after cancelling what is still in flight. `desc`: a progress bar's label.
    `stop()` true (another stage failed): nothing more is submitted, what is in flight is
    collected and handed over, then `spar.errors.Stopped` is raised.

    `n` may be a function giving the number of requests so far: work that `on_result` adds (a
    retry) joins the same pool, instead of waiting for a second round."""
    if concurrency < 1:
        raise ValueError(f"request pool: concurrency {concurrency} (at least 1)")
    count = n if callable(n) else (lambda: n)
    if count() <= 0:
        return
    from tqdm import tqdm

    bar_desc = None if desc is None else label(desc)
    with tqdm(total=count(), desc=bar_desc, leave=False, disable=desc is None) as bar:

        def hand(i: int, value: T) -> None:
            on_result(i, value)
            bar.total = max(bar.total or 0, count())
            bar.update(1)

        _Pool(count, submit, concurrency, hand, stop).run()


class _Pool(Generic[T]):
    def __init__(
        self,
        n: Callable[[], int],
        submit: Callable[[int], Pending[T]],
        concurrency: int,
        hand: Callable[[int, T], None],
        stop: Callable[[], bool] | None = None,
    ) -> None:
        self.n, self.submit, self.concurrency, self.hand = n, submit, concurrency, hand
        self.stop = stop
        self.following = 0  # the next index to submit
        # in flight, in submission order: (index, what submit returned, its waitable future)
        self.flight: deque[tuple[int, Pending[T], cf.Future[Any] | None]] = deque()

    def stopping(self) -> bool:
        return self.stop is not None and self.stop()

    def refill(self) -> None:
        if self.stopping():
            return
        while len(self.flight) < self.concurrency and self.following < self.n():
            fut = self.submit(self.following)
            self.flight.append((self.following, fut, waitable(fut)))
            self.following += 1

    def run(self) -> None:
        try:
            while True:
                self.refill()
                if not self.flight:
                    if self.following < self.n() and self.stopping():
                        from spar.errors import Stopped

                        raise Stopped(f"stopped after {self.following} of {self.n()} requests")
                    break
                ready, failure = self.collect()
                # handed over (committed) before the slots are refilled: at any time at most
                # `concurrency` requests have been sent and not committed — all a crash loses
                for i, value in ready:
                    self.hand(i, value)
                if failure is not None:
                    raise failure
        finally:
            for _, _, w in self.flight:  # after a failure: what has not completed is cancelled
                if w is not None:
                    w.cancel()
            self.flight.clear()

    def collect(self) -> tuple[list[tuple[int, T]], BaseException | None]:
        """Wait until at least one in-flight request completes; the completed ones' results (by
        index) and the first failure among them (the others' results are still handed over).
        Completed requests leave the flight."""
        ready: list[tuple[int, T]] = []
        waits = [w for _, _, w in self.flight if w is not None]
        if len(waits) < len(self.flight):
            # something that resolves only when asked: ask the oldest (for the local engine,
            # that runs every queued request in batches), then take every one done by now
            i, fut, _ = self.flight.popleft()
            try:
                ready.append((i, fut.result()))
            except Exception as e:  # raised by run() after the hand-over
                return ready, e
        elif not any(w.done() for w in waits):  # (a cancelled future counts as done)
            cf.wait(waits, return_when=cf.FIRST_COMPLETED)
        finished: list[tuple[int, Pending[T], cf.Future[Any] | None]] = []
        still: deque[tuple[int, Pending[T], cf.Future[Any] | None]] = deque()
        for e in self.flight:
            (finished if _done(e) else still).append(e)
        self.flight = still
        failure: BaseException | None = None
        for i, fut, _ in sorted(finished, key=lambda e: e[0]):
            try:
                ready.append((i, fut.result()))
            except Exception as e:  # raised by run() after the hand-over
                failure = failure or e
        return ready, failure


def _done(entry: tuple[int, Any, cf.Future[Any] | None]) -> bool:
    _, fut, w = entry
    if w is not None:
        return w.done()
    done = getattr(fut, "done", None)
    return bool(done()) if callable(done) else False


def run_threads(
    n: int,
    work: Callable[[int], T],
    concurrency: int,
    on_result: Callable[[int, T], None],
    desc: str | None = None,
    stop: Callable[[], bool] | None = None,
) -> None:
    """`run_pool` for blocking work: `work(i)` runs in a pool of `concurrency` threads;
    `on_result` is called in the caller's thread. On a failure, work not yet started is
    cancelled and the running work is waited for."""
    with cf.ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        run_pool(n, lambda i: pool.submit(work, i), concurrency, on_result, desc, stop)
