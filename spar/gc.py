"""`spar gc`: remove run-cache entries (and training journals and local engine states) that no
spec of a given set references. Dry run unless asked to delete."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from spar.stages.train import run_id
from spar.store import RunStore


@dataclass
class GcReport:
    entries: list[tuple[str, str, int]] = field(default_factory=list)  # (kind, fp, bytes)
    scratch: list[tuple[Path, int]] = field(default_factory=list)
    deleted: bool = False

    def lines(self) -> list[str]:
        verb = "deleted" if self.deleted else "would delete"
        out = [
            f"{verb} cached {kind} output {fp[:12]} ({_size(n)})" for kind, fp, n in self.entries
        ]
        out += [f"{verb} {p} ({_size(n)})" for p, n in self.scratch]
        total = sum(n for *_, n in self.entries) + sum(n for _, n in self.scratch)
        out.append(f"{verb} {len(self.entries)} cached outputs, {_size(total)} in all")
        return out


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def _tree_size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def collect(store: RunStore, keep: set[str], delete: bool = False) -> GcReport:
    """Everything cached under a fingerprint not in `keep`: listed, and removed if `delete`."""
    report = GcReport(deleted=delete)
    drop: set[str] = set()
    for entry in store.cache.entries():
        fp = entry.manifest.fingerprint
        if fp in keep:
            continue
        drop.add(fp)
        report.entries.append((entry.manifest.stage_kind, fp, entry.size))
    # training runs: journals and local engine states named after the fingerprint
    keep_runs = {run_id(fp) for fp in keep}
    train_dirs = store.internal / "train"
    if train_dirs.exists():
        for d in sorted(train_dirs.iterdir()):
            if d.name not in keep_runs:
                report.scratch.append((d, _tree_size(d)))
    for sub in ("states", "sampler_weights"):
        base = store.internal / "engines" / "local" / sub
        if base.exists():
            for d in sorted(base.iterdir()):
                if not any(d.name.startswith(r + "-") for r in keep_runs):
                    report.scratch.append((d, _tree_size(d)))
    if delete:
        store.cache.forget(drop)
        for path, _ in report.scratch:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()
        store.state.forget_train([r for r in store.state.train_runs() if r not in keep])
    return report
