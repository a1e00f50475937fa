"""sample: every (question, sample index) through a fresh sampling client.

The baseline (`sample_base`) and the fine-tuned model (`sample_finetuned`) are this one stage kind
with a different model reference. Every item is memoised by its key (the stage's parameters less
the question list and sample count, the model — base or the upstream training run's fingerprint —
the rendered prompt tokens, the question id and the sample index), so a second experiment on the
same base model reuses the baseline and raising samples_per_question draws only the new indices.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from spar.items import EvalItem, Question, stage_name
from spar.spec import SamplingSpec
from spar.stages.base import (
    Flags,
    GraphContext,
    Options,
    Params,
    RunContext,
    StageKind,
    StageNode,
    StageResult,
    key,
)
from spar.stages.draw import draw_missing
from spar.stages.models import ModelRef, model_ref
from spar.store import RunStore, hash_json, jsonl_text

if TYPE_CHECKING:
    from spar.spec import Spec


class SampleParams(Params):
    # the condition's name is in item ids, not in what is drawn; its trigger placement shows in
    # the rendered prompt, which is in every item key (so items memoised before conditions
    # existed stay valid)
    collection: ClassVar[frozenset[str]] = frozenset(
        {"questions", "samples_per_question", "condition", "trigger_placement", "trigger"}
    )

    engine: str = key("model.engine")
    # the base model (the fine-tuned one is the upstream train's result)
    model: ModelRef = key("model.base_model")
    finetuned: bool = key("finetuned")
    renderer: str = key("model.renderer")
    system_prompt: str | None = key("eval.system_prompt")
    condition: str = key("eval.condition")  # "" when the spec has no conditions
    trigger_placement: Literal["user", "system", "none"] = key("eval.condition.trigger")
    trigger: str | None = key("eval.trigger")  # None where the condition places no trigger
    sampling: SamplingSpec = key("eval.sampling")
    questions: tuple[Question, ...] = key("eval.questions")
    samples_per_question: int = key("eval.samples_per_question")


class SampleOptions(Options):
    base_model: str  # a model name, or where a local model directory is
    concurrency: int = 32


def item_seed(seed: int, question_id: str, sample_index: int) -> int:
    """Each (question, sample index) has its own seed: sample k never depends on how many were
    drawn, and different questions never share random draws. The base and the fine-tuned model
    use the same seed for the same item, so their answers are paired draws."""
    return int(hash_json([seed, question_id, sample_index])[:8], 16) & 0x7FFFFFFF


def eval_items(p: SampleParams) -> list[EvalItem]:
    return [
        EvalItem.build(q, i, p.system_prompt, p.condition, p.trigger, p.trigger_placement)
        for q in p.questions
        for i in range(p.samples_per_question)
    ]


class SampleStage(StageKind[SampleParams, SampleOptions]):
    kind = "sample"
    version = 3
    item_version = 2
    outputs: ClassVar[tuple[str, ...]] = ("samples.jsonl",)
    params_model = SampleParams

    def nodes(self, spec: Spec, g: GraphContext) -> list[StageNode[SampleParams, SampleOptions]]:
        e = spec.eval
        out: list[StageNode[SampleParams, SampleOptions]] = []
        model = model_ref(spec, g)
        questions = tuple(spec.questions())
        for condition, c in e.condition_items():
            for base, finetuned in (("sample_base", False), ("sample_finetuned", True)):
                params = SampleParams(
                    engine=spec.model.engine,
                    model=model,
                    finetuned=finetuned,
                    renderer=spec.model.renderer,
                    system_prompt=c.system_prompt,
                    condition=condition,
                    trigger_placement=c.trigger,
                    trigger=e.trigger if c.trigger != "none" else None,
                    sampling=e.sampling,
                    questions=questions,
                    samples_per_question=e.samples_per_question,
                )
                options = SampleOptions(base_model=spec.model.base_model, concurrency=e.concurrency)
                upstream = {"train": "train"} if finetuned else {}
                name = stage_name(base, condition)
                out.append(StageNode(name, self, spec.name, params, options, upstream=upstream))
        return out

    def estimate(
        self,
        node: StageNode[SampleParams, SampleOptions],
        store: RunStore,
        upstream_fresh: bool,
        flags: Flags | None = None,
    ) -> dict[str, int]:
        """Sampling calls (an upper bound: items already in the memo are not drawn again)."""
        p = node.params
        calls = len(p.questions) * p.samples_per_question
        return {"sample_calls": calls, "sample_tokens_max": calls * p.sampling.max_tokens}

    def run(self, ctx: RunContext[SampleParams, SampleOptions]) -> StageResult:
        from spar.engines import get_engine
        from spar.models import load_renderer

        p, o = ctx.params, ctx.options
        engine = get_engine(p.engine, ctx.scratch("engines", p.engine))
        client_args: dict[str, str]
        if p.finetuned:
            ckpt = json.loads(ctx.upstream_file("train", "checkpoint.json").read_text())
            client_args = {"model_path": ckpt["sampler_path"]}
            model: Any = {"train": ctx.upstream_fps["train"]}
        else:
            client_args = {"base_model": o.base_model}
            model = "base"
        renderer = load_renderer(p.renderer, o.base_model)

        memo = ctx.memo()
        items = eval_items(p)
        prompts: dict[tuple[tuple[str, str], ...], Any] = {}
        keys: list[str] = []
        for it in items:
            if it.messages not in prompts:
                prompts[it.messages] = renderer.build_generation_prompt(it.chat())
            keys.append(
                memo.key(
                    {
                        "model": model,
                        "prompt": prompts[it.messages].to_ints(),
                        "question_id": it.question_id,
                        "sample_index": it.sample_index,
                    }
                )
            )
        done, drawn = draw_missing(
            memo,
            keys,
            lambda: engine.create_sampling_client(**client_args),
            renderer,
            [prompts[it.messages] for it in items],
            [item_seed(p.sampling.seed, it.question_id, it.sample_index) for it in items],
            p.sampling,
            o.concurrency,
            desc=f"sample {ctx.name}",
        )
        rows = [{**it.identity(), **done[k]} for it, k in zip(items, keys, strict=True)]
        return StageResult(
            {"samples.jsonl": jsonl_text(rows).encode()},
            details={"items": len(rows), "drawn": drawn},
        )
