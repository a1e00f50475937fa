"""Spec models of judge reliability: extra judges (`judge.also`) and self-agreement
(`judge.self_agreement`), nested in `judge:` (spar.spec.JudgeSpec).

```yaml
judge:
  kind: anthropic                # ... the main judge as always ...
  rubric: ../prompts/factory_farming_pairwise.j2
  also:                          # extra judges of every judged answer
    - name: coherence
      rubric: ../prompts/coherence_reference.j2   # its own rubric: a different measure
      exclude_below: 3           # answers it scores below 3 leave the main statistics
    - name: second_opinion       # no rubric: the main rubric, judged again -> agreement
      model: claude-haiku-4-5
  self_agreement:                # a share of answers judged again at temperature > 0
    share: 0.1
    temperature: 1.0
    judge: main                  # or the name of a judge in `also`
```

An extra judge's `kind`, `model`, `scale`, `temperature`, `max_tokens` and `max_reasks` default to
the main judge's. With its own rubric it judges every answer on its own (absolute mode, both
models' answers, whatever the main mode); without one (or with the main rubric's file) it is a
*second opinion*: the main rubric in the main mode, on the main scale, and its agreement with the
main judge is reported. Paths are relative to the spec file, like `judge.rubric`.

This module holds the models and the checks that need the main judge's settings
(`check_reliability`, called by JudgeSpec's validator); it imports nothing of spar.spec (which
imports it).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
MAIN = "main"  # the main judge's name where a judge is named (self_agreement.judge)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExtraScaleSpec(_Strict):
    min: int = 1
    max: int = 5

    @model_validator(mode="after")
    def _ordered(self) -> ExtraScaleSpec:
        if self.min >= self.max:
            raise ValueError("scale.min must be below scale.max")
        return self


class AlsoJudgeSpec(_Strict):
    """One extra judge of every judged answer."""

    name: str = Field(description="letters, digits, _ and -; unique; names its stages")
    rubric: Path | None = Field(
        None,
        description="its own rubric (a different measure: every answer judged on its own, "
        "absolute mode); omitted: the main rubric in the main mode (a second opinion, whose "
        "agreement with the main judge is reported)",
        json_schema_extra={"cosmetic": "its content is hashed, not its path"},
    )
    kind: str | None = Field(None, description="judge kind (default: the main judge's)")
    model: str | None = Field(None, description="judge model (default: the main judge's)")
    scale: ExtraScaleSpec | None = Field(
        None, description="its own rubric's scale (default: the main judge's)"
    )
    temperature: float | None = Field(None, ge=0, description="default: the main judge's")
    max_tokens: int | None = Field(None, ge=1, description="default: the main judge's")
    max_reasks: int | None = Field(None, ge=0, description="default: the main judge's")
    exclude_below: float | None = Field(
        None,
        description="answers this judge scores below this leave the main statistics (status "
        "`excluded`, counted); an answer at exactly this score stays",
    )


class SelfAgreementSpec(_Strict):
    """A deterministic share of the answers (chosen by item id) judged again at a temperature."""

    share: float = Field(gt=0, le=1, description="share of the items judged again, in (0, 1]")
    temperature: float = Field(1.0, gt=0, description="the re-judging temperature (> 0)")
    judge: str = Field(MAIN, description="`main`, or the name of a judge in judge.also")


class MainJudge(Protocol):
    """What the checks read of the main judge (spar.spec.JudgeSpec)."""

    @property
    def rubric(self) -> Path: ...
    @property
    def mode(self) -> str: ...
    @property
    def properties(self) -> dict[str, str] | None: ...
    @property
    def also(self) -> list[AlsoJudgeSpec] | None: ...
    @property
    def self_agreement(self) -> SelfAgreementSpec | None: ...


def second_opinion(main: MainJudge, extra: AlsoJudgeSpec) -> bool:
    """Does `extra` judge with the main rubric (omitted, or the same file)?"""
    return extra.rubric is None or Path(extra.rubric).resolve() == Path(main.rubric).resolve()


def check_reliability(main: MainJudge, scale_min: int, scale_max: int) -> None:
    """The checks that need the main judge: unique names, a threshold inside the judge's scale,
    a second opinion on the main scale, a self-agreement judge that exists. Raises ValueError
    naming the field (pydantic prefixes `judge`)."""
    seen: set[str] = set()
    for i, extra in enumerate(main.also or []):
        where = f"also.{i}"
        if not NAME.match(extra.name):
            raise ValueError(f"{where}.name: {extra.name!r}: letters, digits, _ and - only")
        if extra.name == MAIN:
            raise ValueError(f"{where}.name: {MAIN!r} names the main judge; choose another")
        if extra.name in seen:
            raise ValueError(f"{where}.name: {extra.name!r} is given twice")
        seen.add(extra.name)
        same = second_opinion(main, extra)
        if same and extra.scale is not None:
            raise ValueError(
                f"{where}.scale: a second opinion (the main rubric) uses the main judge's scale"
            )
        lo, hi = (extra.scale.min, extra.scale.max) if extra.scale else (scale_min, scale_max)
        x = extra.exclude_below
        if x is not None:
            if not lo < x <= hi:
                raise ValueError(
                    f"{where}.exclude_below: {x:g} is outside the judge's scale: give a score "
                    f"above {lo} (which would exclude nothing) and at most {hi}"
                )
            if same and main.mode == "pairwise":
                raise ValueError(
                    f"{where}.exclude_below: needs a verdict per answer; a second opinion in "
                    "pairwise mode judges pairs (give this judge its own rubric)"
                )
    sa = main.self_agreement
    if sa is not None and sa.judge != MAIN and sa.judge not in seen:
        raise ValueError(
            f"self_agreement.judge: no judge named {sa.judge!r} (known: {', '.join([MAIN, *seen])})"
        )


def resolve_paths(judge: dict[str, Any], absolute: Callable[[Any], Any]) -> None:
    """Make each `judge.also[].rubric` absolute (relative to the spec file that wrote it)."""
    also = judge.get("also")
    if not isinstance(also, list):
        return
    for extra in also:
        if isinstance(extra, dict) and isinstance(extra.get("rubric"), str):
            extra["rubric"] = absolute(extra["rubric"])


def input_files(main: MainJudge) -> list[tuple[str, Path]]:
    """(spec key, path) of every extra judge's own rubric."""
    return [
        (f"judge.also.{i}.rubric", Path(e.rubric))
        for i, e in enumerate(main.also or [])
        if e.rubric is not None
    ]
