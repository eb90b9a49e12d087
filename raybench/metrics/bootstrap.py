"""Intervals for KLOM summaries (P95, mean, …) over the models of both ensembles: delete-half subsampling.

What the interval covers: the variability of a KLOM summary that comes from *which N models* each ensemble
happens to contain, at this N, i.e. how far the summary of this run could sit from the summary expected of
another run with the same recipe, forget set and N (noise floor included: the estimand is the expected summary
at this N, not the divergence at infinite N). Each replicate draws ``N // 2`` of the unlearned models and,
independently, ``N // 2`` of the oracles, *without* replacement, recomputes per-sample KLOM with the exact kernel
(:func:`raybench.metrics.klom`, per-sample bin edges recomputed from the drawn values, as KLOM does), and then the
summary over samples. The interval is the point estimate plus the 2.5 % and 97.5 % quantiles (NumPy linear) of
the replicates' deviations from their own mean; the lower end is clipped at 0 (KLOM is never negative). It
does *not* cover the choice of samples or of the forget set (samples are held fixed), variation of the training
recipe, architecture or data (models are i.i.d. draws of one fixed recipe), or the bins/clip/eps settings.

Why not the plain bootstrap: resampling models *with* replacement leaves out about a third of them and repeats
others, which makes both histograms lumpier; KLOM is a plug-in divergence of those histograms, so every replicate
sits far above the point estimate (on the digits default run, the floor's val P95 0.683 against a percentile
interval of [1.14, 1.51]), and the replicates' spread is about 4.6 times the true sampling spread at the floor.
A half-sample has no duplicates: it is an ensemble of N/2 models of the same recipe. Its KLOM sits higher (the
floor at N/2), which the centring removes; its spread, conditional on the N models at hand, estimates the spread
at N without rescaling (the delete-d jackknife with d = N/2, whose variance factor (N − d)/d is 1: for a smooth
statistic the finite-population correction makes the half-sample variance about that of independent ensembles of
N). Assumption: the spread at N is not larger than the half-sample spread. Measured (docs/metrics.md#uncertainty):
0.9–1.4 times the true range where KLOM is large, about 2 times near the floor, where the spread of KLOM falls
like 1/N rather than 1/√N.

Chunkwise use (reduce streams samples): make the draws once per ensemble (:func:`bootstrap_draws`, or
:func:`ensemble_rows` per ensemble from its own seed), call :func:`klom_replicates` on each chunk of samples and
place its ``(B, chunk)`` block at the chunk's columns of a ``(B, n_samples)`` array, then call
:func:`bootstrap_interval` with the full array and the full-sample per-sample KLOM. Per-sample KLOM depends only on
that sample's column, so the chunked result equals the whole-matrix one exactly. Memory: ``B × n_samples``
float64 (80 MB for 200 × 50,000). Cost: the binning of B half-size ensembles per sample, about B/2 times one KLOM
of the split; a dedicated kernel reads each sample's values once for all replicates (no gathered copies).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numba
import numpy as np

from raybench.metrics.klom import DIRECTIONS, _check_inputs, _edge_count, _linspace_into, _pairwise, klom

DEFAULT_STATS: tuple[str, ...] = ("p95", "mean")
DEFAULT_N_BOOT = 200
DEFAULT_SEED = 0
DEFAULT_LEVEL = 0.95
METHOD = "half-subsample-centred"
"""Recorded in summary.json's ``bootstrap``: N//2 models of each ensemble without replacement, quantiles of the
replicates' deviations from their mean added to the point estimate, no rescaling (docs/metrics.md#uncertainty)."""
MIN_MODELS = 4
"""Fewer models than this in an ensemble gives no interval: half of it would be a single model."""
_MAX_TERMS = 2**17  # (replicate, sample) pairs per kernel call: 3 float64 buffers of 20 bins, 63 MB in all


@dataclass(frozen=True, eq=False)
class BootstrapDraws:
    """Row indices of each replicate: ``unlearned[b]`` / ``oracle[b]`` are the rows (ascending) of the b-th draw."""

    unlearned: np.ndarray  # (n_boot, n_unlearned // 2) int64
    oracle: np.ndarray  # (n_boot, n_oracle // 2) int64
    n_unlearned: int  # the ensemble sizes drawn from
    n_oracle: int
    seed: int

    @property
    def n_boot(self) -> int:
        return int(self.unlearned.shape[0])


@dataclass(frozen=True)
class BootstrapResult:
    """Interval per statistic, with the point estimate, the replicates' mean (the floor at N/2, to show the shift
    the centring removes), B, seed and level."""

    low: dict[str, float]
    high: dict[str, float]
    point: dict[str, float]
    replicate_mean: dict[str, float]
    n_boot: int
    seed: int
    level: float

    def columns(self, prefix: str = "klom_") -> dict[str, float]:
        """``{prefix+"p95_ci_low": …, prefix+"p95_ci_high": …, prefix+"mean_ci_low": …, …}``."""
        row: dict[str, float] = {}
        for stat in self.low:
            row[f"{prefix}{stat}_ci_low"] = self.low[stat]
            row[f"{prefix}{stat}_ci_high"] = self.high[stat]
        return row


def ensemble_rows(n_models: int, *, n_boot: int = DEFAULT_N_BOOT, seed: int | Sequence[int] = DEFAULT_SEED
                  ) -> np.ndarray:
    """``(n_boot, n_models // 2)`` row indices of one ensemble, each row a uniform draw without replacement
    (sorted), from ``numpy.random.SeedSequence(seed)``: the same seed gives the same draws in every process."""
    if int(n_boot) != n_boot or n_boot < 2:
        raise ValueError(f"n_boot must be an integer >= 2, got {n_boot!r}")
    if n_models < MIN_MODELS:
        raise ValueError(f"an ensemble needs at least {MIN_MODELS} models to be halved, got {n_models}")
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    m = n_models // 2
    rows = np.argsort(rng.random((int(n_boot), n_models)), axis=1)[:, :m]  # a random permutation's first m
    return np.sort(rows, axis=1).astype(np.int64)


def bootstrap_draws(n_unlearned: int, n_oracle: int, *, n_boot: int = DEFAULT_N_BOOT, seed: int = DEFAULT_SEED
                    ) -> BootstrapDraws:
    """Draws of both ensembles for all replicates, so every chunk of samples uses the same half-samples.

    The two ensembles get independent streams (``SeedSequence(seed).spawn(2)``): more oracles do not change the
    unlearned draws and vice versa. ``reduce`` seeds each ensemble from its own identity instead
    (:func:`ensemble_rows`).
    """
    ss_u, ss_o = np.random.SeedSequence(seed).spawn(2)
    return BootstrapDraws(ensemble_rows(n_unlearned, n_boot=n_boot, seed=ss_u.generate_state(4).tolist()),
                          ensemble_rows(n_oracle, n_boot=n_boot, seed=ss_o.generate_state(4).tolist()),
                          int(n_unlearned), int(n_oracle), int(seed))


def klom_replicates(unlearned: np.ndarray, oracle: np.ndarray, draws: BootstrapDraws, *, bins: int = 20,
                    clip: tuple[float, float] = (-100.0, 100.0), eps: float = 1e-5, variant: str = "easydub",
                    direction: str = DIRECTIONS[0], max_terms: int = _MAX_TERMS) -> np.ndarray:
    """Per-replicate, per-sample KLOM of one chunk of samples: float64 of shape ``(B, chunk)``.

    ``unlearned`` / ``oracle`` are the chunk's ``(models, samples)`` margins with all rows, in model order (the
    draws index rows). The value of replicate b at sample s is exactly ``klom(unlearned[draws.unlearned[b]],
    oracle[draws.oracle[b]])[s]`` with the same settings, computed without building those matrices: a kernel
    (the same steps as ``klom``'s: clip, joint range, linspace edges, counts, p and p/q') reads each sample's
    column once for all replicates; the log and the sum over bins are ``klom``'s own. At most ``max_terms``
    (replicate, sample) pairs are in flight (about 500 bytes each).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown KL direction {direction!r}; known: {', '.join(DIRECTIONS)}")
    u, o = _check_inputs(unlearned, oracle, bins, clip, eps, variant)
    if u.shape[0] != draws.n_unlearned or o.shape[0] != draws.n_oracle:
        raise ValueError(f"draws were made for {draws.n_unlearned} unlearned and {draws.n_oracle} oracle models, "
                         f"got {u.shape[0]} and {o.shape[0]}")
    rows_u, rows_o = draws.unlearned.astype(np.int64), draws.oracle.astype(np.int64)
    if direction == "oracle-unlearned":  # P from the oracles: the kernel's first ensemble, as in ``klom``
        u, o, rows_u, rows_o = o, u, rows_o, rows_u
    dtype = u.dtype.type
    grid = np.arange(bins + 1).astype(u.dtype)
    # (samples, models): a sample's values are contiguous, read once per sample for every replicate
    ut, ot = np.ascontiguousarray(u.T), np.ascontiguousarray(o.T)
    width, n_boot = u.shape[1], draws.n_boot
    out = np.empty((n_boot, width), dtype=np.float64)
    batch = int(max(1, min(n_boot, max_terms // max(width, 1))))
    # reused by every batch: slots past a row's nnz hold positive leftovers, logged but never summed (as in klom)
    p = np.ones((batch * width, bins), dtype=np.float64)
    ratio = np.ones((batch * width, bins), dtype=np.float64)
    logs = np.empty_like(ratio)
    nnz = np.empty(batch * width, dtype=np.int64)
    for b0 in range(0, n_boot, batch):
        k = min(batch, n_boot - b0)
        n = k * width
        _replicate_terms(ut, ot, rows_u[b0 : b0 + k], rows_o[b0 : b0 + k], grid, dtype(1.0), dtype(clip[0]),
                         dtype(clip[1]), variant == "closed", float(eps), p, ratio, nnz)
        np.log(ratio[:n], out=logs[:n])  # NumPy's log, as in klom: its last bit is NumPy's, not libm's
        _sums_into(p[:n], logs[:n], nnz[:n], out[b0 : b0 + k].reshape(n))
    return out


@numba.njit(cache=True, parallel=True)
def _replicate_terms(ut, ot, rows_u, rows_o, grid, one, clip_lo, clip_hi, closed, eps, p_out, ratio_out, nnz):
    """``klom``'s binning (``_binned_terms``, step for step) of every (replicate, sample): replicate b of sample s
    bins the values ``ut[s, rows_u[b]]`` against ``ot[s, rows_o[b]]``; outputs at row ``b * samples + s``.

    Parallel over samples: a sample's clipped values stay in L1 while all its replicates are binned.
    """
    bins = grid.shape[0] - 1
    width = ut.shape[0]
    n_boot, m_u = rows_u.shape
    m_o = rows_o.shape[1]
    for s in numba.prange(width):
        edges = np.empty(bins + 1, dtype=ut.dtype)
        count_u = np.empty(bins + 1, dtype=np.int64)
        count_o = np.empty(bins + 1, dtype=np.int64)
        cu = np.empty(ut.shape[1], dtype=ut.dtype)
        co = np.empty(ot.shape[1], dtype=ot.dtype)
        for i in range(ut.shape[1]):
            cu[i] = min(max(ut[s, i], clip_lo), clip_hi)
        for i in range(ot.shape[1]):
            co[i] = min(max(ot[s, i], clip_lo), clip_hi)
        for b in range(n_boot):
            lo = cu[rows_u[b, 0]]
            hi = lo
            for i in range(m_u):
                v = cu[rows_u[b, i]]
                lo = min(lo, v)
                hi = max(hi, v)
            for i in range(m_o):
                v = co[rows_o[b, i]]
                lo = min(lo, v)
                hi = max(hi, v)
            stop = hi if lo < hi else lo + one
            _linspace_into(lo, stop, grid, edges)
            lo64 = np.float64(lo)
            inv_width = bins / (np.float64(stop) - lo64)
            count_u[:] = 0
            count_o[:] = 0
            for i in range(m_u):
                count_u[_edge_count(cu[rows_u[b, i]], edges, lo64, inv_width, bins) - 1] += 1
            for i in range(m_o):
                count_o[_edge_count(co[rows_o[b, i]], edges, lo64, inv_width, bins) - 1] += 1
            if closed:
                count_u[bins - 1] += count_u[bins]
                count_o[bins - 1] += count_o[bins]
                count_u[bins] = 0
                count_o[bins] = 0
            total_u = m_u - count_u[bins]
            total_o = m_o - count_o[bins]
            j = b * width + s
            k = 0
            for i in range(bins):
                if count_u[i] > 0:  # p > 0, hence total_u > 0
                    p = count_u[i] / total_u
                    q = count_o[i] / total_o if total_o > 0 else 0.0
                    p_out[j, k] = p
                    ratio_out[j, k] = p / max(q, eps)
                    k += 1
            nnz[j] = k


@numba.njit(cache=True, parallel=True)
def _sums_into(p, logs, nnz, out):
    """``klom``'s ``_row_sums`` (Σ p·log per row in NumPy's pairwise order, via its ``_pairwise``) into ``out``,
    with one terms buffer per block of rows instead of one per row."""
    n, bins = p.shape
    block = 256
    for blk in numba.prange((n + block - 1) // block):
        terms = np.empty(bins, dtype=np.float64)
        for s in range(blk * block, min(n, (blk + 1) * block)):
            k = nnz[s]
            for i in range(k):
                terms[i] = p[s, i] * logs[s, i]
            out[s] = _pairwise(terms[:k]) if k > 0 else 0.0


def replicate_statistics(replicates: np.ndarray, stats: Sequence[str] = DEFAULT_STATS) -> dict[str, np.ndarray]:
    """Each statistic of each replicate over all samples: ``{stat: (B,)}``; ``"mean"`` or ``"pQ"`` (NumPy linear)."""
    # C order: each replicate's samples contiguous, so the mean is NumPy's pairwise sum of that row whatever layout
    # the caller's array has (a column selection ``a[:, idx]`` comes back in Fortran order and sums differently)
    r = np.ascontiguousarray(replicates, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] < 2 or r.shape[1] == 0:
        raise ValueError(f"replicates must have shape (B >= 2, samples >= 1), got {r.shape}")
    return {stat: _statistic(r, stat) for stat in stats}


def _statistic(values: np.ndarray, stat: str) -> np.ndarray:
    """``stat`` over the last axis of finite per-sample values."""
    if not np.isfinite(values).all():
        raise ValueError("per-sample values contain NaN/inf")
    if stat == "mean":
        return values.mean(axis=-1)
    if stat.startswith("p") and _is_percent(stat[1:]):
        return np.percentile(values, float(stat[1:]), axis=-1)
    raise ValueError(f"unknown statistic {stat!r}: use 'mean' or 'pQ' with 0 <= Q <= 100, e.g. 'p95'")


def bootstrap_interval(replicates: np.ndarray, values: np.ndarray, *, stats: Sequence[str] = DEFAULT_STATS,
                       level: float = DEFAULT_LEVEL, seed: int) -> BootstrapResult:
    """The interval of each statistic from the full ``(B, n_samples)`` replicates and the full-sample per-sample
    KLOM ``values`` (n_samples,): point estimate + quantiles of the replicates' deviations from their mean."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    v = np.asarray(values, dtype=np.float64)
    r = np.asarray(replicates)
    if v.ndim != 1 or r.ndim != 2 or r.shape[1] != v.shape[0]:
        raise ValueError(f"replicates (B, samples) and values (samples,) disagree: {r.shape} and {v.shape}")
    per_rep = replicate_statistics(r, stats)
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    low, high, point, mean = {}, {}, {}, {}
    for stat, reps in per_rep.items():
        centre = float(reps.mean())
        dev_lo, dev_hi = np.percentile(reps - centre, q)
        p = float(_statistic(v, stat))
        low[stat], high[stat] = max(0.0, p + float(dev_lo)), p + float(dev_hi)
        point[stat], mean[stat] = p, centre
    return BootstrapResult(low, high, point, mean, int(r.shape[0]), int(seed), float(level))


def klom_bootstrap(unlearned: np.ndarray, oracle: np.ndarray, *, stats: Sequence[str] = DEFAULT_STATS,
                   n_boot: int = DEFAULT_N_BOOT, seed: int = DEFAULT_SEED, level: float = DEFAULT_LEVEL,
                   chunk: int = 8192, **klom_kwargs) -> BootstrapResult:
    """The interval of KLOM summaries for whole ``(models, samples)`` matrices (chunked internally)."""
    u = np.asarray(unlearned)
    o = np.asarray(oracle)
    if u.ndim != 2 or o.ndim != 2:
        raise ValueError(f"margins must have shape (models, samples), got {u.shape} and {o.shape}")
    draws = bootstrap_draws(u.shape[0], o.shape[0], n_boot=n_boot, seed=seed)
    reps = np.empty((draws.n_boot, u.shape[1]), dtype=np.float64)
    for s0 in range(0, u.shape[1], chunk):
        reps[:, s0 : s0 + chunk] = klom_replicates(u[:, s0 : s0 + chunk], o[:, s0 : s0 + chunk], draws,
                                                   **klom_kwargs)
    return bootstrap_interval(reps, klom(u, o, **klom_kwargs), stats=stats, level=level, seed=seed)


def _is_percent(text: str) -> bool:
    try:
        q = float(text)
    except ValueError:
        return False
    return 0 <= q <= 100
