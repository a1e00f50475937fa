"""judge_also: extra judges of every judged answer, and the self-agreement re-judge.

Stages (each also per eval condition, `spar.items.stage_name`):

- `judge_also.<name>` / `judge_also_base.<name>` — one extra judge of `judge.also`. With a rubric
  of its own it measures something else (e.g. coherence) and judges every answer on its own, in
  absolute mode, whatever the main mode: `judge_also_base.<name>` the baseline's answers,
  `judge_also.<name>` the fine-tuned model's, writing both models' rows (as `judge` does in
  absolute mode). Without a rubric (or with the main rubric's file) it is a second opinion: the
  main rubric in the main mode, so in pairwise mode one verdict per item on the fine-tuned answer
  against the baseline's (`judge_also.<name>` only).
- `judge_again` / `judge_again_base` — `judge.self_agreement`: the judge it names (the main one,
  or an extra one) asked again, at `temperature`, about a deterministic share of the items
  (`chosen`: by a seed derived from the item id, so the same items every time and in every
  experiment). Not planned when that judge kind does not take a temperature (`receives`); the
  report then states why.

The extra judges judge only the final model's answers (not `eval.checkpoints`' intermediate
steps).

Memo: every verdict is kept in the item memo of the `judge` stage kind, keyed exactly as the main
judge keys its own (`JudgeParams.item_basis()` and the rendered request). So an extra judge with
the main judge's settings and rubric shares its verdicts (no call), and one that differs in
kind, model, scale, max_tokens or temperature (where sent), or in its rendered rubric, has keys of
its own. The self-agreement re-judge adds `judge.self_agreement.repeat: 1` to its key basis: its
verdicts never stand for a first verdict (nor one for it), even at the same temperature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from spar.items import stage_name
from spar.judges.base import JudgeConfig, JudgeRequest
from spar.judges.rubric import static_prefix
from spar.stages.base import (
    Flags,
    GraphContext,
    InputFile,
    RunContext,
    StageKind,
    StageNode,
    StageResult,
)
from spar.stages.judge import (
    JudgeOptions,
    JudgeParams,
    JudgeStage,
    ask_judge,
    build_requests,
    estimate_calls,
    judge_devices,
    sample_roles,
    strip_patterns,
    to_ask,
    verdict_rows,
)
from spar.store import ItemMemo, RunStore, derive_seed, jsonl_text, read_jsonl

if TYPE_CHECKING:
    from spar.spec import Spec
    from spar.spec_reliability import AlsoJudgeSpec

ALSO, ALSO_BASE = "judge_also", "judge_also_base"
AGAIN, AGAIN_BASE = "judge_again", "judge_again_base"
Request = tuple[dict[str, Any], JudgeRequest]


class AlsoParams(JudgeParams):
    """The main judge's parameters, plus the self-agreement re-judge's. Both extra fields are
    left out of every dump at their defaults, so an extra judge's item keys are exactly the main
    judge's for the same settings (`spar.stages.base.AddedFields`)."""

    collection: ClassVar[frozenset[str]] = JudgeParams.collection | {"share"}
    added: ClassVar[dict[str, Any]] = {**JudgeParams.added, "repeat": 0, "share": None}

    # 1: a re-judge (self-agreement): in the item key, so it is a verdict of its own
    repeat: int = Field(0, alias="judge.self_agreement.repeat")
    # the share of the items judged (self-agreement); None: every item
    share: float | None = Field(None, alias="judge.self_agreement.share")


def chosen(item_id: str, share: float | None) -> bool:
    """Is the item among the share re-judged? Decided by a seed derived from its id alone."""
    return share is None or derive_seed("self_agreement", item_id) < share * 2**31


@dataclass(frozen=True)
class Setup:
    """One judge as the reliability stages run it: its parameters for the fine-tuned answers (the
    baseline's differ only in `answers`), its rubric and the input key naming it."""

    name: str  # `main` or the extra judge's name
    params: AlsoParams
    rubric_key: str
    rubric: Path


def main_setup(spec: Spec) -> Setup:
    """The main judge's parameters (as `judge` builds them)."""
    return _setup(spec, None, 0)


def extra_setups(spec: Spec) -> list[Setup]:
    return [_setup(spec, e, i) for i, e in enumerate(spec.judge.also or [])]


def _setup(spec: Spec, extra: AlsoJudgeSpec | None, index: int) -> Setup:
    from spar.judges import judge_factory
    from spar.judges.base import receives
    from spar.spec_reliability import MAIN, second_opinion

    j = spec.judge
    same = extra is None or second_opinion(j, extra)
    kind = (extra.kind if extra else None) or j.kind
    sends = receives(judge_factory(kind))

    def pick(name: str) -> Any:
        own = getattr(extra, name) if extra is not None else None
        return own if own is not None else getattr(j, name)

    scale = j.scale if same or extra is None or extra.scale is None else extra.scale
    params = AlsoParams(
        answers="finetuned",
        kind=kind,
        model=pick("model"),
        mode=j.mode if same else "absolute",
        scale_min=scale.min,
        scale_max=scale.max,
        max_tokens=pick("max_tokens") if "max_tokens" in sends else None,
        temperature=pick("temperature") if "temperature" in sends else None,
        max_reasks=pick("max_reasks") if "max_reasks" in sends else None,
        strip=strip_patterns(spec.eval.trigger, j.strip),
        properties=tuple(j.properties.items()) if same and j.properties is not None else None,
    )
    if extra is None or extra.rubric is None or same:
        return Setup(extra.name if extra else MAIN, params, "judge.rubric", j.rubric)
    return Setup(extra.name, params, f"judge.also.{index}.rubric", Path(extra.rubric))


def self_agreement_setup(spec: Spec) -> tuple[Setup | None, str | None]:
    """The re-judge's setup, or None and why it is skipped (its judge takes no temperature)."""
    from spar.judges import judge_factory
    from spar.judges.base import receives
    from spar.spec_reliability import MAIN

    sa = spec.judge.self_agreement
    if sa is None:
        return None, None
    target = main_setup(spec) if sa.judge == MAIN else _by_name(spec, sa.judge)
    sends = receives(judge_factory(target.params.kind))
    if "temperature" not in sends:
        took = ", ".join(sorted(sends)) or "none of max_tokens, temperature, max_reasks"
        return None, (
            f"judge kind {target.params.kind!r} does not take a temperature (it sends: {took}), "
            "so a re-judge would repeat its first verdict"
        )
    params = target.params.model_copy(
        update={"temperature": sa.temperature, "repeat": 1, "share": sa.share}
    )
    return Setup(target.name, params, target.rubric_key, target.rubric), None


def _by_name(spec: Spec, name: str) -> Setup:
    return next(s for s in extra_setups(spec) if s.name == name)


def judge_memo(store: RunStore, p: AlsoParams) -> ItemMemo:
    """The main judge kind's item memo, keyed by these parameters (see the module docstring)."""
    return store.memo(JudgeStage.kind, JudgeStage.item_version, p.item_basis())


def requests_of(p: AlsoParams, rubric: Path, samples: list[Path]) -> list[Request]:
    """The requests of the items this stage judges (every one, or the chosen share)."""
    rows = [read_jsonl(s) for s in samples]
    out = build_requests(p, rubric, rows[0], rows[1] if len(rows) > 1 else None)
    return [r for r in out if chosen(r[0]["item_id"], p.share)]


class JudgeAlsoStage(StageKind[AlsoParams, JudgeOptions]):
    kind = "judge_also"
    version = 1
    item_version = 1  # unused: verdicts live in the `judge` kind's memo (judge_memo)
    outputs: ClassVar[tuple[str, ...]] = ("judged.jsonl",)
    params_model = AlsoParams

    def devices(self, node: StageNode[AlsoParams, JudgeOptions]) -> frozenset[str]:
        return judge_devices(node)

    def nodes(self, spec: Spec, g: GraphContext) -> list[StageNode[AlsoParams, JudgeOptions]]:
        out: list[StageNode[AlsoParams, JudgeOptions]] = []
        for s in extra_setups(spec):
            out += self._nodes(spec, s, f"{ALSO}.{s.name}", f"{ALSO_BASE}.{s.name}")
        again, _ = self_agreement_setup(spec)
        if again is not None:
            out += self._nodes(spec, again, AGAIN, AGAIN_BASE)
        return out

    def _nodes(
        self, spec: Spec, s: Setup, name: str, base_name: str
    ) -> list[StageNode[AlsoParams, JudgeOptions]]:
        """Like `judge`'s nodes: per condition, the baseline's answers (absolute mode) and the
        fine-tuned model's (writing both models' rows)."""
        j, p = spec.judge, s.params
        answers = spec.question_count() * spec.eval.samples_per_question
        options = JudgeOptions(
            concurrency=j.concurrency,
            batch=j.batch,
            max_calls=j.max_calls,
            expected_answers=answers if p.share is None else math.ceil(answers * p.share),
            answer_chars=4 * spec.eval.sampling.max_tokens * (2 if p.mode == "pairwise" else 1),
        )
        rubric = {s.rubric_key: InputFile(s.rubric)}
        out: list[StageNode[AlsoParams, JudgeOptions]] = []
        for condition, _ in spec.eval.condition_items():
            base = stage_name("sample_base", condition)
            up = {
                "sample_base": base,
                "sample_finetuned": stage_name("sample_finetuned", condition),
            }
            if p.mode == "absolute":
                judge_base = stage_name(base_name, condition)
                bp = p.model_copy(update={"answers": "baseline"})
                out.append(
                    StageNode(
                        judge_base, self, spec.name, bp, options, rubric, {"sample_base": base}
                    )
                )
                up["judge_base"] = judge_base
            out.append(
                StageNode(stage_name(name, condition), self, spec.name, p, options, rubric, up)
            )
        return out

    def estimate(
        self,
        node: StageNode[AlsoParams, JudgeOptions],
        store: RunStore,
        upstream_fresh: bool,
        flags: Flags | None = None,
    ) -> dict[str, int]:
        """Judge calls still to make, as `judge` estimates its own: exact and memo-aware once the
        samples are fresh, else an upper bound (the chosen share of the items, rounded up)."""
        p = node.params
        rubric = next(iter(node.inputs.values())).path
        return estimate_calls(
            node,
            store,
            rubric,
            lambda samples: requests_of(p, rubric, samples),
            lambda: judge_memo(store, p),
            upstream_fresh,
            flags,
        )

    def run(self, ctx: RunContext[AlsoParams, JudgeOptions]) -> StageResult:
        from spar.judges import get_judge

        p, o = ctx.params, ctx.options
        rubric = next(iter(ctx.inputs.values()))
        samples = [ctx.upstream_file(r, "samples.jsonl") for r in sample_roles(p)]
        requests = requests_of(p, rubric, samples)
        memo = judge_memo(ctx.store, p)
        keys, verdicts, todo = to_ask(p, memo, requests, ctx.flags.retry_invalid)
        if todo:
            config = JudgeConfig(  # the settings a judge kind does not receive are None: left out
                **p.model_dump(
                    exclude_none=True,
                    exclude={"answers", "strip", "properties", "repeat", "share"},
                ),
                static_prefix=static_prefix(
                    rubric, p.mode, p.scale_min, p.scale_max, properties=p.properties is not None
                ),
            )
            judge = get_judge(config, batch=o.batch, journal=ctx.store.state.batch_journal(p.kind))
            asked = [requests[i][1] for i in todo]
            ask_judge(ctx, judge, asked, [keys[i] for i in todo], memo, verdicts, o.concurrency)
        rows = verdict_rows(requests, keys, verdicts)
        if "judge_base" in ctx.upstream:  # the baseline's verdicts, then this stage's
            rows = read_jsonl(ctx.upstream_file("judge_base", "judged.jsonl")) + rows
        counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "invalid", "error")}
        return StageResult(
            {"judged.jsonl": jsonl_text(rows).encode()},
            errors=counts["error"],
            details={**counts, "asked": len(todo)},
        )


def validate(spec: Spec, where: str) -> None:
    """Before any work: every extra judge's kind is known and its rubric renders in the mode it
    is judged in (absolute for a rubric of its own)."""
    from spar.errors import InputError
    from spar.judges import judge_kinds, rubric

    for i, extra in enumerate(spec.judge.also or []):
        if extra.kind is not None and extra.kind not in judge_kinds():
            raise InputError(
                f"{where}: judge.also.{i}.kind: unknown judge {extra.kind!r} "
                f"(available: {', '.join(judge_kinds()) or 'none'})"
            )
    for i, s in enumerate(extra_setups(spec)):
        p = s.params
        try:
            rubric.validate(
                s.rubric, p.mode, p.scale_min, p.scale_max, properties=p.properties is not None
            )
        except InputError as e:
            raise InputError(f"{where}: judge.also.{i}.rubric ({p.mode} mode): {e}") from None
