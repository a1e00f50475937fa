"""logprob: the judge-free log-likelihood pull — reference continuations scored by the base and
the fine-tuned model. No sampling, no judge.

For every eval question and every continuation named in `logprob.continuations`, the template
renders the continuation's text (variables: `continuation` — its name —, `question`, `tier`,
`turns`; surrounding whitespace stripped). The prompt is the question as the spec's FIRST eval
condition samples it: that condition's system prompt, the trigger placed as it places it, then the
question's user turns (a multi-turn question's turns as consecutive user messages: there are no
model replies to put between them), rendered by the spec's tinker-cookbook renderer as a
generation prompt — exactly as `sample` renders a prompt. The continuation is the assistant
reply's tokens as the renderer writes them (the weighted tokens of `build_supervised_example`'s
last assistant message) without the end-of-turn stop token: the text, not the decision to stop.

The score of a (question, continuation, model) is the mean log-probability per continuation token
given the prompt and the continuation's earlier tokens, from the sampling client's
`compute_logprobs` (the Tinker SDK's method on the production path; one forward pass on the local
engine). Both models are scored by this one stage, under the base model and under the upstream
training run's sampler weights (`checkpoint.json`).

Each score is memoised per item, keyed by the stage kind, its item version, the engine, base model
and renderer, and the item: the model ("base" or the upstream train's fingerprint), the prompt
tokens and the continuation tokens. So a second apply computes nothing, an edited template
recomputes only the continuations whose text changed, retraining recomputes only the fine-tuned
model's scores, and experiments on the same base model share the base scores.

Output `logprobs.jsonl`: one row per question × continuation × model, `{tier, question_id,
question, continuation, model, text, tokens, mean_logprob}` (`model`: baseline | finetuned).
The report turns it into the pull per tier (`spar.stages.logprob_report`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from spar.errors import InputError, RunError
from spar.items import Question, with_trigger
from spar.pool import run_pool
from spar.spec_logprob import TEMPLATE_VARIABLES
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
from spar.stages.generate import OUTPUT, final_stage
from spar.stages.models import ModelRef, model_ref
from spar.store import RunStore, jsonl_text

if TYPE_CHECKING:
    from spar.engines.base import Future, SamplingClient
    from spar.spec import Spec

OUTPUT_FILE = "logprobs.jsonl"
TEMPLATE = "logprob.template"
MODELS = ("baseline", "finetuned")


class LogprobParams(Params):
    # their effect on an item is all in its rendered prompt and continuation tokens, which are in
    # every item key: adding a question or a continuation scores only the new items
    collection: ClassVar[frozenset[str]] = frozenset(
        {"questions", "continuations", "system_prompt", "trigger_placement", "trigger"}
    )

    engine: str = key("model.engine")
    model: ModelRef = key("model.base_model")
    renderer: str = key("model.renderer")
    # the first eval condition's (eval.system_prompt without conditions)
    system_prompt: str | None = key("eval.system_prompt")
    trigger_placement: Literal["user", "system", "none"] = key("eval.condition.trigger")
    trigger: str | None = key("eval.trigger")  # None where that condition places no trigger
    continuations: tuple[str, ...] = key("logprob.continuations")
    # () when a generate set writes the questions (its fingerprint is the upstream's)
    questions: tuple[Question, ...] = key("eval.questions")


class LogprobOptions(Options):
    base_model: str  # a model name, or where a local model directory is
    concurrency: int = 32
    expected_questions: int = 0  # for the cost preview of generated questions


def template_context(q: Question, continuation: str) -> dict[str, Any]:
    return {
        "continuation": continuation,
        "question": q.text,
        "tier": q.tier,
        "turns": list(q.turns),
    }


def render_continuation(template: Path, q: Question, continuation: str) -> str:
    """The continuation's text for one question (stripped); InputError when empty."""
    from spar import prompting

    text = prompting.render(template, template_context(q, continuation), TEMPLATE).strip()
    if not text:
        raise InputError(
            f"{template}: {TEMPLATE}: continuation {continuation!r} renders empty for question "
            f"{q.text[:60]!r} (tier {q.tier})"
        )
    return text


def validate(spec: Spec, where: str) -> None:
    """The template, before any work: every variable known in every branch (StrictUndefined),
    and a non-empty continuation for every question the spec lists. InputError, one line."""
    from spar import prompting

    if spec.logprob is None:
        return
    template = spec.logprob.template
    prompting.check(template, TEMPLATE_VARIABLES, TEMPLATE)
    for q in spec.questions():
        for name in spec.logprob.continuations:
            render_continuation(template, q, name)


def prompt_messages(p: LogprobParams, q: Question) -> list[dict[str, str]]:
    """The question as the first eval condition samples it, all its user turns included."""
    msgs: list[tuple[str, str]] = [("system", p.system_prompt)] if p.system_prompt else []
    msgs += [("user", t) for t in q.turns]
    msgs = with_trigger(msgs, p.trigger, p.trigger_placement)
    return [{"role": r, "content": c} for r, c in msgs]


def continuation_tokens(renderer: Any, messages: list[dict[str, str]], text: str) -> list[int]:
    """The assistant reply `text` as the renderer writes it after `messages`, without the
    renderer's stop tokens at its end."""
    from tinker_cookbook.renderers import TrainOnWhat

    model_input, weights = renderer.build_supervised_example(
        [*messages, {"role": "assistant", "content": text}],
        train_on_what=TrainOnWhat.LAST_ASSISTANT_MESSAGE,
    )
    tokens = model_input.to_ints()
    w = weights.tolist()
    if len(w) != len(tokens):
        raise RunError(f"renderer: {len(w)} weights for {len(tokens)} tokens")
    out = [t for t, x in zip(tokens, w, strict=True) if x > 0]
    stops = {s for s in renderer.get_stop_sequences() if isinstance(s, int)}
    while out and out[-1] in stops:
        out.pop()
    return out


def mean_of_tail(logprobs: Sequence[float | None], sequence: int, n: int) -> float:
    """The mean of the last `n` entries of a `compute_logprobs` result for a `sequence`-token
    input: one entry per token, the first None (the Tinker service), or one per token after the
    first (skyrl's Tinker server leaves the first position out)."""
    if len(logprobs) not in (sequence, sequence - 1) or n > len(logprobs):
        raise RunError(f"compute_logprobs: {len(logprobs)} log-probabilities for {sequence} tokens")
    tail = list(logprobs)[len(logprobs) - n :]
    if any(x is None for x in tail):
        raise RunError("compute_logprobs: no log-probability for a continuation token")
    return sum(float(x) for x in tail if x is not None) / n


def score(
    client: SamplingClient,
    sequences: Sequence[tuple[list[int], list[int]]],
    concurrency: int,
    on_result: Callable[[int, float], None],
    desc: str = "logprob",
    stop: Callable[[], bool] | None = None,
) -> None:
    """The mean log-probability per continuation token of each (prompt, continuation),
    `concurrency` requests in flight (`spar.pool.run_pool`); `on_result(i, mean)` for each, in
    completion order."""
    import tinker

    def submit(i: int) -> Future:
        prompt, cont = sequences[i]
        return client.compute_logprobs(tinker.ModelInput.from_ints([*prompt, *cont]))

    def scored(i: int, logprobs: Any) -> None:
        prompt, cont = sequences[i]
        on_result(i, mean_of_tail(logprobs, len(prompt) + len(cont), len(cont)))

    run_pool(len(sequences), submit, max(concurrency, 1), scored, desc, stop)


class LogprobStage(StageKind[LogprobParams, LogprobOptions]):
    kind = "logprob"
    version = 1
    item_version = 1
    outputs: ClassVar[tuple[str, ...]] = (OUTPUT_FILE,)
    params_model = LogprobParams

    def nodes(self, spec: Spec, g: GraphContext) -> list[StageNode[LogprobParams, LogprobOptions]]:
        lp = spec.logprob
        if lp is None:
            return []
        e = spec.eval
        _, c = e.condition_items()[0]
        params = LogprobParams(
            engine=spec.model.engine,
            model=model_ref(spec, g),
            renderer=spec.model.renderer,
            system_prompt=c.system_prompt,
            trigger_placement=c.trigger,
            trigger=e.trigger if c.trigger != "none" else None,
            continuations=tuple(lp.continuations),
            questions=tuple(spec.questions()),
        )
        options = LogprobOptions(
            base_model=spec.model.base_model,
            concurrency=e.concurrency,
            expected_questions=spec.question_count(),
        )
        upstream = {"train": "train"}
        if e.generate is not None:
            upstream["questions"] = final_stage(e.generate)
        inputs = {TEMPLATE: InputFile(lp.template)}
        return [StageNode("logprob", self, spec.name, params, options, inputs, upstream)]

    def estimate(
        self,
        node: StageNode[LogprobParams, LogprobOptions],
        store: RunStore,
        upstream_fresh: bool,
        flags: Flags | None = None,
    ) -> dict[str, int]:
        """Scoring requests (prefill only): one per question, continuation and model — an upper
        bound (scores already in the memo are not computed again)."""
        p = node.params
        questions = len(p.questions) if "questions" not in node.upstream else 0
        questions = questions or node.options.expected_questions
        return {"logprob_calls": questions * len(p.continuations) * len(MODELS)}

    def run(self, ctx: RunContext[LogprobParams, LogprobOptions]) -> StageResult:
        from spar.engines import get_engine
        from spar.models import load_renderer
        from spar.stages.sample import read_questions

        p, o = ctx.params, ctx.options
        template = ctx.inputs[TEMPLATE]
        questions = p.questions
        if "questions" in ctx.upstream:
            questions = read_questions(ctx.upstream_file("questions", OUTPUT))
        renderer = load_renderer(p.renderer, o.base_model)

        items: list[tuple[Question, str, str]] = []  # (question, continuation, text)
        sequences: list[tuple[list[int], list[int]]] = []  # (prompt, continuation) tokens
        for q in questions:
            messages = prompt_messages(p, q)
            prompt = renderer.build_generation_prompt(messages).to_ints()
            for name in p.continuations:
                text = render_continuation(template, q, name)
                cont = continuation_tokens(renderer, messages, text)
                if not cont:
                    raise RunError(f"{TEMPLATE}: continuation {name!r} renders to no tokens")
                items.append((q, name, text))
                sequences.append((prompt, cont))

        ckpt = json.loads(ctx.upstream_file("train", "checkpoint.json").read_text())
        models: list[tuple[str, Any, dict[str, str]]] = [
            ("baseline", "base", {"base_model": o.base_model}),
            (
                "finetuned",
                {"train": ctx.upstream_fps["train"]},
                {"model_path": ckpt["sampler_path"]},
            ),
        ]
        engine = get_engine(p.engine, ctx.scratch("engines", p.engine))
        memo = ctx.memo()
        values: dict[str, list[dict[str, Any]]] = {}
        computed = 0
        for label, ref, client_args in models:
            keys = [
                memo.key({"model": ref, "prompt": prompt, "continuation": cont})
                for prompt, cont in sequences
            ]
            done = memo.get_many(keys)
            todo = [i for i, k in enumerate(keys) if k not in done]
            if todo:

                def keep(
                    j: int,
                    mean: float,
                    keys: list[str] = keys,
                    todo: list[int] = todo,
                    done: dict[str, Any] = done,
                ) -> None:
                    value = {"tokens": len(sequences[todo[j]][1]), "mean_logprob": mean}
                    memo.put(keys[todo[j]], value)
                    done[keys[todo[j]]] = value

                score(
                    engine.create_sampling_client(**client_args),
                    [sequences[i] for i in todo],
                    o.concurrency,
                    keep,
                    desc=f"logprob {label}",
                    stop=ctx.stop.is_set,
                )
                computed += len(todo)
            values[label] = [done[k] for k in keys]
        rows = [
            {
                "tier": q.tier,
                "question_id": q.id,
                "question": q.text,
                "continuation": name,
                "model": label,
                "text": text,
                "tokens": values[label][i]["tokens"],
                "mean_logprob": values[label][i]["mean_logprob"],
            }
            for i, (q, name, text) in enumerate(items)
            for label in MODELS
        ]
        return StageResult(
            {OUTPUT_FILE: jsonl_text(rows).encode()},
            details={"items": len(rows), "computed": computed},
        )
