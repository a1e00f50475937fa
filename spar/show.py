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
    exhibits rate) and `gap <triggered>-<untriggered>` (fine-tuned leakage gap)."""
    out: dict[str, dict[str, Any]] = {}
    conditions = summary.get("conditions", {})
    if list(conditions) in ([], [""]):
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


def _group_headline(group: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for c, per in group["conditions"].items():
        out[f"rate {c}"] = _stat(per["exhibits_rate"]["finetuned"])
    for g in group.get("gaps", []):
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


def _row(
    experiment: str, planned: PlannedStage, summary_path: Path, params: dict[str, Any]
) -> dict[str, Any]:
    effects: dict[str, Any] = {}
    invalid = errors = None
    status = planned.status if summary_path.exists() else "not run"
    if planned.status == "fresh":
        summary = json.loads(summary_path.read_text())
        if "groups" in summary:  # a sweep report: one row per group, added by the caller
            return {"experiment": experiment, "status": status, "summary": summary}
        invalid, errors = summary["invalid"], summary.get("errors", 0)
        effects = headline(summary)
    return {
        "experiment": experiment,
        "status": status,
        "reasons": planned.reasons if planned.status != "fresh" else [],
        "params": params,
        "effects": effects,
        "invalid": invalid,
        "errors": errors,
    }


def show_rows(specs: list[Spec], store: RunStore) -> list[dict[str, Any]]:
    shown: list[tuple[Spec, Spec | None]] = []  # (spec of the row, its sweep root)
    for spec in specs:
        if spec.sweep is None:
            shown.append((spec, None))
        else:
            shown += [(point, spec) for _, point in sweep_points(spec)]
    flat = [flatten(s.model_dump(mode="json", exclude={"name", "sweep"})) for s, _ in shown]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    differ = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]
    planned = {(p.node.experiment, p.node.name): p for p in plan_specs(specs, store)}
    rows = []
    for (spec, root), f in zip(shown, flat, strict=True):
        params = {k: _display(f.get(k)) for k in differ}
        path = store.stage_dir(spec.name, "report") / "summary.json"
        rows.append(_row(spec.name, planned[(spec.name, "report")], path, params))
        last_point = root is not None and spec is [s for s, r in shown if r is root][-1]
        if root is not None and last_point:
            rows += _sweep_rows(root, planned[(root.name, "sweep_report")], store, differ)
    return rows


def _sweep_rows(
    root: Spec, planned: PlannedStage, store: RunStore, differ: list[str]
) -> list[dict[str, Any]]:
    """One row per group of a sweep (points differing only in seed): CIs over seeds."""
    path = store.stage_dir(root.name, "sweep_report") / "summary.json"
    got = _row(root.name, planned, path, {})
    if "summary" not in got:
        return [got | {"experiment": f"{root.name} (sweep)", "params": dict.fromkeys(differ, "")}]
    rows = []
    for group in got["summary"]["groups"]:
        seeds = len(group["seeds"])
        name = f"{root.name}/{group['label']}" if group["label"] else root.name
        params = {
            k: group["point"].get(k, f"{seeds} seeds" if k in got["summary"]["seed_keys"] else "")
            for k in differ
        }
        rows.append(
            {
                "experiment": f"{name} ({seeds} seeds)",
                "status": "fresh",
                "reasons": [],
                "params": params,
                "effects": _group_headline(group),
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
