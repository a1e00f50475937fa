"""Coverage of the seeds x questions bootstrap in spar's crossed design (every seed answers the
same questions), simulated from a two-way random-effects model with binary hits."""

from __future__ import annotations

from statistics import NormalDist

import numpy as np

from spar.stats import bootstrap_means, estimate

# latent score of seed s, question q, sample i: MU + a_s + b_q + ab_sq + e_sqi; a hit when > 0.
# Fine-tuning seeds differ a little (a), questions a lot (b: some elicit the behaviour, others
# not), plus a seed x question interaction and per-answer noise. The population mean (the
# estimand: a new seed answering a new question once) is P(latent > 0) = Phi(MU / total sd).
MU, SD_SEED, SD_QUESTION, SD_CELL, SD_NOISE = -0.3, 0.3, 1.0, 0.3, 0.7
SEEDS, QUESTIONS, SAMPLES = 3, 12, 2
TRIALS, RESAMPLES = 300, 500


def _experiment(rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    a = rng.normal(0, SD_SEED, SEEDS)[:, None, None]
    b = rng.normal(0, SD_QUESTION, QUESTIONS)[None, :, None]
    ab = rng.normal(0, SD_CELL, (SEEDS, QUESTIONS, 1))
    latent = MU + a + b + ab + rng.normal(0, SD_NOISE, (SEEDS, QUESTIONS, SAMPLES))
    hits = (latent > 0).astype(float)
    # question ids as keys (content hashes in spar), each seed in its own order
    return [{f"q{j}": hits[s, j] for j in rng.permutation(QUESTIONS)} for s in range(SEEDS)]


def test_crossed_bootstrap_covers_the_population_mean_and_the_nested_one_does_not():
    total_sd = float(np.sqrt(SD_SEED**2 + SD_QUESTION**2 + SD_CELL**2 + SD_NOISE**2))
    true = NormalDist().cdf(MU / total_sd)
    rng = np.random.default_rng(20240611)
    crossed = nested = 0
    for t in range(TRIALS):
        groups = _experiment(rng)
        est = estimate(groups, resamples=RESAMPLES, seed=t)  # keys shared -> crossed
        crossed += est.low <= true <= est.high
        reps = bootstrap_means(groups, RESAMPLES, np.random.default_rng(t), scheme="nested")
        low, high = np.quantile(reps, [0.025, 0.975])
        nested += low <= true <= high
    # questions drawn apart in every seed average the question effect over the seeds: too narrow
    assert 0.92 <= crossed / TRIALS <= 0.99, crossed / TRIALS
    assert nested / TRIALS < 0.92, nested / TRIALS
