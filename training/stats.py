"""Small statistics for the evaluation reports: intervals, paired tests, ranking metrics."""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054


def wilson(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% by default)."""
    if trials <= 0:
        return (0.0, 1.0)
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def proportion(successes: int, trials: int) -> dict[str, float | int]:
    """A rate with its 95% Wilson interval, as the reports print it."""
    low, high = wilson(successes, trials)
    return {"rate": successes / trials if trials else float("nan"), "ci95": [low, high],
            "n": trials}


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs (a right and b wrong, and
    the reverse): a binomial test of a_only against Binomial(a_only + b_only, 1/2)."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    k = min(a_only, b_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2 * tail)


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the precision-recall curve, as the mean precision at each positive."""
    labels = np.asarray(labels).astype(bool)
    positives = int(labels.sum())
    if positives == 0:
        return float("nan")
    order = np.argsort(-np.asarray(scores), kind="stable")
    hits = labels[order]
    precision_at = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision_at[hits].sum() / positives)


def f1(predicted: np.ndarray, labels: np.ndarray) -> float:
    predicted = np.asarray(predicted).astype(bool)
    labels = np.asarray(labels).astype(bool)
    tp = int((predicted & labels).sum())
    fp = int((predicted & ~labels).sum())
    fn = int((~predicted & labels).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def poisson_rate(events: int, exposure: float) -> dict[str, float | int]:
    """Events per unit of `exposure` with the exact (Garwood) 95% interval."""
    from scipy.stats import chi2

    low = 0.0 if events == 0 else chi2.ppf(0.025, 2 * events) / 2
    high = chi2.ppf(0.975, 2 * events + 2) / 2
    return {"rate": events / exposure, "ci95": [low / exposure, high / exposure],
            "events": events, "exposure": exposure}


def bootstrap(statistic: object, groups: list[tuple[np.ndarray, ...]], seed: int = 0,
              resamples: int = 1000) -> dict[str, float | list[float] | int]:
    """`statistic(*concatenated arrays)` with a 95% percentile interval from resampling whole
    groups (clips), because frames of one clip are not independent."""
    def value(chosen: list[tuple[np.ndarray, ...]]) -> float:
        return float(statistic(*(np.concatenate(parts)  # type: ignore[operator]
                                 for parts in zip(*chosen, strict=True))))

    rng = np.random.default_rng(seed)
    draws = [value([groups[i] for i in rng.integers(0, len(groups), len(groups))])
             for _ in range(resamples)]
    low, high = np.nanpercentile(draws, [2.5, 97.5])
    return {"value": value(groups), "ci95": [float(low), float(high)], "groups": len(groups)}
