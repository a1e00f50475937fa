"""Writing files: secret redaction, atomic writes, JSONL, the params file beside each output."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO

import yaml
from pydantic import BaseModel, ConfigDict

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
TEXT_SUFFIXES = {".json", ".jsonl", ".yaml", ".txt", ".html", ".md", ".csv"}


def redact(text: str) -> str:
    """Replace the value of every environment variable that names a secret."""
    for name, value in os.environ.items():
        if len(value) >= 8 and any(m in name.upper() for m in SECRET_MARKERS) and value in text:
            text = text.replace(value, "***")
    return text


def redact_json(value: Any) -> Any:
    """A JSON value with every secret redacted from its strings (for journaled items)."""
    return json.loads(redact(json.dumps(value, ensure_ascii=False)))


def _atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write `path` through a temp file of its own (unique per writer, so two threads or
    processes writing the same path never share one), then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, lambda f: f.write(data))


def atomic_copy(src: Path, path: Path) -> None:
    """Copy `src` to `path` atomically (streamed: outputs may be large)."""

    def copy(f: BinaryIO) -> None:
        with src.open("rb") as source:
            shutil.copyfileobj(source, f)

    _atomic(path, copy)


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
    # False when items ended in error (or an upstream stage was incomplete): the next apply
    # runs the stage again, and the run cache never keeps it
    complete: bool = True
    details: dict[str, Any] = {}  # counts a stage reports (items, invalid, errors, dropped, ...)
    restored_from: str | None = None  # experiment whose run produced it (run cache restores)
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


def write_params(output: Path, rec: ParamsRecord) -> None:
    text = yaml.safe_dump(rec.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
    atomic_write_text(params_path(output), text)
