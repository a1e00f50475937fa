"""Judge rubrics: Jinja templates rendered in a sandbox with StrictUndefined."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2

from spar import prompting
from spar.errors import InputError

# Two values for every per-item variable that differ at their first character (static_prefix).
_SENTINELS = ("\u00a7\u2460\u00a7", "\u00b6\u2461\u00b6")


Message = dict[str, str]  # {"role": "user" | "assistant", "content": ...}


def context(
    mode: str,
    *,
    tier: str,
    question: str,
    response: str,
    baseline_response: str | None,
    scale_min: int,
    scale_max: int,
    conversation: list[Message] | None = None,
    baseline_conversation: list[Message] | None = None,
    prop: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """The variables a rubric may use.

    `conversation`: the whole exchange that ends in `response` (every user and assistant turn,
    no system prompt); a single-turn answer's is [question, response], the default. Pairwise adds
    `baseline_response` / `finetuned_response` and `baseline_conversation`. `prop` (name,
    description), given only when the judge has `judge.properties`, adds `property` and
    `property_description`.
    """
    ctx: dict[str, Any] = {
        "mode": mode,
        "tier": tier,
        "question": question,
        "response": response,
        "scale_min": scale_min,
        "scale_max": scale_max,
        "conversation": conversation if conversation is not None else _exchange(question, response),
    }
    if mode == "pairwise":
        ctx["baseline_response"] = baseline_response
        ctx["finetuned_response"] = response
        ctx["baseline_conversation"] = (
            baseline_conversation
            if baseline_conversation is not None
            else _exchange(question, baseline_response or "")
        )
    if prop is not None:
        ctx["property"], ctx["property_description"] = prop
    return ctx


def _exchange(question: str, response: str) -> list[Message]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": response}]


def variables(mode: str, properties: bool = False) -> tuple[str, ...]:
    """The names a rubric may use in this mode (and with `judge.properties` or without):
    exactly the keys of `context(...)`."""
    return tuple(
        context(
            mode,
            tier="",
            question="",
            response="",
            baseline_response="",
            scale_min=0,
            scale_max=0,
            prop=("", "") if properties else None,
        )
    )


WHAT = "judge.rubric"


def load(path: Path) -> jinja2.Template:
    return prompting.load(path, WHAT)


def render(path: Path, ctx: dict[str, Any]) -> str:
    return prompting.render(path, ctx, WHAT)


PROPERTY_VARIABLES = ("property", "property_description")


def _check_names(path: Path, mode: str, properties: bool) -> None:
    """Every variable, filter and test the template uses, in any branch, must exist; with
    `judge.properties` the template must use `property`."""
    hints = dict.fromkeys(PROPERTY_VARIABLES, "only with judge.properties; ")
    used = prompting.check(path, variables(mode, properties), WHAT, "the rubric", hints)
    if properties and "property" not in used:
        raise InputError(
            f"{path}: judge.properties is set but the rubric does not use property: every "
            "property would get the same verdict"
        )


def validate(
    path: Path, mode: str, scale_min: int, scale_max: int, *, properties: bool = False
) -> None:
    """Fail early on a syntax error, an unknown variable/filter/test in any branch, a rubric that
    ignores `property` although `judge.properties` is set (`properties`), or a template that
    cannot render with sample values."""
    _check_names(path, mode, properties)
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
            prop=("a_property", "what it means") if properties else None,
        ),
    )


def static_prefix(
    path: Path, mode: str, scale_min: int, scale_max: int, *, properties: bool = False
) -> str:
    """The part of every rendered prompt that does not depend on the item ("" if none).

    The template is rendered for two sentinel items that differ in every per-item variable (tier,
    question, response, baseline_response, the conversations' messages, property and its
    description) at their first character but share the run's constants (mode, scale); their
    common prefix is what every item's prompt starts with. A branch on an item's value can still
    make a real prompt differ earlier, so callers check `prompt.startswith(prefix)` before
    relying on it.
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
                prop=(s, s) if properties else None,
            )
            renders.append(render(path, ctx))
    except Exception:  # a prefix is only an optimisation; validate() reports the error
        return ""
    a, b = renders
    n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return a[:n]
