"""Run exactly the stages that are not fresh, in dependency order; restore from the run cache
what ran before; record what produced what."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from spar.errors import RunError
from spar.models import warm_imports
from spar.plan import (
    PlannedStage,
    bypasses_cache,
    evaluate,
    upstream_key,
    upstream_output_changed,
)
from spar.progress import labelled
from spar.stages.base import Flags, RunContext, Stopped
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
    stop: threading.Event | None = None,
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
        stop=stop or threading.Event(),
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


def _dependencies(plan: list[PlannedStage]) -> dict[tuple[str, str], set[tuple[str, str]]]:
    """What each stage waits for: its upstream stages in the plan, and an earlier stage with the
    same fingerprint (it runs once; this one is then restored from the run cache)."""
    keys = {p.key for p in plan}
    first: dict[str, tuple[str, str]] = {}
    deps: dict[tuple[str, str], set[tuple[str, str]]] = {}
    for p in plan:
        up = {upstream_key(p.node.experiment, ref) for ref in p.node.upstream.values()}
        deps[p.key] = up & keys
        twin = first.setdefault(p.fingerprint, p.key)
        if twin != p.key:
            deps[p.key].add(twin)
    return deps


@dataclass
class _Failure:
    stage: PlannedStage
    error: BaseException


class StagesFailed(RunError):
    """More than one stage of an apply failed: every one is named. Stages that failed for the
    same reason (an unreachable service) share one line."""

    def __init__(self, failures: list[_Failure]) -> None:
        self.failures = failures
        by_reason: dict[str, list[str]] = {}
        for f in failures:
            reason = str(f.error).splitlines()[0] if str(f.error) else type(f.error).__name__
            by_reason.setdefault(reason, []).append(
                f"{f.stage.node.experiment} / {f.stage.node.name}"
            )
        lines = [f"{', '.join(stages)}: {reason}" for reason, stages in by_reason.items()]
        if len(lines) == 1:
            super().__init__(f"{len(failures)} stages failed: {lines[0]}")
        else:
            super().__init__(f"{len(failures)} stages failed:\n  " + "\n  ".join(lines))


class _Scheduler:
    """Runs the stages of a plan as their upstream stages finish, at most `jobs` at once and one
    at a time per local device (`StageKind.devices`)."""

    def __init__(self, store: RunStore, plan: list[PlannedStage], flags: Flags, jobs: int) -> None:
        self.store, self.plan, self.flags, self.jobs = store, plan, flags, max(1, jobs)
        self.deps = _dependencies(plan)
        self.outcome = Outcome()
        self.current: dict[tuple[str, str], dict[str, ParamsRecord]] = {}
        self.done: set[tuple[str, str]] = set()
        self.busy: set[str] = set()  # devices a running stage computes on
        self.stop = threading.Event()
        self.failures: list[_Failure] = []
        self.lock = threading.Lock()
        self.experiments = len({p.node.experiment for p in plan})

    def settle(self, p: PlannedStage) -> bool:
        """Fresh or restored now (True), or it must run (False)."""
        status, reasons = evaluate(p, self.store, self.current, self.flags)
        if status == "fresh":
            self.current[p.key] = p.records
            return True
        manifest = (
            None if bypasses_cache(p.node, self.flags) else (self.store.cache.lookup(p.fingerprint))
        )
        if manifest is not None and all(
            r.complete and upstream_output_changed(r, p.node, self.current) is None
            for r in manifest.records.values()
        ):
            restored = self.store.restore(manifest, p.node.experiment, p.node.name)
            if restored is not None:
                log.info("restored %s / %s from the run cache", *p.key)
                self.store.stage_event("restored", *p.key, fingerprint=p.fingerprint)
                self.current[p.key] = restored
                self.outcome.restored.append(p)
                return True
        p.reasons = reasons
        return False

    def run(self, p: PlannedStage) -> None:
        log.info("running %s / %s (%s)", p.node.experiment, p.node.name, "; ".join(p.reasons))
        self.store.stage_event("started", *p.key, fingerprint=p.fingerprint)
        try:
            records, errors = run_stage(self.store, p, self.current, self.flags, self.stop)
        except Stopped:
            self.store.stage_event("stopped", *p.key, fingerprint=p.fingerprint)
            raise
        except BaseException as e:
            self.store.stage_event("failed", *p.key, fingerprint=p.fingerprint, error=str(e))
            raise
        with self.lock:
            self.current[p.key] = records
            self.outcome.ran.append(p)
            if errors:
                self.outcome.incomplete[f"{p.node.experiment}/{p.node.name}"] = errors
        if all(r.complete for r in records.values()):
            self.store.cache.save(p.fingerprint, {n: p.output_dir / n for n in records}, records)
        self.store.stage_event("finished", *p.key, fingerprint=p.fingerprint, errors=errors)

    def run_labelled(self, p: PlannedStage) -> None:
        """`run` in a stage thread: with several experiments in the plan, its progress bars
        name the experiment (a sweep's points run side by side)."""
        with labelled(p.node.experiment if self.experiments > 1 else ""):
            self.run(p)

    def serial(self) -> None:
        """One stage at a time in plan order, in this thread (as with `--jobs 1`)."""
        for p in self.plan:
            if not self.settle(p):
                self.run(p)

    def concurrent(self) -> None:
        pending = list(self.plan)  # in plan order: the first ready stage starts first
        must_run: set[tuple[str, str]] = set()
        running: dict[Future[None], tuple[PlannedStage, frozenset[str]]] = {}
        pool = ThreadPoolExecutor(max_workers=self.jobs, thread_name_prefix="spar-stage")
        warm = False
        try:
            while pending or running:
                progressed = True
                while progressed and not self.stop.is_set():
                    progressed = False
                    for p in list(pending):
                        if len(running) >= self.jobs:
                            break
                        if not self.deps[p.key] <= self.done:
                            continue
                        if p.key not in must_run:
                            if self.settle(p):
                                pending.remove(p)
                                self.done.add(p.key)
                                progressed = True
                                continue
                            must_run.add(p.key)
                        devices = p.node.kind.devices(p.node)
                        if devices & self.busy:
                            continue
                        pending.remove(p)
                        if not warm:
                            warm_imports()  # before two stages first import transformers at once
                            warm = True
                        self.busy |= devices
                        running[pool.submit(self.run_labelled, p)] = (p, devices)
                if not running:
                    break  # stopping, or (cannot happen in a topological plan) nothing is ready
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    p, devices = running.pop(fut)
                    self.busy -= devices
                    try:
                        fut.result()
                        self.done.add(p.key)
                    except Stopped:
                        pass  # left off for another stage's failure (in the stage log)
                    except Exception as e:  # every failed stage is reported
                        self.failures.append(_Failure(p, e))
                        self.stop.set()
        except BaseException:  # KeyboardInterrupt: running stages stop at their next item
            self.stop.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def apply_plan(
    store: RunStore, plan: list[PlannedStage], flags: Flags | None = None, jobs: int = 1
) -> Outcome:
    """Run (or restore) every stage of `plan` that is not fresh now. A stage is evaluated again
    right before it starts, so what an upstream stage just rewrote is seen.

    `jobs` > 1: every stage whose upstream stages are done starts, at most `jobs` at once and one
    at a time per local device (a stage's `devices`); stages on remote services run side by
    side. A failure starts no new stage and stops the running ones at their next item (what
    they finished is journaled); every failed stage is reported (`StagesFailed` when several)."""
    for p in plan:  # a killed apply's half-written files (the caller holds the lock)
        if store.remove_stale_temps(*p.key):
            log.info("removed a killed apply's temp files from %s / %s", *p.key)
    sched = _Scheduler(store, plan, flags or Flags(), jobs)
    if sched.jobs == 1:
        sched.serial()
    else:
        sched.concurrent()
        if len(sched.failures) == 1:
            raise sched.failures[0].error
        if sched.failures:
            for f in sched.failures[1:]:  # --debug shows every stage's traceback, not one
                log.debug(
                    "%s / %s failed", f.stage.node.experiment, f.stage.node.name, exc_info=f.error
                )
            raise StagesFailed(sched.failures) from sched.failures[0].error
    order = {p.key: i for i, p in enumerate(plan)}
    sched.outcome.ran.sort(key=lambda p: order[p.key])
    sched.outcome.restored.sort(key=lambda p: order[p.key])
    return sched.outcome
