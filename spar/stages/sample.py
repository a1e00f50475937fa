"""sample: every (question, sample index) through a fresh sampling client.

The baseline (`sample_base`) and the fine-tuned model (`sample_finetuned`) are this one stage kind
with a different model reference; so is each intermediate checkpoint of `eval.checkpoints`
(`sample_step<N>`: the weights the train stage saved after N steps, its `checkpoint.json`'s
`checkpoints["N"]`; per condition `sample_step<N>.<condition>`). Every item is memoised by its
key (the stage's parameters less the question list and sample count, the model — base or the
upstream training run's fingerprint, with the step for a checkpoint — the rendered prompt tokens,
the question id and the sample index), so a second experiment on the same base model reuses the
baseline and raising samples_per_question draws only the new indices.

A multi-turn question is sampled in rounds: round t draws reply t of every conversation that has a
user turn t, its prompt rendered from the first turn's messages, the earlier replies and user
turns (sequential within a conversation, concurrent across conversations). Each reply is memoised
by its own key: the one above, with the id of the question's FIRST turn as question id and, from
turn 1 on, the turn index; its rendered prompt carries the earlier turns and replies. So a reply
depends only on the conversation up to it: adding a turn to a question draws only the new turn
(and a question's first reply is the draw of the single-turn question of its first turn).
Questions written by a generate set (`eval.generate`) are read from its output when it runs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from spar.errors import RunError
from spar.items import EvalItem, Question, stage_name
from spar.spec import SamplingSpec, load_questions, questions_of
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
from spar.stages.generate import OUTPUT, final_stage
from spar.stages.models import ModelRef, model_ref
from spar.stages.train import intermediate_checkpoints
from spar.store import RunStore, derive_seed, jsonl_text

if TYPE_CHECKING:
    from spar.engines.base import SamplingClient
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
    # () when a generate set writes the questions (its fingerprint is the upstream's)
    questions: tuple[Question, ...] = key("eval.questions")
    samples_per_question: int = key("eval.samples_per_question")
    # an intermediate checkpoint (training step) of the fine-tuned model; None: the final one
    checkpoint: int | None = key("eval.checkpoint")
    # the final model's params are what they were before checkpoints existed
    added: ClassVar[dict[str, Any]] = {"checkpoint": None}


class SampleOptions(Options):
    base_model: str  # a model name, or where a local model directory is
    concurrency: int = 32
    # for the cost preview before generated questions exist: their user turns (an upper bound)
    expected_turns: int = 0


def checkpoint_stage(base: str, step: int) -> str:
    """The stage (before its condition suffix) of an intermediate checkpoint: `sample_step10`,
    `judge_step10`."""
    return f"{base}_step{step}"


def item_seed(seed: int, question_id: str, sample_index: int) -> int:
    """Each (question, sample index) has its own seed: sample k never depends on how many were
    drawn, and different questions never share random draws. The base and the fine-tuned model
    use the same seed for the same item, so their answers are paired draws."""
    return derive_seed(seed, question_id, sample_index)


def turn_seed(seed: int, turn: int) -> int:
    """The seed of reply `turn` of an item whose (first reply's) seed is `seed`: turn 0 keeps it,
    a later turn's derives from it and the turn index."""
    if turn == 0:
        return seed
    return derive_seed(seed, "turn", turn)


def read_questions(path: Path) -> tuple[Question, ...]:
    """The questions of an eval questions file (a generate set's output has its format), in the
    order `Spec.questions()` gives a spec's: grouped by tier, in first-seen tier order."""
    return tuple(questions_of(load_questions(path)))


def eval_items(p: SampleParams, questions: Sequence[Question] | None = None) -> list[EvalItem]:
    """Every (question, sample index) item of `questions` (default: the params' own)."""
    return [
        EvalItem.build(q, i, p.system_prompt, p.condition, p.trigger, p.trigger_placement)
        for q in (p.questions if questions is None else questions)
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
        generated: dict[str, str] = {}
        turns = 0
        if e.generate is not None:
            generated = {"questions": final_stage(e.generate)}
            turns = spec.turn_count()
        models: list[tuple[str, bool, int | None]] = [
            ("sample_base", False, None),
            ("sample_finetuned", True, None),
            *((checkpoint_stage("sample", n), True, n) for n in intermediate_checkpoints(spec)),
        ]
        for condition, c in e.condition_items():
            for base, finetuned, step in models:
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
                    checkpoint=step,
                )
                options = SampleOptions(
                    base_model=spec.model.base_model,
                    concurrency=e.concurrency,
                    expected_turns=turns,
                )
                upstream = {**generated, **({"train": "train"} if finetuned else {})}
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
        """Sampling calls, one per reply of every user turn (an upper bound: replies already in
        the memo are not drawn again; generated questions not written yet are counted from
        their generate set's counts)."""
        p = node.params
        turns = sum(len(q.turns) for q in p.questions)
        if "questions" in node.upstream:
            path = store.stage_dir(*node.upstream_at("questions")) / OUTPUT
            if upstream_fresh and path.exists():
                turns = sum(len(q.turns) for q in read_questions(path))
            else:
                turns = node.options.expected_turns
        calls = turns * p.samples_per_question
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
            if p.checkpoint is not None:
                saved = (ckpt.get("checkpoints") or {}).get(str(p.checkpoint))
                if saved is None:
                    raise RunError(
                        f"{ctx.name}: the train stage saved no checkpoint at step {p.checkpoint} "
                        "(eval.checkpoints)"
                    )
                client_args = {"model_path": saved}
                model = {**model, "step": p.checkpoint}
        else:
            client_args = {"base_model": o.base_model}
            model = "base"
        renderer = load_renderer(p.renderer, o.base_model)

        questions = p.questions
        if "questions" in ctx.upstream:
            questions = read_questions(ctx.upstream_file("questions", OUTPUT))
        items = eval_items(p, questions)
        memo = ctx.memo()
        made: list[SamplingClient] = []

        def client() -> SamplingClient:  # one sampling client for every round, made on demand
            if not made:
                made.append(engine.create_sampling_client(**client_args))
            return made[0]

        # replies[i]: the memoised draws of item i so far, one per user turn
        replies: list[list[dict[str, Any]]] = [[] for _ in items]
        drawn = 0
        for turn in range(max((it.turn_count for it in items), default=0)):
            active = [i for i, it in enumerate(items) if it.turn_count > turn]
            messages = [
                items[i].prompt_at(turn, [r["response"] for r in replies[i]]) for i in active
            ]
            prompts: dict[tuple[tuple[str, str], ...], Any] = {}
            keys: list[str] = []
            seeds: list[int] = []
            for i, msgs in zip(active, messages, strict=True):
                if msgs not in prompts:
                    prompts[msgs] = renderer.build_generation_prompt(items[i].chat(msgs))
                basis: dict[str, Any] = {
                    "model": model,
                    "prompt": prompts[msgs].to_ints(),
                    "question_id": items[i].first_turn_id,
                    "sample_index": items[i].sample_index,
                }
                if turn:  # turn 0's key is the single-turn key: those items stay memoised
                    basis["turn"] = turn
                keys.append(memo.key(basis))
                seeds.append(
                    turn_seed(
                        item_seed(p.sampling.seed, basis["question_id"], items[i].sample_index),
                        turn,
                    )
                )
            done, n = draw_missing(
                memo,
                keys,
                client,
                renderer,
                [prompts[m] for m in messages],
                seeds,
                p.sampling,
                o.concurrency,
                desc=f"sample {ctx.name}" + (f" turn {turn + 1}" if turn else ""),
                stop=ctx.stop.is_set,
            )
            drawn += n
            for i, k in zip(active, keys, strict=True):
                replies[i].append(done[k])
        rows: list[dict[str, Any]] = []
        for it, rs in zip(items, replies, strict=True):
            row = {**it.identity(), **rs[-1]}  # the last reply's response and stop reason
            if it.turn_count > 1:
                row["conversation"] = it.conversation([r["response"] for r in rs])
            rows.append(row)
        return StageResult(
            {"samples.jsonl": jsonl_text(rows).encode()},
            details={"items": len(rows), "drawn": drawn},
        )
