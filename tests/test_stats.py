"""The leaderboard statistics against hand-computed cases and known-answer simulations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from leaderboards import stats


def test_outcomes_and_win_rate_by_hand():
    assert [stats.outcome(p) for p in (0.9, 0.1, 0.5, None, float("nan"))] == [1.0, 0.0, 0.5, None, None]
    est = stats.win_rate([1, 0, 0.5, 1], seed=0)
    assert est.value == pytest.approx(0.625) and est.n == 4
    assert est.se == pytest.approx(np.std([1, 0, 0.5, 1], ddof=1) / 2)
    assert 0.0 <= est.low <= 0.625 <= est.high <= 1.0
    assert stats.win_rate([1, 0, 0.5, 1], seed=0) == est  # seeded


def test_paired_difference_by_hand():
    # differences [1, 0, 0, 0.5]: mean 0.375; of the 16 sign flips, |mean| >= 0.375 in exactly half
    res = stats.paired_difference([1, 1, 0, 0.5], [0, 1, 0, 0], seed=0)
    assert res.difference == pytest.approx(0.375) and res.n == 4
    assert res.p_value == pytest.approx(0.5, abs=0.03)
    assert res.low <= 0.375 <= res.high
    big = stats.paired_difference([1] * 40, [0] * 30 + [1] * 10, seed=0)
    assert big.difference == pytest.approx(0.75) and big.p_value < 0.001 and big.low > 0.5
    with pytest.raises(ValueError, match="same prompts"):
        stats.paired_difference([1, 0], [1])


def test_bradley_terry_two_players_by_hand():
    # A beats B 3 times in 4: the MLE of s_A - s_B is log(3 / 1)
    fit = stats.fit_bradley_terry(["B", "A"], [("A", "B", 1.0)] * 3 + [("A", "B", 0.0)])
    assert fit["B"] == 0.0 and fit["A"] == pytest.approx(math.log(3), abs=1e-4)
    # a tie counts half a win each way: 2.5 wins in 4 -> log(2.5 / 1.5)
    fit = stats.fit_bradley_terry(["B", "A"], [("A", "B", 1.0), ("A", "B", 1.0), ("A", "B", 0.5), ("B", "A", 1.0)])
    assert fit["A"] == pytest.approx(math.log(2.5 / 1.5), abs=1e-4)


def test_bradley_terry_recovers_known_strengths_and_ranks_by_ci_overlap():
    rng = np.random.default_rng(0)
    truth = {"ref": 0.0, "good": 1.0, "ok": 0.5, "bad": -0.5, "also-ok": 0.5}
    players = list(truth)
    battles = []
    for prompt in range(300):
        for x in players[1:]:
            p = 1 / (1 + math.exp(-(truth[x] - truth["ref"])))
            battles.append((x, "ref", float(rng.random() < p), f"p{prompt}"))
        p = 1 / (1 + math.exp(-(truth["good"] - truth["bad"])))
        battles.append(("good", "bad", float(rng.random() < p), f"p{prompt}"))
    ratings = stats.bradley_terry(players, battles, anchor="ref", seed=0, n_resamples=200)
    by = {r.player: r for r in ratings}
    for name, s in truth.items():
        assert by[name].strength == pytest.approx(s, abs=0.2), name
        assert by[name].low <= by[name].strength <= by[name].high
    assert [r.player for r in ratings][0] == "good" and by["good"].rank == 1
    assert by["ok"].rank == by["also-ok"].rank  # overlapping intervals share a rank
    assert by["bad"].rank == 1 + sum(by[p].low > by["bad"].high for p in players)
    assert by["bad"].rank >= 4
    assert stats.bradley_terry(players, battles, anchor="ref", seed=0, n_resamples=200) == ratings  # seeded


def _length_biased_battles(seed: int, n: int = 400):
    """Three policies against one reference; the evaluator prefers longer answers (phi = 1.5); policy 0 writes
    longer answers than the reference on most prompts, the others about as long."""
    rng = np.random.default_rng(seed)
    theta = np.array([0.0, 0.6, -0.4])
    psi = rng.normal(0, 1.0, n)
    length_diff = np.stack([rng.normal(80, 100, n), rng.normal(0, 60, n), rng.normal(0, 60, n)])
    scale = length_diff.std()
    logits = theta[:, None] + 1.5 * np.tanh(length_diff / scale) + psi[None, :]
    outcomes = (rng.random(logits.shape) < 1 / (1 + np.exp(-logits))).astype(float)
    truth = (1 / (1 + np.exp(-(theta[:, None] + psi[None, :])))).mean(1)  # the length-free win rates
    return outcomes, length_diff, truth


def test_length_controlled_win_rate_recovers_the_length_free_truth():
    outcomes, length_diff, truth = _length_biased_battles(seed=0)
    lc = stats.length_controlled_win_rates(outcomes, length_diff, seed=0, n_resamples=100)
    raw = [stats.win_rate(row, seed=0) for row in outcomes]
    for k in range(3):
        assert lc[k].low <= truth[k] <= lc[k].high, (k, lc[k], truth[k])
        assert lc[k].se > 0 and lc[k].high - lc[k].low < 0.2
    assert not raw[0].low <= truth[0] <= raw[0].high  # the raw win rate of the verbose policy is inflated
    assert raw[0].value - truth[0] > 0.15


def test_length_controlled_win_rate_without_length_bias_is_the_win_rate():
    rng = np.random.default_rng(1)
    outcomes = (rng.random((2, 300)) < np.array([[0.7], [0.4]])).astype(float)
    length_diff = rng.normal(0, 30, (2, 300))
    lc = stats.length_controlled_win_rates(outcomes, length_diff, seed=0, n_resamples=50)
    for k in range(2):
        assert lc[k].value == pytest.approx(outcomes[k].mean(), abs=0.03)
