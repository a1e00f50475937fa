"""`runs/.spar/state.db`: spar's internal journals in one SQLite database.

One database replaces the hand-written JSONL journals: the item memo (one row per finished item,
by stage kind and item key), the hash cache (content hashes keyed by path and stat), provider batch
journals (submitted, not yet collected Message Batches) and training journals (per-step metrics and
saved checkpoints of a train run).

Durability and concurrency:

- The database is in WAL mode with `synchronous=NORMAL`. Every write method is one transaction,
  committed before it returns; a committed WAL transaction survives the process being killed
  (SIGKILL), so a crash loses only items that were still in flight. (A power cut may lose the last
  few commits, never corrupt the database.)
- Several processes may use the database at once: readers (`spar plan`) never block and are never
  blocked by a writer (`spar apply`); writers wait on each other for up to `BUSY_TIMEOUT_MS`.
- Nothing is ever loaded whole: every lookup goes through an index, so opening the database and
  looking items up costs the same however much history it holds.
- Nothing is created before the first write: reads on a missing database return empty results, so
  a `spar plan` on a fresh checkout leaves no trace. The connection is opened lazily, once per
  `State`, and shared by the threads of the process under a lock.

Values are stored as JSON text. Callers redact secrets before they hand values in.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 60_000  # how long a writer waits for another process's write transaction
_CHUNK = 500  # host parameters per `IN (...)` query (SQLite's limit is 32,766; keep it small)

# Version 1. A later version appends its upgrade statements to _MIGRATIONS under the version it
# upgrades from; a fresh database runs _SCHEMA and then every migration in order.
_SCHEMA: tuple[str, ...] = (
    "CREATE TABLE schema_version (version INTEGER NOT NULL)",
    # item memo: one row per finished item; `ns` is the stage kind, `key` the item's hash
    "CREATE TABLE memo (ns TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL)",
    "CREATE UNIQUE INDEX memo_ns_key ON memo (ns, key)",
    # hash cache: a file's content hash, valid while (size, mtime_ns, inode) are unchanged
    "CREATE TABLE hashes (path TEXT PRIMARY KEY, size INTEGER NOT NULL,"
    " mtime_ns INTEGER NOT NULL, inode INTEGER NOT NULL, digest TEXT NOT NULL,"
    " checks TEXT NOT NULL, facts TEXT NOT NULL)",
    # provider batches submitted and not yet collected, in submission order
    "CREATE TABLE batches (seq INTEGER PRIMARY KEY, ns TEXT NOT NULL, batch_id TEXT NOT NULL,"
    " custom_ids TEXT NOT NULL, UNIQUE (ns, batch_id))",
    # training journals of a train run (its stage fingerprint)
    "CREATE TABLE train_steps (run TEXT NOT NULL, step INTEGER NOT NULL, row TEXT NOT NULL,"
    " PRIMARY KEY (run, step)) WITHOUT ROWID",
    "CREATE TABLE train_checkpoints (seq INTEGER PRIMARY KEY, run TEXT NOT NULL,"
    " row TEXT NOT NULL)",
    "CREATE INDEX train_checkpoints_run ON train_checkpoints (run, seq)",
)
_MIGRATIONS: dict[int, tuple[str, ...]] = {}  # from version N to N + 1

_MEMO_PUT = (
    "INSERT INTO memo (ns, key, value) VALUES (?, ?, ?)"
    " ON CONFLICT (ns, key) DO UPDATE SET value = excluded.value"
)


class StateError(RuntimeError):
    """The state database cannot be used (written by a newer spar, or locked for too long)."""


@dataclass(frozen=True)
class HashEntry:
    """A cached content hash: `checks` are the ids of the line validators the content passed,
    `facts` what was computed while validating (e.g. `{"records": 44}`)."""

    digest: str
    checks: frozenset[str]
    facts: dict[str, Any] = field(hash=False)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _chunks(keys: Sequence[str]) -> Iterator[list[str]]:
    unique = list(dict.fromkeys(keys))
    for i in range(0, len(unique), _CHUNK):
        yield unique[i : i + _CHUNK]


def _marks(n: int) -> str:
    return ",".join("?" * n)


class State:
    """runs/.spar/state.db: item memo, hash cache, batch journals, training journals."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._ready = False  # the schema is there, at SCHEMA_VERSION, on this connection

    # ------------------------------------------------------------------ connection

    def close(self) -> None:
        """Release the connection (a later call opens it again)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
                self._ready = False

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _connect(self, create: bool) -> sqlite3.Connection | None:
        if self._conn is not None:
            return self._conn
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            target, uri = str(self.path), False
        elif self.path.exists():
            # mode=rw: never create the file from a read
            target, uri = self.path.resolve().as_uri() + "?mode=rw", True
        else:
            return None
        try:
            conn = sqlite3.connect(
                target,
                uri=uri,
                timeout=BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,  # autocommit: each statement is its own transaction
                check_same_thread=False,  # shared by the process's threads under self._lock
            )
        except sqlite3.OperationalError:
            if create:
                raise
            return None  # removed between the check and the open
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA synchronous = NORMAL")
        self._conn = conn
        log.debug("opened %s", self.path)
        return conn

    @staticmethod
    def _version(conn: sqlite3.Connection) -> int | None:
        try:
            row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        except sqlite3.OperationalError:  # no such table: not initialised (yet)
            return None
        return None if row is None or row[0] is None else int(row[0])

    def _check_version(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise StateError(
                f"{self.path}: written by a newer spar (schema {version}, this spar knows "
                f"{SCHEMA_VERSION}); upgrade spar"
            )

    def _reader(self) -> sqlite3.Connection | None:
        """The connection, or None while there is no initialised database (reads are empty)."""
        if self._ready:
            return self._conn
        conn = self._connect(create=False)
        if conn is None:
            return None
        version = self._version(conn)
        if version is None:
            return None
        self._check_version(version)
        if version < SCHEMA_VERSION:
            self._init_schema(conn)
        self._ready = True
        return conn

    def _writer(self) -> sqlite3.Connection:
        conn = self._connect(create=True)
        assert conn is not None
        if not self._ready:
            self._init_schema(conn)
            self._ready = True
        return conn

    def _init_schema(self, conn: sqlite3.Connection) -> None:
        self._set_wal(conn)
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = self._version(conn)
            if version is None:
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_version (version) VALUES (1)")
                version = 1
                log.debug("created %s", self.path)
            self._check_version(version)
            while version < SCHEMA_VERSION:
                for statement in _MIGRATIONS[version]:
                    conn.execute(statement)
                version += 1
                conn.execute("UPDATE schema_version SET version = ?", (version,))
                log.info("%s: upgraded to schema %d", self.path, version)
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _set_wal(self, conn: sqlite3.Connection) -> None:
        """Switch to WAL (persistent in the file); the switch needs a moment alone with it."""
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                mode = str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e):
                    raise
                mode = ""
            if mode.lower() == "wal":
                return
            if time.monotonic() > deadline:
                raise StateError(f"{self.path}: cannot switch to WAL mode (database busy)")
            time.sleep(0.01)

    @contextlib.contextmanager
    def _transaction(self) -> Generator[sqlite3.Connection]:
        """One write transaction (taken at once, so it never fails half-way on a lock)."""
        with self._lock:
            conn = self._writer()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            conn = self._reader()
            if conn is None:
                return []
            return conn.execute(sql, params).fetchall()

    def _write(self, sql: str, params: Sequence[Any] = ()) -> None:
        """One statement, committed before return."""
        with self._lock:
            self._writer().execute(sql, params)

    # ------------------------------------------------------------------ item memo

    def memo_get(self, ns: str, key: str) -> Any | None:
        rows = self._read("SELECT value FROM memo WHERE ns = ? AND key = ?", (ns, key))
        return json.loads(rows[0][0]) if rows else None

    def memo_get_many(self, ns: str, keys: Sequence[str]) -> dict[str, Any]:
        """The values of those keys that are memoised (missing keys are left out)."""
        out: dict[str, Any] = {}
        for chunk in _chunks(keys):
            sql = f"SELECT key, value FROM memo WHERE ns = ? AND key IN ({_marks(len(chunk))})"
            for key, value in self._read(sql, (ns, *chunk)):
                out[key] = json.loads(value)
        return out

    def memo_has(self, ns: str, keys: Sequence[str]) -> set[str]:
        """Those of `keys` that are memoised (answered from the index alone)."""
        out: set[str] = set()
        for chunk in _chunks(keys):
            sql = f"SELECT key FROM memo WHERE ns = ? AND key IN ({_marks(len(chunk))})"
            out.update(key for (key,) in self._read(sql, (ns, *chunk)))
        return out

    def memo_put(self, ns: str, key: str, value: Any) -> None:
        """Memoise one finished item (replacing any earlier value); committed before return."""
        self._write(_MEMO_PUT, (ns, key, _dumps(value)))

    def memo_put_many(self, ns: str, items: Iterable[tuple[str, Any]]) -> None:
        """Memoise many items in one transaction (imports, bulk loads)."""
        with self._transaction() as conn:
            conn.executemany(_MEMO_PUT, ((ns, key, _dumps(value)) for key, value in items))

    def memo_add_new(self, ns: str, items: Iterable[tuple[str, Any]]) -> None:
        """Memoise items not memoised yet, never replacing one that is (merging another runs
        directory's memo: what this one paid for stays as it was)."""
        with self._transaction() as conn:
            conn.executemany(
                "INSERT INTO memo (ns, key, value) VALUES (?, ?, ?) "
                "ON CONFLICT (ns, key) DO NOTHING",
                ((ns, key, _dumps(value)) for key, value in items),
            )

    def memo_rows(self, page: int = 1000) -> Iterator[tuple[str, str, str]]:
        """Every memoised item as (ns, key, JSON text), in (ns, key) order, read a page at a
        time (no read transaction is held between pages)."""
        last: tuple[str, str] = ("", "")
        while True:
            rows = self._read(
                "SELECT ns, key, value FROM memo WHERE (ns, key) > (?, ?) ORDER BY ns, key LIMIT ?",
                (*last, page),
            )
            for ns, key, value in rows:
                yield str(ns), str(key), str(value)
            if len(rows) < page:
                return
            last = (str(rows[-1][0]), str(rows[-1][1]))

    def memo_delete(self, ns: str, keys: Sequence[str]) -> None:
        with self._transaction() as conn:
            for chunk in _chunks(keys):
                conn.execute(
                    f"DELETE FROM memo WHERE ns = ? AND key IN ({_marks(len(chunk))})",
                    (ns, *chunk),
                )

    def memo_count(self, ns: str | None = None) -> int:
        """Items memoised (in one namespace, or all). Counts the index: not for hot paths."""
        if ns is None:
            rows = self._read("SELECT count(*) FROM memo")
        else:
            rows = self._read("SELECT count(*) FROM memo WHERE ns = ?", (ns,))
        return int(rows[0][0]) if rows else 0

    # ------------------------------------------------------------------ hash cache

    def hash_lookup(self, path: str, stat: tuple[int, int, int]) -> HashEntry | None:
        """The cached hash of `path` if its (size, mtime_ns, inode) are still `stat`."""
        rows = self._read(
            "SELECT size, mtime_ns, inode, digest, checks, facts FROM hashes WHERE path = ?",
            (path,),
        )
        if not rows:
            return None
        size, mtime_ns, inode, digest, checks, facts = rows[0]
        if (size, mtime_ns, inode) != tuple(stat):
            return None
        return HashEntry(str(digest), frozenset(json.loads(checks)), json.loads(facts))

    def hash_store(
        self,
        path: str,
        stat: tuple[int, int, int],
        digest: str,
        checks: Sequence[str],
        facts: dict[str, Any],
    ) -> None:
        size, mtime_ns, inode = stat
        self._write(
            "INSERT INTO hashes (path, size, mtime_ns, inode, digest, checks, facts)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (path) DO UPDATE SET"
            " size = excluded.size, mtime_ns = excluded.mtime_ns, inode = excluded.inode,"
            " digest = excluded.digest, checks = excluded.checks, facts = excluded.facts",
            (path, size, mtime_ns, inode, digest, _dumps(sorted(set(checks))), _dumps(facts)),
        )

    # ------------------------------------------------------------------ provider batches

    def batch_journal(self, ns: str) -> StateBatchJournal:
        """The journal of submitted provider batches for one namespace (a judge stage)."""
        return StateBatchJournal(self, ns)

    # ------------------------------------------------------------------ training journals

    def train_steps(self, run: str) -> list[dict[str, Any]]:
        """The run's per-step metrics rows, ordered by step."""
        rows = self._read("SELECT row FROM train_steps WHERE run = ? ORDER BY step", (run,))
        return [json.loads(row) for (row,) in rows]

    def train_step_put(self, run: str, step: int, row: dict[str, Any]) -> None:
        """Journal (or replace) one step's metrics; committed before return."""
        self._write(
            "INSERT INTO train_steps (run, step, row) VALUES (?, ?, ?)"
            " ON CONFLICT (run, step) DO UPDATE SET row = excluded.row",
            (run, step, _dumps(row)),
        )

    def train_steps_truncate(self, run: str, keep_below: int) -> None:
        """Drop the steps >= `keep_below` (applied after the state a run resumes from)."""
        self._write("DELETE FROM train_steps WHERE run = ? AND step >= ?", (run, keep_below))

    def train_checkpoints(self, run: str) -> list[dict[str, Any]]:
        """The run's checkpoint rows, in the order they were added."""
        rows = self._read("SELECT row FROM train_checkpoints WHERE run = ? ORDER BY seq", (run,))
        return [json.loads(row) for (row,) in rows]

    def train_checkpoint_add(self, run: str, row: dict[str, Any]) -> None:
        self._write("INSERT INTO train_checkpoints (run, row) VALUES (?, ?)", (run, _dumps(row)))

    def train_reset(self, run: str) -> None:
        """Forget the run's steps and checkpoints (it trains from the start)."""
        self.forget_train([run])

    def train_runs(self) -> list[str]:
        """Every run with a journaled step or checkpoint, sorted (one index seek per run)."""
        runs: set[str] = set()
        for table in ("train_steps", "train_checkpoints"):
            # a skip scan: the next run id after the last one, straight from the index
            rows = self._read(
                f"WITH RECURSIVE r (run) AS (SELECT min(run) FROM {table} UNION ALL"
                f" SELECT (SELECT min(run) FROM {table} WHERE run > r.run) FROM r"
                " WHERE r.run IS NOT NULL) SELECT run FROM r WHERE run IS NOT NULL"
            )
            runs.update(str(run) for (run,) in rows)
        return sorted(runs)

    def forget_train(self, runs: Sequence[str]) -> None:
        """Delete the training journals of these runs (garbage collection), in one transaction."""
        with self._transaction() as conn:
            for run in dict.fromkeys(runs):
                conn.execute("DELETE FROM train_steps WHERE run = ?", (run,))
                conn.execute("DELETE FROM train_checkpoints WHERE run = ?", (run,))


class StateBatchJournal:
    """`spar.judges.base.BatchJournal` on the state database, for one namespace."""

    def __init__(self, state: State, ns: str) -> None:
        self.state = state
        self.ns = ns

    def pending(self) -> list[tuple[str, set[str]]]:
        """Batches submitted and not yet collected, oldest first: (batch id, custom ids)."""
        rows = self.state._read(
            "SELECT batch_id, custom_ids FROM batches WHERE ns = ? ORDER BY seq", (self.ns,)
        )
        return [(str(batch_id), set(json.loads(ids))) for batch_id, ids in rows]

    def submitted(self, batch_id: str, custom_ids: Sequence[str]) -> None:
        """Record a batch the provider accepted; committed before return."""
        self.state._write(
            "INSERT INTO batches (ns, batch_id, custom_ids) VALUES (?, ?, ?)"
            " ON CONFLICT (ns, batch_id) DO UPDATE SET custom_ids = excluded.custom_ids",
            (self.ns, batch_id, _dumps(list(custom_ids))),
        )

    def collected(self, batch_id: str) -> None:
        """Every result of the batch was read (or it is gone): never wait on it again."""
        self.state._write("DELETE FROM batches WHERE ns = ? AND batch_id = ?", (self.ns, batch_id))
