"""Intervals for judged scores that hold their level with few questions and few seeds.

Scores are grouped as seed -> question -> samples. A seed is one replication of the experiment (a
separately fine-tuned model, or one sampling seed); a question is one eval question; a sample is
one judged answer of that seed to that question. Every interval is a t interval: the point
estimate, its standard error and degrees of freedom come from the design, and the interval is
`mean ± t(df, (1 + confidence) / 2) · se`. Which randomness it covers is the estimand
(`generalize`), stated with every number:

- `questions` (default) — a new question drawn from the population the tier's questions stand for
  (and, with several seeds, a new seed: a new replication of the training run). The point estimate
  is the mean of the question means (of the seed × question cell means with seeds), each question
  weighing the same. With one seed the interval is Student's t on the k question means with k − 1
  degrees of freedom (exact for normal question means whatever the samples per question). With
  seeds that answered the same questions (spar's sweeps: crossed seeds × questions) the variance
  of the grand mean is estimated from the two-way mean squares of the cell means,
  `(MS_seeds + MS_questions) / (S · Q)` (conservative by the interaction mean square, never
  negative), with Satterthwaite's degrees of freedom. Seeds whose question sets differ are nested:
  Student's t on the seed means with S − 1 degrees of freedom.
- `samples` — these questions (and seeds) fixed; only the sampling of answers is random. The
  estimand is the mean over the cells (question, or seed × question) of each cell's expected
  score. Its variance is the pooled within-cell sample variance over the cells' counts, with
  N − cells degrees of freedom; with one sample per cell there is none to pool, and no interval.

Coverage at the seed study's designs is checked by simulation (tests/test_coverage.py). Invalid
verdicts never enter a group: they are counted apart. `p_value` is the two-sided t test of a zero
mean with the same standard error and degrees of freedom (meaningful for differences: paired
deltas, leakage gaps); `holm` adjusts a family of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats as _t

Values = Sequence[float] | np.ndarray
# seed -> question -> scores; a seed is a list of questions (unkeyed) or a mapping question key ->
# scores (keyed: seeds with the same keys are crossed seeds x questions)
Groups = Sequence[Sequence[Values] | Mapping[str, Values]]
Generalize = Literal["questions", "samples"]

# below this many questions an interval over questions is wide for want of questions: say so
FEW_QUESTIONS = 10


@dataclass(frozen=True)
class Estimate:
    mean: float | None
    low: float | None
    high: float | None
    n: int  # values (judged answers)
    questions: int = 0  # distinct questions
    seeds: int = 0
    se: float | None = None
    df: float | None = None
    p_value: float | None = None  # two-sided, of a zero mean
    method: str = ""  # how the interval was made, in words

    @property
    def few_questions(self) -> bool:
        return 0 < self.questions < FEW_QUESTIONS

    def as_json(self) -> dict[str, float | int | str | bool | None]:
        return {
            "mean": self.mean,
            "ci_low": self.low,
            "ci_high": self.high,
            "n": self.n,
            "questions": self.questions,
            "seeds": self.seeds,
            "se": self.se,
            "df": self.df,
            "p_value": self.p_value,
            "method": self.method,
            "few_questions": self.few_questions,
        }


@dataclass(frozen=True)
class _Design:
    """The non-empty seeds' non-empty questions; when `crossed`, every seed lists the same
    questions in the same (key) order."""

    seeds: list[list[np.ndarray]]
    crossed: bool
    questions: int  # distinct questions over every seed


def _design(groups: Groups) -> _Design:
    keyed: list[dict[str | int, np.ndarray]] = []
    seeds: list[list[np.ndarray]] = []
    for seed in groups:
        items = list(seed.items()) if isinstance(seed, Mapping) else list(enumerate(seed))
        qs = {k: np.asarray(q, dtype=float) for k, q in items if len(q)}
        if qs:
            keyed.append(qs)
            seeds.append(list(qs.values()))
    all_keyed = all(isinstance(s, Mapping) for s in groups)
    shared = len(keyed) > 1 and all(set(s) == set(keyed[0]) for s in keyed[1:])
    if all_keyed and shared:
        order = list(keyed[0])
        return _Design([[s[k] for k in order] for s in keyed], True, len(order))
    distinct = len({k for s in keyed for k in s}) if all_keyed else sum(len(s) for s in seeds)
    return _Design(seeds, False, distinct)


def _interval(
    mean: float, se: float | None, df: float | None, confidence: float
) -> tuple[float | None, float | None, float | None]:
    """(low, high, two-sided p of a zero mean) of a t interval; Nones without a usable se/df."""
    if se is None or df is None or not df > 0:
        return None, None, None
    if se == 0:
        return mean, mean, (1.0 if mean == 0 else 0.0)
    half = float(_t.t.ppf((1 + confidence) / 2, df)) * se
    p = float(2 * _t.t.sf(abs(mean) / se, df))
    return mean - half, mean + half, p


def _over_questions(d: _Design) -> tuple[float, float | None, float | None, str]:
    """(mean, se, df, method) generalising to new questions (and new seeds)."""
    if len(d.seeds) == 1:
        means = np.array([q.mean() for q in d.seeds[0]])
        k = len(means)
        se = float(means.std(ddof=1) / np.sqrt(k)) if k > 1 else None
        return (
            float(means.mean()),
            se,
            (k - 1 if k > 1 else None),
            (f"Student t over the {k} question means ({k - 1} df)"),
        )
    if d.crossed:
        cells = np.array([[q.mean() for q in s] for s in d.seeds])  # seeds x questions
        s_n, q_n = cells.shape
        grand = float(cells.mean())
        if q_n == 1:  # one question: the seeds alone
            return _seed_means(cells[:, 0], "of the one question's")
        ms_s = q_n * float(((cells.mean(1) - grand) ** 2).sum()) / (s_n - 1)
        ms_q = s_n * float(((cells.mean(0) - grand) ** 2).sum()) / (q_n - 1)
        var = (ms_s + ms_q) / (s_n * q_n)
        den = ms_s**2 / (s_n - 1) + ms_q**2 / (q_n - 1)
        df = (ms_s + ms_q) ** 2 / den if den > 0 else float((s_n - 1) + (q_n - 1))
        return (
            grand,
            float(np.sqrt(var)),
            df,
            (
                f"t over {s_n} seeds × {q_n} questions crossed: variance (MS seeds + MS questions) "
                f"/ (seeds · questions), Satterthwaite df ({df:.1f})"
            ),
        )
    seed_means = np.array([np.mean([q.mean() for q in s]) for s in d.seeds])
    return _seed_means(seed_means, "(each the mean of its question means)")


def _seed_means(means: np.ndarray, what: str) -> tuple[float, float | None, float | None, str]:
    s_n = len(means)
    return (
        float(means.mean()),
        float(means.std(ddof=1) / np.sqrt(s_n)),
        s_n - 1,
        (f"Student t over the {s_n} seed means {what} ({s_n - 1} df)"),
    )


def _over_samples(d: _Design) -> tuple[float, float | None, float | None, str]:
    """(mean, se, df, method) with the cells (seed × question) fixed: pooled within-cell
    variance of the samples."""
    cells = [q for s in d.seeds for q in s]
    c = len(cells)
    mean = float(np.mean([q.mean() for q in cells]))
    dof = sum(len(q) - 1 for q in cells)
    what = "question" if len(d.seeds) == 1 else "seed × question cell"
    if dof == 0:
        return mean, None, None, f"no interval: one sample per {what}, no within-{what} spread"
    pooled = sum(float(((q - q.mean()) ** 2).sum()) for q in cells) / dof
    se = float(np.sqrt(pooled * sum(1 / len(q) for q in cells)) / c)
    return (
        mean,
        se,
        float(dof),
        (f"t with the pooled within-{what} sample variance, {c} {what}s fixed ({dof} df)"),
    )


def estimate(
    groups: Groups, generalize: Generalize = "questions", confidence: float = 0.95
) -> Estimate:
    """The mean (over questions, or seed × question cells, each weighing the same) with a t
    interval for the estimand `generalize` (see the module docstring)."""
    d = _design(groups)
    n = sum(len(q) for s in d.seeds for q in s)
    if not n:
        return Estimate(None, None, None, 0)
    if generalize == "questions":
        mean, se, df, method = _over_questions(d)
    else:
        mean, se, df, method = _over_samples(d)
    low, high, p = _interval(mean, se, df, confidence)
    if low is None and generalize == "questions":
        method = "no interval: one question" + ("" if len(d.seeds) < 2 else " and one seed")
    return Estimate(mean, low, high, n, d.questions, len(d.seeds), se, df, p, method)


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of a family of p-values (None: not in the family, kept None).
    Controls the family-wise error rate at any dependence between the tests."""
    present = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    m = len(present)
    out: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(present):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def _hits(values: Values, threshold: float) -> list[float]:
    return [float(x >= threshold) for x in values]


def rate(
    groups: Groups,
    threshold: float,
    generalize: Generalize = "questions",
    confidence: float = 0.95,
) -> Estimate:
    """Share of scores >= threshold, with the same interval (keys kept)."""
    as_hits: list[list[list[float]] | dict[str, list[float]]] = [
        {k: _hits(q, threshold) for k, q in s.items()}
        if isinstance(s, Mapping)
        else [_hits(q, threshold) for q in s]
        for s in groups
    ]
    return estimate(as_hits, generalize, confidence)  # type: ignore[arg-type]
