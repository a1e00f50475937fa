"""The team-shared remote cache: `spar push` / `spar pull` (and `spar apply --remote`).

A remote is any fsspec URL (`s3://bucket/prefix`, `gs://...`, `file:///shared/spar`, a plain
directory). It holds what a runs directory's `.spar/` holds that a teammate can reuse, all of it
content-addressed:

```
<url>/spar-remote.json                  {"format": 1}
<url>/objects/<hh>/<sha256>             output bytes (and the local weights a train output names)
<url>/stages/<fingerprint>.json         a RemoteEntry: the run-cache manifest of one stage, and the
                                        files under runs/.spar/ its outputs name (local weights)
<url>/memo/<ns>/<hh>/<item key>.json    one memoised item (sample, verdict, ...) by its item key
```

- Objects are uploaded first, the stage entry LAST, each in one atomic write (an object store's
  put; elsewhere a temp name, then a rename), so a reader never sees an entry whose objects are
  missing; an interrupted push leaves only objects no entry names. Objects, entries and memo
  items already on the remote are skipped.
- A pull verifies every object against its hash before it enters the local run cache, writes the
  local manifest last, and never overwrites a memo item this runs directory already has.
- Nothing with a secret is ever uploaded: every payload is checked for the value of every
  environment variable named like a secret (*KEY*, *TOKEN*, *SECRET*) before anything is sent, and
  a push that finds one refuses (nothing is sent).
- Local engine weights (a train output's `sampler_path` / `state_path` under `runs/.spar/`) travel
  with the train output and land at the same place under the puller's `runs/.spar/`, wherever
  that runs directory is (the local engine looks there for a recorded path that is not found:
  `local_scratch`); engines that record portable references (Tinker's `tinker://`) need nothing
  more.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError

from spar.errors import InputError, RunError
from spar.store.cache import CacheManifest
from spar.store.files import SECRET_MARKERS, atomic_write_text, now_iso
from spar.store.hashing import canonical_json, hash_json, hash_path

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

    from spar.plan import PlannedStage
    from spar.store import RunStore

log = logging.getLogger(__name__)

FORMAT = 1
MARKER = "spar-remote.json"
ENV = "SPAR_REMOTE"
# protocols whose single-object put is atomic (a reader sees all of it or nothing)
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oci", "oss"})
_HEX = re.compile(r"[0-9a-f]{64}")
_NS = re.compile(r"[A-Za-z0-9_.-]+")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# what a pulled entry may never write under runs/.spar/: spar's own state
_PROTECTED = frozenset(
    {"cache", "state.db", "state.db-wal", "state.db-shm", "lock", "stages.jsonl"}
)
_MEMO_PAGE = 1000
_SCAN_CHUNK = 8 * 1024 * 1024


class RemoteEntry(BaseModel):
    """`stages/<fingerprint>.json` on a remote: one stage's run-cache manifest, plus the files
    under `runs/.spar/` its outputs name (local engine weights), each by content hash."""

    model_config = ConfigDict(extra="forbid")

    format: int = FORMAT
    manifest: CacheManifest
    scratch: dict[str, str] = {}  # path under runs/.spar/ (posix) -> content hash
    refs: dict[str, str] = {}  # a path string in an output -> the scratch path it names
    pushed: str


class MemoObject(BaseModel):
    """`memo/<ns>/<hh>/<key>.json`: one memoised item."""

    model_config = ConfigDict(extra="forbid")

    ns: str
    key: str
    value: Any
    hash: str  # hash_json(value): a damaged object is never merged


# ---------------------------------------------------------------------------- reports


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


@dataclass
class PushReport:
    url: str
    stages: int = 0  # entries uploaded
    stages_there: int = 0  # entries the remote already had
    objects: int = 0
    objects_there: int = 0
    bytes: int = 0
    memo: int = 0
    memo_there: int = 0

    def lines(self) -> list[str]:
        return [
            f"pushed {self.stages} stages ({self.objects} objects, {_size(self.bytes)}) and "
            f"{self.memo} memo items to {self.url}",
            f"already there: {self.stages_there} stages, {self.objects_there} objects, "
            f"{self.memo_there} memo items",
        ]


@dataclass
class PullReport:
    url: str
    stages: int = 0
    stages_here: int = 0  # entries this runs directory already had
    objects: int = 0
    bytes: int = 0
    memo: int = 0
    memo_here: int = 0
    restored: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [
            f"pulled {self.stages} stages ({self.objects} objects, {_size(self.bytes)}) and "
            f"{self.memo} memo items from {self.url}",
            f"already here: {self.stages_here} stages, {self.memo_here} memo items",
        ]
        out += [f"restored {exp} / {stage} (remote cache)" for exp, stage in self.restored]
        return out


# ---------------------------------------------------------------------------- secrets


def _secrets() -> list[tuple[str, bytes]]:
    """(variable name, value) of every environment variable that names a secret — the same rule
    as `redact` (a value of 8 characters or more)."""
    return [
        (name, value.encode())
        for name, value in os.environ.items()
        if len(value) >= 8 and any(m in name.upper() for m in SECRET_MARKERS)
    ]


def _secret_in(data: bytes, secrets: list[tuple[str, bytes]]) -> str | None:
    return next((name for name, value in secrets if value in data), None)


def _secret_in_file(path: Path, secrets: list[tuple[str, bytes]]) -> str | None:
    if not secrets:
        return None
    overlap = max(len(v) for _, v in secrets) - 1
    tail = b""
    with path.open("rb") as f:
        while chunk := f.read(_SCAN_CHUNK):
            found = _secret_in(tail + chunk, secrets)
            if found is not None:
                return found
            tail = chunk[-overlap:] if overlap else b""
    return None


def _refuse(what: str, name: str) -> InputError:
    return InputError(
        f"{what}: holds the value of ${name}; refusing to push (nothing was sent). "
        "Unset the variable if it is no secret, or remove the output"
    )


# ---------------------------------------------------------------------------- transport


def remote_url(given: str | None) -> str:
    """The remote to use: `--remote URL`, else $SPAR_REMOTE."""
    url = given or os.environ.get(ENV, "")
    if not url.strip():
        raise InputError(f"no remote given: pass --remote URL or set ${ENV}")
    return url.strip()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


class Remote:
    """One remote cache: an fsspec filesystem and the root path inside it."""

    def __init__(self, url: str) -> None:
        import fsspec

        self.url = url
        try:
            fs, root = fsspec.url_to_fs(url, skip_instance_cache=True)
        except ImportError as e:  # e.g. s3:// without s3fs
            raise InputError(
                f"--remote {url}: {_first_line(e)} (install spar's 'remote' extra)"
            ) from None
        except (ValueError, TypeError) as e:
            raise InputError(
                f"--remote {url}: not a usable fsspec URL ({_first_line(e)})"
            ) from None
        protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
        self.fs: AbstractFileSystem = fs
        self.local = "file" in protocols
        self.atomic_puts = bool(protocols & OBJECT_STORES)
        self.root = str(root).rstrip("/")
        if not self.root and not self.local:
            raise InputError(f"--remote {url}: names no bucket or path")
        self._dirs: set[str] = set()

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    @contextlib.contextmanager
    def io(self, what: str) -> Iterator[None]:
        """Turn a transport failure into one clear line."""
        try:
            yield
        except (InputError, RunError):
            raise
        except Exception as e:
            raise RunError(f"remote {self.url}: {what}: {_first_line(e)}") from e

    def _mkdir(self, rel: str) -> None:
        if self.atomic_puts:
            return
        parent = str(PurePosixPath(self.path(rel)).parent)
        if parent not in self._dirs:
            self.fs.makedirs(parent, exist_ok=True)
            self._dirs.add(parent)

    def _tmp(self, rel: str) -> str:
        p = PurePosixPath(self.path(rel))
        return str(p.with_name(f".{p.name}.{uuid.uuid4().hex}.tmp"))

    def put_bytes(self, rel: str, data: bytes) -> None:
        """Atomic: all of it appears at `rel`, or nothing does."""
        self._mkdir(rel)
        if self.atomic_puts:
            self.fs.pipe_file(self.path(rel), data)
            return
        tmp = self._tmp(rel)
        self.fs.pipe_file(tmp, data)
        self.fs.mv(tmp, self.path(rel))

    def put_file(self, rel: str, local: Path) -> None:
        self._mkdir(rel)
        if self.atomic_puts:
            self.fs.put_file(str(local), self.path(rel))
            return
        tmp = self._tmp(rel)
        self.fs.put_file(str(local), tmp)
        self.fs.mv(tmp, self.path(rel))

    def put_many(self, items: dict[str, bytes]) -> None:
        if self.atomic_puts:  # concurrent puts, each atomic
            if items:
                self.fs.pipe({self.path(rel): data for rel, data in items.items()})
            return
        for rel, data in items.items():
            self.put_bytes(rel, data)

    def read(self, rel: str) -> bytes | None:
        try:
            data = self.fs.cat_file(self.path(rel))
        except FileNotFoundError:
            return None
        return data.encode() if isinstance(data, str) else bytes(data)

    def read_many(self, rels: list[str]) -> dict[str, bytes]:
        if not rels:
            return {}
        got = self.fs.cat([self.path(r) for r in rels], on_error="omit")
        prefix = self.root + "/"
        out: dict[str, bytes] = {}
        for path, data in got.items():
            p = str(path)
            rel = p[p.index(prefix) + len(prefix) :] if prefix in p else p
            out[rel] = bytes(data)
        return out

    def get_file(self, rel: str, local: Path) -> None:
        self.fs.get_file(self.path(rel), str(local))

    def list(self, rel: str) -> list[str]:
        """Every file under `rel/` (relative to `rel`), less temp files of unfinished writes."""
        base = self.path(rel)
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
        out: list[str] = []
        strip = base.rstrip("/") + "/"
        for p in found:
            p = str(p)
            sub = p[p.index(strip) + len(strip) :] if strip in p else p
            if not PurePosixPath(sub).name.startswith("."):
                out.append(sub)
        return out

    def check_format(self) -> bool:
        """Reach the remote (one clear line if it cannot be reached); True if it holds a spar
        cache already. Refuses a cache written by a newer spar."""
        with self.io("cannot reach it"):
            data = self.read(MARKER)
        if data is None:
            return False
        try:
            fmt = int(json.loads(data)["format"])
        except (ValueError, KeyError, TypeError):
            raise RunError(f"remote {self.url}: {MARKER} is damaged") from None
        if fmt > FORMAT:
            raise RunError(
                f"remote {self.url}: written by a newer spar (format {fmt}, this spar knows "
                f"{FORMAT}); upgrade spar"
            )
        return True


def open_remote(url: str) -> Remote:
    return Remote(url)


def _object_rel(digest: str) -> str:
    return f"objects/{digest[:2]}/{digest}"


def _entry_rel(fingerprint: str) -> str:
    return f"stages/{fingerprint}.json"


def _memo_rel(ns: str, key: str) -> str:
    return f"memo/{ns}/{key[:2]}/{key}.json"


# ---------------------------------------------------------------------------- local side


def _cache_object(store: RunStore, digest: str) -> Path:
    return store.cache.objects / digest[:2] / digest


def _strip_scheme(text: str) -> str:
    return _SCHEME.sub("", text, count=1)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _scratch_refs(
    store: RunStore, manifest: CacheManifest
) -> tuple[dict[str, Path], dict[str, str]]:
    """The files under runs/.spar/ that a stage's JSON outputs name (a train output's local
    weights): (scratch path -> local file, path string -> scratch path of what it names)."""
    internal = store.internal.resolve()
    files: dict[str, Path] = {}
    refs: dict[str, str] = {}
    for name, digest in manifest.outputs.items():
        if not name.endswith(".json"):
            continue
        try:
            value = json.loads(_cache_object(store, digest).read_bytes())
        except (OSError, ValueError):
            continue
        for text in _strings(value):
            if "/" not in text or "\n" in text or len(text) > 4096:
                continue
            # where it is, or (spar run from elsewhere) the same path under this runs dir
            target = Path(local_scratch(_strip_scheme(text), store.internal))
            target = (target if target.is_absolute() else Path.cwd() / target).resolve()
            if not target.is_relative_to(internal) or not _exists(target):
                continue
            rel = target.relative_to(internal).as_posix()
            if rel.split("/", 1)[0] in _PROTECTED:
                continue
            refs[text] = rel
            tree = [target] if target.is_file() else sorted(target.rglob("*"))
            for f in tree:
                if f.is_file() and not f.name.endswith(".tmp"):
                    files[f.relative_to(internal).as_posix()] = f
    return files, refs


def save_fresh(store: RunStore, planned: list[PlannedStage]) -> None:
    """Every fresh, complete stage of a plan into the run cache, if it is not there (outputs a
    `spar gc` dropped from the cache, or written before the cache existed)."""
    for p in planned:
        if p.status != "fresh" or not p.records or store.cache.lookup(p.fingerprint) is not None:
            continue
        if all(r.complete for r in p.records.values()):
            store.cache.save(p.fingerprint, {n: p.output_dir / n for n in p.records}, p.records)


# ---------------------------------------------------------------------------- push


def _memo_payloads(
    store: RunStore, there: set[str], report: PushReport | None = None
) -> Iterator[tuple[str, bytes]]:
    """(remote path, bytes) of every memo item the remote does not have (`there`: paths under
    memo/), a page of the database at a time; counts the others in `report`."""
    for ns, key, value in store.state.memo_rows(_MEMO_PAGE):
        if not _NS.fullmatch(ns) or not _HEX.fullmatch(key):
            continue
        if f"{ns}/{key[:2]}/{key}.json" in there:
            if report is not None:
                report.memo_there += 1
            continue
        parsed = json.loads(value)
        obj = MemoObject(ns=ns, key=key, value=parsed, hash=hash_json(parsed))
        yield _memo_rel(ns, key), canonical_json(obj.model_dump()).encode()


def push(store: RunStore, remote: Remote, fingerprints: set[str] | None = None) -> PushReport:
    """Upload the run cache's entries (those of `fingerprints`, or all), the local files they
    name, and every memo item the remote does not have yet. Every payload is checked for secrets
    before anything is sent; objects go first, each stage entry last."""
    report = PushReport(remote.url)
    secrets = _secrets()
    has_cache = remote.check_format()
    with remote.io("listing"):
        there_entries = (
            {r.removesuffix(".json") for r in remote.list("stages")} if has_cache else set()
        )
        there_objects = (
            {PurePosixPath(r).name for r in remote.list("objects")} if has_cache else set()
        )
        there_memo = set(remote.list("memo")) if has_cache else set()

    # 1. what to send, every payload checked for secrets before anything is sent
    entries: list[tuple[str, bytes]] = []
    uploads: dict[str, Path] = {}  # digest -> local file
    for cached in store.cache.entries():
        m = cached.manifest
        if fingerprints is not None and m.fingerprint not in fingerprints:
            continue
        if m.fingerprint in there_entries:
            report.stages_there += 1
            continue
        if store.cache.lookup(m.fingerprint) is None:  # an object is gone: not pushable
            continue
        scratch_files, refs = _scratch_refs(store, m)
        scratch: dict[str, str] = {}
        for rel, f in scratch_files.items():
            digest = hash_path(f)
            scratch[rel] = digest
            uploads.setdefault(digest, f)
        for name, digest in m.outputs.items():
            obj = _cache_object(store, digest)
            if hash_path(obj) != digest:
                raise RunError(f"{obj}: cached output {name} no longer matches its hash")
            uploads.setdefault(digest, obj)
        entry = RemoteEntry(manifest=m, scratch=scratch, refs=refs, pushed=now_iso())
        data = entry.model_dump_json(indent=1).encode()
        found = _secret_in(data, secrets)
        if found is not None:
            raise _refuse(f"run cache entry {m.stage_kind} {m.fingerprint[:12]}", found)
        entries.append((m.fingerprint, data))
    for digest, f in uploads.items():
        if digest in there_objects:
            continue
        found = _secret_in_file(f, secrets)
        if found is not None:
            raise _refuse(str(f), found)
    for _rel, data in _memo_payloads(store, there_memo, report):  # checked, not kept
        found = _secret_in(data, secrets)
        if found is not None:
            obj = MemoObject.model_validate_json(data)
            raise _refuse(f"memo item {obj.ns} {obj.key[:12]}", found)

    # 2. objects, then the entries that name them, then memo items
    with remote.io("upload failed"):
        if not has_cache:
            remote.put_bytes(MARKER, json.dumps({"format": FORMAT}).encode())
        for digest, f in uploads.items():
            if digest in there_objects:
                report.objects_there += 1
                continue
            remote.put_file(_object_rel(digest), f)
            report.objects += 1
            report.bytes += f.stat().st_size
        for fp, data in entries:
            remote.put_bytes(_entry_rel(fp), data)
            report.stages += 1
        page: dict[str, bytes] = {}
        for rel, data in _memo_payloads(store, there_memo):
            page[rel] = data
            if len(page) == _MEMO_PAGE:
                remote.put_many(page)
                report.memo += len(page)
                page = {}
        remote.put_many(page)
        report.memo += len(page)
    return report


# ---------------------------------------------------------------------------- pull


def _safe_rel(rel: str) -> bool:
    p = PurePosixPath(rel)
    return (
        not p.is_absolute()
        and ".." not in p.parts
        and bool(p.parts)
        and p.parts[0] not in _PROTECTED
    )


def _fetch_object(remote: Remote, digest: str, target: Path) -> int:
    """Download one object to `target` (atomically, verified); its size. Raises RunError if the
    remote's copy does not match its hash."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.pull.tmp")
    try:
        remote.get_file(_object_rel(digest), tmp)
        if hash_path(tmp) != digest:
            raise RunError(f"remote {remote.url}: object {digest[:12]} does not match its hash")
        size = tmp.stat().st_size
        tmp.replace(target)
        return size
    finally:
        tmp.unlink(missing_ok=True)


def _pull_entry(store: RunStore, remote: Remote, entry: RemoteEntry, report: PullReport) -> bool:
    """Bring one stage into the local run cache: objects and named files first (verified), the
    manifest last. False (nothing entered the cache) if the remote's copy is incomplete."""
    m = entry.manifest
    if not all(_safe_rel(rel) and _HEX.fullmatch(d) for rel, d in entry.scratch.items()):
        report.warnings.append(f"remote entry {m.fingerprint[:12]} names unsafe paths: skipped")
        return False
    if any(m.records[n].output_hash != d for n, d in m.outputs.items() if n in m.records) or (
        m.outputs.keys() != m.records.keys()
    ):
        report.warnings.append(f"remote entry {m.fingerprint[:12]} is inconsistent: skipped")
        return False
    try:
        for digest in m.outputs.values():
            obj = _cache_object(store, digest)
            if not obj.exists() or hash_path(obj) != digest:
                report.bytes += _fetch_object(remote, digest, obj)
                report.objects += 1
        for rel, digest in entry.scratch.items():
            target = store.internal / rel
            if target.exists() and hash_path(target) == digest:
                continue
            report.bytes += _fetch_object(remote, digest, target)
            report.objects += 1
    except (FileNotFoundError, RunError) as e:
        report.warnings.append(f"remote entry {m.fingerprint[:12]}: {e}; skipped")
        return False
    for text, rel in entry.refs.items():
        here = Path(_strip_scheme(text))
        here = (here if here.is_absolute() else Path.cwd() / here).resolve()
        if here != (store.internal / rel).resolve():  # engine local maps it (local_scratch)
            log.info("weights recorded at %s pulled into %s", text, store.internal / rel)
    atomic_write_text(store.cache.stages / f"{m.fingerprint}.json", m.model_dump_json(indent=1))
    return True


def pull(store: RunStore, remote: Remote, fingerprints: set[str] | None = None) -> PullReport:
    """Download the remote's stage entries (those of `fingerprints`, or all) into the local run
    cache, and every memo item this runs directory does not have (never replacing one it has)."""
    report = PullReport(remote.url)
    if not remote.check_format():
        return report
    with remote.io("listing"):
        fps = sorted(
            r.removesuffix(".json")
            for r in remote.list("stages")
            if r.endswith(".json") and _HEX.fullmatch(r.removesuffix(".json"))
        )
    want = [fp for fp in fps if fingerprints is None or fp in fingerprints]
    with remote.io("download failed"):
        for fp in want:
            if store.cache.lookup(fp) is not None:
                report.stages_here += 1
                continue
            data = remote.read(_entry_rel(fp))
            if data is None:
                continue
            try:
                entry = RemoteEntry.model_validate_json(data)
            except ValidationError:
                report.warnings.append(f"remote entry {fp[:12]} is damaged: skipped")
                continue
            if entry.manifest.fingerprint != fp or entry.format > FORMAT:
                report.warnings.append(f"remote entry {fp[:12]} is not usable here: skipped")
                continue
            if _pull_entry(store, remote, entry, report):
                report.stages += 1
        _pull_memo(store, remote, report)
    return report


def _pull_memo(store: RunStore, remote: Remote, report: PullReport) -> None:
    by_ns: dict[str, list[str]] = {}
    for rel in remote.list("memo"):
        parts = rel.split("/")
        if len(parts) != 3 or not _NS.fullmatch(parts[0]):
            continue
        key = parts[2].removesuffix(".json")
        if _HEX.fullmatch(key) and parts[1] == key[:2]:
            by_ns.setdefault(parts[0], []).append(key)
    for ns, keys in sorted(by_ns.items()):
        have = store.state.memo_has(ns, keys)
        report.memo_here += len(have)
        missing = [k for k in keys if k not in have]
        for i in range(0, len(missing), _MEMO_PAGE):
            chunk = missing[i : i + _MEMO_PAGE]
            got = remote.read_many([_memo_rel(ns, k) for k in chunk])
            items: list[tuple[str, Any]] = []
            for key in chunk:
                data = got.get(_memo_rel(ns, key))
                try:
                    obj = MemoObject.model_validate_json(data) if data is not None else None
                except ValidationError:
                    obj = None
                if (
                    obj is None
                    or obj.ns != ns
                    or obj.key != key
                    or hash_json(obj.value) != obj.hash
                ):
                    report.warnings.append(f"remote memo item {ns} {key[:12]} is damaged: skipped")
                    continue
                items.append((key, obj.value))
            store.state.memo_add_new(ns, items)
            report.memo += len(items)


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # not a path at all (a name too long, a NUL byte)
        return False


def local_scratch(path: str, internal: Path) -> str:
    """A path under another runs directory's `.spar/` (a pulled train output's weights, recorded
    where they were made) as it is under this one's `internal` (`runs/.spar`), where a pull put
    it; `path` itself if it exists or names nothing found here. For engines that load local
    weights, as engine local does: `local_scratch(model_path, workdir.parent.parent)`."""
    if "/.spar/" not in f"/{path}" or _exists(Path(path)):
        return path
    rel = f"/{path}".rsplit("/.spar/", 1)[1]
    candidate = internal / rel
    if not rel or not _safe_rel(rel) or not _exists(candidate):
        return path
    return str(candidate)


# ---------------------------------------------------------------------------- restore


def restore_layout(store: RunStore, planned: list[PlannedStage]) -> list[tuple[str, str]]:
    """Restore into `runs/<experiment>/<stage>/` every stage of a plan that the run cache holds
    and whose upstream stages are fresh or restored (what `spar apply` would restore, without
    running anything). The (experiment, stage) of each stage restored."""
    from spar.plan import evaluate, upstream_key, upstream_output_changed

    settled: set[tuple[str, str]] = set()
    current: dict[tuple[str, str], dict[str, Any]] = {}
    restored: list[tuple[str, str]] = []
    for p in planned:
        if not all(upstream_key(p.node.experiment, u) in settled for u in p.node.upstream.values()):
            continue
        status, _ = evaluate(p, store, current)
        if status == "fresh":
            current[p.key] = p.records
            settled.add(p.key)
            continue
        manifest = store.cache.lookup(p.fingerprint)
        if manifest is None or not all(
            r.complete and upstream_output_changed(r, p.node, current) is None
            for r in manifest.records.values()
        ):
            continue
        records = store.restore(manifest, p.node.experiment, p.node.name)
        if records is None:
            continue
        store.stage_event("restored", *p.key, fingerprint=p.fingerprint, source="remote")
        current[p.key] = records
        settled.add(p.key)
        restored.append(p.key)
    return restored


__all__ = [
    "ENV",
    "MemoObject",
    "PullReport",
    "PushReport",
    "Remote",
    "RemoteEntry",
    "local_scratch",
    "open_remote",
    "pull",
    "push",
    "remote_url",
    "restore_layout",
    "save_fresh",
]
