"""Judge registry: kind -> factory. Built-ins load lazily; plugins call `register_judge`."""

from __future__ import annotations

from spar.judges.base import BatchJournal, Judge, JudgeConfig, JudgeFactory
from spar.registry import Registry

_JUDGES: Registry[JudgeFactory] = Registry(
    {
        "anthropic": "spar.judges.anthropic:AnthropicJudge",
        "embedding": "spar.judges.embedding:EmbeddingJudge",
    }
)
register_judge = _JUDGES.register
judge_kinds = _JUDGES.names


# As engines (spar.engines.engine_device): the device a judge kind computes on in this process, or
# None for a remote service; plugins declare a `device` attribute on their factory.
_DEVICES: dict[str, str | None] = {"anthropic": None, "embedding": "cpu"}


def judge_device(kind: str) -> str | None:
    from spar.engines import LOCAL_DEVICE

    if kind in _DEVICES:
        return _DEVICES[kind]
    return getattr(_JUDGES.factory(kind), "device", LOCAL_DEVICE)


def judge_factory(kind: str) -> JudgeFactory:
    """The factory registered for a judge kind (its `receives` says which settings it sends)."""
    return _JUDGES.factory(kind)


def get_judge(
    config: JudgeConfig, *, batch: bool = False, journal: BatchJournal | None = None
) -> Judge:
    return _JUDGES.factory(config.kind)(config, batch=batch, journal=journal)
