"""Spec -> stage graph; fingerprints; fresh / stale / missing with reasons.

fingerprint(stage) = hash(stage kind, stage version, canonical JSON of exactly the parameters
that change its result, content hashes of its input files, upstream fingerprints).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from spar.errors import InputError
from spar.spec import Spec
from spar.stages.base import StageNode, pick
from spar.stages.dataset import DatasetStage
from spar.stages.judge import JudgeStage
from spar.stages.plot import PlotStage
from spar.stages.report import ReportStage
from spar.stages.sample import SampleStage
from spar.stages.train import TrainStage
from spar.store import RunStore, hash_json, read_params

Status = Literal["fresh", "stale", "missing"]

# Spec keys that never enter a fingerprint (labels, styling, concurrency, paths whose *content*
# is hashed instead). Every other leaf of a spec is a parameter of some stage; a test pins this.
COSMETIC_KEYS: tuple[str, ...] = (
    "name",
    "description",
    "framing",
    "data.docs",
    "eval.questions",
    "eval.concurrency",
    "judge.rubric",
    "judge.concurrency",
    "judge.batch",
    "training.save_every",
    "report.compare",  # the compared experiments enter as upstream fingerprints instead
    "judge.max_calls",  # a budget check before apply, not a parameter of any result
)

DATASET, TRAIN, SAMPLE, JUDGE, REPORT, PLOT = (
    DatasetStage(),
    TrainStage(),
    SampleStage(),
    JudgeStage(),
    ReportStage(),
    PlotStage(),
)


def build_graph(spec: Spec, compare: tuple[str, ...] = ()) -> list[StageNode]:
    """The pipeline of one spec, in dependency order. `compare`: names of the experiments whose
    report the plot stage overlays (their graphs must come earlier in the plan)."""

    def node(name: str, kind: Any, upstream: tuple[str, ...] = (), **inputs: Path) -> StageNode:
        return StageNode(
            name=name,
            kind=kind,
            experiment=spec.name,
            params=pick(spec, *kind.param_keys),
            inputs={k.replace("__", "."): v for k, v in inputs.items()},
            upstream=upstream,
            spec=spec,
        )

    return [
        node("dataset", DATASET, data__docs=spec.data.docs),
        node("train", TRAIN, ("dataset",)),
        node("sample_base", SAMPLE),
        node("sample_finetuned", SAMPLE, ("train",)),
        node("judge", JUDGE, ("sample_base", "sample_finetuned"), judge__rubric=spec.judge.rubric),
        node("report", REPORT, ("judge",)),
        node(
            "plot",
            PLOT,
            (
                "report",
                "judge",
                "sample_base",
                "sample_finetuned",
                *(f"{c}/report" for c in compare),
            ),
        ),
    ]


def upstream_key(experiment: str, upstream: str) -> tuple[str, str]:
    """`stage` is a stage of the same experiment; `other/stage` one of another experiment."""
    exp, _, stage = upstream.rpartition("/")
    return (exp or experiment, stage)


@dataclass
class PlannedStage:
    node: StageNode
    fingerprint: str
    status: Status
    reasons: list[str]
    input_hashes: dict[str, str]
    upstream_fps: dict[str, str]
    output_dir: Path
    estimate: dict[str, int] | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "experiment": self.node.experiment,
            "stage": self.node.name,
            "status": self.status,
            "reasons": self.reasons,
            "estimate": self.estimate,
        }


def fingerprint(node: StageNode, input_hashes: dict[str, str], upstream_fps: dict[str, str]) -> str:
    return hash_json(
        {
            "kind": node.kind.kind,
            "version": node.kind.version,
            "params": node.params,
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


def diff_reasons(
    node: StageNode,
    old_params: dict[str, Any],
    old_inputs: dict[str, str],
    old_upstream: dict[str, str],
    old_version: int,
    input_hashes: dict[str, str],
    upstream_fps: dict[str, str],
) -> list[str]:
    reasons: list[str] = []
    if old_version != node.kind.version:
        reasons.append(f"stage version {old_version} -> {node.kind.version}")
    old, new = flatten(old_params), flatten(node.params)
    for key in sorted(old.keys() | new.keys()):
        if old.get(key, "<unset>") != new.get(key, "<unset>"):
            reasons.append(
                f"{key}: {_show(old.get(key, '<unset>'))} -> {_show(new.get(key, '<unset>'))}"
            )
    for key in sorted(old_inputs.keys() | input_hashes.keys()):
        if old_inputs.get(key) != input_hashes.get(key):
            reasons.append(f"{key} content changed")
    for name in node.upstream:
        if old_upstream.get(name) != upstream_fps.get(name):
            reasons.append(f"upstream {name} changed")
    return reasons or ["fingerprint changed"]


def plan_nodes(nodes: list[StageNode], store: RunStore) -> list[PlannedStage]:
    """Status of every node. Nodes must be in dependency order within each experiment."""
    planned: list[PlannedStage] = []
    fps: dict[tuple[str, str], str] = {}
    status_of: dict[tuple[str, str], Status] = {}
    for node in nodes:
        input_hashes: dict[str, str] = {}
        for key, path in node.inputs.items():
            check = node.kind.line_check(node, key)
            if check is None:
                input_hashes[key] = store.hashes.hash_file(path)
            else:
                input_hashes[key] = store.hashes.hash_file(path, check[1], check[0])
        upstream_fps = {u: fps[upstream_key(node.experiment, u)] for u in node.upstream}
        fp = fingerprint(node, input_hashes, upstream_fps)
        fps[(node.experiment, node.name)] = fp
        out_dir = store.stage_dir(node.experiment, node.name)
        status, reasons = _status(node, fp, out_dir, store, input_hashes, upstream_fps)
        status_of[(node.experiment, node.name)] = status
        estimate = None
        if status != "fresh":
            up_fresh = all(
                status_of[upstream_key(node.experiment, u)] == "fresh" for u in node.upstream
            )
            estimate = node.kind.estimate(node, store, up_fresh) or None
        planned.append(
            PlannedStage(node, fp, status, reasons, input_hashes, upstream_fps, out_dir, estimate)
        )
    return planned


def _status(
    node: StageNode,
    fp: str,
    out_dir: Path,
    store: RunStore,
    input_hashes: dict[str, str],
    upstream_fps: dict[str, str],
) -> tuple[Status, list[str]]:
    records = [(name, read_params(out_dir / name)) for name in node.outputs]
    missing = [name for name, rec in records if rec is None or not (out_dir / name).exists()]
    if missing:
        return "missing", [f"output missing: {', '.join(missing)}"]
    for name, rec in records:
        assert rec is not None
        if rec.fingerprint != fp:
            return "stale", diff_reasons(
                node,
                rec.params,
                {k: v for k, v in rec.inputs.items()},
                {k: v["fingerprint"] for k, v in rec.upstream.items()},
                rec.stage_version,
                input_hashes,
                upstream_fps,
            )
        if store.output_hash(out_dir / name) != rec.output_hash:
            return "stale", [f"output {name} changed on disk"]
    return "fresh", []


def with_compared(specs: list[Spec]) -> tuple[list[Spec], dict[str, tuple[str, ...]]]:
    """The specs given plus every spec their `report.compare` lists (each loaded once), and for
    each experiment the names of the experiments it compares itself with."""
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
        s.name: tuple(n for n in dict.fromkeys(names[p] for p in s.report.compare) if n != s.name)
        for s in out.values()
    }
    return list(out.values()), compared


def plan_specs(specs: list[Spec], store: RunStore) -> list[PlannedStage]:
    every, compared = with_compared(specs)
    graphs = [build_graph(s, compared[s.name]) for s in every]
    # every report before any plot: a plot stage may read another experiment's report
    nodes = [n for g in graphs for n in g if n.name != "plot"]
    nodes += [n for g in graphs for n in g if n.name == "plot"]
    return plan_nodes(nodes, store)


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
        spec_limit = p.node.spec.judge.max_calls if p.node.spec is not None else None
        for label, limit in (
            (f"--max-judge-calls {max_judge_calls}", max_judge_calls),
            (f"{p.node.experiment}: judge.max_calls {spec_limit}", spec_limit),
        ):
            if limit is not None and calls > limit:
                raise InputError(
                    f"{label}: {p.node.experiment}/{p.node.name} would make {calls} judge calls"
                )


__all__ = ["COSMETIC_KEYS", "PlannedStage", "build_graph", "plan_nodes", "plan_specs"]
