"""Generators: who writes generated data — Claude (`anthropic`) or any engine's sampling client."""

from __future__ import annotations

from pathlib import Path

from spar.generators.base import Generator, GenReply, GenRequest, parse_items

__all__ = [
    "GenReply",
    "GenRequest",
    "Generator",
    "generator_kinds",
    "make_generator",
    "parse_items",
]

ANTHROPIC = "anthropic"
DEFAULT_CLAUDE = "claude-sonnet-4-6"


def generator_kinds() -> list[str]:
    """`anthropic` and every registered engine (its sampling client writes)."""
    from spar.engines import engine_names

    return [ANTHROPIC, *engine_names()]


def make_generator(
    kind: str,
    model: str,
    *,
    renderer: str,
    workdir: Path,
    max_tokens: int,
    system_prompt: str | None,
    temperature: float,
    max_retries: int,
) -> Generator:
    if kind == ANTHROPIC:
        from spar.generators.anthropic import AnthropicGenerator

        return AnthropicGenerator(
            model, max_tokens=max_tokens, system_prompt=system_prompt, max_retries=max_retries
        )
    from spar.generators.engine import EngineGenerator

    return EngineGenerator(
        kind,
        model,
        renderer,
        workdir,
        max_tokens=max_tokens,
        system_prompt=system_prompt,
        temperature=temperature,
        max_retries=max_retries,
    )
