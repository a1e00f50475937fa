"""judge: render the rubric per item (sandboxed Jinja) and ask the judge; memoised per item.

pairwise: one verdict per item on the fine-tuned answer against the baseline answer (`judge`).
absolute: one verdict per answer. The baseline's answers are judged by their own stage
(`judge_base`), which depends on the base model's samples only, so experiments and sweep points
that share the base sampling share its verdicts; `judge` judges the fine-tuned answers and writes
both models' rows to its judged.jsonl. Per eval condition: `judge.<condition>`.
Each intermediate checkpoint of `eval.checkpoints` is judged like the final model by
`judge_step<N>` (`judge_step<N>.<condition>`), with the same parameters: its answers
(`sample_step<N>`) take the fine-tuned answers' place — against the baseline's answers (pairwise),
or beside the baseline's verdicts of `judge_base` (absolute). An answer equal to one judged before
reuses its verdict (the item key is the rendered request).
Hygiene: the eval trigger and every `judge.strip` pattern are removed from the question, the
answers and every message of their conversations before the rubric renders (the raw answers stay
in samples.jsonl). A multi-turn answer is judged with its whole conversation (`conversation`; a
single-turn answer's is [question, response]); `question` is its user turns joined, `response` the
last reply.
Properties (`judge.properties`): one verdict per (answer, property), the rubric rendered with
`property` and `property_description`; judged.jsonl rows then carry `property`. The properties
only enumerate items (`collection`): the rendered prompt names the property, so each (answer,
property) has its own item key and adding a property asks only the new pairs.
Items are joined by `item_id`. An edited rubric re-judges from the sample outputs; it never
re-samples. A call that failed after the provider's retries is `error`: never journaled, shown as
such, and asked again by the next apply (the stage stays incomplete until then).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from spar.items import stage_name
from spar.judges.base import Judge, JudgeConfig, JudgeRequest, Verdict
from spar.judges.rubric import context, render, static_prefix
from spar.progress import label
from spar.stages.base import (
    Flags,
    GraphContext,
    InputFile,
    Options,
    Params,
    RunContext,
    StageKind,
    StageNode,
    StageResult,
    key,
    on_device,
)
from spar.stages.sample import checkpoint_stage
from spar.stages.train import intermediate_checkpoints
from spar.store import ItemMemo, RunStore, jsonl_text, read_jsonl

if TYPE_CHECKING:
    from spar.spec import Spec

Part = Literal["baseline", "finetuned"]


class JudgeParams(Params):
    validity: ClassVar[frozenset[str]] = frozenset({"max_reasks"})
    # in the fingerprint; their effect on an item is all in its request (answer, stripped text)
    collection: ClassVar[frozenset[str]] = frozenset({"answers", "strip", "properties"})
    # without properties, what it was before `judge.properties` existed
    added: ClassVar[dict[str, Any]] = {"properties": None}

    answers: Part = key("judge.answers")  # whose answers this stage judges
    strip: tuple[str, ...] = key("judge.strip")  # the trigger (escaped) + the spec's patterns

    kind: str = key("judge.kind")
    model: str = key("judge.model")
    mode: Literal["pairwise", "absolute"] = key("judge.mode")
    scale_min: int = key("judge.scale.min")
    scale_max: int = key("judge.scale.max")
    # None: the judge kind does not send it (so it is in no key)
    max_tokens: int | None = key("judge.max_tokens")
    temperature: float | None = key("judge.temperature")
    max_reasks: int | None = key("judge.max_reasks")
    # (name, description) in the spec's order; None: one verdict per answer, no `property`
    properties: tuple[tuple[str, str], ...] | None = key("judge.properties")

    def property_items(self) -> list[tuple[str, str] | None]:
        """What each answer is judged for: every property, or once (None) without properties."""
        return list(self.properties) if self.properties is not None else [None]


class JudgeOptions(Options):
    concurrency: int = 8
    batch: bool = False
    max_calls: int | None = None
    # for the cost preview before the samples exist: answers to judge, characters per answer
    expected_answers: int = 0
    answer_chars: int = 0


def clean(text: str, patterns: tuple[str, ...]) -> str:
    """`text` with every pattern removed, then stripped of surrounding whitespace."""
    for pattern in patterns:
        text = re.sub(pattern, "", text)
    return text.strip()


def conversation_of(
    row: dict[str, Any], question: str, response: str, patterns: tuple[str, ...]
) -> list[dict[str, str]]:
    """The exchange a samples.jsonl row ends with, every message cleaned: its `conversation`
    (multi-turn), else [question, response] (both already cleaned)."""
    if "conversation" not in row:
        return [{"role": "user", "content": question}, {"role": "assistant", "content": response}]
    return [
        {"role": m["role"], "content": clean(m["content"], patterns)} for m in row["conversation"]
    ]


def strip_patterns(trigger: str | None, patterns: list[str]) -> tuple[str, ...]:
    return ((re.escape(trigger),) if trigger else ()) + tuple(patterns)


def build_requests(
    p: JudgeParams,
    rubric: Path,
    base: list[dict[str, Any]],
    tuned: list[dict[str, Any]] | None,
) -> list[tuple[dict[str, Any], JudgeRequest]]:
    """(row of judged.jsonl without the verdict, request) for every answer this stage judges —
    the baseline's (`tuned` is None) or the fine-tuned model's (pairwise: against the
    baseline's) — and, with properties, every property of it (answer-major)."""
    by_id = {r["item_id"]: r for r in base}
    out: list[tuple[dict[str, Any], JudgeRequest]] = []
    for row in tuned if tuned is not None else base:
        question = clean(row["question"], p.strip)
        response = clean(row["response"], p.strip)
        conversation = conversation_of(row, question, response, p.strip)
        baseline = baseline_conversation = None
        if p.mode == "pairwise":
            base_row = by_id[row["item_id"]]
            baseline = clean(base_row["response"], p.strip)
            baseline_conversation = conversation_of(base_row, question, baseline, p.strip)
        ident = {k: row[k] for k in row if k not in ("response", "stop_reason", "conversation")}
        for prop in p.property_items():
            ctx = context(
                p.mode,
                tier=row["tier"],
                question=question,
                response=response,
                baseline_response=baseline,
                scale_min=p.scale_min,
                scale_max=p.scale_max,
                conversation=conversation,
                baseline_conversation=baseline_conversation,
                prop=prop,
            )
            req = JudgeRequest(
                prompt=render(rubric, ctx),
                question=question,
                response=response,
                baseline_response=baseline,
                scale_min=p.scale_min,
                scale_max=p.scale_max,
            )
            named = {} if prop is None else {"property": prop[0]}
            out.append(({**ident, "model": p.answers, **named}, req))
    return out


def reusable(p: JudgeParams, memoised: dict[str, Any] | None, retry_invalid: bool) -> bool:
    """May a journaled verdict stand for this item under these parameters?"""
    if memoised is None:
        return False
    v = Verdict.model_validate(memoised)
    if v.status == "ok":
        return True
    if v.status != "invalid" or retry_invalid:
        return False
    # an invalid verdict stands unless the re-ask budget was raised past what it used
    return p.max_reasks is None or v.asks >= 1 + p.max_reasks


def to_ask(
    p: JudgeParams,
    memo: ItemMemo,
    requests: list[tuple[dict[str, Any], JudgeRequest]],
    retry_invalid: bool,
) -> tuple[list[str], dict[str, Any], list[int]]:
    """Item keys, the verdicts journaled for them, and the indices still to ask."""
    keys = [memo.key(req.model_dump()) for _, req in requests]
    verdicts = memo.get_many(keys)
    todo = [i for i, k in enumerate(keys) if not reusable(p, verdicts.get(k), retry_invalid)]
    return keys, verdicts, todo


def sample_roles(p: JudgeParams) -> list[str]:
    """The upstream roles whose samples.jsonl this stage reads: the baseline's, then (judging the
    fine-tuned answers) the fine-tuned model's."""
    return ["sample_base"] + (["sample_finetuned"] if p.answers == "finetuned" else [])


def verdict_rows(
    requests: list[tuple[dict[str, Any], JudgeRequest]],
    keys: list[str],
    verdicts: dict[str, Any],
) -> list[dict[str, Any]]:
    rows = []
    for (ident, _), key_ in zip(requests, keys, strict=True):
        got = verdicts.get(key_)
        if got is None:  # the judge yielded nothing for it: as good as an error
            got = Verdict(score=None, reasoning="no verdict", status="error").model_dump()
        v = Verdict.model_validate(got)
        rows.append({**ident, "score": v.score, "reasoning": v.reasoning, "status": v.status})
    return rows


def ask_judge(
    ctx: RunContext[Any, Any],
    judge: Judge,
    requests: list[JudgeRequest],
    keys: list[str],
    memo: ItemMemo,
    verdicts: dict[str, Any],
    concurrency: int,
) -> None:
    """Ask `judge` about each request (its item key `keys[i]`): every verdict lands in
    `verdicts` and, unless it is an `error`, in the memo as it arrives. Leaves off after the
    verdict in hand when the apply is stopping (`ctx.stopping`)."""
    from tqdm import tqdm

    with tqdm(total=len(requests), desc=label(ctx.name or ctx.kind.kind), leave=False) as bar:
        for pos, verdict in judge.judge_many(requests, concurrency):
            if verdict.status != "error":
                memo.put(keys[pos], verdict.model_dump())
            verdicts[keys[pos]] = verdict.model_dump()
            bar.update(1)
            ctx.stopping()  # another stage failed: leave off here (this verdict is kept)


def judge_devices(node: StageNode[Any, Any]) -> frozenset[str]:
    """The device a judge stage's judge kind computes on (`judge` and `judge_also`)."""
    from spar.judges import judge_device

    return on_device(judge_device(node.params.kind))


def estimate_calls(
    node: StageNode[Any, JudgeOptions],
    store: RunStore,
    rubric: Path,
    requests_of: Callable[[list[Path]], list[tuple[dict[str, Any], JudgeRequest]]],
    memo: Callable[[], ItemMemo],
    upstream_fresh: bool,
    flags: Flags | None,
) -> dict[str, int]:
    """A judge stage's calls still to make (`judge` and the extra judges of `judge_also`):
    exact and memo-aware once its sample outputs are fresh, else an upper bound from the sample
    stages' parameters. Input tokens at 4 characters a token."""
    p = node.params
    samples = [store.stage_dir(*node.upstream_at(r)) / "samples.jsonl" for r in sample_roles(p)]
    if upstream_fresh and all(s.exists() for s in samples):
        requests = requests_of(samples)
        retry = flags is not None and flags.retry_invalid
        _, _, todo = to_ask(p, memo(), requests, retry)
        chars = sum(len(requests[i][1].prompt) for i in todo)
        return {"judge_calls": len(todo), "judge_input_tokens": chars // 4}
    o = node.options
    calls = o.expected_answers * len(p.property_items())
    per_call = len(rubric.read_text()) + o.answer_chars
    return {"judge_calls": calls, "judge_input_tokens": calls * per_call // 4}


class JudgeStage(StageKind[JudgeParams, JudgeOptions]):
    kind = "judge"
    version = 3
    item_version = 2
    outputs: ClassVar[tuple[str, ...]] = ("judged.jsonl",)
    params_model = JudgeParams

    def devices(self, node: StageNode[JudgeParams, JudgeOptions]) -> frozenset[str]:
        return judge_devices(node)

    def nodes(self, spec: Spec, g: GraphContext) -> list[StageNode[JudgeParams, JudgeOptions]]:
        from spar.judges import judge_factory
        from spar.judges.base import receives

        j = spec.judge
        sends = receives(judge_factory(j.kind))
        tuned_params = JudgeParams(
            answers="finetuned",
            kind=j.kind,
            model=j.model,
            mode=j.mode,
            scale_min=j.scale.min,
            scale_max=j.scale.max,
            max_tokens=j.max_tokens if "max_tokens" in sends else None,
            temperature=j.temperature if "temperature" in sends else None,
            max_reasks=j.max_reasks if "max_reasks" in sends else None,
            strip=strip_patterns(spec.eval.trigger, j.strip),
            properties=tuple(j.properties.items()) if j.properties is not None else None,
        )
        options = JudgeOptions(
            concurrency=j.concurrency,
            batch=j.batch,
            max_calls=j.max_calls,
            expected_answers=spec.question_count() * spec.eval.samples_per_question,
            answer_chars=4 * spec.eval.sampling.max_tokens * (2 if j.mode == "pairwise" else 1),
        )
        rubric = {"judge.rubric": InputFile(j.rubric)}
        out: list[StageNode[JudgeParams, JudgeOptions]] = []
        for condition, _ in spec.eval.condition_items():
            base, tuned = (
                stage_name("sample_base", condition),
                stage_name("sample_finetuned", condition),
            )
            tuned_up = {"sample_base": base, "sample_finetuned": tuned}
            if j.mode == "absolute":
                judge_base = stage_name("judge_base", condition)
                params = tuned_params.model_copy(update={"answers": "baseline"})
                out.append(
                    StageNode(
                        judge_base, self, spec.name, params, options, rubric, {"sample_base": base}
                    )
                )
                tuned_up["judge_base"] = judge_base
            params = tuned_params
            out.append(
                StageNode(
                    stage_name("judge", condition),
                    self,
                    spec.name,
                    params,
                    options,
                    rubric,
                    tuned_up,
                )
            )
            for step in intermediate_checkpoints(spec):  # judged like the final model
                up = {
                    **tuned_up,
                    "sample_finetuned": stage_name(checkpoint_stage("sample", step), condition),
                }
                name = stage_name(checkpoint_stage("judge", step), condition)
                out.append(StageNode(name, self, spec.name, params, options, rubric, up))
        return out

    @staticmethod
    def _requests(
        p: JudgeParams, rubric: Path, samples: list[Path]
    ) -> list[tuple[dict[str, Any], JudgeRequest]]:
        rows = [read_jsonl(s) for s in samples]
        return build_requests(p, rubric, rows[0], rows[1] if len(rows) > 1 else None)

    def estimate(
        self,
        node: StageNode[JudgeParams, JudgeOptions],
        store: RunStore,
        upstream_fresh: bool,
        flags: Flags | None = None,
    ) -> dict[str, int]:
        """Judge calls still to make: exact (memo-aware) once both sample outputs are fresh,
        else an upper bound from the sample stages' parameters. Input tokens at 4 characters a
        token. With properties, every answer is judged once per property."""
        p = node.params
        rubric = node.inputs["judge.rubric"].path
        return estimate_calls(
            node,
            store,
            rubric,
            lambda samples: self._requests(p, rubric, samples),
            lambda: store.memo(self.kind, self.item_version, p.item_basis()),
            upstream_fresh,
            flags,
        )

    def run(self, ctx: RunContext[JudgeParams, JudgeOptions]) -> StageResult:
        from spar.judges import get_judge

        p, o = ctx.params, ctx.options
        rubric = ctx.inputs["judge.rubric"]
        samples = [ctx.upstream_file(r, "samples.jsonl") for r in sample_roles(p)]
        requests = self._requests(p, rubric, samples)
        memo = ctx.memo()
        keys, verdicts, todo = to_ask(p, memo, requests, ctx.flags.retry_invalid)
        if todo:
            config = JudgeConfig(  # the settings a judge kind does not receive are None: left out
                **p.model_dump(exclude_none=True, exclude={"answers", "strip", "properties"}),
                static_prefix=static_prefix(
                    rubric,
                    p.mode,
                    p.scale_min,
                    p.scale_max,
                    properties=p.properties is not None,
                ),
            )
            judge = get_judge(config, batch=o.batch, journal=ctx.store.state.batch_journal(p.kind))
            asked = [requests[i][1] for i in todo]
            ask_judge(ctx, judge, asked, [keys[i] for i in todo], memo, verdicts, o.concurrency)
        rows = verdict_rows(requests, keys, verdicts)
        if "judge_base" in ctx.upstream:  # absolute: the baseline's verdicts, then this stage's
            rows = read_jsonl(ctx.upstream_file("judge_base", "judged.jsonl")) + rows
        counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "invalid", "error")}
        return StageResult(
            {"judged.jsonl": jsonl_text(rows).encode()},
            errors=counts["error"],
            details={**counts, "asked": len(todo)},
        )
