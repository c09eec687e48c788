"""Bootstrap confidence intervals for per-item scores."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

DEFAULT_RESAMPLES = 2000


def bootstrap_ci(
    values: Sequence[float],
    statistic: Callable[[np.ndarray], np.ndarray] | None = None,
    level: float = 0.95,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` (default: the mean) over items.

    ``statistic`` maps a ``[resamples, n]`` array to ``[resamples]`` values. Resampling is
    seeded, so the same scores always give the same interval.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    samples = x[rng.integers(0, x.size, size=(resamples, x.size))]
    stats = statistic(samples) if statistic else samples.mean(axis=1)
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(stats, [tail, 100.0 - tail])
    return (float(lo), float(hi))
