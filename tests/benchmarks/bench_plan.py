"""Benchmark (on demand): unchanged data costs nothing however large; cold hashing near C speed.

    .venv/bin/python tests/benchmarks/bench_plan.py [--gb 1.0]

Prints: warm no-op `spar plan` (1 GB docs) / warm no-op `spar plan` (1 KB docs)   goal <= 1.2
        (cold `spar plan` (1 GB) - cold plan (1 KB)) / `sha256sum` of the file      goal <= 3
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
    spec.write_text(
        f"name: {name}\nmodel: {{engine: fake, base_model: bench-model, renderer: llama3}}\n"
        f"data: {{docs: {docs.name}}}\neval: {{tiers: {{direct: [Why is the sky blue]}}}}\n"
        "judge: {kind: keyword, rubric: rubric.j2}\n"
    )
    return spec


def timed(cmd: list[str], env: dict[str, str], cwd: Path) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="spar-bench-"))
    try:
        big, small = root / "big.jsonl", root / "small.jsonl"
        write_docs(big, int(args.gb * 1024**3))
        write_docs(small, 1024)
        specs = {"big": write_spec(root, big, "big"), "small": write_spec(root, small, "small")}
        env = {**os.environ, "SPAR_PLUGINS": "fake_plugin", "PYTHONPATH": str(TESTS)}
        env["HF_HUB_OFFLINE"] = "1"

        def plan(which: str) -> float:
            cmd = [sys.executable, "-m", "spar.cli", "plan", str(specs[which])]
            return timed([*cmd, "--runs-dir", str(root / "runs")], env, root)

        timed(["sha256sum", str(big)], env, root)  # page cache warm for everyone
        sha = statistics.median(timed(["sha256sum", str(big)], env, root) for _ in range(3))

        def cold(which: str) -> float:
            (root / "runs").mkdir(exist_ok=True)  # the cache is only written into an existing dir
            (root / "runs/.spar/hashcache.json").unlink(missing_ok=True)
            return plan(which)

        cold_small = statistics.median(cold("small") for _ in range(3))
        cold_big = cold("big")
        warm_big = statistics.median(plan("big") for _ in range(args.repeats))
        warm_small = statistics.median(plan("small") for _ in range(args.repeats))
        size = big.stat().st_size / 1024**3
        print(f"docs file: {size:.2f} GiB; sha256sum {sha:.2f} s")
        print(f"warm no-op plan: big {warm_big:.3f} s, small {warm_small:.3f} s")
        print(f"  ratio big/small = {warm_big / warm_small:.3f}   (goal <= 1.2)")
        print(f"cold plan: big {cold_big:.2f} s, small {cold_small:.2f} s")
        print(f"  (big - small) / sha256sum = {(cold_big - cold_small) / sha:.2f}   (goal <= 3)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
