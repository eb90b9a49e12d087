"""A paired comparison of two methods' per-sample KLOM over the same samples (``raybench compare``).

Two rows of one run folder are scored on the same samples against the same oracles, so their per-sample KLOM
values pair up by sample: the question "is A closer to retraining than B here?" is a paired one. Two answers,
both reported: the **paired bootstrap** interval of the mean difference d = mean(KLOM_A − KLOM_B) (resampling
samples with replacement, percentile interval), and the **Wilcoxon signed-rank** test of the differences
(``scipy.stats.wilcoxon``, two-sided, zero differences dropped as Wilcoxon's own rule has it). Both treat the
samples as the random unit: they say whether the difference holds across samples of this split, for these models;
the variability from which models each ensemble holds is the row intervals' job (docs/metrics.md#uncertainty).
"""

from __future__ import annotations

import numpy as np

DEFAULT_N_BOOT = 2000
DEFAULT_LEVEL = 0.95


def paired_comparison(a: np.ndarray, b: np.ndarray, *, n_boot: int = DEFAULT_N_BOOT, seed: int = 0,
                      level: float = DEFAULT_LEVEL) -> dict:
    """Mean per-sample KLOM of ``a`` and ``b`` (same samples, same order), their mean difference ``a - b`` with its
    paired-bootstrap ``level`` interval, the share of samples where ``a`` is lower, and the Wilcoxon signed-rank
    statistic and two-sided p-value (None where every difference is 0, where the test is undefined)."""
    from scipy.stats import wilcoxon

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired values must be two 1-D arrays of one length, got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("paired values must be finite")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    d = a - b
    picks = np.random.default_rng(seed).integers(0, d.size, size=(n_boot, d.size))
    means = d[picks].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    statistic = p_value = None
    if np.any(d != 0):
        test = wilcoxon(d, zero_method="wilcox", alternative="two-sided")
        statistic, p_value = float(test.statistic), float(test.pvalue)
    return {"n_samples": int(d.size), "mean_a": float(a.mean()), "mean_b": float(b.mean()),
            "mean_diff": float(d.mean()), "diff_ci_low": float(low), "diff_ci_high": float(high),
            "share_a_lower": float((d < 0).mean()), "wilcoxon_statistic": statistic, "wilcoxon_p": p_value,
            "n_boot": n_boot, "seed": seed, "level": level}
