"""Run exactly the stages that are not fresh, in dependency order; restore from the run cache
what ran before; record what produced what."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from spar.plan import (
    PlannedStage,
    bypasses_cache,
    evaluate,
    upstream_key,
    upstream_output_changed,
)
from spar.stages.base import Flags, RunContext
from spar.store import ParamsRecord, RunStore, now_iso

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    ran: list[PlannedStage] = field(default_factory=list)
    restored: list[PlannedStage] = field(default_factory=list)
    incomplete: dict[str, int] = field(default_factory=dict)  # "exp/stage" -> items in error


def _upstream_record(
    planned: PlannedStage, current: dict[tuple[str, str], dict[str, ParamsRecord]]
) -> dict[str, dict[str, str]]:
    """Per upstream role: its fingerprint and the content hash of each of its outputs."""
    out: dict[str, dict[str, str]] = {}
    for role, ref in planned.node.upstream.items():
        rec = {"fingerprint": planned.upstream_fps[role]}
        for name, p in sorted(current.get(upstream_key(planned.node.experiment, ref), {}).items()):
            rec[name] = p.output_hash
        out[role] = rec
    return out


def run_stage(
    store: RunStore,
    planned: PlannedStage,
    current: dict[tuple[str, str], dict[str, ParamsRecord]],
    flags: Flags,
) -> tuple[dict[str, ParamsRecord], int]:
    node = planned.node
    upstream = {
        role: store.stage_dir(*upstream_key(node.experiment, ref))
        for role, ref in node.upstream.items()
    }
    ctx = RunContext(
        params=node.params,
        options=node.options,
        inputs={k: v.path for k, v in planned.node.inputs.items()},
        upstream=upstream,
        upstream_fps=planned.upstream_fps,
        fingerprint=planned.fingerprint,
        store=store,
        kind=node.kind,
        name=node.name,
        flags=flags,
    )
    started = now_iso()
    result = node.kind.run(ctx)
    missing = set(node.outputs) - result.outputs.keys()
    if missing:
        raise RuntimeError(f"stage {node.name} did not produce {sorted(missing)}")
    up_complete = all(
        all(r.complete for r in current.get(upstream_key(node.experiment, ref), {}).values())
        for ref in node.upstream.values()
    )
    record = {
        "stage": node.name,
        "kind": node.kind.kind,
        "stage_version": node.kind.version,
        "experiment": node.experiment,
        "fingerprint": planned.fingerprint,
        "params": node.params.dump(),
        "inputs": planned.input_hashes,
        "upstream": _upstream_record(planned, current),
        "complete": result.errors == 0 and up_complete,
        "details": result.details,
        "started": started,
    }
    records = {
        name: store.write_output(planned.output_dir / name, result.outputs[name], record)
        for name in node.outputs
    }
    return records, result.errors


def apply_plan(store: RunStore, plan: list[PlannedStage], flags: Flags | None = None) -> Outcome:
    """Run (or restore) every stage of `plan` that is not fresh now. A stage is evaluated again
    right before its turn, so what an upstream stage just rewrote is seen."""
    flags = flags or Flags()
    outcome = Outcome()
    current: dict[tuple[str, str], dict[str, ParamsRecord]] = {}
    for p in plan:
        status, reasons = evaluate(p, store, current, flags)
        if status == "fresh":
            current[p.key] = p.records
            continue
        manifest = None if bypasses_cache(p.node, flags) else store.cache.lookup(p.fingerprint)
        if manifest is not None and all(
            r.complete and upstream_output_changed(r, p.node, current) is None
            for r in manifest.records.values()
        ):
            restored = store.restore(manifest, p.node.experiment, p.node.name)
            if restored is not None:
                log.info("restored %s / %s from the run cache", *p.key)
                current[p.key] = restored
                outcome.restored.append(p)
                continue
        log.info("running %s / %s (%s)", p.node.experiment, p.node.name, "; ".join(reasons))
        records, errors = run_stage(store, p, current, flags)
        current[p.key] = records
        outcome.ran.append(p)
        if errors:
            outcome.incomplete[f"{p.node.experiment}/{p.node.name}"] = errors
        if all(r.complete for r in records.values()):
            store.cache.save(p.fingerprint, {n: p.output_dir / n for n in records}, records)
    return outcome
