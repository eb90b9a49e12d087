"""The challenge's per-example ε and forget score, against a literal restatement of the published scorer."""

import math

import numpy as np
import pytest

from raybench.metrics.epsilon import (
    challenge_score,
    epsilon_points,
    forget_score,
    forget_score_from_epsilons,
    max_epsilon,
    per_example_epsilon,
)

RNG = np.random.default_rng(2023)
DELTA, CAP, PER_UNIT = 1e-5, 50.0, 100


def _rates_single(pos, neg):
    lo, hi = min(pos.min(), neg.min()), max(pos.max(), neg.max())
    thr = np.linspace(lo, hi, int(np.ceil((hi - lo) * PER_UNIT)))
    fpr = (neg[:, None] >= thr[None, :]).mean(axis=0)
    fnr = (pos[:, None] < thr[None, :]).mean(axis=0)
    return fpr, fnr


def _rates_double(pos, neg):
    pos_diff, neg_diff = np.ptp(pos), np.ptp(neg)
    smallest = neg_diff if pos_diff > neg_diff else pos_diff
    if pos_diff >= neg_diff:  # the positive becomes the peakiest distribution
        pos, neg = neg, pos
    lo, hi = pos.min() + smallest - 2.0, pos.max() + 2.0
    rights = np.linspace(lo, hi, int(np.ceil((hi - lo) * PER_UNIT)))
    n_left = int(np.ceil(2 * 2.0 * PER_UNIT))
    lefts = np.concatenate([np.linspace(r - smallest - 2.0, r - smallest + 2.0, n_left) for r in rights])
    rights = np.repeat(rights, n_left)
    inside_pos = (lefts[None, :] <= pos[:, None]) & (pos[:, None] <= rights[None, :])
    inside_neg = (lefts[None, :] <= neg[:, None]) & (neg[:, None] <= rights[None, :])
    return inside_neg.mean(axis=0), (~inside_pos).mean(axis=0)  # fpr, fnr


def reference_epsilons(unlearned, retrained):
    """One example at a time, as google-deepmind/unlearning_evaluation metric.py does it (float64 throughout)."""
    retrain_positive = np.median(retrained, axis=0) > np.median(unlearned, axis=0)
    out = []
    for i in range(unlearned.shape[1]):
        pos = retrained[:, i] if retrain_positive[i] else unlearned[:, i]
        neg = unlearned[:, i] if retrain_positive[i] else retrained[:, i]
        pos_diff, neg_diff = np.ptp(pos), np.ptp(neg)
        largest = pos_diff if pos_diff > neg_diff else neg_diff
        smallest = neg_diff if pos_diff > neg_diff else pos_diff
        with np.errstate(invalid="ignore", divide="ignore"):
            if smallest / largest < 0.01:
                out.append(CAP)
                continue
            fpr_d, fnr_d = _rates_double(pos, neg)
            fpr_s, fnr_s = _rates_single(pos, neg)
            fpr, fnr = np.concatenate([fpr_d, fpr_s]), np.concatenate([fnr_d, fnr_s])
            eps = np.zeros_like(fpr)
            eps[(fpr == 0) & (fnr == 0)] = np.inf
            eps[(eps == 0) & (fpr * fnr == 0)] = np.nan
            terms = np.stack([np.log(1 - DELTA - fpr) - np.log(fnr), np.log(1 - DELTA - fnr) - np.log(fpr)])
            both_nan = np.isnan(terms).all(axis=0)
            best = np.clip(np.nanmax(np.where(both_nan, 0.0, terms), axis=0), 0, None)
            best[both_nan] = np.nan
            eps = np.where(eps == 0, best, eps)
        kept = eps[~np.isnan(eps)]
        out.append(kept.max() if kept.size else np.nan)
    return np.clip(np.array(out), 0, CAP)


def _cases():
    yield "shifted", RNG.normal(0.8, 1, (12, 6)), RNG.normal(0, 1, (9, 6))
    yield "same-law", RNG.normal(0, 0.6, (10, 5)), RNG.normal(0, 0.6, (10, 5))
    yield "wider-unlearned", RNG.normal(0, 3, (8, 4)), RNG.normal(0.5, 0.5, (11, 4))
    coarse_u = np.round(RNG.normal(1, 1, (10, 4)), 1)  # many ties, values on threshold grid points
    yield "coarse", coarse_u, np.round(RNG.normal(0, 1, (10, 4)), 1)
    yield "separated", RNG.normal(6, 0.5, (7, 3)), RNG.normal(0, 0.5, (7, 3))
    # equal ranges (4.0 each) at different places: the tie rule decides which ensemble the windows are built around
    eq_u = np.array([[0.0, 1.1, 1.5, 2.1, 3.2, 4.0], [0.0, 0.1, 0.9, 2.8, 3.5, 4.0]]).T
    eq_r = np.array([[1.2, 1.4, 2.1, 2.9, 3.8, 5.2], [1.5, 2.3, 2.8, 2.8, 3.2, 5.5]]).T
    yield "equal-ranges", eq_u, eq_r
    # equal medians: the unlearned ensemble is the positive one (predicted right of the threshold)
    med_u = np.array([[-2.5, -1.9, -2.8, 0.6, -1.1], [-2.0, 1.8, 1.3, -2.4, 1.7]]).T
    med_r = np.array([[-2.2, 1.0, -1.9, -1.0, -2.4], [2.6, 1.4, -1.6, 1.3, -0.9]]).T
    yield "equal-medians", med_u, med_r
    # a peaky retrained ensemble (range 0.3% of the other's) overlapping unlearned values: capped by the ratio rule,
    # although no window separates them
    peaky_u = np.vstack([np.full((4, 2), 0.3), RNG.normal(0, 1, (8, 2)), [[-2, -2], [2, 2]]])
    peaky_r = 0.3 + np.linspace(0, 0.012, 14)[:, None] * np.ones(2)
    yield "peaky-overlapping", peaky_u, peaky_r


@pytest.mark.parametrize("name,u,r", list(_cases()), ids=[c[0] for c in _cases()])
def test_matches_the_published_scorer_restated(name, u, r):
    np.testing.assert_array_equal(per_example_epsilon(u, r), reference_epsilons(u, r))


def test_identical_ensembles_give_zero_and_disjoint_ones_the_cap():
    u = RNG.normal(0, 1, (20, 8))
    np.testing.assert_array_equal(per_example_epsilon(u, u.copy()), np.zeros(8))
    far_u, far_r = RNG.uniform(10, 11, (20, 5)), RNG.uniform(-11, -10, (20, 5))
    np.testing.assert_array_equal(per_example_epsilon(far_u, far_r), np.full(5, 50.0))


def test_a_peaky_ensemble_gets_the_cap():
    u = RNG.normal(0, 1, (10, 3))
    r = 0.3 + 0.001 * RNG.normal(0, 1, (10, 3))  # range < 1% of the other's, whatever the overlap
    np.testing.assert_array_equal(per_example_epsilon(u, r), np.full(3, 50.0))


def test_no_surviving_rule_is_undefined_not_zero():
    c = np.full((6, 2), 1.5)
    eps = per_example_epsilon(c, c.copy())  # the published scorer's assert fails here
    assert np.isnan(eps).all()
    assert math.isnan(forget_score_from_epsilons(eps, 6))


def test_bucket_points_at_their_boundaries():
    assert (max_epsilon(512), max_epsilon(100), max_epsilon(16), max_epsilon(3), max_epsilon(2)) == (7, 5, 3, 1, 0)
    eps = np.array([0.0, 0.4999, 0.5, 0.99, 1.0, 6.5, 6.9999, 7.0, 12.3, 50.0])
    expected = [1, 1, 0.5, 0.5, 0.25, 2.0**-13, 2.0**-13, 0, 0, 0]
    np.testing.assert_array_equal(epsilon_points(eps, 512), expected)
    np.testing.assert_array_equal(epsilon_points(np.array([4.49, 4.5, 5.0]), 100), [2.0**-8, 2.0**-9, 0])
    np.testing.assert_array_equal(epsilon_points(np.array([0.0, 0.1]), 2), [0, 0])  # N = 2: no bucket at all
    assert forget_score_from_epsilons(np.array([0.0, 0.5, 7.0, 1.0]), 512) == pytest.approx((1 + 0.5 + 0 + 0.25) / 4)


def test_forget_and_challenge_scores():
    u, r = RNG.normal(0.5, 1, (16, 20)), RNG.normal(0, 1, (16, 20))
    eps = reference_epsilons(u, r)
    expected = np.mean([2.0 ** -math.floor(2 * e) if e < 3 else 0.0 for e in eps])  # N = 16: ceil(ln 15) = 3
    assert forget_score(u, r) == pytest.approx(expected)
    score = challenge_score(0.5, [0.9, 0.9], [1.0, 1.0], [0.8], [0.85, 0.85])
    assert score == pytest.approx(0.5 * 0.9 * (0.8 / 0.85))


def test_chunks_of_examples_score_independently():
    u, r = RNG.normal(0.3, 1, (12, 11)), RNG.normal(0, 1, (12, 11))
    whole = per_example_epsilon(u, r)
    parts = np.concatenate([per_example_epsilon(u[:, s : s + 4], r[:, s : s + 4]) for s in range(0, 11, 4)])
    np.testing.assert_array_equal(parts, whole)


@pytest.mark.parametrize("u,r", [(np.zeros((1, 3)), np.zeros((5, 3))), (np.zeros((5, 3)), np.zeros((5, 4))),
                                 (np.full((3, 2), np.nan), np.zeros((3, 2)))])
def test_rejects_bad_input(u, r):
    with pytest.raises(ValueError):
        per_example_epsilon(u, r)
