"""judge: render the rubric per item (sandboxed Jinja) and ask the judge; memoised per item.

pairwise: one verdict per (question, sample) on the fine-tuned answer against the baseline answer.
absolute: one verdict per answer, for the baseline and the fine-tuned model alike.
An edited rubric re-judges from the sample outputs; it never re-samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from spar.judges.base import JudgeRequest, Verdict
from spar.judges.rubric import context, render
from spar.spec import Spec
from spar.stages.base import RunContext, StageKind, StageNode
from spar.store import RunStore, hash_json, jsonl_text, read_jsonl

SAMPLE_STAGES = ("sample_base", "sample_finetuned")


def _read(path: Path) -> dict[tuple[str, str, int], dict[str, Any]]:
    rows = read_jsonl(path)
    return {(r["tier"], r["question"], r["sample_index"]): r for r in rows}


def build_requests(
    spec: Spec,
    base: dict[tuple[str, str, int], dict[str, Any]],
    tuned: dict[tuple[str, str, int], dict[str, Any]],
) -> list[tuple[dict[str, Any], JudgeRequest]]:
    """(row identity, request) for every item to judge, in sample order."""
    j = spec.judge
    out: list[tuple[dict[str, Any], JudgeRequest]] = []
    for (tier, question, index), row in tuned.items():
        b = base[(tier, question, index)]["response"]
        answers = (
            [("finetuned", row["response"], b)]
            if j.mode == "pairwise"
            else [
                ("baseline", b, None),
                ("finetuned", row["response"], None),
            ]
        )
        for model, response, baseline in answers:
            ctx = context(
                j.mode,
                tier=tier,
                question=question,
                response=response,
                baseline_response=baseline,
                scale_min=j.scale.min,
                scale_max=j.scale.max,
            )
            req = JudgeRequest(
                prompt=render(j.rubric, ctx),
                question=question,
                response=response,
                baseline_response=baseline,
                scale_min=j.scale.min,
                scale_max=j.scale.max,
                max_tokens=j.max_tokens,
                temperature=j.temperature,
            )
            ident = {"tier": tier, "question": question, "sample_index": index, "model": model}
            out.append((ident, req))
    return out


def item_keys(spec: Spec, requests: list[tuple[dict[str, Any], JudgeRequest]]) -> list[str]:
    """Memo key of each item: everything that determines its verdict."""
    return [
        hash_json({"judge": spec.judge.kind, "model": spec.judge.model, **req.model_dump()})
        for _, req in requests
    ]


class JudgeStage(StageKind):
    kind = "judge"
    version = 1
    outputs: ClassVar[tuple[str, ...]] = ("judged.jsonl",)
    param_keys: ClassVar[tuple[str, ...]] = (
        "judge.kind",
        "judge.model",
        "judge.mode",
        "judge.scale",
        "judge.max_tokens",
        "judge.temperature",
        "judge.max_reasks",
    )

    def estimate(self, node: StageNode, store: RunStore, upstream_fresh: bool) -> dict[str, int]:
        """Judge calls still to make: exact (memo-aware) once both sample outputs are fresh,
        else an upper bound from the spec. Input tokens are estimated at 4 characters a token."""
        spec = node.spec
        assert spec is not None
        samples = [store.stage_dir(node.experiment, s) / "samples.jsonl" for s in SAMPLE_STAGES]
        if upstream_fresh and all(p.exists() for p in samples):
            requests = build_requests(spec, *(_read(p) for p in samples))
            memo = store.memo_keys("judgments")
            todo = [
                req
                for (_, req), k in zip(requests, item_keys(spec, requests), strict=True)
                if k not in memo
            ]
            chars = sum(len(r.prompt) for r in todo)
            return {"judge_calls": len(todo), "judge_input_tokens": chars // 4}
        per_item = 2 if spec.judge.mode == "absolute" else 1
        calls = len(spec.questions()) * spec.eval.samples_per_question * per_item
        rubric_chars = len(spec.judge.rubric.read_text())
        answer_chars = (
            4 * spec.eval.sampling.max_tokens * (2 if spec.judge.mode == "pairwise" else 1)
        )
        return {
            "judge_calls": calls,
            "judge_input_tokens": calls * (rubric_chars + answer_chars) // 4,
        }

    def run(self, ctx: RunContext) -> dict[str, bytes]:
        from tqdm import tqdm

        from spar.judges import get_judge

        spec = ctx.spec
        base = _read(ctx.upstream_file("sample_base", "samples.jsonl"))
        tuned = _read(ctx.upstream_file("sample_finetuned", "samples.jsonl"))
        requests = build_requests(spec, base, tuned)
        keys = item_keys(spec, requests)
        memo = ctx.memo("judgments")
        todo = [i for i, k in enumerate(keys) if k not in memo]
        if todo:
            judge = get_judge(spec.judge, ctx.store.scratch("judges", spec.judge.kind))
            bar = tqdm(total=len(todo), desc="judge", leave=False)
            for pos, verdict in judge.judge_many(
                [requests[i][1] for i in todo], spec.judge.concurrency
            ):
                memo.put(keys[todo[pos]], verdict.model_dump())
                bar.update(1)
            bar.close()
        rows = []
        for (ident, _), key in zip(requests, keys, strict=True):
            verdict = Verdict.model_validate(memo.get(key))
            rows.append({**ident, **verdict.model_dump()})
        memo.close()
        return {"judged.jsonl": jsonl_text(rows).encode()}
