"""`spar export inspect`: an experiment's answers and verdicts as an Inspect AI eval log.

One log per experiment (each point of a sweep), written with `inspect_ai.log.write_eval_log`
(default `runs/<experiment>/export/<experiment>.eval`; `.json` with `--format json`), so
`inspect view` opens it next to Inspect's own logs. Read from the run directory only:
`report/scores.jsonl` (one row per verdict, or per unjudged answer: model, tier, condition,
status, score), the judge stages' `judged.jsonl` (the verdicts' reasoning) and the sample
stages' `samples.jsonl` (the answers). A report that does not match the spec as it is now is
refused (`spar show`'s rule: it must be fresh) — except one that is current but incomplete
(items in error, which the next apply retries): it is exported with its error verdicts.

The log:
- eval: task = experiment name, model = `<engine>/<base model>` (the model fine-tuned), model
  roles `baseline` and `finetuned` (its sampler weights), dataset = the questions file (or the
  inline `eval.tiers`, or the generate set), metadata.spar = judge, tiers, conditions, report
  fingerprint; config.epochs = samples per question.
- samples: one per answer, i.e. per (question, condition, model) with epoch = sample index + 1
  and id `<model>.<question id>[.<condition>]`. input = the prompt the model saw (system prompt,
  first user turn with the trigger placed, then any later user turns); messages = the whole
  conversation; output = the (last) answer; target = "". scores: one per judge (key: the judge
  model; with judge.properties, one per property, keyed by the property). A score's value is the
  verdict's score when its status is `ok`, else NaN, with `metadata.status` (`invalid`, `error`,
  `excluded`) and the reasoning as explanation; an answer no verdict is about (the baseline in
  pairwise mode) has no score. metadata: tier, condition, model, item_id, question_id,
  sample_index (and the properties).
- results: per score key, the mean of the ok scores per model (`mean_finetuned`,
  `mean_baseline`) — a mean over answers, not the report's mean over question means (that is in
  summary.json) — and in its metadata the verdict counts per status and model.
"""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from spar.errors import InputError
from spar.items import EvalItem, Question, stage_name
from spar.store import RunStore, read_jsonl

if TYPE_CHECKING:
    from inspect_ai.log import EvalLog, EvalSample

    from spar.plan import PlannedStage
    from spar.spec import Spec

Format = Literal["eval", "json"]
MODELS = ("finetuned", "baseline")  # the order of the results' metrics
INSTALL = "spar export inspect: install spar[inspect]"


class ScoreRow(BaseModel):
    """A row of report/scores.jsonl (spar.stages.report.score_rows)."""

    model_config = ConfigDict(extra="ignore")

    item_id: str
    condition: str
    tier: str
    question_id: str
    sample_index: int
    model: Literal["baseline", "finetuned"]
    status: str  # ok | invalid | error | unjudged | excluded
    score: float | None = None
    property: str | None = None
    excluded_by: list[str] | None = None


class SampleRow(BaseModel):
    """A row of a sample stage's samples.jsonl."""

    model_config = ConfigDict(extra="ignore")

    item_id: str
    tier: str
    question_id: str
    question: str
    condition: str = ""
    sample_index: int
    response: str
    stop_reason: str | None = None
    conversation: list[dict[str, str]] | None = None  # multi-turn: user turns and replies


class VerdictRow(BaseModel):
    """A row of a judge stage's judged.jsonl (only what the export shows)."""

    model_config = ConfigDict(extra="ignore")

    item_id: str
    model: str
    property: str | None = None
    reasoning: str | None = None


def require_inspect() -> None:
    try:
        import inspect_ai.log  # noqa: F401
    except ImportError:
        raise InputError(INSTALL) from None


@dataclass(frozen=True)
class Target:
    """An experiment to export: its spec (a sweep point's own) and its planned report."""

    spec: Spec
    report: PlannedStage


def targets(specs: list[Spec], planned: list[PlannedStage]) -> list[Target]:
    """Every experiment of `specs` (a sweep's points) with its report, which must be current:
    a missing, stale or not-run report is an InputError (nothing is written)."""
    from spar.spec import sweep_points

    reports = {p.node.experiment: p for p in planned if p.node.name == "report"}
    out: list[Target] = []
    for spec in specs:
        for point in [spec] if spec.sweep is None else [p for _, p in sweep_points(spec)]:
            report = reports[point.name]
            _check_current(point.name, report)
            out.append(Target(point, report))
    return out


def _check_current(experiment: str, report: PlannedStage) -> None:
    files = [report.output_dir / name for name in report.node.outputs]
    if report.status == "missing" or not all(f.is_file() for f in files):
        raise InputError(f"{experiment}: no report yet: run `spar apply` first")
    incomplete = all(r.startswith("incomplete:") for r in report.reasons)
    if report.status != "fresh" and not incomplete:
        raise InputError(
            f"{experiment}: the report is stale ({'; '.join(report.reasons)}): "
            "run `spar apply` first"
        )


def _rows(path: Path, model: type[BaseModel]) -> list[Any]:
    try:
        rows = read_jsonl(path)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found (run `spar apply`)") from None
    except ValueError as e:
        raise InputError(f"{path}: invalid JSON ({e})") from None
    out = []
    for line, row in enumerate(rows, 1):
        try:
            out.append(model.model_validate(row))
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            raise InputError(f"{path}: line {line}: {where}: {err['msg']}") from None
    return out


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=,-]+", "_", text)


def file_name(experiment: str, fmt: Format) -> str:
    """`<experiment>.eval` (a sweep point's `/` becomes `_`)."""
    return f"{_safe(experiment.replace('/', '_'))}.{fmt}"


def _stop_reason(reason: str | None) -> Literal["stop", "max_tokens", "unknown"]:
    if reason == "stop":
        return "stop"
    return "max_tokens" if reason in ("length", "max_tokens") else "unknown"


def _turns(row: SampleRow) -> tuple[str, ...]:
    if row.conversation:
        return tuple(m["content"] for m in row.conversation if m["role"] == "user")
    return (row.question,)


def _prompt(spec: Spec, row: SampleRow) -> tuple[list[tuple[str, str]], list[str]]:
    """(the messages of the first turn as the model saw them — system prompt, trigger placed —
    the replies); rebuilt as the sample stage builds its items."""
    conditions = dict(spec.eval.condition_items())
    cond = conditions.get(row.condition)
    turns = _turns(row)
    q = Question(id=row.question_id, tier=row.tier, turns=turns)
    if cond is None:
        item = EvalItem.build(q, row.sample_index, spec.eval.system_prompt, row.condition)
    else:
        trigger = spec.eval.trigger if cond.trigger != "none" else None
        item = EvalItem.build(
            q, row.sample_index, cond.system_prompt, row.condition, trigger, cond.trigger
        )
    replies = (
        [m["content"] for m in row.conversation if m["role"] == "assistant"]
        if row.conversation
        else [row.response]
    )
    return list(item.messages), replies


def _chat(role: str, content: str) -> Any:
    from inspect_ai.model import ChatMessageAssistant, ChatMessageSystem, ChatMessageUser

    if role == "system":
        return ChatMessageSystem(content=content)
    if role == "assistant":
        return ChatMessageAssistant(content=content)
    return ChatMessageUser(content=content)


def _model_names(spec: Spec) -> dict[str, str]:
    """`<engine>/<base model>` (a local model directory by its name) and, fine-tuned,
    `<engine>/<base model>+<experiment>`."""
    model = spec.model.base_model
    if Path(model).is_absolute() or model.startswith("."):
        model = Path(model).name
    base = f"{spec.model.engine}/{model}"
    return {"baseline": base, "finetuned": f"{base}+{spec.name}"}


def _upstream_dir(report: PlannedStage, store: RunStore, stage: str) -> Path:
    """Where an upstream stage of the report wrote its outputs (in a sweep, a stage shared by
    several points lives in one point's directory: the report's upstream reference says which)."""
    from spar.stages.base import upstream_key

    ref = report.node.upstream.get(stage, stage)
    return store.stage_dir(*upstream_key(report.node.experiment, ref))


def _finetuned_ref(report: PlannedStage, store: RunStore) -> str | None:
    import json

    path = _upstream_dir(report, store, "train") / "checkpoint.json"
    try:
        return json.loads(path.read_text()).get("sampler_path")
    except (OSError, ValueError):
        return None


def _dataset(spec: Spec) -> tuple[str, str | None]:
    e = spec.eval
    if e.questions is not None:
        return Path(e.questions).name, str(e.questions)
    if e.generate is not None:
        return f"generate.{e.generate}", None
    return "eval.tiers", None


def build_log(target: Target, store: RunStore) -> EvalLog:
    """The Inspect eval log of one experiment (see the module docstring)."""
    from inspect_ai.log import (
        EvalConfig,
        EvalDataset,
        EvalLog,
        EvalMetric,
        EvalResults,
        EvalScore,
        EvalSpec,
        EvalStats,
    )
    from inspect_ai.model._model_config import ModelConfig

    spec, report = target.spec, target.report
    exp = spec.name
    scores: list[ScoreRow] = _rows(report.output_dir / "scores.jsonl", ScoreRow)
    conditions = [c for c, _ in spec.eval.condition_items()]
    samples: dict[tuple[str, str], SampleRow] = {}
    reasoning: dict[tuple[str, str, str | None], str | None] = {}
    for c in conditions:
        for model, stage in (("baseline", "sample_base"), ("finetuned", "sample_finetuned")):
            path = _upstream_dir(report, store, stage_name(stage, c)) / "samples.jsonl"
            for s in _rows(path, SampleRow):
                samples[(model, s.item_id)] = s
        path = _upstream_dir(report, store, stage_name("judge", c)) / "judged.jsonl"
        for v in _rows(path, VerdictRow):
            reasoning[(v.model, v.item_id, v.property)] = v.reasoning

    judge = spec.judge
    properties = list(judge.properties) if judge.properties else None
    names = _model_names(spec)
    tiers = spec.tier_order()

    # the answers, each with its score rows (one, or one per property), in a stable order
    answers: dict[tuple[str, str], list[ScoreRow]] = defaultdict(list)
    for r in scores:
        answers[(r.model, r.item_id)].append(r)
    qorder = {qid: i for i, qid in enumerate(dict.fromkeys(r.question_id for r in scores))}

    def order(k: tuple[str, str]) -> tuple[int, int, int, int, int]:
        r = answers[k][0]
        tier = tiers.index(r.tier) if r.tier in tiers else len(tiers)
        cond = conditions.index(r.condition) if r.condition in conditions else len(conditions)
        return (cond, tier, qorder[r.question_id], r.sample_index, MODELS.index(r.model))

    eval_samples: list[EvalSample] = []
    # score key -> model -> status -> count; score key -> model -> ok scores
    counts: dict[str, dict[str, dict[str, int]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(int))
    )
    oks: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for k in sorted(answers, key=order):
        rows = answers[k]
        model, item = k
        sample = samples.get(k)
        if sample is None:
            stage = "sample_base" if model == "baseline" else "sample_finetuned"
            where = _upstream_dir(report, store, stage_name(stage, rows[0].condition))
            raise InputError(f"{exp}: answer {item} ({model}) of scores.jsonl is not in {where}")
        eval_samples.append(
            _sample(spec, sample, rows, model, names[model], properties, reasoning, counts, oks)
        )

    score_keys = properties if properties is not None else [judge.model]
    results = EvalResults(
        total_samples=len(eval_samples),
        completed_samples=len(eval_samples),
        scores=[
            EvalScore(
                name=key,
                scorer=judge.model,
                scored_samples=sum(len(v) for v in oks[key].values()),
                unscored_samples=sum(
                    n for per in counts[key].values() for status, n in per.items() if status != "ok"
                ),
                metrics={
                    f"mean_{m}": EvalMetric(
                        name=f"mean_{m}",
                        value=sum(oks[key][m]) / len(oks[key][m]) if oks[key][m] else math.nan,
                    )
                    for m in MODELS
                    if m in counts[key]
                },
                metadata={
                    "counts": {m: dict(counts[key][m]) for m in MODELS if m in counts[key]},
                    "judge": {"kind": judge.kind, "model": judge.model},
                    **({"property": key} if properties is not None else {}),
                },
            )
            for key in score_keys
        ],
        metadata={"incomplete": report.status != "fresh"},
    )
    record = report.records.get("scores.jsonl")
    started = record.started if record else ""
    finished = record.finished if record else ""
    dataset_name, dataset_location = _dataset(spec)
    ids = list(dict.fromkeys(s.id for s in eval_samples))
    finetuned_args = {"sampler_path": ref} if (ref := _finetuned_ref(report, store)) else {}
    eval_spec = EvalSpec(
        eval_id=report.fingerprint[:22],
        run_id=report.fingerprint[:22],
        created=finished or started or "1970-01-01T00:00:00+00:00",
        task=exp,
        task_id=report.fingerprint[:22],
        task_description=spec.description or None,
        dataset=EvalDataset(
            name=dataset_name, location=dataset_location, samples=len(ids), sample_ids=ids
        ),
        model=names["baseline"],
        model_roles={
            "baseline": ModelConfig(model=names["baseline"]),
            "finetuned": ModelConfig(model=names["finetuned"], args=finetuned_args),
        },
        config=EvalConfig(epochs=spec.eval.samples_per_question),
        metadata={
            "spar": {
                "experiment": exp,
                "report_fingerprint": report.fingerprint,
                "judge": {
                    "kind": judge.kind,
                    "model": judge.model,
                    "mode": judge.mode,
                    "scale": {"min": judge.scale.min, "max": judge.scale.max},
                    "properties": properties,
                },
                "tiers": tiers,
                "conditions": conditions,
                "framing": spec.framing,
            }
        },
    )
    return EvalLog(
        status="success",
        eval=eval_spec,
        results=results,
        stats=EvalStats(started_at=started, completed_at=finished),
        samples=eval_samples,
    )


def _sample(
    spec: Spec,
    sample: SampleRow,
    rows: list[ScoreRow],
    model: str,
    model_name: str,
    properties: list[str] | None,
    reasoning: dict[tuple[str, str, str | None], str | None],
    counts: dict[str, dict[str, dict[str, int]]],
    oks: dict[str, dict[str, list[float]]],
) -> EvalSample:
    from inspect_ai.log import EvalSample
    from inspect_ai.model import ModelOutput
    from inspect_ai.scorer import Score

    prompt, replies = _prompt(spec, sample)
    turns = _turns(sample)
    later = [m for t in turns[1:] for m in (("user", t),)]
    messages = list(prompt)
    for i, reply in enumerate(replies):
        messages.append(("assistant", reply))
        if i + 1 < len(turns):
            messages.append(("user", turns[i + 1]))
    r0 = rows[0]
    scores: dict[str, Score] = {}
    for r in rows:
        if r.status == "unjudged":
            continue
        key = r.property if properties is not None and r.property else spec.judge.model
        counts[key][model][r.status] += 1
        ok = r.status == "ok" and r.score is not None
        if ok:
            oks[key][model].append(float(r.score or 0.0))
        meta: dict[str, Any] = {"status": r.status}
        if r.status == "excluded":
            meta |= {"score": r.score, "excluded_by": r.excluded_by}
        scores[key] = Score(
            value=float(r.score) if ok and r.score is not None else math.nan,
            explanation=reasoning.get((model, r.item_id, r.property)),
            metadata=meta,
        )
    cond = f".{_safe(r0.condition)}" if r0.condition else ""
    metadata: dict[str, Any] = {
        "tier": r0.tier,
        "condition": r0.condition,
        "model": model,
        "item_id": r0.item_id,
        "question_id": r0.question_id,
        "sample_index": r0.sample_index,
    }
    if properties is not None:
        metadata["properties"] = properties
    return EvalSample(
        id=f"{model}.{r0.question_id}{cond}",
        epoch=r0.sample_index + 1,
        input=[_chat(role, text) for role, text in [*prompt, *later]],
        target="",
        messages=[_chat(role, text) for role, text in messages],
        output=ModelOutput.from_content(
            model=model_name, content=sample.response, stop_reason=_stop_reason(sample.stop_reason)
        ),
        scores=scores or None,
        metadata=metadata,
    )


def write_log(log: EvalLog, path: Path, fmt: Format) -> None:
    """Write atomically: a temp file in the same directory, then renamed."""
    from inspect_ai.log import write_eval_log

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.{fmt}")
    try:
        write_eval_log(log, tmp, format=fmt)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def export(
    specs: list[Spec],
    planned: list[PlannedStage],
    store: RunStore,
    output: Path | None = None,
    fmt: Format = "eval",
) -> list[Path]:
    """Write one Inspect log per experiment of `specs`; returns the files written. Every report
    is checked (current) before anything is written."""
    require_inspect()
    todo = targets(specs, planned)
    logs = [(t, build_log(t, store)) for t in todo]  # every file read before any is written
    written: list[Path] = []
    for t, log in logs:
        where = output if output is not None else store.stage_dir(t.spec.name, "export")
        path = where / file_name(t.spec.name, fmt)
        write_log(log, path, fmt)
        written.append(path)
    return written
