"""What `spar apply` prints last: per experiment the finding, and where to read the whole report.

The numbers are `spar show`'s (`spar.show.show_rows`, formatted by the same cell function), so the
headline and `spar show` can never disagree. One experiment:

    demo: 0 invalid, 0 errors
      effect direct   +0.42 [+0.10, +0.74] p_holm 0.01
      effect distant  +0.05 [-0.20, +0.30] p_holm 0.6
      pull direct     +0.03 [+0.01, +0.05]
      report: /home/me/study/runs/demo/plot/report.html

A sweep: a line per group of points that differ only in seed (its sweep report: intervals over
seeds), then where the points' reports are. An experiment whose report is not fresh says so
instead of giving numbers (nothing stale is presented as current).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spar.reliability import show_line
from spar.show import FEW, _cell, show_rows
from spar.spec import Spec, sweep_points
from spar.store import RunStore

FEW_NOTE = f"{FEW} fewer than 10 questions in the tier: a wide interval"


def label(column: str) -> str:
    """`spar show`'s column header: `effect <tier>`, or the column itself (rate, gap, ...)."""
    prefixed = column.startswith(("rate ", "gap ", "property ", "pull "))
    return column.rstrip() if prefixed else f"effect {column}"


def cell(column: str, stat: dict[str, Any]) -> str:
    """`spar show`'s cell: `+0.42 [+0.10, +0.74] p_holm 0.01` (a rate unsigned)."""
    return _cell(stat, not column.startswith("rate "))


def _counts(row: dict[str, Any]) -> str:
    return f"{row['invalid']} invalid, {row['errors']} errors"


def _state(row: dict[str, Any]) -> str | None:
    """Why a row has no numbers, or None when it is fresh."""
    if row["status"] == "fresh":
        return None
    if row["status"] == "not run":
        return "not run"
    return f"{row['status']} ({'; '.join(row['reasons'])})"


def _few(row: dict[str, Any]) -> bool:
    return any(e.get("few_questions") for e in row["effects"].values())


def report_path(store: RunStore, experiment: str) -> Path:
    return (store.stage_dir(experiment, "plot") / "report.html").resolve()


def experiment_lines(row: dict[str, Any], report: Path) -> list[str]:
    """`<experiment>: N invalid, M errors`, an aligned line per effect, then the report path."""
    state = _state(row)
    lines = [f"{row['experiment']}: {state or _counts(row)}"]
    if state is None:
        effects = row["effects"]
        width = max((len(label(c)) for c in effects), default=0)
        lines += [f"  {label(c):<{width}}  {cell(c, e)}" for c, e in effects.items()]
        if _few(row):
            lines.append(f"  {FEW_NOTE}")
        if line := show_line(row.get("reliability")):
            lines.append(f"  reliability: {line}")
    where = str(report) if report.exists() else f"not written ({report})"
    lines.append(f"  report: {where}")
    return lines


def sweep_lines(spec: Spec, rows: list[dict[str, Any]], store: RunStore) -> list[str]:
    """A line per group of the sweep report (or per point when it is not fresh), then where the
    points' reports are."""
    points = [p.name for _, p in sweep_points(spec)]
    groups = [r for r in rows if r["experiment"] not in points]
    per = [r for r in rows if r["experiment"] in points]
    shown = per if any(_state(g) for g in groups) else groups
    lines = [f"{spec.name}: sweep of {len(points)} points"]
    for r in shown:
        state = _state(r)
        if state:
            lines.append(f"  {r['experiment']}: {state}")
            continue
        effects = "; ".join(f"{label(c)} {cell(c, e)}" for c, e in r["effects"].items())
        lines.append(f"  {r['experiment']}: {effects}; {_counts(r)}")
    if any(_few(r) for r in shown if not _state(r)):
        lines.append(f"  {FEW_NOTE}")
    pattern = report_path(store, f"{spec.name}/*")
    lines.append(f"  reports: {pattern} ({len(points)} points)")
    return lines


def headline_lines(specs: list[Spec], store: RunStore) -> list[str]:
    """The headline of every spec, each block after a blank line."""
    lines: list[str] = []
    for spec in specs:
        rows = show_rows([spec], store)
        lines.append("")
        if spec.sweep is None:
            lines += experiment_lines(rows[0], report_path(store, spec.name))
        else:
            lines += sweep_lines(spec, rows, store)
    return lines
