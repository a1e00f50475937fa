"""The runs directory — the only writer of outputs and state.

`runs/<experiment>/<stage>/<outputs>` with a params file beside each output, and internal state
under `runs/.spar/`: `state.db` (item memo, hash cache, batch and training journals: SQLite),
`cache/` (the run cache: outputs by fingerprint), engine scratch space, and the lock.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from spar.store.cache import CacheManifest, RunCache
from spar.store.files import (
    TEXT_SUFFIXES,
    ParamsRecord,
    atomic_write_bytes,
    atomic_write_text,
    jsonl_text,
    library_versions,
    now_iso,
    params_path,
    read_jsonl,
    read_params,
    read_params_file,
    redact,
    redact_json,
    write_params,
)
from spar.store.hashing import (
    HashCache,
    LineCheck,
    canonical_json,
    derive_seed,
    hash_bytes,
    hash_json,
    hash_path,
    seed_of,
)
from spar.store.state import State

STAGE_LOG = "stages.jsonl"


class StoreError(RuntimeError):
    """A failure of the run directory itself (lock held, corrupt state)."""


class ItemMemo:
    """The item memo of one stage kind: finished items by key, one committed row each.

    A key is the hash of the stage kind, its item-code version, the stage's parameters (less the
    fields that only enumerate items, and those that only decide whether an item may be reused)
    and the item itself — built from the same parameters as the fingerprint, so they cannot
    drift apart.
    """

    def __init__(self, state: State, kind: str, item_version: int, basis: dict[str, Any]) -> None:
        self.state, self.kind = state, kind
        self._prefix = {"kind": kind, "item_version": item_version, "params": basis}

    def key(self, item: Any) -> str:
        return hash_json({**self._prefix, "item": item})

    def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        return self.state.memo_get_many(self.kind, keys)

    def put(self, key: str, value: Any) -> None:
        self.state.memo_put(self.kind, key, redact_json(value))


class RunStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.internal = root / ".spar"
        self.state = State(self.internal / "state.db")
        self.hashes = HashCache(self.state)
        self.cache = RunCache(self.internal / "cache")
        self._log_lock = threading.Lock()

    def stage_dir(self, experiment: str, stage: str) -> Path:
        return self.root / experiment / stage

    def remove_stale_temps(self, experiment: str, stage: str) -> int:
        """Delete the temp files (`.<name>.<random>.tmp`, `atomic_write_*`) a killed apply left in
        a stage's directory; how many. Only under the runs dir's lock: no write is under way."""
        d = self.stage_dir(experiment, stage)
        if not d.is_dir():
            return 0
        stale = [f for f in d.rglob(".*.tmp") if f.is_file()]
        for f in stale:
            f.unlink(missing_ok=True)
        return len(stale)

    def memo(self, kind: str, item_version: int, basis: dict[str, Any]) -> ItemMemo:
        return ItemMemo(self.state, kind, item_version, basis)

    def scratch(self, *parts: str) -> Path:
        """A directory for internal artefacts (checkpoints, converted models) under `.spar/`."""
        d = self.internal.joinpath(*parts)
        d.mkdir(parents=True, exist_ok=True)
        return d

    @contextlib.contextmanager
    def lock(self, wait: float | None = None) -> Iterator[None]:
        """Exclusive lock on the runs directory; waits `wait` seconds (None: forever)."""
        self.internal.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.internal / "lock"))
        try:
            lock.acquire(timeout=-1 if wait is None else wait)
        except Timeout as e:
            raise StoreError(f"{self.root}: another `spar apply` holds the lock") from e
        try:
            yield
        finally:
            lock.release()

    def output_hash(self, output: Path) -> str | None:
        if not output.exists():
            return None
        return self.hashes.hash_file(output)

    def write_output(self, output: Path, data: bytes, record: dict[str, Any]) -> ParamsRecord:
        """Write an output atomically, then its params file: a params file implies its output."""
        params_path(output).unlink(missing_ok=True)
        if output.suffix in TEXT_SUFFIXES:
            data = redact(data.decode()).encode()
        atomic_write_bytes(output, data)
        rec = ParamsRecord.model_validate(
            {
                **record,
                "output": output.name,
                "output_hash": hash_bytes(data),
                "versions": library_versions(),
                "finished": now_iso(),
            }
        )
        write_params(output, rec)
        return rec

    def restore(
        self, manifest: CacheManifest, experiment: str, stage: str
    ) -> dict[str, ParamsRecord] | None:
        return self.cache.restore(manifest, self.stage_dir(experiment, stage), experiment, stage)

    def stage_event(self, event: str, experiment: str, stage: str, **fields: Any) -> None:
        """Append one line to the stage log (`.spar/stages.jsonl`): what started, finished,
        was restored, failed or stopped, in the order it happened (line order)."""
        line = json.dumps(
            {"time": now_iso(), "event": event, "experiment": experiment, "stage": stage, **fields}
        )
        with self._log_lock:
            self.internal.mkdir(parents=True, exist_ok=True)
            with (self.internal / STAGE_LOG).open("a") as f:
                f.write(redact(line) + "\n")

    def close(self) -> None:
        self.state.close()


__all__ = [
    "CacheManifest",
    "HashCache",
    "ItemMemo",
    "LineCheck",
    "ParamsRecord",
    "RunStore",
    "StoreError",
    "atomic_write_bytes",
    "atomic_write_text",
    "canonical_json",
    "derive_seed",
    "hash_bytes",
    "hash_json",
    "hash_path",
    "jsonl_text",
    "now_iso",
    "params_path",
    "read_jsonl",
    "read_params",
    "read_params_file",
    "redact",
    "seed_of",
]
