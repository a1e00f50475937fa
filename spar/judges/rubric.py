"""Judge rubrics: Jinja templates rendered in a sandbox with StrictUndefined."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from spar.errors import InputError

_ENV = SandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def context(
    mode: str,
    *,
    tier: str,
    question: str,
    response: str,
    baseline_response: str | None,
    scale_min: int,
    scale_max: int,
) -> dict[str, Any]:
    """The variables a rubric may use. Pairwise adds baseline_response / finetuned_response."""
    ctx: dict[str, Any] = {
        "mode": mode,
        "tier": tier,
        "question": question,
        "response": response,
        "scale_min": scale_min,
        "scale_max": scale_max,
    }
    if mode == "pairwise":
        ctx["baseline_response"] = baseline_response
        ctx["finetuned_response"] = response
    return ctx


@cache
def _compile(path: Path, text: str) -> jinja2.Template:
    try:
        return _ENV.from_string(text)
    except jinja2.TemplateSyntaxError as e:
        raise InputError(f"{path}: line {e.lineno}: template syntax error: {e.message}") from None


def load(path: Path) -> jinja2.Template:
    return _compile(path, path.read_text())


def render(path: Path, ctx: dict[str, Any]) -> str:
    try:
        return load(path).render(**ctx)
    except jinja2.UndefinedError as e:
        raise InputError(f"{path}: undefined variable in template: {e.message}") from None
    except jinja2.TemplateError as e:
        raise InputError(f"{path}: template error: {e}") from None


def validate(path: Path, mode: str, scale_min: int, scale_max: int) -> None:
    """Compile and render once with sample values so syntax errors and unknown names fail early."""
    render(
        path,
        context(
            mode,
            tier="direct",
            question="Q?",
            response="A.",
            baseline_response="B.",
            scale_min=scale_min,
            scale_max=scale_max,
        ),
    )
