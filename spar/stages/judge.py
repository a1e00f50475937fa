"""judge: render the rubric per item (sandboxed Jinja) and ask the judge; memoised per item.

pairwise: one verdict per item on the fine-tuned answer against the baseline answer.
absolute: one verdict per answer, for the baseline and the fine-tuned model alike.
Items are joined by `item_id`. An edited rubric re-judges from the sample outputs; it never
re-samples. A call that failed after the provider's retries is `error`: never journaled, shown as
such, and asked again by the next apply (the stage stays incomplete until then).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from spar.judges.base import JudgeConfig, JudgeRequest, Verdict
from spar.judges.rubric import context, render, static_prefix
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
)
from spar.store import ItemMemo, RunStore, jsonl_text, read_jsonl

if TYPE_CHECKING:
    from spar.spec import Spec

SAMPLE_STAGES = ("sample_base", "sample_finetuned")


class JudgeParams(Params):
    validity: ClassVar[frozenset[str]] = frozenset({"max_reasks"})

    kind: str = key("judge.kind")
    model: str = key("judge.model")
    mode: Literal["pairwise", "absolute"] = key("judge.mode")
    scale_min: int = key("judge.scale.min")
    scale_max: int = key("judge.scale.max")
    # None: the judge kind does not send it (so it is in no key)
    max_tokens: int | None = key("judge.max_tokens")
    temperature: float | None = key("judge.temperature")
    max_reasks: int | None = key("judge.max_reasks")


class JudgeOptions(Options):
    concurrency: int = 8
    batch: bool = False
    max_calls: int | None = None
    # for the cost preview before the samples exist: answers to judge, characters per answer
    expected_answers: int = 0
    answer_chars: int = 0


def build_requests(
    p: JudgeParams, rubric: Path, base: list[dict[str, Any]], tuned: list[dict[str, Any]]
) -> list[tuple[dict[str, Any], JudgeRequest]]:
    """(row of judged.jsonl without the verdict, request) for every answer to judge."""
    by_id = {r["item_id"]: r for r in base}
    out: list[tuple[dict[str, Any], JudgeRequest]] = []
    for row in tuned:
        b = by_id[row["item_id"]]["response"]
        answers: list[tuple[str, str, str | None]] = (
            [("finetuned", row["response"], b)]
            if p.mode == "pairwise"
            else [("baseline", b, None), ("finetuned", row["response"], None)]
        )
        ident = {k: row[k] for k in row if k not in ("response", "stop_reason")}
        for model, response, baseline in answers:
            ctx = context(
                p.mode,
                tier=row["tier"],
                question=row["question"],
                response=response,
                baseline_response=baseline,
                scale_min=p.scale_min,
                scale_max=p.scale_max,
            )
            req = JudgeRequest(
                prompt=render(rubric, ctx),
                question=row["question"],
                response=response,
                baseline_response=baseline,
                scale_min=p.scale_min,
                scale_max=p.scale_max,
            )
            out.append(({**ident, "model": model}, req))
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


class JudgeStage(StageKind[JudgeParams, JudgeOptions]):
    kind = "judge"
    version = 2
    item_version = 2
    outputs: ClassVar[tuple[str, ...]] = ("judged.jsonl",)
    params_model = JudgeParams

    def nodes(self, spec: Spec, g: GraphContext) -> list[StageNode[JudgeParams, JudgeOptions]]:
        from spar.judges import judge_factory
        from spar.judges.base import receives

        j = spec.judge
        sends = receives(judge_factory(j.kind))
        params = JudgeParams(
            kind=j.kind,
            model=j.model,
            mode=j.mode,
            scale_min=j.scale.min,
            scale_max=j.scale.max,
            max_tokens=j.max_tokens if "max_tokens" in sends else None,
            temperature=j.temperature if "temperature" in sends else None,
            max_reasks=j.max_reasks if "max_reasks" in sends else None,
        )
        per_item = 2 if j.mode == "absolute" else 1
        options = JudgeOptions(
            concurrency=j.concurrency,
            batch=j.batch,
            max_calls=j.max_calls,
            expected_answers=len(spec.questions()) * spec.eval.samples_per_question * per_item,
            answer_chars=4 * spec.eval.sampling.max_tokens * (2 if j.mode == "pairwise" else 1),
        )
        return [
            StageNode(
                "judge",
                self,
                spec.name,
                params,
                options,
                {"judge.rubric": InputFile(j.rubric)},
                {s: s for s in SAMPLE_STAGES},
            )
        ]

    def estimate(
        self,
        node: StageNode[JudgeParams, JudgeOptions],
        store: RunStore,
        upstream_fresh: bool,
        flags: Flags | None = None,
    ) -> dict[str, int]:
        """Judge calls still to make: exact (memo-aware) once both sample outputs are fresh,
        else an upper bound from the sample stages' parameters. Input tokens at 4 characters a
        token."""
        p = node.params
        rubric = node.inputs["judge.rubric"].path
        samples = [store.stage_dir(node.experiment, s) / "samples.jsonl" for s in SAMPLE_STAGES]
        if upstream_fresh and all(s.exists() for s in samples):
            requests = build_requests(p, rubric, *(read_jsonl(s) for s in samples))
            memo = store.memo(self.kind, self.item_version, p.item_basis())
            retry = flags is not None and flags.retry_invalid
            _, _, todo = to_ask(p, memo, requests, retry)
            chars = sum(len(requests[i][1].prompt) for i in todo)
            return {"judge_calls": len(todo), "judge_input_tokens": chars // 4}
        o = node.options
        calls = o.expected_answers
        per_call = len(rubric.read_text()) + o.answer_chars
        return {"judge_calls": calls, "judge_input_tokens": calls * per_call // 4}

    def run(self, ctx: RunContext[JudgeParams, JudgeOptions]) -> StageResult:
        from tqdm import tqdm

        from spar.judges import get_judge

        p, o = ctx.params, ctx.options
        rubric = ctx.inputs["judge.rubric"]
        base = read_jsonl(ctx.upstream_file("sample_base", "samples.jsonl"))
        tuned = read_jsonl(ctx.upstream_file("sample_finetuned", "samples.jsonl"))
        requests = build_requests(p, rubric, base, tuned)
        memo = ctx.memo()
        keys, verdicts, todo = to_ask(p, memo, requests, ctx.flags.retry_invalid)
        if todo:
            config = JudgeConfig(  # the settings a judge kind does not receive are None: left out
                **p.model_dump(exclude_none=True),
                static_prefix=static_prefix(rubric, p.mode, p.scale_min, p.scale_max),
            )
            judge = get_judge(config, batch=o.batch, journal=ctx.store.state.batch_journal(p.kind))
            bar = tqdm(total=len(todo), desc="judge", leave=False)
            for pos, verdict in judge.judge_many([requests[i][1] for i in todo], o.concurrency):
                key = keys[todo[pos]]
                if verdict.status != "error":
                    memo.put(key, verdict.model_dump())
                verdicts[key] = verdict.model_dump()
                bar.update(1)
            bar.close()
        rows = []
        for (ident, _), key in zip(requests, keys, strict=True):
            got = verdicts.get(key)
            if got is None:  # the judge yielded nothing for it: as good as an error
                got = Verdict(score=None, reasoning="no verdict", status="error").model_dump()
            v = Verdict.model_validate(got)
            rows.append({**ident, "score": v.score, "reasoning": v.reasoning, "status": v.status})
        counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "invalid", "error")}
        return StageResult(
            {"judged.jsonl": jsonl_text(rows).encode()},
            errors=counts["error"],
            details={**counts, "asked": len(todo)},
        )
