"""t intervals of spar.stats: hand-computed cases for every design and both estimands."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from spar.stats import estimate, holm, rate

T2 = 4.302652729911275  # t(0.975, 2 df)


def test_constant_scores_have_a_zero_width_interval():
    e = estimate([[[3.0, 3.0], [3.0]]])
    assert (e.mean, e.low, e.high, e.n, e.questions) == (3.0, 3.0, 3.0, 3, 2)
    assert e.p_value == 0.0  # a nonzero mean with no spread
    z = estimate([[[0.0, 0.0], [0.0]]])
    assert z.p_value == 1.0


def test_one_question_has_no_interval_over_questions():
    e = estimate([[[4.0, 5.0]]])
    assert (e.mean, e.low, e.high) == (4.5, None, None)
    assert e.method.startswith("no interval: one question")
    # ... but one over its samples: mean 4.5, sd .7071, se .5, 1 df
    s = estimate([[[4.0, 5.0]]], "samples")
    half = sps.t.ppf(0.975, 1) * 0.5
    assert (s.low, s.high) == pytest.approx((4.5 - half, 4.5 + half))


def test_empty_is_none():
    assert estimate([[[], []]]).mean is None


def test_questions_t_interval_matches_hand_computation():
    # question means 2, 2, 6 (the first of two samples): each question weighs the same
    e = estimate([[[1.0, 3.0], [2.0], [6.0]]])
    sd = np.sqrt(((2 - 10 / 3) ** 2 * 2 + (6 - 10 / 3) ** 2) / 2)
    se = sd / np.sqrt(3)
    assert e.mean == pytest.approx(10 / 3)
    assert (e.low, e.high) == pytest.approx((10 / 3 - T2 * se, 10 / 3 + T2 * se))
    assert (e.se, e.df, e.n, e.questions, e.seeds) == (pytest.approx(se), 2, 4, 3, 1)
    assert e.p_value == pytest.approx(sps.ttest_1samp([2.0, 2.0, 6.0], 0).pvalue)
    assert e.few_questions and e.as_json()["few_questions"] is True
    # the confidence level is used: 80 % is narrower, by the t quantile ratio
    n80 = estimate([[[1.0, 3.0], [2.0], [6.0]]], confidence=0.8)
    assert (n80.high - n80.mean) / (e.high - e.mean) == pytest.approx(sps.t.ppf(0.9, 2) / T2)


def test_samples_do_not_narrow_an_interval_over_questions():
    # the same question means with 1 or 50 samples each: the same interval (questions are the
    # unit); the samples interval narrows with more samples
    rng = np.random.default_rng(0)
    means = [1.0, 2.0, 4.0, 5.0]
    few = [[[m] for m in means]]
    many = [[list(m + rng.normal(0, 1, 50) - 0) for m in means]]
    many = [[list(np.asarray(q) - np.mean(q) + m) for q, m in zip(many[0], means, strict=True)]]
    a, b = estimate(few), estimate(many)
    assert (a.low, a.high) == pytest.approx((b.low, b.high))
    assert estimate(few, "samples").low is None  # one sample per question: no spread to pool
    wide = estimate([[list(m + np.array([-1.0, 1.0])) for m in means]], "samples")
    narrow = estimate(many, "samples")
    assert narrow.high - narrow.low < wide.high - wide.low


def test_samples_interval_pools_within_question_variance():
    # questions {1, 3} and {4, 5, 9}: within SS 2 + 14 = 16 over 1 + 2 df -> pooled 16/3;
    # mean of question means (2 + 6) / 2 = 4; se = sqrt(16/3 * (1/2 + 1/3)) / 2
    e = estimate([[[1.0, 3.0], [4.0, 5.0, 9.0]]], "samples")
    se = np.sqrt(16 / 3 * (1 / 2 + 1 / 3)) / 2
    half = sps.t.ppf(0.975, 3) * se
    assert (e.mean, e.se, e.df) == (4.0, pytest.approx(se), 3)
    assert (e.low, e.high) == pytest.approx((4 - half, 4 + half))


def _crossed_reference(cells: np.ndarray) -> tuple[float, float, float]:
    """(mean, se, df) from the two-way mean squares, written out with loops."""
    s_n, q_n = cells.shape
    g = sum(sum(r) for r in cells) / (s_n * q_n)
    ms_s = q_n * sum((sum(cells[i]) / q_n - g) ** 2 for i in range(s_n)) / (s_n - 1)
    ms_q = s_n * sum((sum(cells[:, j]) / s_n - g) ** 2 for j in range(q_n)) / (q_n - 1)
    var = (ms_s + ms_q) / (s_n * q_n)
    df = (ms_s + ms_q) ** 2 / (ms_s**2 / (s_n - 1) + ms_q**2 / (q_n - 1))
    return g, var**0.5, df


def test_crossed_seeds_matches_a_plain_reference_implementation():
    cells = np.array([[1.0, 2.0, 6.0, 3.0], [2.0, 2.5, 7.0, 3.0], [0.0, 3.0, 5.0, 4.5]])
    # two samples per cell whose mean is the cell value; seeds list the keys in other orders
    groups = [
        {f"q{j}": [cells[s, j] - 0.5, cells[s, j] + 0.5] for j in order}
        for s, order in enumerate([[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]])
    ]
    e = estimate(groups)
    mean, se, df = _crossed_reference(cells)
    half = sps.t.ppf(0.975, df) * se
    assert (e.mean, e.se, e.df) == pytest.approx((mean, se, df))
    assert (e.low, e.high) == pytest.approx((mean - half, mean + half))
    assert (e.questions, e.seeds, e.n) == (4, 3, 24)
    assert "crossed" in e.method


def test_crossed_seeds_count_a_question_effect_once():
    # every seed gives the same answers: seeds add nothing, questions vary (1, 2, 6). Treating
    # the 9 cells as 9 questions would narrow the interval; the crossed design does not
    one = [{"a": [1.0], "b": [2.0], "c": [6.0]}]
    three = one * 3
    e1, e3 = estimate(one), estimate(three)
    assert e3.mean == e1.mean
    assert e3.high - e3.low >= (e1.high - e1.low) * 0.5  # not a 9-question interval
    flat = estimate([[[1.0], [2.0], [6.0]] * 3])
    assert flat.high - flat.low < e3.high - e3.low


def test_seeds_with_different_questions_are_nested():
    # seed means 2 and 5 (its question means 1, 3 / 5): t on 2 seed means, 1 df
    e = estimate([{"a": [1.0], "b": [3.0]}, {"c": [5.0, 5.0]}])
    half = sps.t.ppf(0.975, 1) * 1.5  # sd of (2, 5) = 2.1213 / sqrt(2)
    assert (e.mean, e.df, e.seeds, e.questions) == (3.5, 1, 2, 3)
    assert (e.low, e.high) == pytest.approx((3.5 - half, 3.5 + half))
    assert "seed means" in e.method
    # unkeyed seeds are nested too
    u = estimate([[[1.0], [3.0]], [[5.0, 5.0]]])
    assert (u.low, u.high) == pytest.approx((e.low, e.high))


def test_rate():
    e = rate([[[1.0, 3.0, 5.0], [2.0], [4.0, 4.0]]], threshold=3)
    # hits per question: (0,1,1) -> 2/3, (0) -> 0, (1,1) -> 1
    assert e.mean == pytest.approx((2 / 3 + 0 + 1) / 3) and e.n == 6


def test_holm():
    adj = holm([0.01, 0.04, None, 0.03, 0.005])
    # sorted .005 x4 = .02, .01 x3 = .03, .03 x2 = .06, .04 x1 -> .06 (monotone)
    assert adj == pytest.approx([0.03, 0.06, None, 0.06, 0.02])
    assert holm([0.5, 0.9]) == [1.0, 1.0]
    assert holm([]) == []
