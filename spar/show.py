"""`spar show`: experiments side by side — the parameters that differ and the headline effects.

Headline per experiment: the paired fine-tuned − baseline effect per tier; with eval conditions,
the fine-tuned exhibits (persona) rate per condition and the leakage gaps. A sweep spec shows a row
per point, then a row per group of points that differ only in seed (its sweep report: CIs over
seeds). A row whose report does not match the spec as it is now (an edit not yet applied) is
marked stale with the reasons, and its numbers are left out: nothing stale is presented as current.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from spar.plan import PlannedStage, flatten, plan_specs
from spar.plots import tier_order
from spar.spec import Spec, sweep_points
from spar.store import RunStore

STATS = ("mean", "ci_low", "ci_high", "n")


def _stat(e: dict[str, Any]) -> dict[str, Any]:
    return {k: e.get(k) for k in STATS}


def headline(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Column -> statistic: the effect per tier (no conditions), or `rate <condition>` (fine-tuned
    exhibits rate) and `gap <triggered>-<untriggered>` (fine-tuned leakage gap). `summary` is a
    report's summary or one group of a sweep report."""
    out: dict[str, dict[str, Any]] = {}
    conditions = summary.get("conditions", {})
    if "tiers" in summary and list(conditions) in ([], [""]):  # a report without conditions
        tiers = summary["tiers"]
        for tier in tier_order(list(tiers)):
            per = tiers[tier]
            out[tier] = _stat(per["delta"] if "delta" in per else per["finetuned"])
        return out
    for c in summary.get("condition_order", list(conditions)):
        out[f"rate {c}"] = _stat(conditions[c]["exhibits_rate"]["finetuned"])
    for g in summary.get("gaps", []):
        if g["model"] == "finetuned":
            out[f"gap {g['triggered']}-{g['untriggered']}"] = _stat(g)
    return out


def _display(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("/"):
        try:
            return str(Path(value).relative_to(Path.cwd()))
        except ValueError:
            return value
    return value


def _load(planned: PlannedStage, path: Path) -> tuple[str, dict[str, Any] | None]:
    """The status of a report stage, and its summary only if it is fresh."""
    status = planned.status if path.exists() else "not run"
    return status, json.loads(path.read_text()) if planned.status == "fresh" else None


def _row(
    experiment: str, planned: PlannedStage, path: Path, params: dict[str, Any]
) -> dict[str, Any]:
    status, summary = _load(planned, path)
    return {
        "experiment": experiment,
        "status": status,
        "reasons": planned.reasons if planned.status != "fresh" else [],
        "params": params,
        "effects": headline(summary) if summary else {},
        "invalid": summary["invalid"] if summary else None,
        "errors": summary.get("errors", 0) if summary else None,
    }


def show_rows(specs: list[Spec], store: RunStore) -> list[dict[str, Any]]:
    # each spec with the experiments it shows a row for: itself, or its sweep's points
    expanded = [
        (spec, [spec] if spec.sweep is None else [p for _, p in sweep_points(spec)])
        for spec in specs
    ]
    points = [p for _, ps in expanded for p in ps]
    flat = [flatten(p.model_dump(mode="json", exclude={"name", "sweep"})) for p in points]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    differ = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]
    params = {
        p.name: {k: _display(f.get(k)) for k in differ} for p, f in zip(points, flat, strict=True)
    }
    planned = {(p.node.experiment, p.node.name): p for p in plan_specs(specs, store)}
    rows = []
    for spec, ps in expanded:
        for p in ps:
            path = store.stage_dir(p.name, "report") / "summary.json"
            rows.append(_row(p.name, planned[(p.name, "report")], path, params[p.name]))
        if spec.sweep is not None:
            rows += _sweep_rows(spec, planned[(spec.name, "sweep_report")], store, differ)
    return rows


def _sweep_rows(
    root: Spec, planned: PlannedStage, store: RunStore, differ: list[str]
) -> list[dict[str, Any]]:
    """One row per group of a sweep (points differing only in seed): CIs over seeds."""
    path = store.stage_dir(root.name, "sweep_report") / "summary.json"
    _, summary = _load(planned, path)
    if summary is None:
        blank = dict.fromkeys(differ, "")
        return [_row(f"{root.name} (sweep)", planned, path, blank)]
    rows = []
    for group in summary["groups"]:
        seeds = len(group["seeds"])
        name = f"{root.name}/{group['label']}" if group["label"] else root.name
        row_params = {
            k: group["point"].get(k, f"{seeds} seeds" if k in summary["seed_keys"] else "")
            for k in differ
        }
        rows.append(
            {
                "experiment": f"{name} ({seeds} seeds)",
                "status": "fresh",
                "reasons": [],
                "params": row_params,
                "effects": headline(group),
                "invalid": group.get("invalid"),
                "errors": group.get("errors"),
            }
        )
    return rows


def _cell(e: dict[str, Any], signed: bool = True) -> str:
    if e.get("mean") is None:
        return "—"
    f = "+.2f" if signed else ".2f"
    return f"{e['mean']:{f}} [{e['ci_low']:{f}}, {e['ci_high']:{f}}]"


def format_table(rows: list[dict[str, Any]]) -> str:
    params = list(rows[0]["params"]) if rows else []
    tiers = list(dict.fromkeys(t for r in rows for t in r["effects"]))
    header = [
        "experiment",
        "status",
        *params,
        *(t if t.startswith(("rate ", "gap ")) else f"effect {t}" for t in tiers),
        "invalid",
        "errors",
    ]
    table = [header]
    for r in rows:
        blank = "not run" if r["status"] == "not run" else "stale"
        table.append(
            [
                r["experiment"],
                r["status"],
                *(str(r["params"][p]) for p in params),
                *(
                    _cell(r["effects"][t], not t.startswith("rate "))
                    if t in r["effects"]
                    else blank
                    for t in tiers
                ),
                blank if r["invalid"] is None else str(r["invalid"]),
                blank if r["errors"] is None else str(r["errors"]),
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in table]
    notes = [
        f"{r['experiment']} is stale ({'; '.join(r['reasons'])}): run `spar apply` for results"
        for r in rows
        if r["status"] == "stale"
    ]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:], *notes])
