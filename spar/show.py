"""`spar show`: experiments side by side — the parameters that differ and the headline effects.

A row whose report does not match the spec as it is now (an edit not yet applied) is marked
stale with the reasons, and its numbers are left out: nothing stale is presented as current.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from spar.plan import flatten, plan_specs
from spar.plots import effect, tier_order
from spar.spec import Spec
from spar.store import RunStore


def _display(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("/"):
        try:
            return str(Path(value).relative_to(Path.cwd()))
        except ValueError:
            return value
    return value


def show_rows(specs: list[Spec], store: RunStore) -> list[dict[str, Any]]:
    flat = [flatten(s.model_dump(mode="json", exclude={"name"})) for s in specs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    differ = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]
    planned = {(p.node.experiment, p.node.name): p for p in plan_specs(specs, store)}
    rows = []
    for spec, f in zip(specs, flat, strict=True):
        report = planned[(spec.name, "report")]
        summary_path = store.stage_dir(spec.name, "report") / "summary.json"
        effects: dict[str, Any] = {}
        invalid = errors = None
        status = report.status if summary_path.exists() else "not run"
        if report.status == "fresh":
            summary = json.loads(summary_path.read_text())
            invalid, errors = summary["invalid"], summary.get("errors", 0)
            for tier in tier_order(list(summary["tiers"])):
                e = effect(summary, tier)
                effects[tier] = {k: e.get(k) for k in ("mean", "ci_low", "ci_high", "n")}
        rows.append(
            {
                "experiment": spec.name,
                "status": status,
                "reasons": report.reasons if report.status != "fresh" else [],
                "params": {k: _display(f.get(k)) for k in differ},
                "effects": effects,
                "invalid": invalid,
                "errors": errors,
            }
        )
    return rows


def _cell(e: dict[str, Any]) -> str:
    if e.get("mean") is None:
        return "—"
    return f"{e['mean']:+.2f} [{e['ci_low']:+.2f}, {e['ci_high']:+.2f}]"


def format_table(rows: list[dict[str, Any]]) -> str:
    params = list(rows[0]["params"]) if rows else []
    tiers = tier_order(list(dict.fromkeys(t for r in rows for t in r["effects"])))
    header = ["experiment", "status", *params, *(f"effect {t}" for t in tiers), "invalid", "errors"]
    table = [header]
    for r in rows:
        blank = "not run" if r["status"] == "not run" else "stale"
        table.append(
            [
                r["experiment"],
                r["status"],
                *(str(r["params"][p]) for p in params),
                *(_cell(r["effects"][t]) if t in r["effects"] else blank for t in tiers),
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
