"""Coverage of spar's intervals at the seed study's designs, by simulation (issue 11).

Question means ~ N(mu, 1), samples ~ N(question mean, 1): the design the issue measured the old
percentile bootstrap at (74 % at 3 questions x 1 sample). Every design below runs 2,000 simulated
tiers through `spar.stats.estimate` itself; a 95 % interval must cover its estimand in 93-97 % of
them (the Monte-Carlo standard error at 2,000 trials is 0.5 points).
"""

from __future__ import annotations

import numpy as np
import pytest

from spar.stats import estimate

TRIALS = 2000
DESIGNS = [(3, 1), (3, 5), (3, 10), (12, 3), (20, 5)]  # questions x samples
MU = 3.0
# seeds on top: a seed effect (a separately trained model) and a seed x question interaction,
# smaller than the question effect (fine-tuning seeds differ less than questions do)
SD_SEED, SD_CELL = 0.5, 0.5


def _groups(y: np.ndarray, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    """seeds x questions x samples -> spar's keyed groups (each seed in its own key order)."""
    seeds, questions, _ = y.shape
    return [{f"q{j}": y[s, j] for j in rng.permutation(questions)} for s in range(seeds)]


def _coverage(questions: int, samples: int, seeds: int, generalize: str) -> float:
    rng = np.random.default_rng(1000 * questions + 10 * samples + seeds)
    fixed_q = rng.normal(MU, 1, questions)
    fixed_seed = rng.normal(0, SD_SEED, (seeds, 1)) if seeds > 1 else np.zeros((1, 1))
    fixed_cell = rng.normal(0, SD_CELL, (seeds, questions)) if seeds > 1 else 0.0
    hits = 0
    for _ in range(TRIALS):
        if generalize == "questions":  # new questions (and seeds) every trial
            q = rng.normal(MU, 1, questions)
            seed = rng.normal(0, SD_SEED, (seeds, 1)) if seeds > 1 else np.zeros((1, 1))
            cell = rng.normal(0, SD_CELL, (seeds, questions)) if seeds > 1 else 0.0
            target = MU
        else:  # these questions, seeds and cells fixed; only the answers are drawn again
            q, seed, cell = fixed_q, fixed_seed, fixed_cell
            target = float(np.mean(q[None, :] + seed + cell))
        means = q[None, :] + seed + cell
        y = means[..., None] + rng.normal(0, 1, (seeds, questions, samples))
        e = estimate(_groups(y, rng), generalize)  # type: ignore[arg-type]
        assert e.low is not None and e.high is not None
        hits += e.low <= target <= e.high
    return hits / TRIALS


@pytest.mark.parametrize(("questions", "samples"), DESIGNS)
def test_interval_over_questions_holds_its_level(questions, samples):
    assert 0.93 <= _coverage(questions, samples, 1, "questions") <= 0.97


@pytest.mark.parametrize(("questions", "samples"), [(3, 5), (3, 10), (12, 3), (20, 5)])
def test_interval_over_questions_holds_its_level_with_three_seeds(questions, samples):
    # 3 seeds x 3 questions x 1 sample covers ~97.5 % (conservative: the variance leaves out
    # the interaction mean square's correction); see spar.stats
    assert 0.93 <= _coverage(questions, samples, 3, "questions") <= 0.97


@pytest.mark.parametrize(("questions", "samples"), [(3, 5), (3, 10), (12, 3), (20, 5)])
def test_interval_over_samples_holds_its_level(questions, samples):
    assert 0.93 <= _coverage(questions, samples, 1, "samples") <= 0.97


def test_interval_over_samples_holds_its_level_with_three_seeds():
    assert 0.93 <= _coverage(12, 3, 3, "samples") <= 0.97


def test_the_estimands_differ():
    """The samples interval ignores question spread: used for the question population it
    covers far less than 95 % (and vice versa it is not wider) — the two are not the same
    number under two names."""
    rng = np.random.default_rng(7)
    miss = 0
    for _ in range(500):
        q = rng.normal(MU, 1, 12)
        y = q[None, :, None] + rng.normal(0, 1, (1, 12, 3))
        e = estimate(_groups(y, rng), "samples")
        assert e.low is not None and e.high is not None
        miss += not e.low <= MU <= e.high
    assert miss / 500 > 0.2
