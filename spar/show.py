"""`spar show`: experiments side by side — the parameters that differ and the headline effects."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from spar.plan import flatten
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
    rows = []
    for spec, f in zip(specs, flat, strict=True):
        summary_path = store.stage_dir(spec.name, "report") / "summary.json"
        effects: dict[str, Any] = {}
        invalid = None
        if summary_path.exists():
            summary = json.loads(summary_path.read_text())
            invalid = summary["invalid"]
            for tier in tier_order(list(summary["tiers"])):
                e = effect(summary, tier)
                effects[tier] = {k: e.get(k) for k in ("mean", "ci_low", "ci_high", "n")}
        rows.append(
            {
                "experiment": spec.name,
                "params": {k: _display(f.get(k)) for k in differ},
                "effects": effects,
                "invalid": invalid,
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
    header = ["experiment", *params, *(f"effect {t}" for t in tiers), "invalid"]
    table = [header]
    for r in rows:
        table.append(
            [
                r["experiment"],
                *(str(r["params"][p]) for p in params),
                *(_cell(r["effects"][t]) if t in r["effects"] else "not run" for t in tiers),
                "not run" if r["invalid"] is None else str(r["invalid"]),
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in table]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])
