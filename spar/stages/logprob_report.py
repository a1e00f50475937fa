"""The log-likelihood pull per tier, from `logprobs.jsonl` (the `logprob` stage's output).

Δ(c) of a question = the fine-tuned model's mean log-probability per token of continuation c minus
the base model's (nats per token; > 0: training made the continuation more likely). The pull of a
question = Δ(first) − Δ(second) (Δ(first) alone when one continuation is named): how much more
training pulled the model towards the first continuation than towards the second. Per tier: the
mean over its questions of each, with an interval from the report's estimator (one value per
question: the question is the unit), and each continuation's mean log-probabilities.

`summary.json` gets it as `logprob: {continuations, pull_definition, tiers: {tier: {pull,
delta: {c: ...}, mean_logprob: {c: {baseline, finetuned}}, questions}}}`; `spar show`, the plot
and the HTML report read it through `headline` and `tier_rows`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

Row = dict[str, Any]
# (groups: one seed of {question id: [value]}, what is estimated) -> {mean, ci_low, ci_high, n, ...}
Estimator = Callable[[list[dict[str, list[float]]], str], dict[str, Any]]


def pull_definition(names: Sequence[str]) -> str:
    if len(names) > 1:
        return f"Δ({names[0]}) − Δ({names[1]})"
    return f"Δ({names[0]})"


def _delta_words(c: str) -> str:
    return (
        f"fine-tuned − base mean log-probability per token of continuation {c} given the "
        "question (nats)"
    )


def logprob_summary(rows: list[Row], tiers: Sequence[str], est: Estimator) -> dict[str, Any]:
    """The `logprob` block of summary.json. `rows`: logprobs.jsonl; `tiers`: the report's tier
    order (tiers without rows are left out; tiers only in the rows come after)."""
    names = list(dict.fromkeys(r["continuation"] for r in rows))
    lp = {(r["question_id"], r["continuation"], r["model"]): float(r["mean_logprob"]) for r in rows}
    tier_of = {r["question_id"]: r["tier"] for r in rows}
    complete = [
        q for q in tier_of if all((q, c, m) in lp for c in names for m in ("baseline", "finetuned"))
    ]

    def delta(q: str, c: str) -> float:
        return lp[(q, c, "finetuned")] - lp[(q, c, "baseline")]

    def pull(q: str) -> float:
        return delta(q, names[0]) - (delta(q, names[1]) if len(names) > 1 else 0.0)

    definition = pull_definition(names) if names else ""
    out_tiers: dict[str, Any] = {}
    order = [t for t in tiers if t in tier_of.values()]
    order += [t for t in dict.fromkeys(tier_of.values()) if t not in order]
    for tier in order:
        qs = [q for q in complete if tier_of[q] == tier]
        if not qs:
            continue
        scope = f"in tier {tier}"
        out_tiers[tier] = {
            "pull": est(
                [{q: [pull(q)] for q in qs}],
                f"mean over the questions {scope} of {definition}, Δ(c) = {_delta_words('c')}",
            ),
            "delta": {
                c: est(
                    [{q: [delta(q, c)] for q in qs}],
                    f"mean over the questions {scope} of the {_delta_words(repr(c))}",
                )
                for c in names
            },
            "mean_logprob": {
                c: {m: sum(lp[(q, c, m)] for q in qs) / len(qs) for m in ("baseline", "finetuned")}
                for c in names
            },
            "questions": len(qs),
        }
    return {
        "continuations": names,
        "pull_definition": definition,
        "questions_incomplete": len(tier_of) - len(complete),
        "tiers": out_tiers,
    }


def headline(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`pull <tier>` -> the pull's statistic, for `spar show`; {} without a logprob block."""
    block = summary.get("logprob") or {}
    return {f"pull {t}": per["pull"] for t, per in block.get("tiers", {}).items()}


def tier_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Per tier: the pull, and per continuation its Δ and the mean log-probabilities under
    `baseline` and `finetuned` (the HTML table)."""
    block = summary.get("logprob") or {}
    return [
        {
            "tier": t,
            "pull": per["pull"],
            "continuations": [
                {"name": c, "delta": per["delta"][c], **per["mean_logprob"][c]}
                for c in block["continuations"]
            ],
            "questions": per["questions"],
        }
        for t, per in block.get("tiers", {}).items()
    ]
