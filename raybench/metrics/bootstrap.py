"""Bootstrap intervals for KLOM summaries (P95, mean, …) over the models of both ensembles.

What the interval covers: the variability of a KLOM summary that comes from *which N models* each ensemble
happens to contain, at this N. Each replicate resamples the rows (models) of the unlearned ensemble and,
independently, of the oracle ensemble, with replacement, recomputes per-sample KLOM with the exact kernel
(:func:`raybench.metrics.klom`), and then the summary over samples. The per-sample bin edges are therefore
recomputed in every replicate from the resampled values (that is what KLOM does per sample), so the interval
includes the effect of the data-dependent binning. It does *not* cover the choice of samples or of the forget
set (samples are held fixed), nor variation of the training recipe, architecture or data (the models are
treated as i.i.d. draws from one fixed recipe), nor the bins/clip/eps settings (held fixed).

The interval is the plain percentile bootstrap (Efron & Tibshirani, *An Introduction to the Bootstrap*, ch. 13):
the ``(1-level)/2`` and ``(1+level)/2`` quantiles (NumPy linear) of the B replicate statistics. KLOM is a
plug-in divergence of binned histograms and is biased upwards at finite N; duplicated models in a resample make
both histograms lumpier, so replicate values sit *above* the point estimate on average. The result reports the
replicates' mean next to the interval so that this shift is visible; where the shift is large compared with
the interval's width (near-perfect unlearning, where KLOM is mostly its own noise floor), the interval need not
contain the point estimate, and it measures spread rather than locating the estimand.

Chunkwise use (reduce streams samples): draw the model indices once with :func:`bootstrap_draws` (one draw per
ensemble from the seed, identical for every chunk), call :func:`klom_replicates` on each chunk of samples and
place its ``(B, chunk)`` block at the chunk's columns of a ``(B, n_samples)`` array, then call
:func:`bootstrap_interval` on the full array. Because per-sample KLOM depends only on that sample's column, the
chunked result equals the whole-matrix one exactly. Memory: ``B × n_samples`` float64, 96 MB for 200 × 60,000
(float64 is kept so that percentiles of replicates are those of the exact per-sample values; storing float32
would halve it and move each value by < 1e-7 relative). Cost: B KLOM evaluations of ``(N, chunk)`` matrices
plus the row gathers, i.e. about B times one KLOM of the split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from raybench.metrics.klom import klom

DEFAULT_STATS: tuple[str, ...] = ("p95", "mean")


@dataclass(frozen=True)
class BootstrapDraws:
    """Row indices of each replicate: ``unlearned[b]`` / ``oracle[b]`` index the rows of the b-th resample."""

    unlearned: np.ndarray  # (n_boot, n_unlearned) int64
    oracle: np.ndarray  # (n_boot, n_oracle) int64
    seed: int

    @property
    def n_boot(self) -> int:
        return int(self.unlearned.shape[0])


@dataclass(frozen=True)
class BootstrapResult:
    """Percentile interval per statistic, with the replicates' mean (to show the resampling bias) and B, seed."""

    low: dict[str, float]
    high: dict[str, float]
    replicate_mean: dict[str, float]
    n_boot: int
    seed: int
    level: float

    def flat(self, prefix: str = "klom_") -> dict[str, float | int]:
        """``{prefix+"p95_ci_low": …, prefix+"p95_ci_high": …, …, prefix+"boot_n": B, prefix+"boot_seed": seed}``."""
        row: dict[str, float | int] = {}
        for stat in self.low:
            row[f"{prefix}{stat}_ci_low"] = self.low[stat]
            row[f"{prefix}{stat}_ci_high"] = self.high[stat]
        row[f"{prefix}boot_n"] = self.n_boot
        row[f"{prefix}boot_seed"] = self.seed
        return row


def bootstrap_draws(n_unlearned: int, n_oracle: int, *, n_boot: int = 200, seed: int = 0) -> BootstrapDraws:
    """Draw the model indices of all replicates at once, so every chunk of samples uses the same resamples.

    The two ensembles get independent streams (``SeedSequence(seed).spawn(2)``): adding oracles does not change
    the unlearned resamples and vice versa.
    """
    if int(n_boot) != n_boot or n_boot < 2:
        raise ValueError(f"n_boot must be an integer >= 2, got {n_boot!r}")
    if n_unlearned < 1 or n_oracle < 1:
        raise ValueError(f"both ensembles need at least one model, got {n_unlearned} and {n_oracle}")
    ss_u, ss_o = np.random.SeedSequence(seed).spawn(2)
    u = np.random.default_rng(ss_u).integers(0, n_unlearned, size=(int(n_boot), n_unlearned))
    o = np.random.default_rng(ss_o).integers(0, n_oracle, size=(int(n_boot), n_oracle))
    return BootstrapDraws(u, o, int(seed))


def klom_replicates(unlearned: np.ndarray, oracle: np.ndarray, draws: BootstrapDraws, **klom_kwargs) -> np.ndarray:
    """Per-replicate, per-sample KLOM of one chunk of samples: float64 of shape ``(B, chunk)``.

    ``unlearned`` / ``oracle`` are the chunk's ``(models, samples)`` margins with all rows present, in model
    order (the draws index rows). ``klom_kwargs`` (bins, clip, eps, variant) go to :func:`klom` unchanged.
    """
    u = np.asarray(unlearned)
    o = np.asarray(oracle)
    if u.ndim != 2 or o.ndim != 2:
        raise ValueError(f"margins must have shape (models, samples), got {u.shape} and {o.shape}")
    if u.shape[0] != draws.unlearned.shape[1] or o.shape[0] != draws.oracle.shape[1]:
        raise ValueError(
            f"draws were made for {draws.unlearned.shape[1]} unlearned and {draws.oracle.shape[1]} oracle models, "
            f"got {u.shape[0]} and {o.shape[0]}"
        )
    out = np.empty((draws.n_boot, u.shape[1]), dtype=np.float64)
    for b in range(draws.n_boot):
        out[b] = klom(u[draws.unlearned[b]], o[draws.oracle[b]], **klom_kwargs)
    return out


def replicate_statistics(replicates: np.ndarray, stats: Sequence[str] = DEFAULT_STATS) -> dict[str, np.ndarray]:
    """Each statistic of each replicate over all samples: ``{stat: (B,)}``; ``"mean"`` or ``"pQ"`` (NumPy linear)."""
    r = np.asarray(replicates, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] < 2 or r.shape[1] == 0:
        raise ValueError(f"replicates must have shape (B >= 2, samples >= 1), got {r.shape}")
    if not np.isfinite(r).all():
        raise ValueError("replicates contain NaN/inf values")
    out = {}
    for stat in stats:
        if stat == "mean":
            out[stat] = r.mean(axis=1)
        elif stat.startswith("p") and _is_percent(stat[1:]):
            out[stat] = np.percentile(r, float(stat[1:]), axis=1)
        else:
            raise ValueError(f"unknown statistic {stat!r}: use 'mean' or 'pQ' with 0 <= Q <= 100, e.g. 'p95'")
    return out


def bootstrap_interval(
    replicates: np.ndarray,
    *,
    stats: Sequence[str] = DEFAULT_STATS,
    level: float = 0.95,
    seed: int,
) -> BootstrapResult:
    """Percentile interval of each statistic from the full ``(B, n_samples)`` replicate matrix (the finaliser)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    per_rep = replicate_statistics(replicates, stats)
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    low, high, mean = {}, {}, {}
    for stat, values in per_rep.items():
        lo, hi = np.percentile(values, q)
        low[stat], high[stat], mean[stat] = float(lo), float(hi), float(values.mean())
    return BootstrapResult(low, high, mean, int(np.asarray(replicates).shape[0]), int(seed), float(level))


def klom_bootstrap(
    unlearned: np.ndarray,
    oracle: np.ndarray,
    *,
    stats: Sequence[str] = DEFAULT_STATS,
    n_boot: int = 200,
    seed: int = 0,
    level: float = 0.95,
    chunk: int = 8192,
    **klom_kwargs,
) -> BootstrapResult:
    """Bootstrap interval of KLOM summaries for whole ``(models, samples)`` matrices (chunked internally)."""
    u = np.asarray(unlearned)
    o = np.asarray(oracle)
    if u.ndim != 2 or o.ndim != 2:
        raise ValueError(f"margins must have shape (models, samples), got {u.shape} and {o.shape}")
    draws = bootstrap_draws(u.shape[0], o.shape[0], n_boot=n_boot, seed=seed)
    reps = np.empty((draws.n_boot, u.shape[1]), dtype=np.float64)
    for s0 in range(0, u.shape[1], chunk):
        reps[:, s0 : s0 + chunk] = klom_replicates(u[:, s0 : s0 + chunk], o[:, s0 : s0 + chunk], draws, **klom_kwargs)
    return bootstrap_interval(reps, stats=stats, level=level, seed=seed)


def _is_percent(text: str) -> bool:
    try:
        q = float(text)
    except ValueError:
        return False
    return 0 <= q <= 100
