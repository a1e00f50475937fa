"""Judge registry: kind -> factory. Built-ins load lazily; plugins call `register_judge`."""

from __future__ import annotations

from pathlib import Path

from spar.judges.base import Judge, JudgeFactory
from spar.registry import Registry
from spar.spec import JudgeSpec

_JUDGES: Registry[JudgeFactory] = Registry(
    {
        "anthropic": "spar.judges.anthropic:AnthropicJudge",
        "embedding": "spar.judges.embedding:EmbeddingJudge",
    }
)
register_judge = _JUDGES.register
judge_kinds = _JUDGES.names


def get_judge(spec: JudgeSpec, workdir: Path | None = None) -> Judge:
    return _JUDGES.factory(spec.kind)(spec, workdir)
