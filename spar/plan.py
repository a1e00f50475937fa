"""Spec -> stage graph (from the registered stage kinds); fingerprints; fresh / stale / missing.

fingerprint(stage) = hash(stage kind, stage version, canonical JSON of the stage's params model,
content hashes of its input files, upstream fingerprints). A stage that is not fresh is restored
from the run cache when a stage with its fingerprint ran before (here or in any experiment).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from spar.errors import InputError
from spar.spec import Spec
from spar.stages import stage_kinds
from spar.stages.base import Flags, GraphContext, StageNode, upstream_key
from spar.stages.plot import label
from spar.store import ParamsRecord, RunStore, hash_json, read_params

Status = Literal["fresh", "stale", "missing"]
Action = Literal["none", "run", "restore"]


def build_graph(
    spec: Spec, store: RunStore, compared: tuple[tuple[str, str], ...] = ()
) -> list[StageNode[Any, Any]]:
    """The pipeline of one spec, in dependency order: every registered stage kind's nodes.
    `compared`: (name, label) of the experiments whose report the plot stage overlays."""
    g = GraphContext(store=store, compared=compared)
    nodes: list[StageNode[Any, Any]] = []
    for kind in stage_kinds():
        nodes += kind.nodes(spec, g)
    return nodes


@dataclass
class PlannedStage:
    node: StageNode[Any, Any]
    fingerprint: str
    status: Status
    reasons: list[str]
    input_hashes: dict[str, str]
    upstream_fps: dict[str, str]  # role -> fingerprint
    output_dir: Path
    action: Action = "none"
    estimate: dict[str, int] | None = None
    records: dict[str, ParamsRecord] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        return (self.node.experiment, self.node.name)

    def as_json(self) -> dict[str, Any]:
        return {
            "experiment": self.node.experiment,
            "stage": self.node.name,
            "status": self.status,
            "reasons": self.reasons,
            "action": self.action,
            "estimate": self.estimate,
        }


def fingerprint(
    node: StageNode[Any, Any], input_hashes: dict[str, str], upstream_fps: dict[str, str]
) -> str:
    return hash_json(
        {
            "kind": node.kind.kind,
            "version": node.kind.version,
            "params": node.params.dump(),
            "inputs": input_hashes,
            "upstream": upstream_fps,
        }
    )


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> dotted keys (`training.learning_rate`); lists stay whole."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _show(v: Any) -> str:
    s = repr(v) if isinstance(v, str) else str(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _list_change(key: str, old: list[Any], new: list[Any]) -> str:
    """A list parameter's change in words (questions: which tiers gained or lost questions)."""
    if all(isinstance(x, dict) and "tier" in x for x in [*old, *new]):
        olds = {hash_json(x) for x in old}
        news = {hash_json(x) for x in new}
        tiers: dict[str, list[int]] = {}
        for x in old:
            if hash_json(x) not in news:
                tiers.setdefault(x["tier"], [0, 0])[1] += 1
        for x in new:
            if hash_json(x) not in olds:
                tiers.setdefault(x["tier"], [0, 0])[0] += 1
        parts = [f"{t}: {a} added, {r} removed" for t, (a, r) in tiers.items()]
        return f"{key}: {', '.join(parts) or 'reordered'}"
    return f"{key}: {_show(old)} -> {_show(new)}"


def diff_reasons(
    planned: PlannedStage, rec: ParamsRecord, upstream_fps: dict[str, str]
) -> list[str]:
    node = planned.node
    reasons: list[str] = []
    if rec.stage_version != node.kind.version:
        reasons.append(f"stage version {rec.stage_version} -> {node.kind.version}")
    old, new = flatten(rec.params), flatten(node.params.dump())
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if a != b:
            if isinstance(a, list) and isinstance(b, list):
                reasons.append(_list_change(key, a, b))
            else:
                reasons.append(f"{key}: {_show(a)} -> {_show(b)}")
    for key in sorted(rec.inputs.keys() | planned.input_hashes.keys()):
        if rec.inputs.get(key) != planned.input_hashes.get(key):
            reasons.append(f"{key} content changed")
    for role in node.upstream:
        if rec.upstream.get(role, {}).get("fingerprint") != upstream_fps.get(role):
            reasons.append(f"upstream {node.upstream[role]} changed")
    return reasons or ["fingerprint changed"]


def upstream_output_changed(
    rec: ParamsRecord,
    node: StageNode[Any, Any],
    current: dict[tuple[str, str], dict[str, ParamsRecord]],
) -> str | None:
    """Why `rec` was not made from the upstream outputs as they are now, or None if it was. (An
    upstream stage may rewrite its outputs under the same fingerprint: retried errors,
    `--retry-invalid`.)"""
    for role, ref in node.upstream.items():
        seen = rec.upstream.get(role, {})
        for name, up in current.get(upstream_key(node.experiment, ref), {}).items():
            if seen.get(name) != up.output_hash:
                return f"upstream {ref} output {name} changed"
    return None


def bypasses_cache(node: StageNode[Any, Any], flags: Flags | None) -> bool:
    """`--retry-invalid` runs judge stages even where the run cache has their fingerprint."""
    return flags is not None and flags.retry_invalid and node.kind.kind == "judge"


def evaluate(
    planned: PlannedStage,
    store: RunStore,
    current: dict[tuple[str, str], dict[str, ParamsRecord]],
    flags: Flags | None = None,
) -> tuple[Status, list[str]]:
    """Fresh, stale or missing, and why — from the outputs and params files on disk now.
    `current`: the params records of stages already evaluated (for upstream output checks)."""
    node, out_dir = planned.node, planned.output_dir
    records = {name: read_params(out_dir / name) for name in node.outputs}
    missing = [n for n, rec in records.items() if rec is None or not (out_dir / n).exists()]
    if missing:
        return "missing", [f"output missing: {', '.join(missing)}"]
    recs = {n: r for n, r in records.items() if r is not None}
    planned.records = recs
    for name, rec in recs.items():
        if rec.fingerprint != planned.fingerprint:
            return "stale", diff_reasons(planned, rec, planned.upstream_fps)
        if store.output_hash(out_dir / name) != rec.output_hash:
            return "stale", [f"output {name} changed on disk"]
    first = next(iter(recs.values()))
    if not first.complete:
        errors = first.details.get("error", 0)
        why = f"{errors} items ended in error" if errors else "an upstream stage was incomplete"
        return "stale", [f"incomplete: {why}; apply runs it again"]
    changed = upstream_output_changed(first, node, current)
    if changed is not None:
        return "stale", [changed]
    if flags is not None and flags.retry_invalid and first.details.get("invalid", 0):
        return "stale", [f"--retry-invalid: {first.details['invalid']} invalid verdicts"]
    return "fresh", []


def plan_nodes(
    nodes: list[StageNode[Any, Any]], store: RunStore, flags: Flags | None = None
) -> list[PlannedStage]:
    """Status of every node (in dependency order). Validates each stage's inputs first."""
    planned: list[PlannedStage] = []
    by_key: dict[tuple[str, str], PlannedStage] = {}
    current: dict[tuple[str, str], dict[str, ParamsRecord]] = {}
    will_run: set[str] = set()
    for node in nodes:
        input_hashes: dict[str, str] = {}
        counts: dict[str, int] = {}
        for key, inp in node.inputs.items():
            if inp.files is not None:
                input_hashes[key] = store.hashes.hash_dir(inp.path, list(inp.files))
            elif inp.check is not None:
                input_hashes[key], counts[key] = store.hashes.hash_checked(
                    inp.path, inp.check[1], inp.check[0]
                )
            else:
                input_hashes[key] = store.hashes.hash_file(inp.path)
        node.kind.check(node, counts)
        upstream_fps = {
            r: by_key[upstream_key(node.experiment, u)].fingerprint
            for r, u in node.upstream.items()
        }
        fp = fingerprint(node, input_hashes, upstream_fps)
        key = (node.experiment, node.name)
        out_dir = store.stage_dir(node.experiment, node.name)
        p = PlannedStage(node, fp, "missing", [], input_hashes, upstream_fps, out_dir)
        p.status, p.reasons = evaluate(p, store, current, flags)
        current[key] = p.records if p.status == "fresh" else {}
        if p.status != "fresh":
            cached = not bypasses_cache(node, flags) and (
                fp in will_run or store.cache.lookup(fp) is not None
            )
            p.action = "restore" if cached else "run"
            if p.action == "run":
                will_run.add(fp)
                up_fresh = all(
                    by_key[upstream_key(node.experiment, u)].status == "fresh"
                    for u in node.upstream.values()
                )
                p.estimate = node.kind.estimate(node, store, up_fresh, flags) or None
        by_key[key] = p
        planned.append(p)
    return planned


def with_compared(
    specs: list[Spec],
) -> tuple[list[Spec], dict[str, tuple[tuple[str, str], ...]]]:
    """The specs given plus every spec their `report.compare` lists (each loaded once), and for
    each experiment the (name, label) of the experiments it compares itself with."""
    from spar.spec import load_spec

    out: dict[str, Spec] = {}
    for spec in specs:
        if spec.name in out:
            raise InputError(f"{spec.name}: name: two specs given share this name")
        out[spec.name] = spec
    names: dict[Path, str] = {}
    queue = list(specs)
    while queue:
        spec = queue.pop(0)
        for path in spec.report.compare:
            if path not in names:
                other = load_spec(path)
                names[path] = other.name
                if other.name not in out:
                    out[other.name] = other
                    queue.append(other)
    compared = {
        s.name: tuple(
            (n, label(n, out[n].framing))
            for n in dict.fromkeys(names[p] for p in s.report.compare)
            if n != s.name
        )
        for s in out.values()
    }
    return list(out.values()), compared


def _identity(node: StageNode[Any, Any], upstream: dict[str, str]) -> str:
    """What a node computes, independent of the experiment it belongs to."""
    return hash_json(
        {
            "kind": node.kind.kind,
            "name": node.name,
            "params": node.params.dump(),
            "inputs": {k: str(i.path) for k, i in node.inputs.items()},
            "upstream": upstream,
        }
    )


def sweep_graph(root: Spec, store: RunStore) -> list[StageNode[Any, Any]]:
    """The graph of a sweep: every point's pipeline, where a stage that is the same in every point
    (same kind, params, inputs and upstream: dataset, distill, base sampling and its verdicts when
    only training keys are swept) becomes ONE stage of the root experiment `<name>`, which the
    points' stages read as `<name>/<stage>`; then the per-sweep report."""
    from spar.spec import sweep_points
    from spar.stages.sweep_report import sweep_report_nodes

    if root.report.compare:
        raise InputError(f"{root.name}: report.compare: not available in a sweep spec")
    points = sweep_points(root)
    graphs = [build_graph(spec, store) for _, spec in points]
    idents: list[dict[str, str]] = []
    for graph in graphs:
        ids: dict[str, str] = {}
        for node in graph:
            ids[node.name] = _identity(
                node,
                {r: ids[upstream_key(node.experiment, u)[1]] for r, u in node.upstream.items()},
            )
        idents.append(ids)
    shared = {
        name
        for name, ident in idents[0].items()
        if all(ids.get(name) == ident for ids in idents[1:])
    }
    nodes: list[StageNode[Any, Any]] = [
        replace(n, experiment=root.name) for n in graphs[0] if n.name in shared
    ]
    for graph in graphs:
        for n in graph:
            if n.name not in shared:
                up = {r: f"{root.name}/{u}" if u in shared else u for r, u in n.upstream.items()}
                nodes.append(replace(n, upstream=up))
    return nodes + sweep_report_nodes(root, points)


def topological(nodes: list[StageNode[Any, Any]]) -> list[StageNode[Any, Any]]:
    """Dependency order, otherwise the order given."""
    keys = {(n.experiment, n.name) for n in nodes}
    for n in nodes:
        for u in n.upstream.values():
            if upstream_key(n.experiment, u) not in keys:
                raise InputError(f"{n.experiment}/{n.name}: upstream stage {u!r} does not exist")
    done: set[tuple[str, str]] = set()
    out: list[StageNode[Any, Any]] = []
    todo = list(nodes)
    while todo:
        ready = [
            n
            for n in todo
            if all(upstream_key(n.experiment, u) in done for u in n.upstream.values())
        ]
        if not ready:
            stuck = ", ".join(f"{n.experiment}/{n.name}" for n in todo[:3])
            raise InputError(f"stage graph has a cycle: {stuck}")
        ready_ids = {id(n) for n in ready}
        out += ready
        done |= {(n.experiment, n.name) for n in ready}
        todo = [n for n in todo if id(n) not in ready_ids]
    return out


def plan_specs(
    specs: list[Spec], store: RunStore, flags: Flags | None = None
) -> list[PlannedStage]:
    every, compared = with_compared(specs)
    nodes: list[StageNode[Any, Any]] = []
    for s in every:
        if s.sweep is not None:
            nodes += sweep_graph(s, store)
        else:
            nodes += build_graph(s, store, compared[s.name])
    return plan_nodes(topological(nodes), store, flags)


def totals(plan: list[PlannedStage]) -> dict[str, dict[str, int]]:
    """Per experiment, the summed estimates of the stages that will run."""
    out: dict[str, dict[str, int]] = {}
    for p in plan:
        for key, value in (p.estimate or {}).items():
            exp = out.setdefault(p.node.experiment, {})
            exp[key] = exp.get(key, 0) + value
    return out


def check_budget(plan: list[PlannedStage], max_judge_calls: int | None) -> None:
    """Refuse (before any work) when more judge calls are due than a budget allows."""
    for p in plan:
        calls = (p.estimate or {}).get("judge_calls", 0)
        spec_limit = getattr(p.node.options, "max_calls", None)
        for label_, limit in (
            (f"--max-judge-calls {max_judge_calls}", max_judge_calls),
            (f"{p.node.experiment}: judge.max_calls {spec_limit}", spec_limit),
        ):
            if limit is not None and calls > limit:
                raise InputError(
                    f"{label_}: {p.node.experiment}/{p.node.name} would make {calls} judge calls"
                )


__all__ = ["PlannedStage", "build_graph", "evaluate", "plan_nodes", "plan_specs"]
