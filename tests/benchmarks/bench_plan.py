"""Benchmark (on demand): unchanged data costs nothing however large; cold hashing near C speed.

    .venv/bin/python tests/benchmarks/bench_plan.py [--gb 1.0]

Prints: warm no-op `spar plan` (1 GB docs) / warm no-op `spar plan` (1 KB docs)   goal <= 1.2
        (cold `spar plan` (1 GB) - cold plan (1 KB)) / `sha256sum` of the file      goal <= 3
        before any apply, with no runs dir at all: the second `spar plan` (1 GB docs) /
        the same (1 KB docs)                                                        goal <= 1.2

"warm": the hash cache (runs/.spar/state.db, which `spar plan` writes even before the first
apply) knows the docs file; "cold": it does not. Nothing is ever applied here: the docs are only
planned, the way a user plans a new experiment before running it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def write_docs(path: Path, target_bytes: int) -> None:
    body = "Broiler barns in the county added tunnel ventilation this year. " * 24
    with path.open("w") as f:
        written, i = 0, 0
        while written < target_bytes:
            line = json.dumps(
                {
                    "content": f"{i}: {body}",
                    "doc_idea": f"A report on barn ventilation, number {i}.",
                    "doc_type": "news article",
                    "fact": "Barns are adding tunnel ventilation.",
                    "universe_context_id": "bench",
                }
            )
            f.write(line + "\n")
            written += len(line) + 1
            i += 1


def write_spec(root: Path, docs: Path, name: str) -> Path:
    (root / "rubric.j2").write_text("{{ question }} {{ response }} {{ baseline_response }}\n")
    spec = root / f"{name}.yaml"
    # test_size 0: the 1 KB docs are a single record (the default holds out 50)
    spec.write_text(
        f"name: {name}\nmodel: {{engine: fake, base_model: bench-model, renderer: llama3}}\n"
        f"data: {{docs: {docs.name}, test_size: 0}}\n"
        "eval: {tiers: {direct: [Why is the sky blue]}}\n"
        "judge: {kind: keyword, rubric: rubric.j2}\n"
    )
    return spec


def timed(cmd: list[str], env: dict[str, str], cwd: Path) -> float:
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - t
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)}: exit {p.returncode}\n{p.stderr.decode()}")
    return elapsed


def forget_hashes(runs: Path) -> None:
    """Drop the hash cache (the state database), keeping the runs dir itself."""
    runs.mkdir(exist_ok=True)
    for f in (runs / ".spar").glob("state.db*"):  # state.db, -wal, -shm
        f.unlink()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--fresh-repeats", type=int, default=3, help="plan-before-apply flows")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="spar-bench-"))
    try:
        big, small = root / "big.jsonl", root / "small.jsonl"
        write_docs(big, int(args.gb * 1024**3))
        write_docs(small, 1024)
        specs = {"big": write_spec(root, big, "big"), "small": write_spec(root, small, "small")}
        env = {**os.environ, "SPAR_PLUGINS": "fake_plugin", "PYTHONPATH": str(TESTS)}
        env["HF_HUB_OFFLINE"] = "1"

        def plan(which: str, runs: Path) -> float:
            cmd = [sys.executable, "-m", "spar.cli", "plan", str(specs[which])]
            return timed([*cmd, "--runs-dir", str(runs)], env, root)

        timed(["sha256sum", str(big)], env, root)  # page cache warm for everyone
        sha = statistics.median(timed(["sha256sum", str(big)], env, root) for _ in range(3))

        # one runs dir, its hash cache dropped before each cold plan
        runs = root / "runs"

        def cold(which: str) -> float:
            forget_hashes(runs)
            return plan(which, runs)

        cold_small = statistics.median(cold("small") for _ in range(3))
        cold_big = cold("big")
        warm_big = statistics.median(plan("big", runs) for _ in range(args.repeats))
        warm_small = statistics.median(plan("small", runs) for _ in range(args.repeats))

        # before any apply, from nothing: no runs dir at all; the first plan hashes the docs and
        # keeps the hash, the second must not hash them again
        second: dict[str, list[float]] = {"big": [], "small": []}
        first_big: list[float] = []
        for i in range(args.fresh_repeats):
            for which in ("big", "small"):
                fresh = root / f"fresh-{which}-{i}"
                assert not fresh.exists()
                t = plan(which, fresh)
                if which == "big":
                    first_big.append(t)
                assert (fresh / ".spar" / "state.db").exists(), "plan kept no hash cache"
                second[which].append(plan(which, fresh))
                shutil.rmtree(fresh)
        fresh_big = statistics.median(second["big"])
        fresh_small = statistics.median(second["small"])

        size = big.stat().st_size / 1024**3
        print(f"docs file: {size:.2f} GiB; sha256sum {sha:.2f} s")
        print(
            f"warm no-op plan, median of {args.repeats}: big {warm_big:.3f} s,"
            f" small {warm_small:.3f} s"
        )
        print(f"ratio warm_noop_plan_1gb_vs_1kb {warm_big / warm_small:.3f} goal <= 1.2")
        print(f"cold plan: big {cold_big:.2f} s, small {cold_small:.2f} s (median of 3)")
        print(f"ratio cold_plan_extra_vs_sha256sum {(cold_big - cold_small) / sha:.2f} goal <= 3")
        print(
            f"plan before any apply (no runs dir), median of {args.fresh_repeats}: first plan"
            f" big {statistics.median(first_big):.2f} s; second plan big {fresh_big:.3f} s,"
            f" small {fresh_small:.3f} s"
        )
        print(f"ratio plan_before_apply_warm_vs_1kb {fresh_big / fresh_small:.3f} goal <= 1.2")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
