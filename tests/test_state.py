"""spar.store.state: round trips, durability across SIGKILL, several processes on one database."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from spar.store.state import SCHEMA_VERSION, HashEntry, State, StateError

if TYPE_CHECKING:
    from spar.judges.base import BatchJournal

ROOT = Path(__file__).resolve().parents[1]


def db_path(tmp_path: Path) -> Path:
    return tmp_path / "runs" / ".spar" / "state.db"


def run_child(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def start_child(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# --------------------------------------------------------------------------- item memo


def test_memo_round_trip(tmp_path: Path) -> None:
    with State(db_path(tmp_path)) as st:
        value = {"response": "héllo ✓", "tokens": [1, 2, 3], "score": 4.5, "none": None}
        st.memo_put("sample", "aa", value)
        st.memo_put("sample", "bb", [1, "two"])
        st.memo_put("judge", "aa", "other namespace")
        assert st.memo_get("sample", "aa") == value
        assert st.memo_get("judge", "aa") == "other namespace"
        assert st.memo_get("sample", "cc") is None
        assert st.memo_get("nope", "aa") is None
        assert st.memo_has("sample", ["aa", "bb", "cc"]) == {"aa", "bb"}
        assert st.memo_has("judge", ["aa", "bb"]) == {"aa"}
        assert st.memo_has("sample", []) == set()
        assert st.memo_get_many("sample", ["aa", "cc", "bb", "aa"]) == {
            "aa": value,
            "bb": [1, "two"],
        }
        assert st.memo_count() == 3
        assert st.memo_count("sample") == 2
        assert st.memo_count("missing") == 0

        st.memo_put("sample", "aa", "replaced")
        assert st.memo_get("sample", "aa") == "replaced"
        assert st.memo_count("sample") == 2

        st.memo_delete("sample", ["aa", "zz"])
        assert st.memo_has("sample", ["aa", "bb"]) == {"bb"}
        assert st.memo_count() == 2

    # stored as JSON, non-ASCII kept as is
    raw = sqlite3.connect(db_path(tmp_path))
    try:
        ((text,),) = raw.execute("SELECT value FROM memo WHERE key = 'aa' AND ns = 'judge'")
    finally:
        raw.close()
    assert text == json.dumps("other namespace")
    # reopened: everything is still there
    with State(db_path(tmp_path)) as st:
        assert st.memo_get("sample", "bb") == [1, "two"]
        assert st.memo_count() == 2


def test_memo_many_keys_are_chunked(tmp_path: Path) -> None:
    keys = [f"{i:064x}" for i in range(2_345)]
    with State(db_path(tmp_path)) as st:
        st.memo_put_many("sample", ((k, {"i": i}) for i, k in enumerate(keys) if i % 3))
        present = {k for i, k in enumerate(keys) if i % 3}
        assert st.memo_has("sample", keys) == present
        got = st.memo_get_many("sample", keys)
        assert set(got) == present
        assert all(got[k] == {"i": int(k, 16)} for k in present)
        st.memo_delete("sample", keys[:1_500])
        assert st.memo_has("sample", keys) == {k for k in present if int(k, 16) >= 1_500}


def test_missing_db_reads_empty_and_creates_nothing(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    st = State(db_path(tmp_path))
    assert st.memo_get("sample", "aa") is None
    assert st.memo_get_many("sample", ["aa"]) == {}
    assert st.memo_has("sample", ["aa"]) == set()
    assert st.memo_count() == 0
    assert st.hash_lookup("/x", (1, 2, 3)) is None
    assert st.batch_journal("judge").pending() == []
    assert st.train_steps("r") == []
    assert st.train_checkpoints("r") == []
    assert st.train_runs() == []
    st.close()
    assert not runs.exists()
    # the first write creates it
    st.memo_put("sample", "aa", 1)
    assert db_path(tmp_path).is_file()
    assert st.memo_get("sample", "aa") == 1
    st.close()


def test_reader_opened_before_the_db_existed_sees_it_later(tmp_path: Path) -> None:
    reader = State(db_path(tmp_path))
    assert reader.memo_has("sample", ["aa"]) == set()
    with State(db_path(tmp_path)) as writer:
        writer.memo_put("sample", "aa", 1)
        assert reader.memo_has("sample", ["aa"]) == {"aa"}
    reader.close()


def test_wal_mode_and_schema_version(tmp_path: Path) -> None:
    with State(db_path(tmp_path)) as st:
        st.memo_put("sample", "aa", 1)
    raw = sqlite3.connect(db_path(tmp_path))
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        raw.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
        raw.commit()
    finally:
        raw.close()
    with State(db_path(tmp_path)) as st, pytest.raises(StateError, match="newer spar"):
        st.memo_get("sample", "aa")


def test_lookups_use_indexes(tmp_path: Path) -> None:
    with State(db_path(tmp_path)) as st:
        st.memo_put("sample", "aa", 1)
        st.train_step_put("r", 0, {"step": 0})
        st.train_checkpoint_add("r", {"name": "a"})
        st.batch_journal("judge").submitted("b", ["x"])
        st.hash_store("/p", (1, 2, 3), "d", [], {})
    raw = sqlite3.connect(db_path(tmp_path))
    queries = [
        ("SELECT key FROM memo WHERE ns = ? AND key IN (?, ?)", ("s", "a", "b")),
        ("SELECT value FROM memo WHERE ns = ? AND key = ?", ("s", "a")),
        ("SELECT digest FROM hashes WHERE path = ?", ("/p",)),
        ("SELECT row FROM train_steps WHERE run = ? ORDER BY step", ("r",)),
        ("SELECT row FROM train_checkpoints WHERE run = ? ORDER BY seq", ("r",)),
        ("SELECT batch_id FROM batches WHERE ns = ? ORDER BY seq", ("judge",)),
    ]
    try:
        for sql, params in queries:
            plan = " ".join(str(r[-1]) for r in raw.execute("EXPLAIN QUERY PLAN " + sql, params))
            assert "SEARCH" in plan and "SCAN" not in plan.replace("SCAN CONSTANT", ""), (sql, plan)
    finally:
        raw.close()


def test_threads_share_one_state(tmp_path: Path) -> None:
    with State(db_path(tmp_path)) as st:

        def put(t: int) -> None:
            for i in range(200):
                st.memo_put("judge", f"{t}-{i}", i)
                assert st.memo_get("judge", f"{t}-{i}") == i

        threads = [threading.Thread(target=put, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert st.memo_count("judge") == 800


# --------------------------------------------------------------------------- several processes

PUT_THEN_SIGKILL = """
    import os, signal, sqlite3, sys
    from pathlib import Path
    from spar.store.state import State

    path, n = Path(sys.argv[1]), int(sys.argv[2])
    st = State(path)
    for i in range(n):
        st.memo_put("sample", f"k{i}", {"i": i, "text": "x" * 100})
    # an item in flight: written, not yet committed, when the process dies
    try:
        raw = sqlite3.connect(path, isolation_level=None, timeout=1)
        raw.execute("BEGIN IMMEDIATE")
        raw.execute("INSERT INTO memo (ns, key, value) VALUES ('sample', 'in-flight', '0')")
    except sqlite3.OperationalError:  # the State still holds a transaction open (not ours)
        pass
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_memo_survives_sigkill(tmp_path: Path) -> None:
    n = 1_237
    proc = run_child(PUT_THEN_SIGKILL, str(db_path(tmp_path)), str(n))
    assert proc.returncode == -9, proc.stderr
    with State(db_path(tmp_path)) as st:
        assert st.memo_count() == n
        keys = [f"k{i}" for i in range(n)]
        assert st.memo_has("sample", [*keys, "in-flight"]) == set(keys)
        assert st.memo_get("sample", f"k{n - 1}") == {"i": n - 1, "text": "x" * 100}
        # and the database is still writable after the crash
        st.memo_put("sample", "after", 1)
        assert st.memo_count() == n + 1


WRITER = """
    import sys
    from pathlib import Path
    from spar.store.state import State

    path, tag, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    with State(path) as st:
        for i in range(n):
            st.memo_put("sample", f"{tag}-{i}", i)
            st.memo_put("shared", f"k{i % 50}", tag)
            if i % 100 == 0:
                st.train_step_put(tag, i, {"step": i})
"""


def test_two_processes_writing_lose_nothing(tmp_path: Path) -> None:
    n = 1_500
    procs = [start_child(WRITER, str(db_path(tmp_path)), tag, str(n)) for tag in ("a", "b")]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    with State(db_path(tmp_path)) as st:
        assert st.memo_count("sample") == 2 * n
        assert st.memo_get_many("sample", [f"a-{i}" for i in range(n)]) == {
            f"a-{i}": i for i in range(n)
        }
        assert st.memo_has("sample", [f"b-{i}" for i in range(n)]) == {f"b-{i}" for i in range(n)}
        assert st.memo_count("shared") == 50
        assert st.train_runs() == ["a", "b"]
        assert [r["step"] for r in st.train_steps("b")] == list(range(0, n, 100))


HOLDER = """
    import sqlite3, sys
    from pathlib import Path
    from spar.store.state import State

    path = Path(sys.argv[1])
    st = State(path)
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "put":
            for i in range(int(arg)):
                st.memo_put("sample", f"k{st.memo_count()}", i)
        elif cmd == "hold":  # a write transaction left open: uncommitted rows
            raw = sqlite3.connect(path, isolation_level=None)
            raw.execute("BEGIN IMMEDIATE")
            raw.execute("INSERT INTO memo (ns, key, value) VALUES ('sample', 'uncommitted', '0')")
        print("ok", flush=True)
"""


def test_reader_sees_committed_items_while_writer_holds_db(tmp_path: Path) -> None:
    writer = start_child(HOLDER, str(db_path(tmp_path)))
    assert writer.stdin is not None and writer.stdout is not None

    def tell(cmd: str) -> None:
        assert writer.stdin is not None and writer.stdout is not None
        writer.stdin.write(cmd + "\n")
        writer.stdin.flush()
        assert writer.stdout.readline().strip() == "ok"

    try:
        tell("put 10")
        with State(db_path(tmp_path)) as reader:
            assert reader.memo_count("sample") == 10
            tell("put 5")
            assert reader.memo_count("sample") == 15
            assert reader.memo_has("sample", ["k0", "k14", "k15"]) == {"k0", "k14"}
            # the writer is mid-transaction: the reader is not blocked and sees only commits
            tell("hold")
            assert reader.memo_count("sample") == 15
            assert reader.memo_get("sample", "uncommitted") is None
            assert reader.memo_get("sample", "k3") == 3
    finally:
        assert writer.stdin is not None
        writer.stdin.close()
        writer.wait(timeout=60)
    assert writer.returncode == 0, writer.stderr.read() if writer.stderr else ""
    with State(db_path(tmp_path)) as st:
        assert st.memo_count() == 15  # the open transaction died with its process


# --------------------------------------------------------------------------- hash cache


def test_hash_cache(tmp_path: Path) -> None:
    with State(db_path(tmp_path)) as st:
        assert st.hash_lookup("/data/docs.jsonl", (10, 20, 30)) is None
        st.hash_store("/data/docs.jsonl", (10, 20, 30), "abc", ["docs", "jsonl", "docs"], {})
        entry = st.hash_lookup("/data/docs.jsonl", (10, 20, 30))
        assert entry == HashEntry("abc", frozenset({"docs", "jsonl"}), {})
        # any stat field changed: the entry no longer applies
        assert st.hash_lookup("/data/docs.jsonl", (11, 20, 30)) is None
        assert st.hash_lookup("/data/docs.jsonl", (10, 21, 30)) is None
        assert st.hash_lookup("/data/docs.jsonl", (10, 20, 31)) is None
        assert st.hash_lookup("/data/other.jsonl", (10, 20, 30)) is None
        # replaced
        st.hash_store("/data/docs.jsonl", (11, 21, 31), "def", ["docs"], {"records": 44})
        assert st.hash_lookup("/data/docs.jsonl", (10, 20, 30)) is None
        entry = st.hash_lookup("/data/docs.jsonl", (11, 21, 31))
        assert entry is not None
        assert entry.digest == "def"
        assert entry.checks == frozenset({"docs"})
        assert entry.facts == {"records": 44}
        assert hash(entry) == hash(HashEntry("def", frozenset({"docs"}), {"other": 1}))


# --------------------------------------------------------------------------- batch journal


def test_batch_journal(tmp_path: Path) -> None:
    with State(db_path(tmp_path)) as st:
        journal: BatchJournal = st.batch_journal("judge")
        other = st.batch_journal("judge_other")
        assert journal.pending() == []
        journal.submitted("batch_2", ["c1", "c2"])
        journal.submitted("batch_1", ["c3"])
        other.submitted("batch_9", ["z"])
        assert journal.pending() == [("batch_2", {"c1", "c2"}), ("batch_1", {"c3"})]
        journal.collected("batch_2")
        journal.collected("never-submitted")
        assert journal.pending() == [("batch_1", {"c3"})]
        assert other.pending() == [("batch_9", {"z"})]
    # a crash while polling: the next process finds the batch still pending
    with State(db_path(tmp_path)) as st:
        journal = st.batch_journal("judge")
        assert journal.pending() == [("batch_1", {"c3"})]
        journal.collected("batch_1")
        assert journal.pending() == []


# --------------------------------------------------------------------------- training journals


def test_train_journals(tmp_path: Path) -> None:
    with State(db_path(tmp_path)) as st:
        for step in (2, 0, 3, 1):
            st.train_step_put("run1", step, {"step": step, "loss": 1.0 / (step + 1)})
        st.train_step_put("run1", 2, {"step": 2, "loss": 0.0})  # replaced
        st.train_step_put("run2", 0, {"step": 0, "loss": 9.0})
        st.train_checkpoint_add("run1", {"name": "step000002", "batch": 2, "state_path": "s2"})
        st.train_checkpoint_add("run1", {"name": "step000001", "batch": 1, "state_path": "s1"})
        st.train_checkpoint_add("run3", {"name": "final", "batch": 4})
        assert [r["step"] for r in st.train_steps("run1")] == [0, 1, 2, 3]
        assert st.train_steps("run1")[2] == {"step": 2, "loss": 0.0}
        assert [r["name"] for r in st.train_checkpoints("run1")] == ["step000002", "step000001"]
        assert st.train_runs() == ["run1", "run2", "run3"]

        st.train_steps_truncate("run1", 2)
        assert [r["step"] for r in st.train_steps("run1")] == [0, 1]
        assert [r["step"] for r in st.train_steps("run2")] == [0]
        assert len(st.train_checkpoints("run1")) == 2

        st.train_reset("run1")
        assert st.train_steps("run1") == []
        assert st.train_checkpoints("run1") == []
        assert st.train_runs() == ["run2", "run3"]

        st.forget_train(["run2", "run3", "unknown"])
        assert st.train_runs() == []
        assert st.memo_count() == 0
