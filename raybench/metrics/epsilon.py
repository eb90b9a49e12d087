"""Per-example ε and forget score of the NeurIPS 2023 Machine Unlearning Challenge.

Published scorer: google-deepmind/unlearning_evaluation, ``metric.py`` (``compute_forget_score_from_confs``)
and ``main.py`` (the final score). For each forget example, N unlearned and N retrained models' logit-scaled
confidences ``log p_y − log(1 − p_y)`` (our margins, exactly) are two samples; ε measures how well *some*
decision rule tells them apart, read as an (ε, δ) hypothesis-testing bound:

1. the *positive* ensemble is the one with the larger median (retrained wins only if strictly larger);
2. if (smaller range)/(larger range) < 0.01 the example gets ε = cap (a "peaky" ensemble the sweep might miss);
   when both ranges are 0 the ratio is 0/0, not < 0.01, and the sweep runs, as in the scorer;
3. two families of rules are swept at ``thresholds_per_unit`` = 100 thresholds per margin unit:
   * single threshold: ``numpy.linspace(min, max, ceil((max − min)·100))`` over the pooled values; predict
     positive where value ≥ threshold;
   * double threshold: the *peakier* ensemble (smaller range; on equal ranges the negative one) is predicted
     inside a window ``[left, right]`` (both ends inclusive). With ``w`` = the smaller range and buffer 2,
     ``right`` runs over ``linspace(min_peaky + w − 2, max_peaky + 2, ceil(·100))`` (≈ 400 values) and, for
     each right end, ``left`` over ``linspace(right − w − 2, right − w + 2, 400)``: about 160,000 windows;
4. per rule, with FPR/FNR the two error rates and δ = 1e-5,
   ``ε = max(log(1 − δ − FPR) − log FNR, log(1 − δ − FNR) − log FPR)`` clipped at 0 (a term whose log
   argument is negative is NaN and ignored; if both are, the rule is dropped); rules where exactly one of
   FPR/FNR is 0 are dropped; both 0 gives ∞; ε_example = max over surviving rules, clipped to [0, cap = 50];
5. bucket k = [0.5k, 0.5k + 0.5) earns 2^−k for buckets ending at or below ``ceil(ln(N − 1))`` with N the
   number of *unlearned* models (the scorer's ``num_models``): the cap is 7 at N = 512 (buckets k = 0…13),
   5 at N = 100 (k = 0…9), 3 at N = 16; ε at or above the cap earns 0; N = 2 leaves no bucket (score 0);
   the forget score is the mean over the forget set, in [0, 1], 1 best (retrained-like on every example);
6. final score = forget score × (RA_u / RA_r) × (TA_u / TA_r), with mean retain and test (here: val)
   accuracies of the two ensembles.

Differences from the published scorer, all numerical: it computes rates as float32 means on a GPU and
thresholds in the margins' dtype; here counts are exact integers, rates and thresholds float64, and the logs
come from one NumPy table per ensemble size, so an ε lying within ~1e-6 of a bucket edge can land on the other
side. Where no rule survives (e.g. both ensembles constant and equal), the scorer's ``assert`` fails; here the
example's ε is NaN and any score built on it is NaN (a number that cannot be computed is not approximated).

Cost per example, exact (no coarsening): O(N log N) sort, O(T + N) for T single thresholds, and
O(400 · (400 + 2N)) for the double sweep (pointer walks over sorted values), in a numba kernel parallel over
examples: measured about 0.5 ms of CPU per example at N = 100 and 0.6 ms at N = 512 (5 s for 10,000 examples).

Chunkwise: ε depends only on its example's column, so chunks of the forget split can be scored independently
and concatenated; the forget score is the mean of :func:`epsilon_points` over all of them.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from raybench.metrics.inputs import margin_matrix

DELTA = 1e-5
EPSILON_CAP = 50.0
THRESHOLDS_PER_UNIT = 100
_BUFFER = 2.0


def per_example_epsilon(
    unlearned: np.ndarray,
    retrained: np.ndarray,
    *,
    delta: float = DELTA,
    cap: float = EPSILON_CAP,
    thresholds_per_unit: int = THRESHOLDS_PER_UNIT,
) -> np.ndarray:
    """ε per forget example (float64, shape (examples,)) from ``(models, examples)`` margins of both ensembles."""
    u, r = _inputs(unlearned, retrained)
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if not cap > 0:
        raise ValueError(f"cap must be positive, got {cap!r}")
    if int(thresholds_per_unit) != thresholds_per_unit or thresholds_per_unit < 1:
        raise ValueError(f"thresholds_per_unit must be a positive integer, got {thresholds_per_unit!r}")
    retrain_positive = np.median(r, axis=0) > np.median(u, axis=0)
    tables = [_log_tables(n, delta) for n in (u.shape[0], r.shape[0])]
    eps = _epsilons(np.ascontiguousarray(u.T), np.ascontiguousarray(r.T), retrain_positive,
                    *tables[0], *tables[1], float(cap), float(thresholds_per_unit), _BUFFER)
    return np.where(np.isnan(eps), np.nan, np.clip(eps, 0.0, cap))


def max_epsilon(n_models: int) -> float:
    """Upper end of the scored buckets, ``ceil(ln(N − 1))`` for N unlearned models (7 at N = 512)."""
    if int(n_models) != n_models or n_models < 2:
        raise ValueError(f"the forget score needs at least 2 models, got {n_models!r}")
    return float(math.ceil(math.log(n_models - 1))) if n_models > 2 else 0.0


def epsilon_points(eps: np.ndarray, n_models: int) -> np.ndarray:
    """Points per example: 2^−k for ε in [0.5k, 0.5k + 0.5) when that bucket ends at or below the cap, else 0.

    NaN ε (undefined) gives NaN points.
    """
    e = np.asarray(eps, dtype=np.float64)
    if (e < 0).any():
        raise ValueError("ε values must be >= 0")
    n_buckets = int(2 * max_epsilon(n_models))  # buckets k = 0 … n_buckets − 1 end at 0.5(k + 1) <= cap
    k = np.floor(2 * np.where(np.isnan(e), 0.0, e))  # 2e is exact in binary, so floor(2e) is the bucket
    points = np.where(k < n_buckets, np.exp2(-np.minimum(k, 1074.0)), 0.0)
    return np.where(np.isnan(e), np.nan, points)


def forget_score_from_epsilons(eps: np.ndarray, n_models: int) -> float:
    """Mean points over the forget set (NaN if any ε is undefined)."""
    points = epsilon_points(eps, n_models)
    if points.size == 0:
        raise ValueError("the forget score needs at least one example")
    return float(points.mean())


def forget_score(unlearned: np.ndarray, retrained: np.ndarray, **kwargs) -> float:
    """The challenge's forget score of two ``(models, examples)`` margin matrices (N = unlearned models)."""
    eps = per_example_epsilon(unlearned, retrained, **kwargs)
    return forget_score_from_epsilons(eps, np.asarray(unlearned).shape[0])


def challenge_score(
    forget: float,
    retain_acc_unlearned: np.ndarray,
    retain_acc_retrained: np.ndarray,
    val_acc_unlearned: np.ndarray,
    val_acc_retrained: np.ndarray,
) -> float:
    """Final score ``forget × (RA_u / RA_r) × (TA_u / TA_r)`` with each accuracy the mean over its ensemble."""
    means = [float(np.mean(np.asarray(a, dtype=np.float64))) for a in
             (retain_acc_unlearned, retain_acc_retrained, val_acc_unlearned, val_acc_retrained)]
    ra_u, ra_r, ta_u, ta_r = means
    if ra_r <= 0 or ta_r <= 0:
        raise ValueError("the retrained models' mean retain and val accuracies must be positive")
    return float(forget) * (ra_u / ra_r) * (ta_u / ta_r)


def _inputs(unlearned, retrained) -> tuple[np.ndarray, np.ndarray]:
    u = margin_matrix(unlearned, "unlearned", min_models=2)
    r = margin_matrix(retrained, "retrained", min_models=2)
    if u.shape[1] != r.shape[1]:
        raise ValueError(f"example counts differ: {u.shape[1]} unlearned vs {r.shape[1]} retrained")
    return u, r


def _log_tables(n: int, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """``log(k/n)`` and ``log(1 − δ − k/n)`` for k = 0…n, NaN where the argument is negative (as np.log gives)."""
    rate = np.arange(n + 1) / n
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(rate), np.log(1 - delta - rate)


@numba.njit(cache=True, inline="always")
def _linspace(start, stop, num):
    """``numpy.linspace(start, stop, num)`` in float64, operation for operation."""
    out = np.empty(num, dtype=np.float64)
    if num == 0:
        return out
    if num == 1:
        out[0] = start
        return out
    step = (stop - start) / (num - 1)
    for i in range(num):
        out[i] = i * step + start
    out[num - 1] = stop
    return out


@numba.njit(cache=True, inline="always")
def _rule_eps(fp, fn, lr_neg, l1m_neg, lr_pos, l1m_pos):
    """ε of one rule from its error counts (FP among negatives, FN among positives); -1 means dropped."""
    if fp == 0 and fn == 0:
        return np.inf
    if fp == 0 or fn == 0:
        return -1.0
    t1 = l1m_neg[fp] - lr_pos[fn]  # log(1 − δ − FPR) − log FNR; NaN when FPR = 1
    t2 = l1m_pos[fn] - lr_neg[fp]  # log(1 − δ − FNR) − log FPR; NaN when FNR = 1
    if np.isnan(t1):
        if np.isnan(t2):
            return -1.0
        return max(t2, 0.0)
    if np.isnan(t2):
        return max(t1, 0.0)
    return max(t1, t2, 0.0)


@numba.njit(cache=True, parallel=True)
def _epsilons(u_t, r_t, retrain_positive, lr_u, l1m_u, lr_r, l1m_r, cap, per_unit, buffer):
    """ε per example before the final clip; ``u_t``/``r_t`` are (examples, models), one row per example."""
    n_ex = u_t.shape[0]
    out = np.empty(n_ex, dtype=np.float64)
    n_left = int(np.ceil(2 * buffer * per_unit))
    for i in numba.prange(n_ex):
        if retrain_positive[i]:
            pos, neg = np.sort(r_t[i]), np.sort(u_t[i])
            lr_pos, l1m_pos, lr_neg, l1m_neg = lr_r, l1m_r, lr_u, l1m_u
        else:
            pos, neg = np.sort(u_t[i]), np.sort(r_t[i])
            lr_pos, l1m_pos, lr_neg, l1m_neg = lr_u, l1m_u, lr_r, l1m_r
        n_pos, n_neg = pos.shape[0], neg.shape[0]
        pos_diff = pos[-1] - pos[0]
        neg_diff = neg[-1] - neg[0]
        largest = pos_diff if pos_diff > neg_diff else neg_diff
        smallest = neg_diff if pos_diff > neg_diff else pos_diff
        if largest > 0 and smallest / largest < 0.01:
            out[i] = cap
            continue
        best = -1.0  # no surviving rule yet

        # single threshold: predict positive where value >= thr
        lo = min(pos[0], neg[0])
        hi = max(pos[-1], neg[-1])
        thr = _linspace(lo, hi, int(np.ceil((hi - lo) * per_unit)))
        a = 0  # number of positives < thr
        b = 0  # number of negatives < thr
        for t in thr:
            while a < n_pos and pos[a] < t:
                a += 1
            while b < n_neg and neg[b] < t:
                b += 1
            best = max(best, _rule_eps(n_neg - b, a, lr_neg, l1m_neg, lr_pos, l1m_pos))

        # double threshold: the peakier ensemble is predicted inside [left, right]
        if pos_diff >= neg_diff:
            peak, other = neg, pos
            lr_pk, l1m_pk, lr_ot, l1m_ot = lr_neg, l1m_neg, lr_pos, l1m_pos
        else:
            peak, other = pos, neg
            lr_pk, l1m_pk, lr_ot, l1m_ot = lr_pos, l1m_pos, lr_neg, l1m_neg
        n_pk, n_ot = peak.shape[0], other.shape[0]
        width = smallest
        r_min = peak[0] + width - buffer
        r_max = peak[-1] + buffer
        rights = _linspace(r_min, r_max, int(np.ceil((r_max - r_min) * per_unit)))
        cp = 0  # peaky values <= right
        co = 0  # other values <= right
        for tr in rights:
            while cp < n_pk and peak[cp] <= tr:
                cp += 1
            while co < n_ot and other[co] <= tr:
                co += 1
            # lefts = linspace(l0, l1, n_left), computed inline as numpy.linspace does, without an array
            l0 = tr - width - buffer
            l1 = tr - width + buffer
            step = (l1 - l0) / (n_left - 1)
            lp = np.searchsorted(peak, l0)  # peaky values < left (side="left")
            lo_ = np.searchsorted(other, l0)
            for k in range(n_left):
                tl = l1 if k == n_left - 1 else k * step + l0
                while lp < n_pk and peak[lp] < tl:
                    lp += 1
                while lo_ < n_ot and other[lo_] < tl:
                    lo_ += 1
                tp = max(cp - lp, 0)
                fp = max(co - lo_, 0)
                best = max(best, _rule_eps(fp, n_pk - tp, lr_ot, l1m_ot, lr_pk, l1m_pk))
        out[i] = best if best >= 0 else np.nan
    return out
