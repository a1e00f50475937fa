"""generate: data and eval questions written by an LLM, one stage per step (in progress)."""

from __future__ import annotations

OUTPUT = "generated.jsonl"  # the final stage's output: documents, chat records or questions


def final_stage(name: str) -> str:
    """The stage whose `generated.jsonl` a dataset or an eval reads: `generate.<name>`."""
    return f"generate.{name}"


def step_stage(name: str, step: str) -> str:
    return f"generate.{name}.{step}"
