"""`spar show`: experiments side by side — the parameters that differ and the headline effects.

Headline per experiment: the paired fine-tuned − baseline effect per tier; with eval conditions,
the fine-tuned exhibits (persona) rate per condition and the leakage gaps. With judge.properties the
headline is per property (the paired effect over all tiers, or per condition the fine-tuned
exhibits rate and the leakage gaps), and below the table each experiment gets a line per property
(and tier): `warm: base 1.80 -> ft 3.10 (+1.30 [+0.90, +1.70]); exhibits 20 % -> 70 %`. A sweep
spec shows a row per point, then a row per group of points that differ only in seed (its sweep
report: CIs over seeds). With `logprob:` in the spec, `pull <tier>` columns give the
log-likelihood pull per tier (`spar.stages.logprob_report`). A row whose report does not match
the spec as it is now (an edit not yet applied) is marked stale with the reasons, and its
numbers are left out: nothing stale is presented as current.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from spar.plan import PlannedStage, flatten, plan_specs
from spar.plots import conditions_of, properties_of, property_names, tier_order
from spar.spec import Spec, sweep_points
from spar.store import RunStore

STATS = ("mean", "ci_low", "ci_high", "n", "questions", "few_questions", "p_value", "p_holm")
FEW = "†"  # after an interval over fewer than spar.stats.FEW_QUESTIONS questions


def _stat(e: dict[str, Any]) -> dict[str, Any]:
    return {k: e.get(k) for k in STATS}


def headline(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Column -> statistic: the effect per tier (no conditions), or `rate <condition>` (fine-tuned
    exhibits rate) and `gap <triggered>-<untriggered>` (fine-tuned leakage gap); with
    judge.properties, the same per property (`_property_headline`). `summary` is a report's
    summary or one group of a sweep report."""
    if property_names(summary):
        return _property_headline(summary)
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


def _property_headline(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """With judge.properties: `property <p>` (the paired effect over all tiers, or the fine-tuned
    mean in pairwise mode) without conditions; with them `rate <c> [<p>]` (fine-tuned exhibits
    rate of the property) and `gap <t>-<u> [<p>]` (its fine-tuned leakage gap)."""
    out: dict[str, dict[str, Any]] = {}
    props = property_names(summary)
    conds = conditions_of(summary)
    if not conds:
        per = properties_of(summary)
        for p in props:
            out[f"property {p}"] = _stat(
                per[p]["delta"] if "delta" in per[p] else per[p]["finetuned"]
            )
        return out
    for c in conds:
        per = properties_of(summary, c)
        for p in props:
            out[f"rate {c} [{p}]"] = _stat(per[p]["finetuned"]["exhibits_rate"])
    for g in summary.get("gaps", []):
        if g["model"] == "finetuned" and g.get("property"):
            out[f"gap {g['triggered']}-{g['untriggered']} [{g['property']}]"] = _stat(g)
    return out


def property_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Per condition ("" without conditions), property and tier (None: all tiers): each model's
    mean score and exhibits rate, and the paired fine-tuned − baseline delta (absolute mode);
    [] without judge.properties."""
    out: list[dict[str, Any]] = []
    for c in conditions_of(summary) or [""]:
        per = properties_of(summary, c)
        for p in property_names(summary):
            if p not in per:
                continue
            scopes = [
                (None, per[p]),
                *((t, per[p]["tiers"][t]) for t in tier_order(list(per[p]["tiers"]))),
            ]
            for tier, st in scopes:
                models = [m for m in ("baseline", "finetuned") if m in st]
                out.append(
                    {
                        "condition": c,
                        "property": p,
                        "tier": tier,
                        "mean": {m: _stat(st[m]) for m in models},
                        "exhibits": {m: _stat(st[m]["exhibits_rate"]) for m in models},
                        "delta": _stat(st["delta"]) if "delta" in st else None,
                        "invalid": sum(st[m]["invalid"] for m in models),
                        "errors": sum(st[m]["errors"] for m in models),
                    }
                )
    return out


def _pulls(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`pull <tier>`: the log-likelihood pull per tier, when the spec has `logprob:`."""
    from spar.stages.logprob_report import headline as pull_headline

    return {k: _stat(v) for k, v in pull_headline(summary).items()}


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
    row = {
        "experiment": experiment,
        "status": status,
        "reasons": planned.reasons if planned.status != "fresh" else [],
        "params": params,
        "effects": {**headline(summary), **_pulls(summary)} if summary else {},
        "invalid": summary["invalid"] if summary else None,
        "errors": summary.get("errors", 0) if summary else None,
    }
    if summary and summary.get("reliability"):  # judge.also / self_agreement (spar.reliability)
        row["reliability"] = summary["reliability"]
    return _with_properties(row, summary)


def _with_properties(row: dict[str, Any], summary: dict[str, Any] | None) -> dict[str, Any]:
    """`row` with `properties` (`property_rows`) when its summary has judge.properties."""
    props = property_rows(summary) if summary else []
    return {**row, "properties": props} if props else row


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
        row = {
            "experiment": f"{name} ({seeds} seeds)",
            "status": "fresh",
            "reasons": [],
            "params": row_params,
            "effects": headline(group),
            "invalid": group.get("invalid"),
            "errors": group.get("errors"),
        }
        rows.append(_with_properties(row, group))
    return rows


def _cell(e: dict[str, Any], signed: bool = True) -> str:
    if e.get("mean") is None:
        return "—"
    f = "+.2f" if signed else ".2f"
    if e.get("ci_low") is None:
        text = f"{e['mean']:{f}} [no interval]"
    else:
        text = f"{e['mean']:{f}} [{e['ci_low']:{f}}, {e['ci_high']:{f}}]"
    if e.get("p_holm") is not None:
        text += f" p_holm {e['p_holm']:.2g}"
    return text + (FEW if e.get("few_questions") else "")


def _mean(e: dict[str, Any] | None) -> str:
    return "—" if not e or e.get("mean") is None else f"{e['mean']:.2f}"


def _rate(e: dict[str, Any] | None) -> str:
    return "—" if not e or e.get("mean") is None else f"{100 * e['mean']:.0f} %"


def property_line(r: dict[str, Any]) -> str:
    """`warm: base 1.80 -> ft 3.10 (+1.30 [+0.90, +1.70]); exhibits 20 % -> 70 %` (a tier's
    line is indented and named by its tier; pairwise: the fine-tuned numbers only)."""
    m, x = r["mean"], r["exhibits"]
    if "baseline" in m:
        text = f"base {_mean(m['baseline'])} -> ft {_mean(m.get('finetuned'))}"
        rates = f"exhibits {_rate(x['baseline'])} -> {_rate(x.get('finetuned'))}"
    else:
        text = f"ft {_mean(m.get('finetuned'))}"
        rates = f"exhibits {_rate(x.get('finetuned'))}"
    if r["delta"] is not None:
        text += f" ({_cell(r['delta'])})"
    counts = (
        f"; {r['invalid']} invalid, {r['errors']} errors" if r["invalid"] or r["errors"] else ""
    )
    name = r["property"] if r["tier"] is None else f"  {r['tier']}"
    return f"  {name}: {text}; {rates}{counts}"


def property_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Below the table: each experiment's properties, per condition, then per tier."""
    lines: list[str] = []
    for row in rows:
        last = None
        for r in row.get("properties", []):
            if r["condition"] != last:
                last = r["condition"]
                where = f", condition {last}" if last else ""
                lines.append(f"{row['experiment']}{where}: properties (all tiers, then per tier)")
            lines.append(property_line(r))
    return lines


def format_table(rows: list[dict[str, Any]]) -> str:
    params = list(rows[0]["params"]) if rows else []
    tiers = list(dict.fromkeys(t for r in rows for t in r["effects"]))
    header = [
        "experiment",
        "status",
        *params,
        *(
            t if t.startswith(("rate ", "gap ", "property ", "pull ")) else f"effect {t}"
            for t in tiers
        ),
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
    if any(
        (e or {}).get("few_questions")
        for r in rows
        for e in [*r["effects"].values(), *(x["delta"] for x in r.get("properties", []))]
    ):
        notes.append(
            f"{FEW} fewer than 10 questions: the interval is wide because the tier has few "
            "questions (p_holm: Holm-adjusted over every per-tier delta)"
        )
    from spar.reliability import show_line  # judge.also / self_agreement

    props = property_lines(rows) + [
        f"{r['experiment']}: reliability: {line}"
        for r in rows
        if (line := show_line(r.get("reliability")))
    ]
    props = ["", *props] if props else []
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:], *props, *notes])
