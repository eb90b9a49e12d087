"""Percentile summaries of per-sample values (KLOM, or any later per-sample metric).

EasyDUB prints mean and percentiles computed with NumPy's default (linear) percentile; using the same definition
keeps our summary rows comparable with its printouts. The headline of a KLOM row is P95.
"""

from __future__ import annotations

import numpy as np

PERCENTILES: tuple[int, ...] = (5, 25, 50, 75, 95, 99)
STAT_NAMES: tuple[str, ...] = ("mean",) + tuple(f"p{q}" for q in PERCENTILES)


def summarize(values: np.ndarray, prefix: str = "") -> dict[str, float]:
    """``{prefix+"mean": …, prefix+"p5": …, …, prefix+"p99": …}`` of a 1-D array of per-sample values."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"summarize needs a non-empty 1-D array, got shape {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError("summarize got NaN/inf values")
    stats = [float(v.mean())] + [float(x) for x in np.percentile(v, PERCENTILES)]
    return {prefix + name: stat for name, stat in zip(STAT_NAMES, stats, strict=True)}
