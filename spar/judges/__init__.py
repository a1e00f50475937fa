"""Judge registry: kind -> factory. Built-ins load lazily; plugins call `register_judge`."""

from __future__ import annotations

import importlib

from spar.judges.base import Judge, JudgeFactory
from spar.spec import JudgeSpec

_BUILTIN: dict[str, str] = {
    "anthropic": "spar.judges.anthropic:AnthropicJudge",
    "embedding": "spar.judges.embedding:EmbeddingJudge",
}
_REGISTERED: dict[str, JudgeFactory] = {}


def register_judge(kind: str, factory: JudgeFactory) -> None:
    _REGISTERED[kind] = factory


def judge_kinds() -> list[str]:
    return sorted(_BUILTIN.keys() | _REGISTERED.keys())


def get_judge(spec: JudgeSpec) -> Judge:
    if spec.kind not in _REGISTERED:
        module, attr = _BUILTIN[spec.kind].split(":")
        _REGISTERED[spec.kind] = getattr(importlib.import_module(module), attr)
    return _REGISTERED[spec.kind](spec)
