"""Hierarchical bootstrap statistics for judged scores.

Scores are grouped as seed -> question -> samples. A bootstrap replicate resamples seeds (when
there are several), then questions within the tier, then samples within each chosen question,
all with replacement, and takes the mean of the resampled scores. The CI is the percentile
interval of the replicate means. Invalid verdicts never enter a group: they are counted apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# seed -> question -> scores
Groups = Sequence[Sequence[Sequence[float] | np.ndarray]]


@dataclass(frozen=True)
class Estimate:
    mean: float | None
    low: float | None
    high: float | None
    n: int

    def as_json(self) -> dict[str, float | int | None]:
        return {"mean": self.mean, "ci_low": self.low, "ci_high": self.high, "n": self.n}


def _clean(groups: Groups) -> list[list[np.ndarray]]:
    out = []
    for seed in groups:
        qs = [np.asarray(q, dtype=float) for q in seed if len(q)]
        if qs:
            out.append(qs)
    return out


def bootstrap_means(groups: Groups, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """`resamples` replicate means of the hierarchical bootstrap (seeds, questions, samples)."""
    seeds = _clean(groups)
    questions = [q for s in seeds for q in s]
    sizes = np.array([len(q) for q in questions])
    width = int(sizes.max())
    padded = np.zeros((len(questions), width))
    for i, q in enumerate(questions):
        padded[i, : len(q)] = q
    counts = np.array([len(s) for s in seeds])
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    # level 1: seeds; level 2: questions within each chosen seed -> (resamples, k) question rows
    if len(seeds) == 1:
        q_idx = rng.integers(0, counts[0], (resamples, counts[0]))
    else:
        chosen = rng.integers(0, len(seeds), (resamples, len(seeds)))
        per_seed = [
            first[chosen[b]][:, None]
            + rng.integers(0, counts[chosen[b]][:, None], (len(seeds), counts.max()))
            for b in range(resamples)
        ]
        valid = [
            np.arange(counts.max())[None, :] < counts[chosen[b]][:, None] for b in range(resamples)
        ]
        rows = [p[v] for p, v in zip(per_seed, valid, strict=True)]
        width_q = max(len(r) for r in rows)
        q_idx = np.full((resamples, width_q), -1)
        for b, r in enumerate(rows):
            q_idx[b, : len(r)] = r
    present = q_idx >= 0
    q_safe = np.where(present, q_idx, 0)
    # level 3: samples within each chosen question
    n = sizes[q_safe]
    draws = (rng.random((*q_safe.shape, width)) * n[..., None]).astype(int)
    vals = np.take_along_axis(padded[q_safe], draws, axis=-1)
    keep = (np.arange(width) < n[..., None]) & present[..., None]
    return (vals * keep).sum(axis=(1, 2)) / keep.sum(axis=(1, 2))


def estimate(
    groups: Groups, resamples: int = 2000, seed: int = 0, confidence: float = 0.95
) -> Estimate:
    """Mean of all scores with a hierarchical-bootstrap percentile CI."""
    seeds = _clean(groups)
    flat = [x for s in seeds for q in s for x in q]
    if not flat:
        return Estimate(None, None, None, 0)
    mean = float(np.mean(flat))
    if len(flat) == 1:
        return Estimate(mean, mean, mean, 1)
    reps = bootstrap_means(seeds, resamples, np.random.default_rng(seed))
    alpha = (1 - confidence) / 2
    low, high = np.quantile(reps, [alpha, 1 - alpha])
    return Estimate(mean, float(low), float(high), len(flat))


def rate(groups: Groups, threshold: float, **kw: float | int) -> Estimate:
    """Share of scores >= threshold, with the same hierarchical CI."""
    as_hits = [[[float(x >= threshold) for x in q] for q in s] for s in groups]
    return estimate(as_hits, **kw)  # type: ignore[arg-type]
