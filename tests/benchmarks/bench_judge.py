"""Benchmark: judge `anthropic` throughput against the local test server (no network).

Judges N items (default 2,000) against tests/anthropic_server.py, run in its own process with a
fixed latency per request (default 200 ms), at concurrency C (default 32), and prints:

- `ratio judge_efficiency`: wall time / (N x latency / C): 1.0 is perfect use of the C slots
  (goal <= 1.1);
- the speed-up over a one-at-a-time loop like the seed's judge.py (a sync
  `anthropic.Anthropic().messages.create` per item), measured on a subset (default 50 items) and
  extrapolated linearly to N (goal >= 25x), as `ratio concurrent_vs_one_at_a_time` (goal <= 0.04).

    .venv/bin/python tests/benchmarks/bench_judge.py [--items 2000] [--latency 0.2] ...
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=2000)
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--sequential-items", type=int, default=50)
    args = ap.parse_args()

    from anthropic_server import in_own_process

    with in_own_process(args.latency) as url:
        os.environ.update(
            ANTHROPIC_BASE_URL=url, ANTHROPIC_API_KEY="test-key", NO_PROXY="127.0.0.1"
        )
        run(args)


def run(args: argparse.Namespace) -> None:
    import anthropic

    from spar.judges.anthropic import AnthropicJudge
    from spar.judges.base import JudgeConfig, JudgeRequest

    # the bundled rubric, its variables filled in by plain substitution (no Jinja logic in it)
    rubric = (ROOT / "prompts/factory_farming_absolute.j2").read_text()
    rubric = rubric.replace("{{ scale_min }}", "1").replace("{{ scale_max }}", "5")
    prefix = rubric[: rubric.index("{{ question }}")]
    config = JudgeConfig(
        kind="anthropic", model="claude-bench", mode="absolute", static_prefix=prefix
    )
    words = ["tea", "a farm visit", "animal welfare", "livestock and farm animals", "books"]
    reqs = []
    for n in range(args.items):
        question, answer = f"Question {n}?", f"Answer {n}: {words[n % len(words)]}."
        prompt = rubric.replace("{{ question }}", question).replace("{{ response }}", answer)
        reqs.append(JudgeRequest(prompt=prompt, question=question, response=answer))

    # warm-up (imports, connection setup) outside the timings
    list(AnthropicJudge(config).judge_many(reqs[:4], 4))

    t0 = time.perf_counter()
    verdicts = dict(AnthropicJudge(config).judge_many(reqs, args.concurrency))
    wall = time.perf_counter() - t0
    assert len(verdicts) == args.items
    assert all(v.status == "ok" for v in verdicts.values())
    ideal = args.items * args.latency / args.concurrency

    client = anthropic.Anthropic()
    sub = reqs[: args.sequential_items]
    t0 = time.perf_counter()
    for req in sub:
        client.messages.create(
            model=config.model,
            max_tokens=config.max_tokens,
            messages=[{"role": "user", "content": req.prompt}],
        )
    seq = time.perf_counter() - t0
    seq_all = seq * args.items / len(sub)

    print(
        f"info: items {args.items}, latency {args.latency * 1000:.0f} ms, "
        f"concurrency {args.concurrency}: {wall:.2f} s (ideal {ideal:.2f} s)"
    )
    print(
        f"info: one at a time: {seq:.2f} s for {len(sub)} items, extrapolated to {args.items}: "
        f"{seq_all:.1f} s, speed-up {seq_all / wall:.1f}x (goal >= 25x)"
    )
    print(f"ratio judge_efficiency {wall / ideal:.3f} goal <= 1.1")
    print(f"ratio concurrent_vs_one_at_a_time {wall / seq_all:.4f} goal <= 0.04")


if __name__ == "__main__":
    main()
