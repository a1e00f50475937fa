"""Judge registry: kind -> factory. Built-ins load lazily; plugins call `register_judge`."""

from __future__ import annotations

from spar.judges.base import BatchJournal, Judge, JudgeConfig, JudgeFactory
from spar.registry import Registry

_JUDGES: Registry[JudgeFactory] = Registry(
    {
        "anthropic": "spar.judges.anthropic:AnthropicJudge",
        "embedding": "spar.judges.embedding:EmbeddingJudge",
    },
    devices={"anthropic": None, "embedding": "cpu"},
)
register_judge = _JUDGES.register
judge_kinds = _JUDGES.names
judge_device = _JUDGES.device  # see Registry.device


def judge_factory(kind: str) -> JudgeFactory:
    """The factory registered for a judge kind (its `receives` says which settings it sends)."""
    return _JUDGES.factory(kind)


def get_judge(
    config: JudgeConfig, *, batch: bool = False, journal: BatchJournal | None = None
) -> Judge:
    return _JUDGES.factory(config.kind)(config, batch=batch, journal=journal)
