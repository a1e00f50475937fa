"""Benchmark (on demand): a warm no-op plan/apply costs the same however much the memo holds, and
the memo journals fast with every item committed.

    .venv/bin/python tests/benchmarks/bench_memo.py [--big 1000000] [--small 1000] [--repeats 11]

End to end with the real CLI, in subprocesses, on a small fake-engine project (as the tests'
`project` fixture: SPAR_PLUGINS=fake_plugin, tests/data docs and rubric, a tiny local model dir).
Both runs dirs get one real `spar apply` (every stage fresh), then extra rows are bulk-loaded into
runs/.spar/state.db until the item memo holds --big items in one and --small in the other.

Prints: warm no-op `spar plan`, 1M journaled items / 1k items                  goal <= 1.2
        warm no-op `spar apply`, 1M journaled items / 1k items                 goal <= 1.2
        5,000 / `State.memo_put` items per second, one committed transaction each  goal <= 1
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(TESTS))

from conftest import base_spec, build_tiny_model  # noqa: E402

from spar.store.state import State  # noqa: E402

GOAL_ITEMS_PER_S = 5_000
NAMESPACES = ("sample", "judge")  # the extra items are split between the two, as a real memo is


def key(ns: str, i: int) -> str:
    return hashlib.sha256(f"bench {ns} item {i}".encode()).hexdigest()


def value(ns: str, i: int) -> dict[str, object]:
    """About what an item weighs: a sampled answer, or a verdict with its reasoning."""
    if ns == "judge":
        return {
            "score": i % 10,
            "reasoning": f"Verdict {i}: the answer mentions barn ventilation only in passing. " * 2,
            "status": "ok",
        }
    return {
        "response": f"Answer {i}: broiler barns added tunnel ventilation this year. " * 5,
        "stop_reason": "stop",
    }


# ---------------------------------------------------------------------------- the project


def tiny_model(d: Path) -> Path:
    """The test suite's tiny model (conftest), built once per benchmark directory."""
    return d if (d / "config.json").exists() else build_tiny_model(d)


class Project:
    def __init__(self, root: Path, model: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        shutil.copy(TESTS / "data" / "docs.jsonl", root / "docs.jsonl")
        shutil.copy(TESTS / "data" / "rubric.j2", root / "rubric.j2")
        self.spec = root / "spec.yaml"
        self.spec.write_text(yaml.safe_dump(base_spec(model), sort_keys=False))
        self.calls = root / "calls.jsonl"
        env = {**os.environ, "SPAR_PLUGINS": "fake_plugin", "FAKE_CALL_LOG": str(self.calls)}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        env.pop("FAKE_KILL_AFTER", None)
        self.env = env

    def spar(self, command: str, runs: Path) -> tuple[float, str]:
        """Run `spar COMMAND spec --runs-dir RUNS` in a fresh process: (wall seconds, stdout)."""
        cmd = [sys.executable, "-m", "spar.cli", command, str(self.spec), "--runs-dir", str(runs)]
        t = time.perf_counter()
        p = subprocess.run(cmd, cwd=self.root, env=self.env, capture_output=True, text=True)
        elapsed = time.perf_counter() - t
        if p.returncode != 0:
            sys.exit(f"{' '.join(cmd)}: exit {p.returncode}\n{p.stdout}\n{p.stderr}")
        return elapsed, p.stdout

    def calls_made(self) -> int:
        return len(self.calls.read_text().splitlines()) if self.calls.exists() else 0


def fill_memo(db: Path, target: int) -> int:
    """Bulk-load extra items (one transaction) until the memo holds `target` items in all."""
    with State(db) as st:
        have = st.memo_count()
        extra = max(0, target - have)
        share = [extra // len(NAMESPACES)] * len(NAMESPACES)
        share[0] += extra - sum(share)
        for ns, n in zip(NAMESPACES, share, strict=True):

            def items(ns: str = ns, n: int = n) -> Iterator[tuple[str, object]]:
                for i in range(n):
                    yield key(ns, i), value(ns, i)

            st.memo_put_many(ns, items())
        total = st.memo_count()
    assert total == max(target, have), (total, target)
    return total


# ---------------------------------------------------------------------------- journaling


def bench_journal(path: Path, n: int, first: int = 0) -> float:
    """Items per second, each `memo_put` its own committed transaction."""
    with State(path) as st:
        st.memo_put("sample", "warm-up", 0)  # creates the database: not part of the figure
        before = st.memo_count("sample")
        values = [(key("sample", i), value("sample", i)) for i in range(first, first + n)]
        t = time.perf_counter()
        for k, v in values:
            st.memo_put("sample", k, v)
        elapsed = time.perf_counter() - t
        assert st.memo_count("sample") == before + n
    return n / elapsed


# ---------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--big", type=int, default=1_000_000, help="items in the large memo")
    ap.add_argument("--small", type=int, default=1_000, help="items in the small memo")
    ap.add_argument("--repeats", type=int, default=11, help="timed runs of each command")
    ap.add_argument("--items", type=int, default=20_000, help="memo_put calls timed")
    ap.add_argument("--dir", type=Path, default=None, help="where to build (default: a temp dir)")
    ap.add_argument("--model", type=Path, default=None, help="tiny model dir (kept; built once)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-memo-") as tmp:
        root = Path(tmp)

        rate = bench_journal(root / "journal" / "state.db", args.items)
        print(f"memo_put: {rate:,.0f} items/s, each committed ({args.items:,} items)")

        t = time.perf_counter()
        model = tiny_model(args.model or root / "tiny-model")
        proj = Project(root / "proj", model)
        runs = {"big": proj.root / "runs-big", "small": proj.root / "runs-small"}
        for name, target in (("big", args.big), ("small", args.small)):
            _, out = proj.spar("apply", runs[name])
            assert "ran " in out, out
            fill_memo(runs[name] / ".spar" / "state.db", target)
        size_mb = sum(f.stat().st_size for f in (runs["big"] / ".spar").glob("state.db*")) / 1e6
        print(
            f"set up: applied once in each runs dir, memo filled to {args.big:,} items"
            f" ({size_mb:,.0f} MB) and {args.small:,} items in {time.perf_counter() - t:.1f} s"
        )

        calls = proj.calls_made()
        for name in ("big", "small"):  # warm: the OS has the files cached; every stage fresh
            for command in ("plan", "apply"):
                _, out = proj.spar(command, runs[name])
            assert "nothing to do" in out, out
            _, out = proj.spar("plan", runs[name])
            assert all(" fresh" in line for line in out.splitlines() if "estimate" not in line)
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.repeats):  # interleaved, so drift hits both alike
            for command in ("plan", "apply"):
                for name in ("big", "small"):
                    elapsed, _ = proj.spar(command, runs[name])
                    times.setdefault((command, name), []).append(elapsed)
        assert proj.calls_made() == calls, "a warm no-op run called the engine or judge"

        for command in ("plan", "apply"):
            b = statistics.median(times[command, "big"])
            s = statistics.median(times[command, "small"])
            print(
                f"warm no-op `spar {command}`, median of {args.repeats}: {args.big:,} items"
                f" {b * 1e3:.0f} ms, {args.small:,} items {s * 1e3:.0f} ms"
            )
            print(f"ratio warm_noop_{command}_1M_vs_1k {b / s:.3f} goal <= 1.2")

        print(f"ratio memo_put_items_per_s_inverse {GOAL_ITEMS_PER_S / rate:.3f} goal <= 1")

        # for context (no goal): journaling into the large memo (random inserts into a big index)
        big_rate = bench_journal(runs["big"] / ".spar" / "state.db", args.items, first=2 * args.big)
        print(f"info: memo_put into the {args.big:,}-item memo: {big_rate:,.0f} items/s, committed")


if __name__ == "__main__":
    main()
