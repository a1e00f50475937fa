"""Judge rubrics: Jinja templates rendered in a sandbox with StrictUndefined."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import meta, nodes
from jinja2.sandbox import SandboxedEnvironment

from spar.errors import InputError

_ENV = SandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)

# Two values for every per-item variable that differ at their first character (static_prefix).
_SENTINELS = ("\u00a7\u2460\u00a7", "\u00b6\u2461\u00b6")


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


def variables(mode: str) -> tuple[str, ...]:
    """The names a rubric may use in this mode: exactly the keys of `context(mode, ...)`."""
    return tuple(
        context(
            mode,
            tier="",
            question="",
            response="",
            baseline_response="",
            scale_min=0,
            scale_max=0,
        )
    )


def _syntax_error(path: Path, e: jinja2.TemplateSyntaxError) -> InputError:
    return InputError(f"{path}: line {e.lineno}: template syntax error: {e.message}")


@cache
def _compile(path: Path, text: str) -> jinja2.Template:
    try:
        return _ENV.from_string(text)
    except jinja2.TemplateSyntaxError as e:
        raise _syntax_error(path, e) from None


@cache
def _parse(path: Path, text: str) -> nodes.Template:
    try:
        return _ENV.parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise _syntax_error(path, e) from None


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: file not found (judge.rubric)") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory (judge.rubric)") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start})") from None


def load(path: Path) -> jinja2.Template:
    return _compile(path, _read(path))


def render(path: Path, ctx: dict[str, Any]) -> str:
    try:
        return load(path).render(**ctx)
    except jinja2.UndefinedError as e:
        raise InputError(f"{path}: undefined variable in template: {e.message}") from None
    except jinja2.TemplateError as e:
        raise InputError(f"{path}: template error: {e}") from None


def _first_line(ast: nodes.Template, name: str) -> int:
    lines = [n.lineno for n in ast.find_all(nodes.Name) if n.name == name and n.ctx == "load"]
    return min(lines, default=1)


def _check_names(path: Path, ast: nodes.Template, mode: str) -> None:
    """Every variable, filter and test the template uses, in any branch, must exist.

    Rendering once with sample values only checks the branches that sample enters: a variable
    used under `{% if tier == "distant" %}` would otherwise fail on the first distant item, after
    the sampling it depends on has been paid for.
    """
    allowed = variables(mode)
    unknown = meta.find_undeclared_variables(ast) - set(allowed) - set(_ENV.globals)
    if unknown:
        name = min(unknown, key=lambda n: (_first_line(ast, n), n))
        raise InputError(
            f"{path}: line {_first_line(ast, name)}: unknown variable '{name}' "
            f"(the rubric may use: {', '.join(allowed)})"
        )
    for node in ast.find_all((nodes.Filter, nodes.Test)):
        kind, known = (
            ("filter", _ENV.filters) if isinstance(node, nodes.Filter) else ("test", _ENV.tests)
        )
        if node.name not in known:
            raise InputError(f"{path}: line {node.lineno}: unknown {kind} '{node.name}'")


def validate(path: Path, mode: str, scale_min: int, scale_max: int) -> None:
    """Fail early on a syntax error, an unknown variable/filter/test in any branch, or a
    template that cannot render with sample values."""
    text = _read(path)
    _check_names(path, _parse(path, text), mode)
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


def static_prefix(path: Path, mode: str, scale_min: int, scale_max: int) -> str:
    """The part of every rendered prompt that does not depend on the item ("" if none).

    The template is rendered for two sentinel items that differ in every per-item variable (tier,
    question, response, baseline_response) at their first character but share the run's
    constants (mode, scale); their common prefix is what every item's prompt starts with. A
    branch on an item's value can still make a real prompt differ earlier, so callers check
    `prompt.startswith(prefix)` before relying on it.
    """
    renders = []
    try:
        for s in _SENTINELS:
            ctx = context(
                mode,
                tier=s,
                question=s,
                response=s,
                baseline_response=s,
                scale_min=scale_min,
                scale_max=scale_max,
            )
            renders.append(render(path, ctx))
    except Exception:  # a prefix is only an optimisation; validate() reports the error
        return ""
    a, b = renders
    n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return a[:n]
