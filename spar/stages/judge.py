"""judge: render the rubric per item (sandboxed Jinja) and ask the judge; memoised per item.

pairwise: one verdict per (question, sample) on the fine-tuned answer against the baseline answer.
absolute: one verdict per answer, for the baseline and the fine-tuned model alike.
An edited rubric re-judges from the sample outputs; it never re-samples.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from spar.judges.base import JudgeRequest, Verdict
from spar.judges.rubric import context, render
from spar.spec import Spec
from spar.stages.base import RunContext, StageKind
from spar.store import hash_json, jsonl_text


def _read(path: Path) -> dict[tuple[str, str, int], dict[str, Any]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
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

    def run(self, ctx: RunContext) -> dict[str, bytes]:
        from tqdm import tqdm

        from spar.judges import get_judge

        spec = ctx.spec
        base = _read(ctx.upstream_file("sample_base", "samples.jsonl"))
        tuned = _read(ctx.upstream_file("sample_finetuned", "samples.jsonl"))
        requests = build_requests(spec, base, tuned)
        keys = [
            hash_json({"judge": spec.judge.kind, "model": spec.judge.model, **req.model_dump()})
            for _, req in requests
        ]
        memo = ctx.memo("judgments")
        todo = [i for i, k in enumerate(keys) if k not in memo]
        if todo:
            judge = get_judge(spec.judge)
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
