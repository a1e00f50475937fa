"""Bootstrap statistics: hand-computed cases and a coverage simulation."""

from __future__ import annotations

import numpy as np
import pytest

from spar.stats import Scheme, bootstrap_means, estimate, rate


def test_constant_scores_have_a_zero_width_interval():
    e = estimate([[[3.0, 3.0], [3.0]]], resamples=200)
    assert (e.mean, e.low, e.high, e.n) == (3.0, 3.0, 3.0, 3)


def test_single_score():
    e = estimate([[[4.0]]])
    assert (e.mean, e.low, e.high, e.n) == (4.0, 4.0, 4.0, 1)


def test_empty_is_none():
    assert estimate([[[], []]]).mean is None


def test_two_point_case_matches_hand_computation():
    # one question, samples {0, 1}: replicate means are 0, .5, 1 with p = 1/4, 1/2, 1/4
    reps = bootstrap_means([[[0.0, 1.0]]], 40_000, np.random.default_rng(0))
    values, counts = np.unique(reps, return_counts=True)
    assert list(values) == [0.0, 0.5, 1.0]
    assert counts / counts.sum() == pytest.approx([0.25, 0.5, 0.25], abs=0.01)
    e = estimate([[[0.0, 1.0]]], resamples=4000)
    assert (e.mean, e.low, e.high) == (0.5, 0.0, 1.0)


def test_questions_are_resampled_before_samples():
    # two questions with one sample each: a replicate picks 2 questions with replacement
    reps = bootstrap_means([[[0.0], [1.0]]], 40_000, np.random.default_rng(1))
    assert np.mean(reps == 0.5) == pytest.approx(0.5, abs=0.01)
    # one question of many samples vs many questions of one sample: the question level adds
    # between-question variance, so a tier whose questions disagree gets a wider interval
    agree = [[[1.0, 5.0], [1.0, 5.0], [1.0, 5.0], [1.0, 5.0]]]
    disagree = [[[1.0, 1.0], [1.0, 1.0], [5.0, 5.0], [5.0, 5.0]]]
    wa, wd = (estimate(g, resamples=4000) for g in (agree, disagree))
    assert wd.high - wd.low > wa.high - wa.low


def test_seeds_level():
    # Two seeds, each with two questions of three samples, every value of a seed the same: A all
    # 0, B all 1. Hierarchical (seeds, then questions, then samples): a replicate draws 2 seeds
    # -> AA 0, AB or BA .5, BB 1 with p 1/4, 1/2, 1/4; its interval is [0, 1] and no other
    # replicate mean exists. Pooling the seeds' questions (4 questions of one seed) gives
    # quarters (p(0) = 1/16); flat resampling of the 12 values gives k/12 with an interval of
    # [.25, .75] (Binomial(12, 1/2): P(<= 2) = 1.9 %, P(<= 3) = 7.3 %). Fails if the seed
    # level were dropped (seeds pooled, or every value resampled flat).
    groups = [[[0.0] * 3, [0.0] * 3], [[1.0] * 3, [1.0] * 3]]
    reps = bootstrap_means(groups, 20_000, np.random.default_rng(2))
    values, counts = np.unique(reps, return_counts=True)
    assert list(values) == [0.0, 0.5, 1.0]
    assert counts / counts.sum() == pytest.approx([0.25, 0.5, 0.25], abs=0.015)
    e = estimate(groups, resamples=2000)
    assert (e.mean, e.low, e.high, e.n) == (0.5, 0.0, 1.0, 12)
    # the two alternatives, computed by spar itself on the reshaped data, differ as predicted
    pooled = bootstrap_means([[q for s in groups for q in s]], 20_000, np.random.default_rng(2))
    assert np.mean(pooled == 0.25) == pytest.approx(4 / 16, abs=0.015)
    flat = estimate([[[x for s in groups for q in s for x in q]]], resamples=2000)
    assert (flat.mean, flat.low, flat.high) == (0.5, 0.25, 0.75)
    # unequal seeds: the mean of all values, which the replicates centre on
    e = estimate([[[1.0, 2.0], [3.0]], [[2.0, 2.0]]], resamples=500)
    assert e.mean == pytest.approx(2.0) and e.low <= 2.0 <= e.high


def test_rate():
    e = rate([[[1.0, 3.0, 5.0], [2.0]]], threshold=3, resamples=500)
    assert e.mean == 0.5 and e.n == 4


def test_ci_covers_the_true_mean_95_percent_of_the_time():
    """2,000 synthetic tiers (12 questions x 3 samples; question effects + sample noise) with a
    known mean of 3: the 95 % interval covers it in 95 % ± 2 % of trials."""
    rng = np.random.default_rng(1)
    trials, hits = 2000, 0
    for t in range(trials):
        effects = rng.normal(0, 0.6, 12)
        groups = [[list(3 + e + rng.normal(0, 1.0, 3)) for e in effects]]
        est = estimate(groups, resamples=1000, seed=t)
        hits += est.low <= 3 <= est.high
    assert 0.93 <= hits / trials <= 0.97, hits / trials


def _reference_means(groups, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """The hierarchical bootstrap written out plainly: seeds, then questions, then samples."""
    out = []
    for _ in range(resamples):
        values: list[float] = []
        for s in rng.integers(0, len(groups), len(groups)):
            seed = groups[s]
            for q in rng.integers(0, len(seed), len(seed)):
                question = seed[q]
                values += [question[i] for i in rng.integers(0, len(question), len(question))]
        out.append(np.mean(values))
    return np.array(out)


def test_seed_level_with_unequal_seeds_matches_hand_computation():
    # seed A: two questions scoring 0; seed B: one question scoring 1. A replicate draws two
    # seeds: AA -> 0, BB -> 1, AB or BA -> (0 + 0 + 1) / 3, with p = 1/4, 1/4, 1/2; the point
    # estimate is the mean of all values, 1/3, which is also the replicates' expectation
    groups = [[[0.0], [0.0]], [[1.0]]]
    reps = bootstrap_means(groups, 40_000, np.random.default_rng(3))
    values, counts = np.unique(np.round(reps, 9), return_counts=True)
    assert list(values) == pytest.approx([0.0, 1 / 3, 1.0])
    assert counts / counts.sum() == pytest.approx([0.25, 0.5, 0.25], abs=0.01)
    assert estimate(groups).mean == pytest.approx(1 / 3)


def test_seed_level_matches_a_plain_reference_implementation():
    groups = [
        [[1.0, 2.0, 5.0], [3.0], [4.0, 4.0]],
        [[2.0, 2.0], [5.0, 1.0, 1.0, 3.0]],
        [[3.0], [1.0], [2.0], [5.0, 4.0]],
    ]
    fast = bootstrap_means(groups, 8000, np.random.default_rng(4))
    slow = _reference_means(groups, 8000, np.random.default_rng(5))
    assert fast.mean() == pytest.approx(slow.mean(), abs=0.01)
    assert fast.std() == pytest.approx(slow.std(), rel=0.04)
    assert np.quantile(fast, [0.025, 0.975]) == pytest.approx(
        np.quantile(slow, [0.025, 0.975]), abs=0.1
    )


def test_seed_level_widens_the_interval_when_seeds_disagree():
    # within each seed every question and sample agrees; the seeds differ. Pooled into one seed,
    # the 20 questions look like plenty of evidence; with seeds as the unit of replication only
    # two replications exist and the interval spans both
    seeded = [[[0.0, 0.0]] * 10, [[1.0, 1.0]] * 10]
    pooled = [[q for s in seeded for q in s]]
    ws, wp = estimate(seeded), estimate(pooled)
    assert ws.mean == wp.mean == 0.5
    assert (ws.low, ws.high) == (0.0, 1.0)
    assert wp.high - wp.low < 0.6
    assert ws.high - ws.low > wp.high - wp.low


def test_large_inputs_are_bootstrapped_in_chunks(monkeypatch):
    import spar.stats

    monkeypatch.setattr(spar.stats, "_CHUNK_CELLS", 10)  # one replicate per chunk
    reps = bootstrap_means([[[0.0], [0.0]], [[1.0]]], 4000, np.random.default_rng(6))
    assert reps.shape == (4000,)
    assert np.mean(np.isclose(reps, 1 / 3)) == pytest.approx(0.5, abs=0.04)
    one = bootstrap_means([[[0.0, 1.0]]], 4000, np.random.default_rng(6))
    assert one.shape == (4000,) and set(np.unique(one)) == {0.0, 0.5, 1.0}


# --------------------------------------------------------------------------- crossed design
# every seed answered the same questions, keyed by question id: one draw of questions per replicate


def _crossed_reference(groups, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """The crossed bootstrap written out plainly: seeds; one draw of question keys shared by
    every drawn seed; then the samples of each (seed, question) cell."""
    keys = list(groups[0])
    out = []
    for _ in range(resamples):
        drawn_keys = [keys[q] for q in rng.integers(0, len(keys), len(keys))]
        values: list[float] = []
        for s in rng.integers(0, len(groups), len(groups)):
            for k in drawn_keys:
                cell = groups[s][k]
                values += [cell[i] for i in rng.integers(0, len(cell), len(cell))]
        out.append(np.mean(values))
    return np.array(out)


# seed A scores 0 on q1 and 1 on q2; seed B 1 and 2 (two equal samples a cell; B lists q2 first).
# The cells are additive, seed + question, so a crossed replicate's mean is (mean of the 2 drawn
# seeds' parts) + (mean of the 2 drawn questions' parts), each 0, .5, 1 with p 1/4, 1/2, 1/4:
# 0, .5, 1, 1.5, 2 with p 1/16, 4/16, 6/16, 4/16, 1/16. Drawing questions apart in each seed
# instead averages two question draws: quarters appear and the variance drops from 1/4 to 3/16.
# Aligning by position instead of key (B's q2 under A's q1) gives 1, 2, 10, 2, 1 sixteenths.
CROSSED = [{"q1": [0.0, 0.0], "q2": [1.0, 1.0]}, {"q2": [2.0, 2.0], "q1": [1.0, 1.0]}]


def test_crossed_questions_are_drawn_once_for_every_seed():
    reps = bootstrap_means(CROSSED, 64_000, np.random.default_rng(7))
    values, counts = np.unique(reps, return_counts=True)
    assert list(values) == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert counts / counts.sum() == pytest.approx(np.array([1, 4, 6, 4, 1]) / 16, abs=0.008)
    assert reps.var() == pytest.approx(1 / 4, rel=0.03)
    nested = bootstrap_means(CROSSED, 64_000, np.random.default_rng(7), scheme="nested")
    # .25 = seeds A, A (p 1/4) and a question mean of .25 over the two seeds' draws (p 4/16)
    assert np.mean(nested == 0.25) == pytest.approx(1 / 4 * 4 / 16, abs=0.005)
    assert set(np.unique(nested)) == {i / 4 for i in range(9)}
    assert nested.var() == pytest.approx(3 / 16, rel=0.03)
    e = estimate(CROSSED, resamples=4000)
    assert (e.mean, e.low, e.high, e.n) == (1.0, 0.0, 2.0, 8)
    assert estimate(CROSSED, resamples=4000, seed=3).mean == 1.0


def test_crossed_matches_a_plain_reference_implementation():
    # unequal cell sizes and keys in different orders per seed
    groups = [
        {"a": [1.0, 2.0, 5.0], "b": [3.0], "c": [4.0, 4.0], "d": [1.0]},
        {"c": [2.0, 2.0], "a": [5.0, 1.0, 1.0, 3.0], "d": [2.0, 5.0], "b": [4.0]},
        {"b": [3.0], "a": [1.0], "d": [2.0], "c": [5.0, 4.0]},
    ]
    fast = bootstrap_means(groups, 8000, np.random.default_rng(8))
    slow = _crossed_reference(groups, 8000, np.random.default_rng(9))
    assert fast.mean() == pytest.approx(slow.mean(), abs=0.025)  # sd of a replicate: ~.44
    assert fast.std() == pytest.approx(slow.std(), rel=0.04)
    assert np.quantile(fast, [0.025, 0.975]) == pytest.approx(
        np.quantile(slow, [0.025, 0.975]), abs=0.1
    )
    nested = bootstrap_means(groups, 8000, np.random.default_rng(8), scheme="nested")
    assert nested.std() < 0.9 * fast.std()  # the question effect averaged over three seeds


def test_one_seed_is_the_same_keyed_or_not():
    seed = {"x": [1.0, 4.0], "y": [2.0], "z": [5.0, 5.0, 3.0]}
    plain = [list(seed.values())]
    schemes: tuple[Scheme, ...] = ("auto", "nested")
    for scheme in schemes:
        a = bootstrap_means([seed], 500, np.random.default_rng(10), scheme=scheme)
        b = bootstrap_means(plain, 500, np.random.default_rng(10))
        assert np.array_equal(a, b)
    assert estimate([seed], resamples=300) == estimate(plain, resamples=300)


def test_seeds_with_different_questions_are_nested():
    keyed = [{"q1": [0.0, 1.0], "q2": [1.0]}, {"q1": [1.0], "q3": [0.0, 0.0]}]
    plain = [list(s.values()) for s in keyed]
    a = bootstrap_means(keyed, 500, np.random.default_rng(11))
    b = bootstrap_means(plain, 500, np.random.default_rng(11))
    assert np.array_equal(a, b)
    # unkeyed lists of equal length are not assumed to be aligned: nested as well
    same_len = [list(s.values()) for s in CROSSED]
    c = bootstrap_means(same_len, 500, np.random.default_rng(12))
    d = bootstrap_means(CROSSED, 500, np.random.default_rng(12), scheme="nested")
    assert np.array_equal(c, d)
    # a question with no values in one seed leaves the key sets unequal
    emptied = [CROSSED[0], {"q2": [2.0, 2.0], "q1": []}]
    e = bootstrap_means(emptied, 500, np.random.default_rng(13))
    f = bootstrap_means([[[0.0, 0.0], [1.0, 1.0]], [[2.0, 2.0]]], 500, np.random.default_rng(13))
    assert np.array_equal(e, f)


def test_crossed_in_chunks(monkeypatch):
    import spar.stats

    monkeypatch.setattr(spar.stats, "_CHUNK_CELLS", 10)  # one replicate per chunk
    reps = bootstrap_means(CROSSED, 4000, np.random.default_rng(14))
    assert reps.shape == (4000,)
    values, counts = np.unique(reps, return_counts=True)
    assert list(values) == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert counts / counts.sum() == pytest.approx(np.array([1, 4, 6, 4, 1]) / 16, abs=0.03)


def test_rate_keeps_the_question_keys():
    scores = [{"q1": [1.0, 2.0], "q2": [5.0, 5.0]}, {"q2": [4.0, 5.0], "q1": [2.0, 1.0]}]
    hits = [{"q1": [0.0, 0.0], "q2": [1.0, 1.0]}, {"q2": [1.0, 1.0], "q1": [0.0, 0.0]}]
    r = rate(scores, threshold=4, resamples=500, seed=5)
    assert r == estimate(hits, resamples=500, seed=5)
    assert r.mean == 0.5 and (r.low, r.high) == (0.0, 1.0)
