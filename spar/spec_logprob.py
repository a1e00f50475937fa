"""Spec model of `logprob:` — the judge-free log-likelihood pull.

Reference continuations (a Jinja template rendered per question and continuation name) are scored
by their mean per-token log-probability under the base and the fine-tuned model, given each eval
question as the prompt. The pull of a question is Δ(first) − Δ(second), where Δ(c) is the
fine-tuned minus the base model's mean log-probability of continuation c (Δ(first) alone when one
continuation is named).
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"
# the variables the template is rendered with
TEMPLATE_VARIABLES = ("continuation", "question", "tier", "turns")


class LogprobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    template: Path = Field(
        ...,
        json_schema_extra={"cosmetic": "its content is hashed, not its path"},
        description="Jinja template of a reference continuation, rendered per (question, "
        "continuation) with `continuation` (its name), `question`, `tier` and `turns`",
    )
    continuations: list[str] = Field(
        min_length=1,
        description="continuation names, e.g. [topic, neutral]: pull = Δ(first) − Δ(second) "
        "(Δ(first) alone when one is named), Δ = fine-tuned − base mean log-prob per token",
    )

    @field_validator("continuations")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        for name in v:
            if not re.match(NAME_PATTERN, name):
                raise ValueError(f"{name!r}: letters, digits, _ and - only")
        dup = sorted({n for n in v if v.count(n) > 1})
        if dup:
            raise ValueError(f"{dup[0]!r} given twice")
        return v
