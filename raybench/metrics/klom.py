"""KLOM: per-sample KL divergence between the margins of unlearned models and of oracles.

The published number (EasyDUB ``binned_kl_divergence`` / ``klom_from_margins``; docs/metrics.md#klom) is a Python loop
over samples. Every score raybench reports is compared with numbers produced by that loop, so this module
reproduces it *bit for bit*, quirks included, while running several hundred times faster:

* both ensembles are clipped to ``clip``; per sample, ``bins`` equal bins span the joint min..max, with the edges
  built exactly as ``numpy.linspace`` builds them (in the input dtype: float32 edges for float32 margins);
* a value lands in bin ``i`` when ``edge[i-1] <= v < edge[i]``; values equal to the top edge are **dropped**
  (``variant="easydub"``) or counted in the last bin (``variant="closed"``);
* ``p`` (unlearned) and ``q`` (oracle) are normalised counts; ``q`` is floored at ``eps`` only where ``p > 0``
  and is not renormalised; KLOM = Σ_{p>0} p·ln(p/q).

``direction="oracle-unlearned"`` swaps which ensemble is ``p`` (KL(oracle ‖ unlearned), what DUB's ``run.py``
prints; docs/metrics.md#variants): the kernel is the same, called with the two ensembles exchanged, so every step
above holds with the roles swapped, including which side's empty histogram makes a sample degenerate.

The counting runs in a fused numba kernel over blocks of samples (parallel over blocks, cache-friendly row
access). The float arithmetic that follows uses the same NumPy ufuncs as the reference and a summation that
reproduces NumPy's reduction order, so the results are identical, not merely close.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

KLOM_VERSION = "easydub-1"
"""Stamped on every summary row: which definition produced the number (see docs/metrics.md#variants)."""

VARIANTS = ("easydub", "closed")
DIRECTIONS = ("unlearned-oracle", "oracle-unlearned")
"""KL(unlearned ‖ oracle), the published definition and the default; KL(oracle ‖ unlearned), DUB ``run.py``'s."""
_BLOCK = 128  # samples per parallel task: a block of columns stays hot in L2 between its two reads
_CHUNK = 8192  # samples per call of the kernel: bounds temporary memory whatever the input size


@dataclass(frozen=True)
class KlomResult:
    """Per-sample KLOM plus what the reference silently does to it.

    ``dropped_unlearned`` / ``dropped_oracle`` count the values that fell on the top edge and were not binned.
    A sample is *degenerate* when every value of the ensemble that defines P was dropped (the unlearned one, or
    the oracles with ``direction="oracle-unlearned"``): the reference then scores it 0, a false perfect score that
    summaries must flag.
    """

    values: np.ndarray
    dropped_unlearned: np.ndarray
    dropped_oracle: np.ndarray
    n_unlearned: int
    n_oracle: int
    direction: str = DIRECTIONS[0]

    @property
    def degenerate(self) -> np.ndarray:
        if self.direction == "oracle-unlearned":
            return self.dropped_oracle == self.n_oracle
        return self.dropped_unlearned == self.n_unlearned

    @property
    def n_degenerate(self) -> int:
        return int(self.degenerate.sum())


def klom(
    unlearned: np.ndarray,
    oracle: np.ndarray,
    *,
    bins: int = 20,
    clip: tuple[float, float] = (-100.0, 100.0),
    eps: float = 1e-5,
    variant: str = "easydub",
    direction: str = "unlearned-oracle",
) -> np.ndarray:
    """KLOM per sample, KL(unlearned ‖ oracle) (or KL(oracle ‖ unlearned) with ``direction="oracle-unlearned"``),
    as float64 of shape (samples,).

    ``unlearned`` has shape (models_u, samples) and ``oracle`` (models_o, samples); the model counts may differ.
    """
    return klom_details(unlearned, oracle, bins=bins, clip=clip, eps=eps, variant=variant, direction=direction).values


def klom_details(
    unlearned: np.ndarray,
    oracle: np.ndarray,
    *,
    bins: int = 20,
    clip: tuple[float, float] = (-100.0, 100.0),
    eps: float = 1e-5,
    variant: str = "easydub",
    direction: str = "unlearned-oracle",
) -> KlomResult:
    """KLOM per sample with the counts of dropped values (see :class:`KlomResult`)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown KL direction {direction!r}; known: {', '.join(DIRECTIONS)}")
    u, o = _check_inputs(unlearned, oracle, bins, clip, eps, variant)
    # P is the first ensemble the kernel gets: exchanging the two is the whole of the reversed direction
    p_side, q_side = (o, u) if direction == "oracle-unlearned" else (u, o)
    n = u.shape[1]
    values = np.empty(n, dtype=np.float64)
    drop_u = np.zeros(n, dtype=np.int64)
    drop_o = np.zeros(n, dtype=np.int64)
    dtype = u.dtype.type
    grid = np.arange(bins + 1).astype(u.dtype)
    clip_lo, clip_hi = dtype(clip[0]), dtype(clip[1])
    width = min(n, _CHUNK)
    p = np.ones((width, bins), dtype=np.float64)
    ratio = np.ones((width, bins), dtype=np.float64)
    nnz = np.empty(width, dtype=np.int64)
    for s0 in range(0, n, _CHUNK):
        s1 = min(n, s0 + _CHUNK)
        drop_p, drop_q = (drop_o, drop_u) if direction == "oracle-unlearned" else (drop_u, drop_o)
        _binned_terms(p_side, q_side, s0, s1, grid, dtype(1.0), clip_lo, clip_hi, variant == "closed", float(eps),
                      _BLOCK, p, ratio, nnz, drop_p[s0:s1], drop_q[s0:s1])
        # The one transcendental step runs in NumPy, as in the reference, so its last bit is NumPy's (NumPy
        # may use its own SIMD log rather than libm's). Slots past nnz hold positive leftovers, never summed.
        logs = np.log(ratio[: s1 - s0])
        values[s0:s1] = _row_sums(p[: s1 - s0], logs, nnz[: s1 - s0])
    return KlomResult(values, drop_u, drop_o, u.shape[0], o.shape[0], direction)


def _check_inputs(unlearned, oracle, bins, clip, eps, variant) -> tuple[np.ndarray, np.ndarray]:
    if variant not in VARIANTS:
        raise ValueError(f"unknown KLOM variant {variant!r}; known: {', '.join(VARIANTS)}")
    if int(bins) != bins or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    if not clip[0] < clip[1]:
        raise ValueError(f"clip must be (low, high) with low < high, got {clip!r}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps!r}")
    arrays = []
    for name, a in (("unlearned", unlearned), ("oracle", oracle)):
        a = np.asarray(a)
        if a.ndim != 2:
            raise ValueError(f"{name} margins must have shape (models, samples), got shape {a.shape}")
        if a.shape[0] == 0 or a.shape[1] == 0:
            raise ValueError(f"{name} margins are empty (shape {a.shape})")
        if a.dtype.kind not in "fiu":
            raise ValueError(f"{name} margins must be numeric, got dtype {a.dtype}")
        arrays.append(a)
    u, o = arrays
    if u.shape[1] != o.shape[1]:
        raise ValueError(f"sample counts differ: unlearned has {u.shape[1]}, oracle has {o.shape[1]}")
    # One dtype for both: float32 stays float32 (the reference's edges are float32 then); anything else,
    # or a mix, is compared in float64, which represents every float32 exactly.
    dtype = np.float32 if u.dtype == o.dtype == np.float32 else np.float64
    u = np.ascontiguousarray(u, dtype=dtype)
    o = np.ascontiguousarray(o, dtype=dtype)
    for name, a in (("unlearned", u), ("oracle", o)):
        for s0 in range(0, a.shape[1], _CHUNK):  # chunked: no temporary as large as the input
            bad = ~np.isfinite(a[:, s0 : s0 + _CHUNK])
            if bad.any():
                model, sample = np.argwhere(bad)[0]
                raise ValueError(
                    f"{name} margins contain NaN/inf values (first at model {model}, sample {s0 + sample})"
                )
    return u, o


@numba.njit(cache=True, inline="always")
def _edge_count(v, edges, lo, inv_width, bins):
    """Number of edges <= v, i.e. ``searchsorted(edges, v, side="right")`` = ``numpy.digitize(v, edges)``.

    A float64 guess from the bin width, then exact comparisons against the real edges fix it up, so the
    answer is the reference's even where rounding puts a value on the other side of an edge.
    """
    g = int((np.float64(v) - lo) * inv_width) + 1
    g = min(max(g, 1), bins + 1)
    while g < bins + 1 and edges[g] <= v:
        g += 1
    while g > 1 and edges[g - 1] > v:
        g -= 1
    return g


@numba.njit(cache=True, inline="always")
def _linspace_into(start, stop, grid, edges):
    """``numpy.linspace(start, stop, len(grid))`` into ``edges``, operation for operation, in the same dtype."""
    div = grid[-1]
    delta = stop - start
    step = delta / div
    if step == 0:  # NumPy's branch for subnormal steps (gh-5437)
        for i in range(grid.shape[0]):
            edges[i] = (grid[i] / div) * delta + start
    else:
        for i in range(grid.shape[0]):
            edges[i] = grid[i] * step + start
    edges[grid.shape[0] - 1] = stop


@numba.njit(cache=True, inline="always")
def _column_range(src, s, clip_lo, clip_hi, lo, hi):
    """(min, max) of ``lo``, ``hi`` and the clipped values of column ``s`` of ``src``."""
    for m in range(src.shape[0]):
        v = min(max(src[m, s], clip_lo), clip_hi)
        lo = min(lo, v)
        hi = max(hi, v)
    return lo, hi


@numba.njit(cache=True, inline="always")
def _count_column(src, s, clip_lo, clip_hi, edges, lo, inv_width, bins, counts):
    counts[:] = 0
    for m in range(src.shape[0]):
        v = min(max(src[m, s], clip_lo), clip_hi)
        counts[_edge_count(v, edges, lo, inv_width, bins) - 1] += 1


@numba.njit(cache=True, parallel=True)
def _binned_terms(u, o, s0, s1, grid, one, clip_lo, clip_hi, closed, eps, block, p_out, ratio_out, nnz,
                  drop_u, drop_o):
    """Bin samples s0..s1 of both ensembles; emit, per sample, p and p/q' of the bins where p > 0.

    ``grid`` is ``arange(bins + 1)`` and ``one`` is 1.0, both in the margins' dtype, so every edge is computed
    in that dtype exactly as ``numpy.linspace`` computes it (numba would otherwise promote to float64).
    Counts have one extra bucket, index ``bins``, for values on the top edge (dropped by the reference).
    Outputs are packed to the left of each row of ``p_out``/``ratio_out``; ``nnz`` says how many.

    Speed: one sample's column is read twice (range, then counts); blocks of consecutive samples keep those
    cache lines hot between the two reads, and a sample's counts and edges stay in L1.
    """
    bins = grid.shape[0] - 1
    w = s1 - s0
    for b in numba.prange((w + block - 1) // block):
        edges = np.empty(bins + 1, dtype=u.dtype)
        count_u = np.empty(bins + 1, dtype=np.int64)
        count_o = np.empty(bins + 1, dtype=np.int64)
        for j in range(b * block, min(w, (b + 1) * block)):
            s = s0 + j
            lo = min(max(u[0, s], clip_lo), clip_hi)
            # one call per ensemble, not a loop over (u, o): a tuple of a read-only and a writable array has two
            # element types, which numba cannot iterate (Arrow hands reduce read-only matrices)
            lo, hi = _column_range(u, s, clip_lo, clip_hi, lo, lo)
            lo, hi = _column_range(o, s, clip_lo, clip_hi, lo, hi)
            stop = hi if lo < hi else lo + one
            _linspace_into(lo, stop, grid, edges)
            lo64 = np.float64(lo)
            inv_width = bins / (np.float64(stop) - lo64)
            _count_column(u, s, clip_lo, clip_hi, edges, lo64, inv_width, bins, count_u)
            _count_column(o, s, clip_lo, clip_hi, edges, lo64, inv_width, bins, count_o)
            if closed:
                count_u[bins - 1] += count_u[bins]
                count_o[bins - 1] += count_o[bins]
                count_u[bins] = 0
                count_o[bins] = 0
            drop_u[j] = count_u[bins]
            drop_o[j] = count_o[bins]
            total_u = u.shape[0] - count_u[bins]
            total_o = o.shape[0] - count_o[bins]
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
def _row_sums(p, logs, nnz):
    """Σ p·log per row, added in exactly the order ``numpy.sum`` adds a short contiguous float64 array.

    NumPy adds short contiguous arrays with its pairwise kernel: sequentially from -0.0 below 8 elements,
    else 8 interleaved partial sums combined as a tree, then the tail. Reproducing that order (checked by the
    parity tests) makes the result identical to the reference, not an ulp away.
    """
    n, bins = p.shape
    out = np.empty(n, dtype=np.float64)
    for s in numba.prange(n):
        k = nnz[s]
        terms = np.empty(k, dtype=np.float64)
        for i in range(k):
            terms[i] = p[s, i] * logs[s, i]
        out[s] = _pairwise(terms) if k > 0 else 0.0
    return out
@numba.njit(cache=True, inline="always")
def _pairwise(a):
    n = a.shape[0]
    if n < 8:
        res = -0.0
        for i in range(n):
            res += a[i]
        return res
    r0, r1, r2, r3, r4, r5, r6, r7 = a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]
    i = 8
    while i < n - (n % 8):
        r0 += a[i]
        r1 += a[i + 1]
        r2 += a[i + 2]
        r3 += a[i + 3]
        r4 += a[i + 4]
        r5 += a[i + 5]
        r6 += a[i + 6]
        r7 += a[i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[i]
        i += 1
    return res
