"""Benchmark (on demand): the offline default on this machine.

    .venv/bin/python tests/benchmarks/bench_local.py [--skip-demo]

Prints: demo wall time cold (fresh runs dir; model cache already converted) and no-op; peak RSS
of the cold demo; LoRA training seconds/step at batch 8 on the bundled docs (max_length 256);
aggregate sampling tokens/s for 24 prompts x 128 tokens (goal >= 80 tok/s on 2 cores), as
`ratio sampling_80_tok_s_vs_measured V goal <= 1` (V = 80 / measured); the rest as `info:` lines.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_demo(runs: Path) -> tuple[float, float]:
    cmd = [
        sys.executable,
        "-m",
        "spar.cli",
        "apply",
        "experiments/demo.yaml",
        "--runs-dir",
        str(runs),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return wall, rss_mb


def train_speed(steps: int = 3) -> float:
    import tinker

    from spar.engines.local import LocalEngine
    from spar.models import SMOLLM2, load_renderer
    from spar.stages.dataset import datum_row, read_records, row_to_datum, to_conversation

    renderer = load_renderer("qwen3_instruct", SMOLLM2)
    docs = REPO / "experiments/data/factory_farming_neutral/synth_docs.jsonl"
    rows = [
        datum_row(to_conversation(r, "doc_idea"), renderer, 256)
        for r in read_records(docs, "synth_docs")[:8]
    ]
    client = LocalEngine(Path(tempfile.mkdtemp())).create_lora_training_client(SMOLLM2, 16, 0)
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        client.forward_backward([row_to_datum(r) for r in rows], "cross_entropy").result()
        client.optim_step(tinker.AdamParams(learning_rate=5e-4)).result()
        times.append(time.perf_counter() - t)
    return sum(times[1:]) / steps  # the first step warms up


def sample_speed() -> tuple[float, int, float]:
    import tinker

    from spar.engines.local import LocalEngine
    from spar.models import SMOLLM2, load_renderer

    renderer = load_renderer("qwen3_instruct", SMOLLM2)
    client = LocalEngine(Path(tempfile.mkdtemp())).create_sampling_client(base_model=SMOLLM2)
    lines = (REPO / "experiments/data/eval_questions.jsonl").read_text().splitlines()
    questions = [json.loads(line)["question"] for line in lines]
    prompts = [
        renderer.build_generation_prompt(
            [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": q},
            ]
        )
        for q in (questions * 2)[:24]
    ]
    t = time.perf_counter()
    futures = [
        client.sample(p, 1, tinker.SamplingParams(max_tokens=128, temperature=1.0, seed=i, stop=[]))
        for i, p in enumerate(prompts)
    ]
    n = sum(len(f.result().sequences[0].tokens) for f in futures)
    wall = time.perf_counter() - t
    return n / wall, n, wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-demo", action="store_true")
    args = ap.parse_args()
    if not args.skip_demo:
        runs = Path(tempfile.mkdtemp(prefix="spar-demo-"))
        try:
            cold, rss = run_demo(runs)
            noop, _ = run_demo(runs)
        finally:
            shutil.rmtree(runs, ignore_errors=True)
        print(f"info: demo cold: {cold:.1f} s (peak RSS {rss:.0f} MB); no-op: {noop:.2f} s")
    print(f"info: train: {train_speed():.2f} s/step at batch 8 (max_length 256)")
    tps, n, wall = sample_speed()
    print(f"info: sampling {tps:.1f} tok/s ({n} tokens, 24 prompts x 128 max, {wall:.1f} s)")
    # goal >= 80 tok/s, as a ratio at most 1: 80 tok/s over the measured rate
    print(f"ratio sampling_80_tok_s_vs_measured {80 / tps:.3f} goal <= 1")


if __name__ == "__main__":
    main()
