"""Hashing, in one place: canonical JSON, content hashes of files and directories, the hash cache.

Every fingerprint, item key and output hash in spar comes from here.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spar.store.state import State

HASH_ALGO = "sha256"
_CHUNK = 8 * 1024 * 1024
# A line checker gets (line bytes without newline, 1-based line number) and raises on bad input.
LineCheck = Callable[[bytes, int], None]


def canonical_json(obj: Any) -> str:
    """Stable JSON: sorted keys, no whitespace, UTF-8 kept; the input to every fingerprint."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def hash_bytes(data: bytes) -> str:
    return hashlib.new(HASH_ALGO, data).hexdigest()


def hash_json(obj: Any) -> str:
    return hash_bytes(canonical_json(obj).encode())


def seed_of(digest: str) -> int:
    """A non-negative 31-bit sampling seed from a hex digest (its first 8 digits)."""
    return int(digest[:8], 16) & 0x7FFFFFFF


def derive_seed(*parts: Any) -> int:
    """A sampling seed that depends on exactly these parts (a hash of their canonical JSON)."""
    return seed_of(hash_json(list(parts)))


def hash_stream(path: Path, check: LineCheck | None) -> tuple[str, int]:
    """(content hash, number of non-blank lines); `check` sees every line while it is hashed."""
    h = hashlib.new(HASH_ALGO)
    lineno = 0
    records = 0
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
                if line.strip():
                    records += 1
                check(line, lineno)
    if check is not None and tail:
        if tail.strip():
            records += 1
        check(tail, lineno + 1)
    return h.hexdigest(), records


def hash_path(path: Path) -> str:
    """Uncached content hash of one file (for files outside any runs directory)."""
    return hash_stream(path, None)[0]


def stat_key(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ino)


class HashCache:
    """Content hashes keyed by (path, size, mtime, inode) in the runs directory's state database:
    an unchanged file is never re-read. A file validated by a named check is remembered as such
    (with its record count), so an unchanged multi-GB docs file costs one `stat` on a warm plan.

    Entries are kept in memory until `save()`, which the CLI calls once every spec validated, so
    bad input leaves nothing behind; `spar plan` saves too, even before the first apply.
    """

    def __init__(self, state: State) -> None:
        self.state = state
        self._pending: dict[str, tuple[tuple[int, int, int], str, frozenset[str], int]] = {}

    def _lookup(self, key: str, st: tuple[int, int, int]) -> tuple[str, frozenset[str], int] | None:
        got = self._pending.get(key)
        if got is not None and got[0] == st:
            return got[1], got[2], got[3]
        entry = self.state.hash_lookup(key, st)
        if entry is None:
            return None
        return entry.digest, entry.checks, int(entry.facts.get("records", 0))

    def hash_file(self, path: Path, check: LineCheck | None = None, check_id: str = "") -> str:
        return self.hash_checked(path, check, check_id)[0]

    def hash_checked(
        self, path: Path, check: LineCheck | None = None, check_id: str = ""
    ) -> tuple[str, int]:
        """(content hash, non-blank line count — 0 unless a check ran on this content)."""
        path = path.resolve()
        st = stat_key(path.stat())
        key = str(path)
        got = self._lookup(key, st)
        if got is not None and (check is None or check_id in got[1]):
            return got[0], got[2]
        digest, records = hash_stream(path, check)
        checks: set[str] = set()
        if got is not None and got[0] == digest:
            checks |= got[1]
            records = records if check is not None else got[2]
        if check is not None:
            checks.add(check_id)
        self._pending[key] = (st, digest, frozenset(checks), records)
        return digest, records

    def records(self, path: Path) -> int | None:
        """Non-blank line count of `path` as a line check saw it, if its content is known (one
        stat, no read)."""
        path = path.resolve()
        got = self._lookup(str(path), stat_key(path.stat()))
        return got[2] if got is not None and got[1] else None

    def hash_dir(self, root: Path, files: list[Path]) -> str:
        """A directory's content: the hash of its files' relative names and content hashes."""
        return hash_json(sorted((str(p.relative_to(root)), self.hash_file(p)) for p in files))

    def save(self) -> None:
        if not self._pending:
            return
        for key, (st, digest, checks, records) in self._pending.items():
            self.state.hash_store(key, st, digest, sorted(checks), {"records": records})
        self._pending.clear()
