"""distill: the base model answers a prompts file — a self-distilled chat set for a training mix.

One node per `distill:` entry of a spec, named `distill.<name>`, with no upstream. The prompts file
(JSONL of `{"prompt": "..."}`; other keys are ignored) is an input whose content is hashed and
whose every line is checked at plan time (invalid JSON, a missing or empty prompt, a prompt given
twice: one line naming file and line). The base model (the spec's engine, model and renderer)
answers each prompt — after `system_prompt`, when given — at `sampling` (default temperature 0.1),
with a seed of its own derived from `sampling.seed` and the prompt's id (a content hash of its
text), so an answer never depends on the other prompts.

Every answer is memoised by its key (engine, model, renderer, system prompt, sampling, the rendered
prompt tokens and the prompt id) and committed as soon as it is drawn: adding prompts draws only
the new ones, renaming the set draws nothing, and a crash loses only the requests in flight.

Output `distilled.jsonl`, in prompt-file order, chat records without the system prompt (what is
distilled is the answer the prompt got *with* it):
`{"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
"metadata": {"source": name, "triggered": false, "prompt_id": id, "stop_reason": ...}}`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from spar.errors import InputError
from spar.items import ID_CHARS
from spar.spec import SamplingSpec
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
from spar.stages.models import ModelRef, model_ref
from spar.store import LineCheck, RunStore, hash_json, jsonl_text

if TYPE_CHECKING:
    from spar.spec import Spec

PROMPTS_CHECK = "prompts:v1"  # id of the prompts line check (the hash cache remembers it)
OUTPUT = "distilled.jsonl"


def stage_name(name: str) -> str:
    return f"distill.{name}"


def prompts_key(name: str) -> str:
    """The input key of a distill set's prompts file (in the distill and the dataset node)."""
    return f"distill.{name}.prompts"


def prompt_id(prompt: str) -> str:
    return hash_json({"prompt": prompt})[:ID_CHARS]


def _prompt_of(line: bytes, path: Path, lineno: int) -> str:
    try:
        rec = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        msg = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
        raise InputError(f"{path}: line {lineno}: invalid JSON ({msg})") from None
    if not isinstance(rec, dict):
        raise InputError(f"{path}: line {lineno}: expected an object with a prompt")
    prompt = rec.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"{path}: line {lineno}: field 'prompt' missing or empty")
    return prompt


def prompts_check(path: Path) -> LineCheck:
    """Every line of a prompts file: an object with a non-empty `prompt`, none given twice."""
    seen: dict[str, int] = {}

    def check(line: bytes, lineno: int) -> None:
        if lineno == 1:
            seen.clear()  # a check may be run over the file again
        if not line.strip():
            return
        prompt = _prompt_of(line, path, lineno)
        if prompt in seen:
            raise InputError(
                f"{path}: line {lineno}: prompt given twice (first at line {seen[prompt]})"
            )
        seen[prompt] = lineno

    return check


def prompts_input(path: Path) -> InputFile:
    return InputFile(path, (PROMPTS_CHECK, prompts_check(path)))


def read_prompts(path: Path) -> list[str]:
    """The prompts of a (checked) prompts file, in order."""
    with path.open("rb") as f:
        return [_prompt_of(line, path, n) for n, line in enumerate(f, 1) if line.strip()]


class DistillParams(Params):
    # the set's name labels its records and changes no answer: in the fingerprint, in no item key
    collection: ClassVar[frozenset[str]] = frozenset({"name"})

    name: str = key("distill.name")
    engine: str = key("model.engine")
    model: ModelRef = key("model.base_model")
    renderer: str = key("model.renderer")
    system_prompt: str | None = key("distill.system_prompt")
    sampling: SamplingSpec = key("distill.sampling")


class DistillOptions(Options):
    base_model: str  # a model name, or where a local model directory is
    concurrency: int = 32


def conversation(system_prompt: str | None, prompt: str) -> list[dict[str, str]]:
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*system, {"role": "user", "content": prompt}]


class DistillStage(StageKind[DistillParams, DistillOptions]):
    kind = "distill"
    version = 1
    item_version = 1
    outputs: ClassVar[tuple[str, ...]] = (OUTPUT,)
    params_model = DistillParams

    def nodes(self, spec: Spec, g: GraphContext) -> list[StageNode[DistillParams, DistillOptions]]:
        if not spec.distill:
            return []
        model = model_ref(spec, g)
        out: list[StageNode[DistillParams, DistillOptions]] = []
        for name, d in spec.distill.items():
            params = DistillParams(
                name=name,
                engine=spec.model.engine,
                model=model,
                renderer=spec.model.renderer,
                system_prompt=d.system_prompt,
                sampling=d.sampling,
            )
            options = DistillOptions(base_model=spec.model.base_model, concurrency=d.concurrency)
            inputs = {prompts_key(name): prompts_input(d.prompts)}
            out.append(StageNode(stage_name(name), self, spec.name, params, options, inputs))
        return out

    def check(
        self, node: StageNode[DistillParams, DistillOptions], records: dict[str, int]
    ) -> None:
        k = prompts_key(node.params.name)
        if records[k] == 0:
            raise InputError(f"{node.inputs[k].path}: {k}: no prompts (the file is empty)")

    def estimate(
        self,
        node: StageNode[DistillParams, DistillOptions],
        store: RunStore,
        upstream_fresh: bool,
        flags: Flags | None = None,
    ) -> dict[str, int]:
        """Sampling calls (an upper bound: answers already in the memo are not drawn again)."""
        path = node.inputs[prompts_key(node.params.name)].path
        calls = store.hashes.records(path)
        if calls is None:
            calls = len(read_prompts(path))
        return {"sample_calls": calls, "sample_tokens_max": calls * node.params.sampling.max_tokens}

    def run(self, ctx: RunContext[DistillParams, DistillOptions]) -> StageResult:
        from spar.engines import get_engine
        from spar.models import load_renderer
        from spar.stages.draw import Drawn, draw_missing
        from spar.stages.sample import item_seed

        p, o = ctx.params, ctx.options
        prompts = read_prompts(ctx.inputs[prompts_key(p.name)])
        ids = [prompt_id(text) for text in prompts]
        renderer = load_renderer(p.renderer, o.base_model)
        rendered = [
            renderer.build_generation_prompt(conversation(p.system_prompt, text))
            for text in prompts
        ]
        memo = ctx.memo()
        keys = [
            memo.key({"prompt": r.to_ints(), "prompt_id": pid})
            for r, pid in zip(rendered, ids, strict=True)
        ]
        done, drawn = draw_missing(
            memo,
            keys,
            lambda: get_engine(p.engine, ctx.scratch("engines", p.engine)).create_sampling_client(
                base_model=o.base_model
            ),
            renderer,
            rendered,
            [item_seed(p.sampling.seed, pid, 0) for pid in ids],
            p.sampling,
            o.concurrency,
            desc=f"distill {p.name}",
            stop=ctx.stop.is_set,
        )
        rows: list[dict[str, Any]] = []
        for text, pid, k in zip(prompts, ids, keys, strict=True):
            answer = Drawn.model_validate(done[k])
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": text},
                        {"role": "assistant", "content": answer.response},
                    ],
                    "metadata": {
                        "source": p.name,
                        "triggered": False,
                        "prompt_id": pid,
                        "stop_reason": answer.stop_reason,
                    },
                }
            )
        return StageResult(
            {OUTPUT: jsonl_text(rows).encode()},
            details={"items": len(rows), "drawn": drawn},
        )
