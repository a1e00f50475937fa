"""spar.pool: continuous request pools (no waves, no head-of-line blocking), their failure
semantics, the local engine's lazy futures collected a whole batch at a time, and the stages'
loops (draw, logprob score, the generators) running on it.

Futures here are completed by hand, in a chosen order, from the pool's own callbacks (no sleeps):
a `Strict` future refuses `.result()` while pending, so a loop that blocks on a request that has
not completed fails at once instead of hanging.
"""

from __future__ import annotations

import random
import threading
from concurrent.futures import CancelledError, Future
from typing import Any

import numpy as np
import pytest
import tinker
from tinker.lib.public_interfaces.api_future import AwaitableConcurrentFuture

from spar.pool import run_pool, run_threads, waitable


class Strict(Future):
    """A future whose `.result()` must not be asked before it completes."""

    def result(self, timeout: float | None = None) -> Any:
        if not self.done():
            raise AssertionError("blocked on a request that has not completed")
        return super().result(timeout)


class Script:
    """Requests 0..n-1 as Strict futures completed one at a time, in a random order among those in
    flight, request 0 (the head) last: the first once `concurrency` are in flight, each next one
    when the previous result is handed over. Records the completion order and what was in flight
    at each hand-over."""

    def __init__(self, n: int, concurrency: int, seed: int = 0, wrap: Any = None) -> None:
        self.n, self.concurrency = n, concurrency
        self.rng = random.Random(seed)
        self.futures: dict[int, Future] = {}
        self.wrap = wrap or (lambda f: f)
        self.order: list[int] = []  # completion order
        self.handed: list[int] = []
        self.in_flight_at_hand_over: list[tuple[int, int]] = []  # (in flight, wanted at least)

    def complete_next(self) -> None:
        pending = [i for i, f in self.futures.items() if not f.done()]
        if pending:
            others = [i for i in pending if i != 0]
            i = self.rng.choice(others) if others else 0
            self.order.append(i)
            self.futures[i].set_result(i * 10)

    def submit(self, i: int) -> Any:
        assert i == len(self.futures), "submitted in index order"
        self.futures[i] = Strict()
        in_flight = len(self.futures) - len(self.order)
        if in_flight == min(self.concurrency, self.n - len(self.order)):
            self.complete_next()  # the pool has refilled every slot: one completes
        return self.wrap(self.futures[i])

    def on_result(self, i: int, value: int) -> None:
        assert value == i * 10
        self.handed.append(i)
        # handed over before its slot is refilled: the others are all still in flight
        in_flight = len(self.futures) - len(self.order)
        wanted = min(self.concurrency, self.n - len(self.order) + 1) - 1
        self.in_flight_at_hand_over.append((in_flight, wanted))
        assert in_flight <= self.concurrency
        if len(self.futures) == self.n:  # nothing left to submit: the next completes now
            self.complete_next()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("concurrency", [1, 3, 8, 30])
def test_a_slow_first_request_does_not_block_the_others(seed: int, concurrency: int) -> None:
    n = 23
    s = Script(n, concurrency, seed)
    run_pool(n, s.submit, concurrency, s.on_result)
    assert len(s.futures) == n and sorted(s.handed) == list(range(n))
    assert s.handed == s.order  # completion order, not submission order
    if concurrency > 1:
        assert s.order[-1] == 0  # the head held only its own slot
        assert s.order != sorted(s.order)
    # at every hand-over every other slot was busy, and the pool refills the freed one right
    # after (the next completion happens only once it has): never a wave
    assert all(got == want for got, want in s.in_flight_at_hand_over), s.in_flight_at_hand_over


def test_tinker_api_futures_are_waited_on_through_their_future() -> None:
    """The Tinker SDK's APIFuture (the real class): waited on and cancelled via `.future()`."""
    s = Script(9, 3, seed=5, wrap=AwaitableConcurrentFuture)
    run_pool(9, s.submit, 3, s.on_result)
    assert s.handed == s.order and s.order[-1] == 0
    api = AwaitableConcurrentFuture(Future())
    assert waitable(api) is api.future()
    assert waitable(object()) is None


def test_a_failed_request_stops_submitting_cancels_and_raises() -> None:
    futures: list[Future] = []
    handed: list[tuple[int, str]] = []

    def submit(i: int) -> Future:
        f: Future = Strict()
        futures.append(f)
        if i == 1:
            f.set_result("one")
        if i == 3:  # fails once 0, 2 and 3 are in flight (1 has been handed over)
            f.set_exception(RuntimeError("request 3 failed"))
        return f

    def on_result(i: int, value: str) -> None:
        handed.append((i, value))
        if i == 1:
            futures[2].set_result("two")  # completes together with 3's failure

    with pytest.raises(RuntimeError, match="request 3 failed"):
        run_pool(10, submit, 3, on_result)
    # 2 completed with the failure: still handed over; nothing submitted after it
    assert handed == [(1, "one"), (2, "two")]
    assert len(futures) == 4
    assert futures[0].cancelled()  # still in flight: cancelled
    assert not futures[2].cancelled()


def test_a_failing_on_result_stops_the_pool_too() -> None:
    futures: list[Future] = []

    def submit(i: int) -> Future:
        f: Future = Future()
        futures.append(f)
        if i % 2:
            f.set_result(i)
        return f

    seen: list[int] = []

    def on_result(i: int, value: int) -> None:
        seen.append(i)
        if i == 3:
            raise ValueError("commit failed")

    with pytest.raises(ValueError, match="commit failed"):
        run_pool(100, submit, 4, on_result)
    assert seen == [1, 3]
    # results are handed over before their slots are refilled: nothing was submitted after the
    # failed commit, and what had not completed is cancelled
    assert [f.cancelled() for f in futures] == [True, False, True, False]


class LazyClient:
    """The local engine's shape: requests queue; asking any pending one runs the whole queue."""

    def __init__(self, with_done: bool = True) -> None:
        self.queue: list[tuple[int, Future]] = []
        self.batches: list[list[int]] = []
        self.with_done = with_done

    def request(self, i: int) -> Any:
        fut: Future = Future()
        self.queue.append((i, fut))
        client = self

        class Lazy:
            def result(self, timeout: float | None = None) -> int:
                if not fut.done():
                    client.flush()
                return fut.result(timeout)

        if self.with_done:
            Lazy.done = lambda self: fut.done()  # type: ignore[attr-defined]
        return Lazy()

    def flush(self) -> None:
        batch, self.queue = self.queue, []
        self.batches.append([i for i, _ in batch])
        for i, fut in batch:
            fut.set_result(i * i)


@pytest.mark.parametrize(("n", "concurrency"), [(10, 4), (7, 7), (5, 1), (33, 8)])
def test_lazy_futures_are_collected_a_whole_batch_at_a_time(n: int, concurrency: int) -> None:
    client = LazyClient()
    got: dict[int, int] = {}
    run_pool(n, client.request, concurrency, got.__setitem__)
    assert got == {i: i * i for i in range(n)}
    # each batch is a full pool's worth: one flush per `concurrency` requests
    assert client.batches == [
        list(range(k, min(k + concurrency, n))) for k in range(0, n, concurrency)
    ]


def test_lazy_futures_without_done_still_all_resolve() -> None:
    client = LazyClient(with_done=False)
    got: list[int] = []
    run_pool(9, client.request, 3, lambda i, v: got.append(i))
    assert sorted(got) == list(range(9))
    assert sum(map(len, client.batches)) == 9


def test_the_local_engines_futures_say_when_done(tiny_model: Any, tmp_path: Any) -> None:
    """`_Lazy.done()` is what lets the pool take a whole batch (no compute until asked)."""
    from spar.engines.local import LocalEngine

    client = LocalEngine(tmp_path).create_sampling_client(base_model=str(tiny_model))
    params = tinker.SamplingParams(max_tokens=2, temperature=1.0, seed=1)
    futs = [client.sample(tinker.ModelInput.from_ints([1, 2, k + 3]), 1, params) for k in range(3)]
    assert [f.done() for f in futs] == [False] * 3
    futs[0].result()
    assert [f.done() for f in futs] == [True] * 3


def test_work_added_by_on_result_joins_the_same_pool() -> None:
    """`n` as a function: retries appended by on_result are drawn while a first attempt is still
    in flight (no second round waiting for the first to end)."""
    jobs: list[tuple[int, int]] = [(i, 0) for i in range(6)]
    order: list[tuple[int, int]] = []
    slow: Strict = Strict()  # item 1's first attempt: completes once all else is handed over

    def submit(k: int) -> Future:
        if jobs[k] == (1, 0):
            return slow
        f = Strict()
        f.set_result(jobs[k])
        return f

    def on_result(k: int, job: tuple[int, int]) -> None:
        order.append(job)
        item, attempt = job
        if item % 3 == 0 and attempt < 2:  # items 0 and 3 need two retries
            jobs.append((item, attempt + 1))
        if len(order) == 9:
            slow.set_result((1, 0))

    run_pool(lambda: len(jobs), submit, 2, on_result)
    assert sorted(order) == sorted([(i, 0) for i in range(6)] + [(0, 1), (0, 2), (3, 1), (3, 2)])
    assert order[-1] == (1, 0)
    assert len(jobs) == 10


def test_run_threads_keeps_every_worker_busy_around_a_slow_item() -> None:
    n, concurrency = 40, 4
    release = threading.Event()
    lock = threading.Lock()
    running = 0
    peak = 0
    handed: list[int] = []
    main = threading.get_ident()

    def work(i: int) -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        try:
            if i == 0:  # the slow head: until every other item has been handed over
                assert release.wait(timeout=60), "the pool waited for the slow head"
            return -i
        finally:
            with lock:
                running -= 1

    def on_result(i: int, value: int) -> None:
        assert threading.get_ident() == main  # handed over in the caller's thread
        assert value == -i
        handed.append(i)
        if len(handed) == n - 1:
            release.set()

    run_threads(n, work, concurrency, on_result)
    assert handed[-1] == 0 and sorted(handed) == list(range(n))
    assert peak <= concurrency


def test_run_threads_failure_raises_and_skips_the_rest() -> None:
    started: list[int] = []

    def work(i: int) -> int:
        started.append(i)
        if i == 2:
            raise KeyError("two")
        return i

    with pytest.raises(KeyError):
        run_threads(1000, work, 2, lambda i, v: None)
    assert len(started) < 1000


def test_bad_concurrency() -> None:
    with pytest.raises(ValueError, match="concurrency 0"):
        run_pool(3, lambda i: Future(), 0, lambda i, v: None)
    run_pool(0, lambda i: pytest.fail("nothing to submit"), 2, lambda i, v: None)


# ---------------------------------------------------------------------------------------------
# the stages' loops on the pool


def seq(tokens: list[int]) -> tinker.SampledSequence:
    return tinker.SampledSequence(
        stop_reason="stop", sequence_id="s", tokens_np=np.asarray(tokens, dtype=np.int32)
    )


class ScriptedSampling:
    """A sampling client whose requests complete in a scripted order (see Script)."""

    def __init__(self, n: int, concurrency: int, renderer: Any, seed: int = 0) -> None:
        self.script = Script(n, concurrency, seed)
        self.renderer = renderer
        self.prompts: list[list[int]] = []
        self.seeds: list[int | None] = []

    def sample(self, prompt: tinker.ModelInput, n: int, params: tinker.SamplingParams) -> Any:
        i = len(self.prompts)
        self.prompts.append(prompt.to_ints())
        self.seeds.append(params.seed)
        text = f"reply {i} seed {params.seed}"
        tokens = [*self.renderer.tokenizer.encode(text), *self._stop()]
        response = tinker.SampleResponse(sequences=[seq(tokens)])
        inner = self.script.submit(i)
        out: Future = Strict()
        inner.add_done_callback(lambda f: out.set_result(response))
        return out

    def _stop(self) -> list[int]:
        return [s for s in self.renderer.get_stop_sequences() if isinstance(s, int)]

    def compute_logprobs(self, prompt: tinker.ModelInput) -> Any:
        i = len(self.prompts)
        self.prompts.append(prompt.to_ints())
        inner = self.script.submit(i)
        out: Future = Strict()
        tokens = prompt.to_ints()
        inner.add_done_callback(
            lambda f: out.set_result([None, *[-float(t % 7) for t in tokens[1:]]])
        )
        return out


def test_draw_hands_over_in_completion_order_with_each_items_seed(tiny_model: Any) -> None:
    from spar.models import load_renderer
    from spar.spec import SamplingSpec
    from spar.stages.draw import Drawn, draw

    renderer = load_renderer("qwen3_instruct", str(tiny_model))
    n, concurrency = 12, 4
    client = ScriptedSampling(n, concurrency, renderer, seed=3)
    prompts = [
        renderer.build_generation_prompt([{"role": "user", "content": f"q{i}"}]) for i in range(n)
    ]
    seeds = [1000 + 7 * i for i in range(n)]
    got: list[tuple[int, Drawn]] = []

    def on_result(i: int, d: Drawn) -> None:
        got.append((i, d))
        client.script.on_result(i, i * 10)

    draw(client, renderer, prompts, seeds, SamplingSpec(max_tokens=8), concurrency, on_result)
    assert [i for i, _ in got] == client.script.order and client.script.order[-1] == 0
    for i, d in got:
        assert d.response == f"reply {i} seed {seeds[i]}" and d.stop_reason == "stop"
    assert client.seeds == seeds and client.prompts == [p.to_ints() for p in prompts]
    assert all(g == w for g, w in client.script.in_flight_at_hand_over)


def test_logprob_score_hands_over_in_completion_order() -> None:
    from spar.stages.logprob import score

    seqs = [([1, 2, 3 + i], [4 + i, 5, 6 + 2 * i][: 1 + i % 3]) for i in range(9)]
    client = ScriptedSampling(len(seqs), 3, renderer=None, seed=1)
    got: list[tuple[int, float]] = []

    def on_result(i: int, mean: float) -> None:
        got.append((i, mean))
        client.script.on_result(i, i * 10)

    score(client, seqs, 3, on_result)
    assert [i for i, _ in got] == client.script.order and client.script.order[-1] == 0
    for i, mean in got:
        _, cont = seqs[i]
        assert mean == pytest.approx(sum(-float(t % 7) for t in cont) / len(cont))


def test_engine_generator_retries_join_the_pool(
    tiny_model: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reply without a usable item is drawn again with the next seed while a first attempt is
    still in flight (its slow request held only its own slot); every reply settles once."""
    from spar.generators.base import GenReply, GenRequest
    from spar.generators.engine import EngineGenerator
    from spar.models import load_renderer
    from spar.store import derive_seed

    renderer = load_renderer("qwen3_instruct", str(tiny_model))
    stops = [s for s in renderer.get_stop_sequences() if isinstance(s, int)]
    words = ["alpha", "beta", "gamma", "delta", "eps"]
    base_seed = {w: 11 * (k + 1) for k, w in enumerate(words)}
    calls: list[tuple[str, int]] = []
    slow: Future = Strict()  # eps's first attempt: completes when every other reply settled

    def response(text: str) -> tinker.SampleResponse:
        tokens = [*renderer.tokenizer.encode(text), *stops]
        return tinker.SampleResponse(sequences=[seq(tokens)])

    class Client:
        def sample(self, prompt: tinker.ModelInput, n: int, params: tinker.SamplingParams) -> Any:
            seed = params.seed or 0
            text = renderer.tokenizer.decode(prompt.to_ints())
            which = next(w for w in words if w in text)
            calls.append((which, seed))
            if which == "eps":
                return slow
            # "beta" and "delta" have a usable reply only from their second attempt on
            usable = which not in ("beta", "delta") or seed != base_seed[which]
            fut: Future = Strict()
            fut.set_result(response(f"an item about {which}" if usable else "   "))
            return fut

    class Engine:
        def create_sampling_client(self, **kw: Any) -> Client:
            return Client()

    monkeypatch.setattr("spar.engines.get_engine", lambda name, workdir: Engine())
    reqs = [GenRequest(prompt=f"Write about {w}", n=1, seed=base_seed[w]) for w in words]
    gen = EngineGenerator(
        "fake",
        str(tiny_model),
        "qwen3_instruct",
        tmp_path,
        max_tokens=16,
        system_prompt=None,
        temperature=1.0,
        max_retries=2,
    )
    replies: dict[int, GenReply] = {}

    def on_reply(i: int, r: GenReply) -> None:
        assert i not in replies
        replies[i] = r
        if len(replies) == 4:
            slow.set_result(response("an item about eps"))

    gen.generate_many(reqs, 2, on_reply)
    assert {i: (r.status, r.attempts, r.items) for i, r in replies.items()} == {
        0: ("ok", 1, ["an item about alpha"]),
        1: ("ok", 2, ["an item about beta"]),
        2: ("ok", 1, ["an item about gamma"]),
        3: ("ok", 2, ["an item about delta"]),
        4: ("ok", 1, ["an item about eps"]),
    }
    assert list(replies) == [0, 2, 1, 3, 4]
    assert sorted(calls) == sorted(
        [(w, base_seed[w]) for w in words]
        + [
            ("beta", derive_seed(base_seed["beta"], 1)),
            ("delta", derive_seed(base_seed["delta"], 1)),
        ]
    )


def test_cancelled_futures_raise() -> None:
    f: Future = Future()
    f.cancel()
    with pytest.raises(CancelledError):
        run_pool(1, lambda i: f, 1, lambda i, v: None)


def test_a_stop_submits_nothing_more_hands_over_what_is_in_flight_and_raises() -> None:
    """`stop()` turns true at the 3rd hand-over (another stage failed): the requests already in
    flight are still collected and handed over (committed), none is submitted after, and
    `Stopped` is raised."""
    from spar.errors import Stopped

    futures: list[Future] = []
    handed: list[int] = []

    def submit(i: int) -> Future:
        f: Future = Future()
        futures.append(f)
        f.set_result(i)
        return f

    def on_result(i: int, value: int) -> None:
        handed.append(i)

    with pytest.raises(Stopped, match="stopped after 4 of 10 requests"):
        run_pool(10, submit, 2, on_result, stop=lambda: len(handed) >= 3)
    # 0,1 handed; refilled with 2,3; 2 handed -> stop: 3 (in flight) still handed, no 4
    assert handed == [0, 1, 2, 3] and len(futures) == 4
    seen: list[int] = []
    run_pool(5, submit, 2, lambda i, v: seen.append(i), stop=lambda: False)
    assert seen == [0, 1, 2, 3, 4]
