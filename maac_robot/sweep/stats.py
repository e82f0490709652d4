"""Aggregate statistics over seeds (Agarwal et al., 2021, "Deep RL at the Edge of the Statistical Precipice",
as rliable computes them), with numpy alone.

* `iqm`: the interquartile mean, the mean of the middle half of the runs: ⌊n/4⌋ dropped at each end, like
  `scipy.stats.trim_mean(x, 0.25)` that rliable uses (with fewer than 4 runs nothing is dropped: the mean).
* `bootstrap_ci`: the percentile bootstrap confidence interval of a statistic over runs, resampling the runs
  of each task with replacement (stratified: a sweep has one task, so its runs are the one stratum).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

Statistic = Callable[[np.ndarray], np.ndarray]  # [..., n runs] -> [...]


def iqm(values: Sequence[float] | np.ndarray, axis: int = -1) -> np.ndarray | float:
    """Interquartile mean along `axis` (a float for a 1-D input)."""
    x = np.sort(np.asarray(values, dtype=float), axis=axis)
    n = x.shape[axis]
    if n == 0:
        raise ValueError("the IQM of no values is undefined")
    cut = n // 4
    kept = np.take(x, np.arange(cut, n - cut), axis=axis)
    out = kept.mean(axis=axis)
    return float(out) if np.ndim(out) == 0 else out


def mean(values: np.ndarray, axis: int = -1) -> np.ndarray | float:
    out = np.asarray(values, dtype=float).mean(axis=axis)
    return float(out) if np.ndim(out) == 0 else out


def bootstrap_ci(values: Sequence[float], statistic: Statistic = iqm, confidence: float = 0.95, reps: int = 2000,
                 seed: int = 0) -> tuple[float, float]:
    """The percentile bootstrap interval of `statistic` over `values` (one per run): `reps` resamples of the
    runs with replacement, the (1 − confidence)/2 and (1 + confidence)/2 quantiles of the statistic over
    them. Deterministic for a given `seed`; one run gives the degenerate interval (v, v)."""
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"bootstrap_ci takes a non-empty 1-D sequence, got shape {x.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    samples = x[rng.integers(0, len(x), size=(reps, len(x)))]
    stats = np.asarray(statistic(samples, axis=-1))
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(stats, [alpha, 1 - alpha])
    return float(lo), float(hi)


def aggregate(values: Sequence[float], confidence: float = 0.95, reps: int = 2000,
              seed: int = 0) -> dict[str, float]:
    """IQM with its bootstrap interval, and the mean, of one variant's runs at one budget."""
    lo, hi = bootstrap_ci(values, iqm, confidence, reps, seed)
    return {"n": len(values), "iqm": float(iqm(values)), "ci_low": lo, "ci_high": hi,
            "mean": float(np.mean(values))}
