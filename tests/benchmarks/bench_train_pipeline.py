"""Benchmark (on demand): the pipelined training loop against the serial one on a distant service.

    .venv/bin/python tests/benchmarks/bench_train_pipeline.py [--steps 20] [--latency 1.0]
        [--backend jax|null]

skyrl's Tinker server (tests/tinker_server/, the tests' tiny model, CPU) behind a proxy that adds
`--latency` seconds to every HTTP request (tests/benchmarks/latency_proxy.py), trained through
spar's own `train_loop` with the real `TinkerEngine`: `--steps` batches of one datum, the final
state and sampler weights saved (`--save-every` adds periodic states). The same run serially
(`pipeline_depth` 0: the loop before pipelining) and pipelined (the default depth), after an
unmeasured warm-up run that compiles the server's shapes. Prints

    ratio pipelined_vs_serial V goal <= 0.6

and `info:` lines: both walls, the requests each sent through the proxy, the steady-state
seconds per step and the fixed rest (client creation, final saves), the walls without added
latency (the server's own time), and the floor the SDK sets (see `floor`). `--depths 2,3`
also measures deeper pipelines. `--backend null` runs skyrl's server with launch.py's
compute-free backend instead of its JAX one: the service's only cost is then the added latency.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS / "benchmarks"))

from conftest import DATA, build_tiny_model  # noqa: E402
from latency_proxy import ProxyProcess as LatencyProxy  # noqa: E402
from tinker_server.bootstrap import add_backend_option, ensure_venv, running_server  # noqa: E402

MAX_LENGTH = 48  # every datum pads to one sequence bucket on the server: one compile


def rows_for(base_model: str, n: int) -> list[dict]:
    from spar.models import load_renderer
    from spar.stages.dataset import datum_row, read_records, to_conversation

    renderer = load_renderer("qwen3_instruct", base_model)
    records = read_records(DATA / "docs.jsonl", "synth_docs")
    return [
        datum_row(to_conversation(records[i % len(records)], "doc_idea"), renderer, MAX_LENGTH)
        for i in range(n)
    ]


@dataclass(frozen=True)
class Timing:
    wall: float  # one `train_loop`: client creation to the final sampler weights
    per_step: float  # steady state: seconds between the rows of the 3rd and the last step


def train(
    url: str, base_model: str, rows: list[dict], depth: int, save_every: int, work: Path, tag: str
) -> Timing:
    from spar.engines.tinker import TinkerEngine
    from spar.stages.train import LoopConfig, TrainJournal, train_loop
    from spar.store.state import State

    os.environ["TINKER_BASE_URL"] = url
    cfg = LoopConfig(
        lora_rank=4, learning_rate=1e-3, batch_size=1, save_every=save_every, pipeline_depth=depth
    )
    seen: list[float] = []
    with State(work / f"{tag}.db") as state:
        t = time.perf_counter()
        res = train_loop(
            TinkerEngine(work),
            base_model,
            rows,
            cfg,
            tag,
            TrainJournal(state, tag),
            on_step=lambda row: seen.append(time.perf_counter()),
        )
        wall = time.perf_counter() - t
    assert [m["step"] for m in res.metrics] == list(range(len(rows)))
    per_step = (seen[-1] - seen[2]) / (len(seen) - 3) if len(seen) > 3 else math.nan
    return Timing(wall, per_step)


def floor(steps: int, latency: float) -> float:
    """The least a pipelined run can take at this latency: the tinker SDK sends one training
    client's requests one at a time (each POST waits for its answer before the next goes out:
    `TrainingClient._take_turn`), so 2 requests a step cost 2 x latency whatever the depth; plus
    the client's creation (session, model: ~2 requests, each answered through a retrieve) and
    the final state and sampler weights (2 sends + their retrieves)."""
    return (2 * steps + 2 + 2) * latency


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--latency", type=float, default=1.0, help="seconds added to every request")
    ap.add_argument(
        "--depths",
        default="",
        help="also measure these pipeline depths, comma-separated (info lines only)",
    )
    ap.add_argument("--save-every", type=int, default=0)
    add_backend_option(ap)
    args = ap.parse_args()

    from spar.stages.train import PIPELINE_DEPTH

    depth = PIPELINE_DEPTH
    depths = sorted({0, depth, *(int(x) for x in args.depths.split(",") if x.strip())})
    os.environ["TINKER_API_KEY"] = "tml-spar-bench"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="bench-train-pipeline-"))
    model = build_tiny_model(work / "tiny-model")
    rows = rows_for(str(model), args.steps)
    with running_server(ensure_venv(), model, work / "skyrl", args.backend) as server:
        # warm-up: the server compiles its shapes once, outside every measurement
        train(server.url, str(model), rows[:2], depth, 0, work, "warmup")
        local = {
            d: train(server.url, str(model), rows, d, args.save_every, work, f"local{d}")
            for d in (0, depth)
        }
        walls: dict[int, Timing] = {}
        sent: dict[int, int] = {}
        for d in depths:
            with LatencyProxy(server.url, args.latency) as proxy:
                walls[d] = train(proxy.url, str(model), rows, d, args.save_every, work, f"p{d}")
                sent[d] = proxy.requests
    serial, piped = walls[0], walls[depth]
    print(f"info: backend {args.backend}")
    print(f"ratio pipelined_vs_serial {piped.wall / serial.wall:.3f} goal <= 0.6")
    print(
        f"info: {args.steps} steps at {args.latency:g} s per request: serial {serial.wall:.1f} s "
        f"({sent[0]} requests), pipelined depth {depth} {piped.wall:.1f} s "
        f"({sent[depth]} requests)"
    )
    for d in depths:
        if d not in (0, depth):
            print(
                f"info: depth {d}: {walls[d].wall:.1f} s ({sent[d]} requests), "
                f"ratio to serial {walls[d].wall / serial.wall:.3f}"
            )
    print(
        f"info: steady state: serial {serial.per_step:.2f} s/step, pipelined "
        f"{piped.per_step:.2f} s/step (ratio {piped.per_step / serial.per_step:.3f}); the rest "
        f"(client creation, final saves): serial "
        f"{serial.wall - args.steps * serial.per_step:.1f} s, pipelined "
        f"{piped.wall - args.steps * piped.per_step:.1f} s"
    )
    print(
        f"info: without added latency: serial {local[0].wall:.1f} s "
        f"({local[0].per_step:.2f} s/step), pipelined {local[depth].wall:.1f} s "
        f"({local[depth].per_step:.2f} s/step) (the server's own time)"
    )
    print(
        f"info: SDK floor for a pipelined step: {2 * args.latency:.2f} s (its 2 requests are "
        f"sent one at a time, each waiting for its answer); for the run: "
        f"{floor(args.steps, args.latency):.0f} s, i.e. ratio >= "
        f"{floor(args.steps, args.latency) / serial.wall:.3f} against this serial run"
    )


if __name__ == "__main__":
    main()
