"""Benchmark: the sampling request pool (spar.pool through spar.stages.draw) against a remote-like
Tinker service: N sampling requests (default 500) through the real tinker SDK SamplingClient, to
skyrl's Tinker server (tests/tinker_server, the tiny test model) behind a proxy adding a fixed
latency to every HTTP request (default 300 ms, tests/benchmarks/latency_proxy.py), at concurrency C
(default 32), max_tokens small so the server's compute stays small.

Prints `ratio sampling_pool_efficiency V goal <= 1.1`, V = wall / (N x latency / C), and as `info:`
lines the same figure for the old submission-order loop, the server alone (no proxy) and one
request's latency through the proxy.

skyrl's server computes every sample on the machine's 2 cores and the tinker SDK makes two HTTP
requests per sample, so that figure measures the server as much as the pool. The same pool
(`spar.pool.run_threads`, through the `anthropic` generator and the real anthropic SDK) is then
measured against a service whose only cost is its latency: the local Messages server
(tests/anthropic_server.py), N generation requests at concurrency C, the latency the server's own
(in its own process: an in-process proxy shares this process's GIL with the SDK's threads):
`ratio generation_pool_efficiency V goal <= 1.1`. The sampling figure's proxy runs in its own
process too (`latency_proxy.ProxyProcess`).

`--backend null` runs skyrl's server with launch.py's compute-free backend instead of its JAX one,
so the sampling figure too measures the pool against latency alone.

    .venv/bin/python tests/benchmarks/bench_pool.py [--requests 500] [--latency 0.3] ...
        [--backend jax|null]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests/benchmarks")]


def old_draw(client: Any, prompts: list[Any], params: Callable[[int], Any], c: int) -> None:
    """The loop draw had before spar.pool: collected in submission order."""
    in_flight: deque[Any] = deque()
    following = 0
    while following < len(prompts) or in_flight:
        while following < len(prompts) and len(in_flight) < c:
            in_flight.append(client.sample(prompts[following], 1, params(following)))
            following += 1
        in_flight.popleft().result()


def main() -> None:
    from tinker_server.bootstrap import add_backend_option

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--latency", type=float, default=0.3)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=2)
    ap.add_argument("--skip-old", action="store_true")
    ap.add_argument("--skip-sampling", action="store_true", help="only the generation figure")
    add_backend_option(ap)
    args = ap.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", NO_PROXY="127.0.0.1", TINKER_API_KEY="tml-spar-test")
    if not args.skip_sampling:
        sampling_pool(args)
    generation_pool(args)


def generation_pool(args: argparse.Namespace) -> None:
    """N generation requests through the pool to the local Messages server (its own latency)."""
    from anthropic_server import in_own_process

    from spar.generators.anthropic import AnthropicGenerator
    from spar.generators.base import GenReply, GenRequest

    n, c, lat = args.requests, args.concurrency, args.latency
    # the latency is the server's own, in its own process (as bench_judge): an in-process proxy
    # would share this process's GIL with the 32 SDK threads, which a remote service does not
    gen = AnthropicGenerator("claude-test", max_tokens=64, system_prompt=None, max_retries=0)
    requests = [GenRequest(prompt=f"Write a question about topic {i}. n=1", n=1) for i in range(n)]
    with in_own_process(lat) as url:
        os.environ.update(ANTHROPIC_BASE_URL=url, ANTHROPIC_API_KEY="test-key")
        got: list[int] = []

        def on_reply(i: int, reply: GenReply) -> None:
            assert reply.status == "ok", reply
            assert reply.attempts == 1, reply  # no re-asks: one request per item
            got.append(i)

        gen.generate_many(requests[:c], c, on_reply)  # warm-up: imports, connections
        got.clear()
        t0 = time.perf_counter()
        gen.generate_many(requests, c, on_reply)
        wall = time.perf_counter() - t0
    assert sorted(got) == list(range(n)), "every request answered once"
    ideal = n * lat / c
    print(f"info: generation: {n} requests, {lat * 1000:.0f} ms server latency, concurrency {c}:")
    print(f"info: {wall:.2f} s (ideal {ideal:.2f} s)")
    print(f"ratio generation_pool_efficiency {wall / ideal:.3f} goal <= 1.1")


def sampling_pool(args: argparse.Namespace) -> None:
    import tinker
    from conftest import build_tiny_model
    from latency_proxy import ProxyProcess as LatencyProxy
    from tinker_server.bootstrap import ensure_venv, running_server

    from spar.engines.tinker import TinkerEngine
    from spar.models import load_renderer
    from spar.spec import SamplingSpec
    from spar.stages.draw import draw

    work = Path(tempfile.mkdtemp(prefix="bench-pool-"))
    tiny = build_tiny_model(work / "tiny")
    renderer = load_renderer("qwen3_instruct", str(tiny))
    n, c, lat = args.requests, args.concurrency, args.latency
    prompts = [
        renderer.build_generation_prompt([{"role": "user", "content": f"Question {i}?"}])
        for i in range(n)
    ]
    sampling = SamplingSpec(temperature=1.0, max_tokens=args.max_tokens)
    stops = renderer.get_stop_sequences()

    def params(i: int) -> Any:
        return tinker.SamplingParams(
            temperature=1.0, max_tokens=args.max_tokens, seed=i, stop=stops
        )

    def client_at(url: str) -> Any:
        os.environ["TINKER_BASE_URL"] = url
        return TinkerEngine(work).create_sampling_client(base_model=str(tiny))

    def pooled(client: Any, count: int) -> float:
        got: list[int] = []
        t0 = time.perf_counter()
        draw(
            client,
            renderer,
            prompts[:count],
            list(range(count)),
            sampling,
            c,
            lambda i, d: got.append(i),
        )
        wall = time.perf_counter() - t0
        assert sorted(got) == list(range(count))
        return wall

    with running_server(ensure_venv(), tiny, work / "skyrl", args.backend) as server:
        direct = client_at(server.url)
        pooled(direct, 2 * c)  # warm-up: the server's compiles, connections
        server_wall = pooled(direct, n)
        with LatencyProxy(server.url, lat) as proxy:
            client = client_at(proxy.url)
            pooled(client, c)  # warm-up through the proxy
            t0 = time.perf_counter()
            client.sample(prompts[0], 1, params(0)).result()
            one = time.perf_counter() - t0
            before = proxy.requests
            wall = pooled(client, n)
            http = proxy.requests - before
            old = None
            if not args.skip_old:
                t0 = time.perf_counter()
                old_draw(client, prompts, params, c)
                old = time.perf_counter() - t0
    ideal = n * lat / c
    print(f"info: backend {args.backend}")
    print(f"info: {n} requests, latency {lat * 1000:.0f} ms per HTTP request, concurrency {c}")
    print(f"info: server alone (no proxy), pool: {server_wall:.2f} s")
    print(f"info: one request through the proxy: {one:.2f} s; {http} HTTP requests for {n}")
    print(f"info: pool: {wall:.2f} s (ideal {ideal:.2f} s)")
    per_trip = wall / (http * lat / c)
    print(f"info: per HTTP round trip ({http / n:.2f} a sample): {per_trip:.3f}")
    if old is not None:
        print(f"info: old submission-order loop: {old:.2f} s, ratio {old / ideal:.3f}")
    print(f"ratio sampling_pool_efficiency {wall / ideal:.3f} goal <= 1.1")


if __name__ == "__main__":
    main()
