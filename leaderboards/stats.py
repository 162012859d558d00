"""Statistics for evaluations and leaderboards: win rates with CIs, paired differences, the length-controlled win
rate, and Bradley-Terry ratings. Every resampling is seeded: the same data and seed give the same numbers.

Outcomes are per prompt, from the evaluated policy's side: 1 a win, 0 a loss, 0.5 a tie.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95


def _method(n_params: int) -> str:
    """scipy's BFGS for small fits, L-BFGS-B for large ones. On this 2-core machine L-BFGS-B spent about 1 ms per
    iteration in its setulb routine, 5-15x slower than BFGS on fits of a few dozen parameters; BFGS keeps a dense
    inverse Hessian, which stops paying off at a few hundred parameters."""
    return "BFGS" if n_params <= 200 else "L-BFGS-B"


def bootstrap_ci(values: Sequence[float], *, n_resamples: int = 2000, level: float = LEVEL,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean (seeded: the same data and seed give the same interval)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_resamples, x.size))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def outcome(preference: float | None) -> float | None:
    """A judged preference P(policy better) as an outcome: 1 win, 0 loss, 0.5 tie; None for an abstention."""
    if preference is None or not np.isfinite(preference):
        return None
    return 1.0 if preference > 0.5 else 0.0 if preference < 0.5 else 0.5


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its 95% interval (and standard error where one is computed)."""

    value: float
    low: float
    high: float
    n: int
    se: float = float("nan")

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high, "n": self.n, "se": self.se}


def win_rate(outcomes: Sequence[float], *, seed: int = 0, n_resamples: int = 2000) -> Estimate:
    """Mean outcome (ties count half) with a seeded percentile bootstrap 95% CI over prompts."""
    x = np.asarray(outcomes, dtype=float)
    if x.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    lo, hi = bootstrap_ci(x, seed=seed, n_resamples=n_resamples)
    return Estimate(float(x.mean()), lo, hi, int(x.size), float(x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else 0.0)


@dataclass(frozen=True)
class PairedDifference:
    """Policy A's outcomes minus policy B's on the same prompts: the mean, its bootstrap CI and a two-sided p-value."""

    difference: float
    low: float
    high: float
    p_value: float
    n: int


def paired_difference(a: Sequence[float], b: Sequence[float], *, seed: int = 0,
                      n_resamples: int = 5000) -> PairedDifference:
    """Bootstrap of the mean per-prompt difference ``a_i - b_i`` (prompts resampled, pairs kept together).

    The p-value is the sign-flip permutation test of "no difference": each prompt's difference is flipped with
    probability 1/2 (seeded), and p is the share of flipped means at least as far from 0 as the observed one.
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired outcomes need the same prompts: {x.size} vs {y.size}")
    d = x - y
    if d.size == 0:
        return PairedDifference(float("nan"), float("nan"), float("nan"), float("nan"), 0)
    lo, hi = bootstrap_ci(d, seed=seed, n_resamples=n_resamples)
    rng = np.random.default_rng(seed + 1)
    signs = rng.choice([-1.0, 1.0], size=(n_resamples, d.size))
    flipped = np.abs((signs * d).mean(axis=1))
    p = float((np.sum(flipped >= abs(d.mean()) - 1e-12) + 1) / (n_resamples + 1))
    return PairedDifference(float(d.mean()), lo, hi, min(1.0, p), int(d.size))


# -- length-controlled win rate ----------------------------------------------------------------------------
def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def fit_length_glm(outcomes: np.ndarray, length_diff: np.ndarray, *, difficulty_l2: float = 1.0,
                   start: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit AlpacaEval 2's length-controlled GLM on battles of M policies against one reference on N prompts.

    ``outcomes`` and ``length_diff`` are ``[M, N]`` (NaN where a battle is missing): the outcome of policy m on
    prompt i and its answer's length minus the reference answer's. The model is

        logit P(m beats the reference on i) = theta_m + phi_m * tanh(length_diff_mi / sd(length_diff)) + psi_i

    with a per-policy quality theta_m, a per-policy length coefficient phi_m and a per-prompt difficulty psi_i
    shared by all policies. AlpacaEval fits psi once on its own instructions; here psi is estimated from the
    battles on the same prompts (an L2 penalty ``difficulty_l2`` keeps it identified: with one policy it
    shrinks towards 0). Returns ``(theta, phi, psi)``; fitted by maximum likelihood with scipy,
    from ``start`` (the concatenated parameters, e.g. a previous fit's) when given.
    """
    from scipy.optimize import minimize

    y = np.asarray(outcomes, dtype=float)
    m, n = y.shape
    seen = ~np.isnan(y)
    scale = np.nanstd(length_diff) or 1.0
    t = np.where(seen, np.tanh(np.nan_to_num(length_diff) / scale), 0.0)
    yy = np.where(seen, y, 0.0)

    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        theta, phi, psi = params[:m], params[m:2 * m], params[2 * m:]
        z = theta[:, None] + phi[:, None] * t + psi[None, :]
        p = _sigmoid(z)
        eps = 1e-12
        nll = -np.sum(seen * (yy * np.log(p + eps) + (1 - yy) * np.log(1 - p + eps)))
        g = seen * (p - yy)
        grad = np.concatenate([g.sum(1), (g * t).sum(1), g.sum(0) + 2 * difficulty_l2 * psi])
        return nll + difficulty_l2 * float(psi @ psi), grad

    res = minimize(loss, np.zeros(2 * m + n) if start is None else start, jac=True, method=_method(2 * m + n))
    return res.x[:m], res.x[m:2 * m], res.x[2 * m:]


def length_controlled_win_rates(outcomes: np.ndarray, length_diff: np.ndarray, *, seed: int = 0,
                                n_resamples: int = 200, difficulty_l2: float = 1.0) -> list[Estimate]:
    """The length-controlled win rate of each of M policies (AlpacaEval 2): the mean over prompts of the fitted
    win probability with the length term set to zero, ``mean_i sigmoid(theta_m + psi_i)``. Its standard error
    and 95% CI come from a seeded bootstrap over prompts (the GLM refitted on each resample)."""
    y, ld = np.asarray(outcomes, dtype=float), np.asarray(length_diff, dtype=float)
    m, n = y.shape

    def lc(yb: np.ndarray, lb: np.ndarray, start=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        theta, phi, psi = fit_length_glm(yb, lb, difficulty_l2=difficulty_l2, start=start)
        seen = ~np.isnan(yb)
        probs = _sigmoid(theta[:, None] + psi[None, :])
        return np.array([probs[k][seen[k]].mean() if seen[k].any() else np.nan for k in range(m)]), \
            np.concatenate([theta, phi]), psi

    point, head, psi = lc(y, ld)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_resamples):  # each refit starts from the full-data fit (the resample's prompts' difficulties)
        idx = rng.integers(0, n, n)
        draws.append(lc(y[:, idx], ld[:, idx], np.concatenate([head, psi[idx]]))[0])
    draws = np.array(draws)
    alpha = (1 - LEVEL) / 2
    return [Estimate(float(point[k]), float(np.nanquantile(draws[:, k], alpha)),
                     float(np.nanquantile(draws[:, k], 1 - alpha)), int((~np.isnan(y[k])).sum()),
                     float(np.nanstd(draws[:, k], ddof=1))) for k in range(m)]


# -- Bradley-Terry ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rating:
    """A Bradley-Terry strength (log-odds units; the anchor player is 0), its 95% CI, and its rank."""

    player: str
    strength: float
    low: float
    high: float
    rank: int

    @property
    def elo(self) -> float:
        """The strength on the Elo scale (400 / ln 10 per log-odds unit, anchor at 1000)."""
        return 1000.0 + 400.0 / np.log(10.0) * self.strength


def fit_bradley_terry(players: Sequence[str], battles: Sequence[tuple[str, str, float]], *,
                      anchor: str | None = None, l2: float = 1e-6, start: dict[str, float] | None = None
                      ) -> dict[str, float]:
    """Maximum-likelihood Bradley-Terry strengths: P(i beats j) = sigmoid(s_i - s_j).

    ``battles`` are ``(i, j, outcome)`` with outcome 1 (i won), 0 (j won) or 0.5 (a tie, counted as half a win
    each way). The ``anchor`` player (default: the first) is fixed at 0; a tiny L2 term keeps a player who won or
    lost everything finite. Solved with scipy.
    """
    from scipy.optimize import minimize

    index = {p: k for k, p in enumerate(players)}
    if anchor is None:
        anchor = players[0]
    i = np.array([index[b[0]] for b in battles])
    j = np.array([index[b[1]] for b in battles])
    y = np.array([b[2] for b in battles], dtype=float)
    free = [k for k in range(len(players)) if k != index[anchor]]

    def full(x: np.ndarray) -> np.ndarray:
        s = np.zeros(len(players))
        s[free] = x
        return s

    def loss(x: np.ndarray) -> tuple[float, np.ndarray]:
        s = full(x)
        p = _sigmoid(s[i] - s[j])
        eps = 1e-12
        nll = -np.sum(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps)) + l2 * float(x @ x)
        g = p - y
        grad = np.zeros(len(players))
        np.add.at(grad, i, g)
        np.add.at(grad, j, -g)
        return nll, grad[free] + 2 * l2 * x

    x0 = np.zeros(len(free)) if start is None else np.array([start[players[k]] for k in free])
    res = minimize(loss, x0, jac=True, method=_method(len(free)))
    s = full(res.x)
    return {p: float(s[k]) for p, k in index.items()}


def bradley_terry(players: Sequence[str], battles: Sequence[tuple[str, str, float, str]], *, anchor: str | None = None,
                  seed: int = 0, n_resamples: int = 500) -> list[Rating]:
    """Bradley-Terry ratings with seeded bootstrap CIs over prompts, and ranks that respect CI overlap.

    ``battles`` are ``(i, j, outcome, prompt_id)``; the bootstrap resamples prompts (all battles on a prompt go
    together). A player's rank is 1 + the number of players whose lower bound is above this player's upper
    bound, so players whose intervals overlap share ranks. Sorted best first.
    """
    players = list(players)
    point = fit_bradley_terry(players, [b[:3] for b in battles], anchor=anchor)
    prompts = sorted({b[3] for b in battles})
    by_prompt: dict[str, list] = {p: [] for p in prompts}
    for b in battles:
        by_prompt[b[3]].append(b[:3])
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_resamples):
        picked = rng.integers(0, len(prompts), len(prompts))
        sample = [b for k in picked for b in by_prompt[prompts[k]]]
        fit = fit_bradley_terry(players, sample, anchor=anchor, start=point)
        draws.append([fit[p] for p in players])
    draws = np.asarray(draws)
    alpha = (1 - LEVEL) / 2
    lows, highs = np.quantile(draws, alpha, axis=0), np.quantile(draws, 1 - alpha, axis=0)
    ratings = []
    for k, p in enumerate(players):
        rank = 1 + int(np.sum(lows > highs[k]))
        ratings.append(Rating(p, point[p], float(lows[k]), float(highs[k]), rank))
    return sorted(ratings, key=lambda r: (-r.strength, r.player))
