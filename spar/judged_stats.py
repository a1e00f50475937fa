"""`spar stats`: the report's statistics for judged files from any source.

Reads spar's own `judged.jsonl` (`{tier, question_id, question, model, status, score, ...}`) and
the seed scripts' `{tier, question, score, reasoning}` rows alike: rows that share a question
(its `question_id`, else its text) are that question's samples; rows are split by `model` (none
when the rows have none) and by `property` (when they have one). A verdict counts when its status
is `ok` (a row without a status: when its score is a number); the rest are counted as invalid or
errors and never enter a mean. Each group's mean and interval are `spar.stats.estimate` of the
question groups — exactly what the report stage computes for a tier and model.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from spar.errors import InputError
from spar.plots import tier_order
from spar.stats import Generalize, estimate

MODEL_ORDER = {"baseline": 0, "finetuned": 1}


class JudgedRow(BaseModel):
    """One judged answer, as spar or the seed scripts write it (other fields ignored)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    tier: str
    question: str | None = None
    question_id: str | None = None
    score: float | None = None
    status: Literal["ok", "invalid", "error"] | None = None
    model: str | None = None
    prop: str | None = Field(None, alias="property")

    @model_validator(mode="after")
    def _identified(self) -> JudgedRow:
        if self.question is None and self.question_id is None:
            raise ValueError("needs `question` or `question_id`")
        if self.status == "ok" and self.score is None:
            raise ValueError("status ok without a score")
        return self

    @property
    def verdict(self) -> str:
        """ok, invalid or error."""
        if self.status is not None:
            return self.status
        return "ok" if self.score is not None else "invalid"

    @property
    def key(self) -> str:
        return self.question_id if self.question_id is not None else str(self.question)


def read_judged(path: Path) -> list[JudgedRow]:
    """Every row of a judged JSONL file; InputError (file and line) on a bad one."""
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    rows: list[JudgedRow] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(JudgedRow.model_validate(json.loads(line)))
        except json.JSONDecodeError:
            raise InputError(f"{path}: line {n}: invalid JSON") from None
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            raise InputError(f"{path}: line {n}: {where + ': ' if where else ''}{msg}") from None
    if not rows:
        raise InputError(f"{path}: no judged rows")
    return rows


def judged_stats(
    path: Path,
    rows: list[JudgedRow],
    generalize: Generalize = "questions",
    confidence: float = 0.95,
) -> list[dict[str, Any]]:
    """One entry per (tier, model, property) of a file: `{file, tier, model, [property], mean,
    ci_low, ci_high, n, questions, invalid, errors, method}`; tiers in semantic order."""
    groups: dict[tuple[str, str | None, str | None], list[JudgedRow]] = defaultdict(list)
    for r in rows:
        groups[(r.tier, r.model, r.prop)].append(r)
    with_property = any(r.prop is not None for r in rows)
    tiers = tier_order(list(dict.fromkeys(r.tier for r in rows)))
    out = []
    for tier, model, prop in sorted(
        groups,
        key=lambda g: (tiers.index(g[0]), MODEL_ORDER.get(g[1] or "", 2), g[1] or "", g[2] or ""),
    ):
        mine = groups[(tier, model, prop)]
        by_q: dict[str, list[float]] = defaultdict(list)
        for r in mine:
            if r.verdict == "ok":
                by_q[r.key].append(float(r.score))  # type: ignore[arg-type]
        est = estimate([dict(by_q)], generalize, confidence)
        entry: dict[str, Any] = {"file": str(path), "tier": tier, "model": model}
        if with_property:
            entry["property"] = prop
        out.append(
            {
                **entry,
                "mean": est.mean,
                "ci_low": est.low,
                "ci_high": est.high,
                "n": est.n,
                "questions": est.questions,
                "invalid": sum(r.verdict == "invalid" for r in mine),
                "errors": sum(r.verdict == "error" for r in mine),
                "method": est.method,
            }
        )
    return out


def format_stats(entries: list[dict[str, Any]], generalize: str, confidence: float) -> str:
    """The text table of `spar stats`: per file, a line per tier, model (and property)."""
    lines: list[str] = []
    last = None
    for e in entries:
        if e["file"] != last:
            last = e["file"]
            lines.append(("" if not lines else "\n") + e["file"])
        who = " ".join(x for x in (e["tier"], e["model"], e.get("property")) if x)
        if e["mean"] is None:
            value = "no valid verdicts"
        elif e["ci_low"] is None:
            value = f"{e['mean']:.2f} [no interval]"
        else:
            value = f"{e['mean']:.2f} [{e['ci_low']:.2f}, {e['ci_high']:.2f}]"
        k = e["questions"]
        few = " (wide: few questions)" if 0 < k < 10 and e["ci_low"] is not None else ""
        lines.append(
            f"  {who}: {value}{few}; n {e['n']}, {k} question{'' if k == 1 else 's'}, "
            f"{e['invalid']} invalid, {e['errors']} errors"
        )
    target = (
        "a new question of the tier's population"
        if generalize == "questions"
        else "these questions fixed, new answers sampled"
    )
    lines.append(f"\n{confidence * 100:g} % t intervals generalising to {target}")
    return "\n".join(lines)
