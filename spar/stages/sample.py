"""sample: tiers × questions × samples_per_question through a fresh sampling client.

The baseline (`sample_base`) and the fine-tuned model (`sample_finetuned`) are this one stage kind
with a different model reference. Every item is memoised by (engine, model reference, rendered
prompt tokens, sampling parameters, sample index, seed), so a second experiment on the same base
model reuses the baseline and raising samples_per_question draws only the new indices.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from pydantic import BaseModel

from spar.stages.base import RunContext, StageKind, StageNode
from spar.store import RunStore, hash_json, jsonl_text


class SampleRow(BaseModel):
    tier: str
    question: str
    sample_index: int
    response: str
    stop_reason: str


def item_seed(seed: int, sample_index: int) -> int:
    """Each sample index has its own seed, so sample k never depends on how many were drawn."""
    return int(hash_json([seed, sample_index])[:8], 16) & 0x7FFFFFFF


def build_messages(system_prompt: str | None, question: str) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*msgs, {"role": "user", "content": question}]


class SampleStage(StageKind):
    kind = "sample"
    version = 1
    outputs: ClassVar[tuple[str, ...]] = ("samples.jsonl",)
    param_keys: ClassVar[tuple[str, ...]] = (
        "model.engine",
        "model.base_model",
        "model.renderer",
        "eval.tiers",
        "eval.samples_per_question",
        "eval.sampling",
        "eval.system_prompt",
    )

    def estimate(self, node: StageNode, store: RunStore, upstream_fresh: bool) -> dict[str, int]:
        """Sampling calls (an upper bound: items already in the memo are not drawn again)."""
        spec = node.spec
        assert spec is not None
        calls = len(spec.questions()) * spec.eval.samples_per_question
        return {"sample_calls": calls, "sample_tokens_max": calls * spec.eval.sampling.max_tokens}

    def run(self, ctx: RunContext) -> dict[str, bytes]:
        import tinker
        from tqdm import tqdm

        from spar.engines import get_engine
        from spar.models import load_renderer

        spec = ctx.spec
        engine = get_engine(spec.model.engine, ctx.store.scratch("engines", spec.model.engine))
        if "train" in ctx.node.upstream:
            ckpt = json.loads(ctx.upstream_file("train", "checkpoint.json").read_text())
            model_ref = {"engine": spec.model.engine, "model_path": ckpt["sampler_path"]}
        else:
            model_ref = {"engine": spec.model.engine, "base_model": spec.model.base_model}
        renderer = load_renderer(spec.model.renderer, spec.model.base_model)
        sp = spec.eval.sampling
        sampling = {"temperature": sp.temperature, "top_p": sp.top_p, "max_tokens": sp.max_tokens}

        items: list[tuple[str, str, int, Any, str]] = []  # tier, question, index, prompt, key
        for tier, question in spec.questions():
            prompt = renderer.build_generation_prompt(
                build_messages(spec.eval.system_prompt, question)
            )
            for i in range(spec.eval.samples_per_question):
                key = hash_json(
                    {
                        "model": model_ref,
                        "prompt": prompt.to_ints(),
                        "sampling": sampling,
                        "index": i,
                        "seed": sp.seed,
                    }
                )
                items.append((tier, question, i, prompt, key))

        memo = ctx.memo("samples")
        todo = [it for it in items if it[4] not in memo]
        if todo:
            client = engine.create_sampling_client(
                **{k: v for k, v in model_ref.items() if k != "engine"}
            )
            stops = renderer.get_stop_sequences()
            bar = tqdm(total=len(todo), desc=f"sample {ctx.node.name}", leave=False)
            window = spec.eval.concurrency
            for start in range(0, len(todo), window):
                chunk = todo[start : start + window]
                futures = [
                    client.sample(
                        prompt,
                        1,
                        tinker.SamplingParams(
                            **sampling, seed=item_seed(sp.seed, index), stop=stops
                        ),
                    )
                    for _, _, index, prompt, _ in chunk
                ]
                for (_, _, _, _, key), fut in zip(chunk, futures, strict=True):
                    seq = fut.result().sequences[0]
                    message, _ = renderer.parse_response(list(seq.tokens))
                    text = (
                        message["content"]
                        if isinstance(message["content"], str)
                        else str(message["content"])
                    )
                    memo.put(key, {"response": text, "stop_reason": str(seq.stop_reason)})
                    bar.update(1)
            bar.close()
        rows = []
        for tier, question, index, _, key in items:
            got = memo.get(key)
            assert got is not None
            rows.append(
                SampleRow(tier=tier, question=question, sample_index=index, **got).model_dump()
            )
        memo.close()
        return {"samples.jsonl": jsonl_text(rows).encode()}
