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


# cells (replicates x drawn questions x samples) computed at once: bounds the memory of a replicate
# batch (~8 bytes a cell, a few arrays) whatever the number of resamples
_CHUNK_CELLS = 4_000_000


def bootstrap_means(groups: Groups, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """`resamples` replicate means of the hierarchical bootstrap (seeds, questions, samples).

    A replicate draws as many seeds as there are, with replacement; for each drawn seed as many
    of its questions as it has, with replacement; for each drawn question as many of its samples
    as it has, with replacement — and takes the mean of every drawn value (the estimator of the
    point estimate, the mean of all values). With one seed the seed level is a no-op."""
    seeds = _clean(groups)
    questions = [q for s in seeds for q in s]
    sizes = np.array([len(q) for q in questions])
    width = int(sizes.max())
    padded = np.zeros((len(questions), width))
    for i, q in enumerate(questions):
        padded[i, : len(q)] = q
    counts = np.array([len(s) for s in seeds])
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    drawn_q = int(counts[0]) if len(seeds) == 1 else len(seeds) * int(counts.max())
    chunk = max(1, _CHUNK_CELLS // (drawn_q * width))
    out = [
        _replicates(padded, sizes, counts, first, min(chunk, resamples - start), rng)
        for start in range(0, resamples, chunk)
    ]
    return np.concatenate(out)


def _replicates(
    padded: np.ndarray,
    sizes: np.ndarray,
    counts: np.ndarray,
    first: np.ndarray,
    resamples: int,
    rng: np.random.Generator,
) -> np.ndarray:
    n_seeds = len(counts)
    # levels 1 and 2: seeds, then questions within each drawn seed -> (resamples, k) question
    # rows of `padded`, -1 where a drawn seed has fewer questions than the widest
    if n_seeds == 1:
        q_idx = rng.integers(0, counts[0], (resamples, counts[0]))
    else:
        chosen = rng.integers(0, n_seeds, (resamples, n_seeds))
        n_q = counts[chosen]  # questions of each drawn seed
        width_q = int(counts.max())
        within = rng.integers(0, n_q[..., None], (resamples, n_seeds, width_q))
        rows = first[chosen][..., None] + within
        valid = np.arange(width_q) < n_q[..., None]
        q_idx = np.where(valid, rows, -1).reshape(resamples, n_seeds * width_q)
    present = q_idx >= 0
    q_safe = np.where(present, q_idx, 0)
    # level 3: samples within each drawn question
    width = padded.shape[1]
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
