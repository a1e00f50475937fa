"""Benchmark (on demand): a sweep runs its points side by side; planning a big sweep is fast.

    .venv/bin/python tests/benchmarks/bench_sweep.py [--latency 0.5] [--jobs 8] [--skip-sweep]
        [--skip-plan] [--backend jax|null]

Prints, one line per figure (`ratio NAME VALUE goal <= BOUND`):

- `ratio sweep6_vs_one_point`: wall time of `spar apply --jobs N` on a 6-point sweep (3 seeds x 2
  learning rates) / wall time of the same spec's one point, both on engine `tinker` against the
  skyrl Tinker server (tests/tinker_server/) behind a stand-in that adds `--latency` seconds to
  every request (tests/benchmarks/latency_proxy.py), all on 127.0.0.1. goal <= 1.3.
- `ratio plan_100_point_sweep_s_vs_2s`: warm `spar plan` of a 100-point sweep of the demo spec
  (10 seeds x 10 learning rates; median of 3, after one warm-up run) / 2 s. goal <= 1.

`--backend null` serves the sweep from skyrl's server with launch.py's compute-free backend
instead of its JAX one: on a small machine skyrl's compute, serialised across the points,
otherwise dominates the figure; with it the service's only cost is the added latency.

Before the timed runs, one point is applied once (a different seed) so the server's XLA compiles
are not charged to either side. The judge is the fake plugin's keyword judge (instant); the
questions, samples and training steps are the tests' small spec.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
sys.path[:0] = [str(TESTS), str(TESTS / "benchmarks")]


def spar(args: list[str], cwd: Path, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-m", "spar.cli", *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"spar {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return wall


def tinker_spec(model: Path, seed: int) -> dict[str, Any]:
    from conftest import base_spec

    d = base_spec(model)
    d["model"]["engine"] = "tinker"
    d["training"].update(save_every=0, max_length=48, seed=seed)
    d["eval"]["samples_per_question"] = 1
    d["eval"]["sampling"]["max_tokens"] = 16
    return d


def bench_sweep(args: argparse.Namespace, work: Path) -> None:
    from conftest import DATA, build_tiny_model
    from latency_proxy import LatencyProxy
    from tinker_server.bootstrap import ensure_venv, running_server

    model = build_tiny_model(work / "model")
    proj = work / "proj"
    proj.mkdir()
    for name in ("docs.jsonl", "rubric.j2"):
        shutil.copy(DATA / name, proj / name)
    with (
        running_server(ensure_venv(), model, work / "skyrl", args.backend) as server,
        LatencyProxy(server.url, args.latency) as proxy,
    ):
        env = {
            **os.environ,
            "SPAR_PLUGINS": "fake_plugin",
            "PYTHONPATH": str(TESTS),
            "HF_HUB_OFFLINE": "1",
            "TINKER_BASE_URL": proxy.url,
            "TINKER_API_KEY": "tml-spar-bench",
        }
        jobs = ["--jobs", str(args.jobs)]
        warm = proj / "warm.yaml"
        warm.write_text(yaml.safe_dump({**tinker_spec(model, 99), "name": "warm"}))
        spar(["apply", str(warm), "--runs-dir", str(work / "runs-warm"), *jobs], proj, env)
        one = proj / "one.yaml"
        one.write_text(yaml.safe_dump(tinker_spec(model, 1)))
        t_one = spar(["apply", str(one), "--runs-dir", str(work / "runs-one"), *jobs], proj, env)
        six = proj / "six.yaml"
        spec = tinker_spec(model, 1)
        spec["sweep"] = {"training.seed": [1, 2, 3], "training.learning_rate": [1e-3, 2e-3]}
        six.write_text(yaml.safe_dump(spec))
        t_six = spar(["apply", str(six), "--runs-dir", str(work / "runs-six"), *jobs], proj, env)
        print(f"info: backend {args.backend}")
        print(
            f"info: one point {t_one:.1f} s, 6 points {t_six:.1f} s "
            f"({args.latency * 1000:.0f} ms per request, --jobs {args.jobs}, "
            f"{proxy.requests} requests through the stand-in)"
        )
        print(f"ratio sweep6_vs_one_point {t_six / t_one:.2f} goal <= 1.3")


def bench_plan(work: Path) -> None:
    spec = work / "plan100.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "extends": str(ROOT / "experiments" / "demo.yaml"),
                "name": "plan100",
                "sweep": {
                    "training.seed": list(range(1, 11)),
                    "training.learning_rate": [round(1e-4 * k, 6) for k in range(1, 11)],
                },
            }
        )
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    runs = work / "runs-plan"
    spar(["plan", str(spec), "--runs-dir", str(runs)], work, env)  # warm: the hash cache
    walls = [spar(["plan", str(spec), "--runs-dir", str(runs)], work, env) for _ in range(3)]
    wall = statistics.median(walls)
    print(f"info: warm `spar plan` of a 100-point sweep: {wall:.2f} s (median of 3)")
    print(f"ratio plan_100_point_sweep_s_vs_2s {wall / 2.0:.2f} goal <= 1")


def main() -> None:
    from tinker_server.bootstrap import add_backend_option

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latency", type=float, default=0.5)
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--skip-sweep", action="store_true", help="only the plan figure")
    ap.add_argument("--skip-plan", action="store_true", help="only the sweep figure")
    add_backend_option(ap, " for the sweep")
    ap.add_argument("--keep", type=Path, help="work here and keep it (runs dirs, stage logs)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if not args.skip_plan:
            bench_plan(work)
        if not args.skip_sweep:
            bench_sweep(args, work)


if __name__ == "__main__":
    main()
