"""Generator on an engine's sampling client (the local SmolLM2, a Tinker model): the prompt is
one user message through the spec's renderer; the reply's text is read by `parse_items` (no
structured output: a small model's list may be messy, and an unusable reply is drawn again with
another seed)."""

from __future__ import annotations

from pathlib import Path

from spar.generators.base import GenReply, GenRequest, OnReply, parse_items
from spar.spec import SamplingSpec
from spar.store import derive_seed


def retry_seed(seed: int, attempt: int) -> int:
    return seed if attempt == 0 else derive_seed(seed, attempt)


class EngineGenerator:
    def __init__(
        self,
        engine: str,
        model: str,
        renderer: str,
        workdir: Path,
        *,
        max_tokens: int,
        system_prompt: str | None,
        temperature: float,
        max_retries: int,
    ) -> None:
        self.system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        self.engine = engine
        self.model = model
        self.renderer_name = renderer
        self.workdir = workdir
        self.sampling = SamplingSpec(temperature=temperature, max_tokens=max_tokens)
        self.max_retries = max_retries

    def generate_many(
        self, requests: list[GenRequest], concurrency: int, on_reply: OnReply
    ) -> None:
        """Draws in one request pool: a request without a usable item is drawn again with its
        next seed, up to 1 + max_retries attempts; each reply is handed over as it settles."""
        if not requests:
            return
        from spar.engines import get_engine
        from spar.models import load_renderer
        from spar.stages.draw import Drawn, draw

        renderer = load_renderer(self.renderer_name, self.model)
        client = get_engine(self.engine, self.workdir).create_sampling_client(base_model=self.model)
        prompts = [
            renderer.build_generation_prompt([*self.system, {"role": "user", "content": r.prompt}])
            for r in requests
        ]
        # one pool for every attempt: a reply without a usable item is drawn again with the
        # request's next seed as soon as it is read (jobs: (request, attempt), appended to)
        jobs = [(i, 0) for i in range(len(requests))]
        job_prompts = list(prompts)
        job_seeds = [r.seed for r in requests]

        def settle(k: int, drawn: Drawn) -> None:
            i, attempt = jobs[k]
            req = requests[i]
            items, problem = parse_items(drawn.response, req.n, req.turns)
            if items:
                on_reply(i, GenReply(items=items, status="ok", attempts=attempt + 1))
            elif attempt < self.max_retries:
                jobs.append((i, attempt + 1))
                job_prompts.append(prompts[i])
                job_seeds.append(retry_seed(req.seed, attempt + 1))
            else:
                on_reply(
                    i,
                    GenReply(items=[], status="unusable", attempts=attempt + 1, problem=problem),
                )

        draw(
            client,
            renderer,
            job_prompts,
            job_seeds,
            self.sampling,
            concurrency,
            settle,
            desc="generate",
        )
