"""Run exactly the stages that are not fresh, in dependency order, and record what produced what."""

from __future__ import annotations

import logging

from spar.plan import PlannedStage, upstream_key
from spar.stages.base import RunContext
from spar.store import RunStore, now_iso, read_params_file

log = logging.getLogger(__name__)


def _upstream_record(store: RunStore, planned: PlannedStage, name: str) -> dict[str, str]:
    """The upstream stage's fingerprint and the content hash of each of its outputs."""
    rec: dict[str, str] = {"fingerprint": planned.upstream_fps[name]}
    up_dir = store.stage_dir(*upstream_key(planned.node.experiment, name))
    for params_file in sorted(up_dir.glob("*.params.yaml")):
        params = read_params_file(params_file)
        if params is not None:
            rec[params.output] = params.output_hash
    return rec


def run_stage(store: RunStore, planned: PlannedStage) -> None:
    node = planned.node
    ctx = RunContext(
        node=node,
        store=store,
        fingerprint=planned.fingerprint,
        upstream_dirs={
            u: store.stage_dir(*upstream_key(node.experiment, u)) for u in node.upstream
        },
    )
    started = now_iso()
    outputs = node.kind.run(ctx)
    missing = set(node.outputs) - outputs.keys()
    if missing:
        raise RuntimeError(f"stage {node.name} did not produce {sorted(missing)}")
    record = {
        "stage": node.name,
        "kind": node.kind.kind,
        "stage_version": node.kind.version,
        "experiment": node.experiment,
        "fingerprint": planned.fingerprint,
        "params": node.params,
        "inputs": planned.input_hashes,
        "upstream": {u: _upstream_record(store, planned, u) for u in node.upstream},
        "started": started,
    }
    for name in node.outputs:
        store.write_output(planned.output_dir / name, outputs[name], record)


def apply_plan(store: RunStore, plan: list[PlannedStage]) -> list[PlannedStage]:
    """Run every stage of `plan` that is not fresh; return those that ran."""
    ran: list[PlannedStage] = []
    for p in plan:
        if p.status == "fresh":
            continue
        log.info("running %s / %s (%s)", p.node.experiment, p.node.name, "; ".join(p.reasons))
        run_stage(store, p)
        ran.append(p)
    return ran
