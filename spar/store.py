"""The run directory: content hashes (+ stat cache), atomic writes, params files, item memo, lock.

This is the only module that hashes content or writes stage outputs. Everything else asks it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock, Timeout
from pydantic import BaseModel, ConfigDict

HASH_ALGO = "sha256"
_CHUNK = 8 * 1024 * 1024
SECRET_MARKERS = ("KEY", "TOKEN", "SECRET")
_VERSIONED_LIBS = (
    "spar",
    "tinker",
    "tinker-cookbook",
    "torch",
    "transformers",
    "peft",
    "anthropic",
)

_TEXT_SUFFIXES = {".json", ".jsonl", ".yaml", ".txt", ".html", ".md", ".csv"}
# A line checker gets (line bytes without newline, 1-based line number) and raises on bad input.
LineCheck = Callable[[bytes, int], None]


class StoreError(RuntimeError):
    """A failure of the run directory itself (lock held, corrupt state)."""


# --------------------------------------------------------------------------- hashing


def canonical_json(obj: Any) -> str:
    """Stable JSON: sorted keys, no whitespace, UTF-8 kept; the input to every fingerprint."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def hash_bytes(data: bytes) -> str:
    return hashlib.new(HASH_ALGO, data).hexdigest()


def hash_json(obj: Any) -> str:
    return hash_bytes(canonical_json(obj).encode())


def _hash_stream(path: Path, check: LineCheck | None) -> str:
    h = hashlib.new(HASH_ALGO)
    lineno = 0
    tail = b""
    with path.open("rb", buffering=0) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            if check is None:
                continue
            lines = (tail + chunk).split(b"\n")
            tail = lines.pop()
            for line in lines:
                lineno += 1
                check(line, lineno)
    if check is not None and tail:
        check(tail, lineno + 1)
    return h.hexdigest()


def hash_path(path: Path) -> str:
    """Uncached content hash of one file (for files outside any runs directory)."""
    return _hash_stream(path, None)


class HashCache:
    """Content hashes keyed by (path, size, mtime, inode): unchanged files are never re-read.

    A file validated by a named check is remembered as such, so an unchanged multi-GB docs file
    costs one `stat` on a warm plan. The cache is only written by `save()`, which the CLI calls once
    the whole spec validated, so bad input leaves nothing behind.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._entries: dict[str, dict[str, Any]] = {}
        self._dirty = False
        if path is not None and path.exists():
            try:
                self._entries = json.loads(path.read_text())
            except (json.JSONDecodeError, OSError):
                self._entries = {}

    @staticmethod
    def _stat_key(st: os.stat_result) -> list[int]:
        return [st.st_size, st.st_mtime_ns, st.st_ino]

    def hash_file(self, path: Path, check: LineCheck | None = None, check_id: str = "") -> str:
        path = path.resolve()
        st = path.stat()
        key = str(path)
        entry = self._entries.get(key)
        if (
            entry is not None
            and entry["stat"] == self._stat_key(st)
            and (check is None or check_id in entry["checks"])
        ):
            return str(entry["hash"])
        digest = _hash_stream(path, check)
        checks: list[str] = []
        if entry is not None and entry["hash"] == digest and entry["stat"] == self._stat_key(st):
            checks = list(entry["checks"])
        if check is not None and check_id not in checks:
            checks.append(check_id)
        self._entries[key] = {"stat": self._stat_key(st), "hash": digest, "checks": checks}
        self._dirty = True
        return digest

    def save(self) -> None:
        if self.path is None or not self._dirty:
            return
        atomic_write_text(self.path, json.dumps(self._entries, indent=0, sort_keys=True))
        self._dirty = False


# --------------------------------------------------------------------------- writing


def redact(text: str) -> str:
    """Replace the value of every environment variable that names a secret."""
    for name, value in os.environ.items():
        if len(value) >= 8 and any(m in name.upper() for m in SECRET_MARKERS) and value in text:
            text = text.replace(value, "***")
    return text


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, redact(text).encode())


def jsonl_text(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every non-blank line of a JSONL output, parsed."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def params_path(output: Path) -> Path:
    """`X.ext` -> `X.params.yaml` (beside it)."""
    return output.with_name(output.name.split(".", 1)[0] + ".params.yaml")


class ParamsRecord(BaseModel):
    """What produced an output: the file `plan` compares against. Never holds secrets."""

    model_config = ConfigDict(extra="forbid")

    stage: str
    kind: str
    stage_version: int
    experiment: str
    fingerprint: str
    params: dict[str, Any]
    inputs: dict[str, str]
    upstream: dict[str, dict[str, str]]
    output: str
    output_hash: str
    versions: dict[str, str]
    started: str
    finished: str


def library_versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for lib in _VERSIONED_LIBS:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[lib] = metadata.version(lib)
    return out


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def read_params(output: Path) -> ParamsRecord | None:
    return read_params_file(params_path(output))


def read_params_file(p: Path) -> ParamsRecord | None:
    if not p.exists():
        return None
    try:
        return ParamsRecord.model_validate(yaml.safe_load(p.read_text()))
    except Exception:
        return None


# --------------------------------------------------------------------------- item memo


class ItemMemo:
    """Append-only journal of finished items, one JSON line each, flushed and fsynced at once.

    A crash loses only in-flight items; a torn last line (killed mid-write) is cut off on open.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._items: dict[str, Any] = {}
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            raw = path.read_bytes()
            good = raw[: raw.rfind(b"\n") + 1]
            if len(good) != len(raw):
                with path.open("r+b") as f:
                    f.truncate(len(good))
            for line in good.splitlines():
                with contextlib.suppress(json.JSONDecodeError, KeyError):
                    rec = json.loads(line)
                    self._items[rec["key"]] = rec["value"]
        self._fh = path.open("a", encoding="utf-8")

    @staticmethod
    def key(fields: dict[str, Any]) -> str:
        return hash_json(fields)

    def get(self, key: str) -> Any | None:
        return self._items.get(key)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def put(self, key: str, value: Any) -> None:
        line = json.dumps({"key": key, "value": value}, ensure_ascii=False)
        self._fh.write(redact(line) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._items[key] = value

    def close(self) -> None:
        self._fh.close()


# --------------------------------------------------------------------------- the runs directory


class RunStore:
    """`runs/<experiment>/<stage>/<outputs>` plus internal state under `runs/.spar/`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.internal = root / ".spar"
        self.hashes = HashCache(self.internal / "hashcache.json")

    def stage_dir(self, experiment: str, stage: str) -> Path:
        return self.root / experiment / stage

    def memo(self, name: str) -> ItemMemo:
        return ItemMemo(self.internal / "memo" / f"{name}.jsonl")

    def memo_keys(self, name: str) -> set[str]:
        """The keys journaled so far, read without opening the journal for writing."""
        path = self.internal / "memo" / f"{name}.jsonl"
        if not path.exists():
            return set()
        keys = set()
        for line in path.read_bytes().splitlines():
            with contextlib.suppress(json.JSONDecodeError, KeyError):
                keys.add(json.loads(line)["key"])
        return keys

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
        if output.suffix in _TEXT_SUFFIXES:
            data = redact(data.decode()).encode()
        atomic_write_bytes(output, data)
        rec = ParamsRecord.model_validate(
            {
                **record,
                "output": output.name,
                "output_hash": self.hashes.hash_file(output),
                "versions": library_versions(),
                "finished": now_iso(),
            }
        )
        text = yaml.safe_dump(rec.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
        atomic_write_text(params_path(output), text)
        return rec
