"""Benchmark (on demand): the item memo journals fast and costs the same however much it holds.

    .venv/bin/python tests/benchmarks/bench_memo.py [--items 20000] [--big 1000000]

Prints: 5,000 / memo_put items per second, one committed transaction each   goal <= 1
        warm lookup (open + memo_has of 1,000 keys + close), 1M items / 1k items   goal <= 1.2
and, for context only, the same lookup as a fresh process pays it and the journaling rate into
the 1M-item memo.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from spar.state import State  # noqa: E402

GOAL_ITEMS_PER_S = 5_000
NS = "sample"


def key(i: int) -> str:
    return hashlib.sha256(f"item {i}".encode()).hexdigest()


def value(i: int) -> dict[str, object]:
    """About what a sampled item weighs: a response of a few hundred characters."""
    return {
        "response": f"Answer {i}: broiler barns added tunnel ventilation this year. " * 5,
        "tokens": 96,
        "stop_reason": "stop",
    }


def bench_journal(path: Path, n: int, first: int = 0) -> float:
    """Items per second, each `memo_put` its own committed transaction."""
    with State(path) as st:
        st.memo_put(NS, "warm-up", 0)  # creates the database: not part of the figure
        before = st.memo_count(NS)
        values = [(key(i), value(i)) for i in range(first, first + n)]
        t = time.perf_counter()
        for k, v in values:
            st.memo_put(NS, k, v)
        elapsed = time.perf_counter() - t
        assert st.memo_count(NS) == before + n
    return n / elapsed


def build(path: Path, n: int) -> None:
    def items() -> Iterator[tuple[str, object]]:
        for i in range(n):
            yield key(i), value(i)

    with State(path) as st:
        st.memo_put_many(NS, items())


def lookup_keys(n_items: int, n_keys: int, rng: random.Random) -> list[str]:
    present = [key(i) for i in rng.sample(range(n_items), n_keys // 2)]
    absent = [key(n_items + i) for i in range(n_keys - len(present))]
    keys = present + absent
    rng.shuffle(keys)
    return keys


def warm_lookup(path: Path, keys: list[str]) -> float:
    """What a warm no-op apply pays the memo: open, look the stage's items up, close."""
    t = time.perf_counter()
    st = State(path)
    found = st.memo_has(NS, keys)
    st.close()
    elapsed = time.perf_counter() - t
    assert len(found) == len(keys) // 2
    return elapsed


PROCESS = """
import sys
from pathlib import Path
from spar.state import State
st = State(Path(sys.argv[1]))
found = st.memo_has("sample", Path(sys.argv[2]).read_text().split())
st.close()
assert len(found) == int(sys.argv[3])
"""


def process_lookup(path: Path, keys_file: Path, present: int) -> float:
    """The same, in a fresh process: interpreter start, import, open, lookup, close."""
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", PROCESS, str(path), str(keys_file), str(present)],
        check=True,
        cwd=ROOT,
    )
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--items", type=int, default=20_000, help="memo_put calls timed")
    ap.add_argument("--big", type=int, default=1_000_000, help="items in the large memo")
    ap.add_argument("--small", type=int, default=1_000, help="items in the small memo")
    ap.add_argument("--keys", type=int, default=1_000, help="keys looked up (half present)")
    ap.add_argument("--repeats", type=int, default=41)
    ap.add_argument("--process-repeats", type=int, default=11)
    ap.add_argument("--dir", type=Path, default=None, help="where to build (default: a temp dir)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-memo-") as tmp:
        root = Path(tmp)

        rate = bench_journal(root / "journal" / "state.db", args.items)
        print(f"memo_put: {rate:,.0f} items/s, each committed ({args.items:,} items)")
        print(f"ratio memo_put_items_per_s_inverse {GOAL_ITEMS_PER_S / rate:.3f} goal <= 1")

        t = time.perf_counter()
        big, small = root / "big" / "state.db", root / "small" / "state.db"
        build(big, args.big)
        build(small, args.small)
        size_mb = sum(f.stat().st_size for f in big.parent.iterdir()) / 1e6
        print(
            f"built memos of {args.big:,} items ({size_mb:,.0f} MB) and {args.small:,} items"
            f" in {time.perf_counter() - t:.1f} s"
        )

        rng = random.Random(0)
        big_keys = lookup_keys(args.big, args.keys, rng)
        small_keys = lookup_keys(args.small, args.keys, rng)
        for _ in range(3):  # warm: the OS has the files cached, as on a second `spar apply`
            warm_lookup(big, big_keys)
            warm_lookup(small, small_keys)
        big_t, small_t = [], []
        for _ in range(args.repeats):  # interleaved, so drift hits both alike
            big_t.append(warm_lookup(big, big_keys))
            small_t.append(warm_lookup(small, small_keys))
        b, s = statistics.median(big_t), statistics.median(small_t)
        print(
            f"warm lookup of {args.keys:,} keys (open + memo_has + close), median of"
            f" {args.repeats}: {args.big:,} items {b * 1e3:.2f} ms, {args.small:,} items"
            f" {s * 1e3:.2f} ms"
        )
        print(f"ratio memo_lookup_1M_vs_1k {b / s:.3f} goal <= 1.2")

        # for context (no goal): the same lookup as a whole fresh process pays it
        files = {}
        for name, keys in (("big", big_keys), ("small", small_keys)):
            files[name] = root / f"{name}.keys"
            files[name].write_text("\n".join(keys))
        half = args.keys // 2
        big_p, small_p = [], []
        for _ in range(args.process_repeats):
            big_p.append(process_lookup(big, files["big"], half))
            small_p.append(process_lookup(small, files["small"], half))
        bp, sp = statistics.median(big_p), statistics.median(small_p)
        print(
            f"info: the same in a fresh process (interpreter start + import + open + memo_has +"
            f" close), median of {args.process_repeats}: {bp * 1e3:.1f} ms vs {sp * 1e3:.1f} ms"
            f" (x{bp / sp:.3f}; context only, not the goal's figure)"
        )

        # for context (no goal): journaling into the large memo (random inserts into a big index)
        rate = bench_journal(big, args.items, first=2 * args.big)
        print(f"info: memo_put into the {args.big:,}-item memo: {rate:,.0f} items/s, committed")


if __name__ == "__main__":
    main()
