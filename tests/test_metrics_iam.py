"""IAM's signal and unlearning score against a literal restatement of the published interpolation."""

import math

import numpy as np
import pytest
from scipy.stats import gumbel_r

from raybench.metrics.iam import M0, M1, iam_scores, iam_signal, iam_split

RNG = np.random.default_rng(77)
EPS1, EPS2 = 1e-2, 1e-5


def _signal(margin):
    p = 1 / (1 + np.exp(-margin))
    return (-np.log(EPS1 - np.log(EPS2 + p)) - M0) / (M1 - M0)


def reference_u(original, target, shadows, k=100):
    """Mean U over samples of one target, as iam_score.interpolate_appro(type='gumbel', fix_variance=True)."""
    f, t, s = _signal(original), _signal(target), _signal(shadows)
    alphas = np.linspace(0, 1, k)
    inter = np.stack([s + (f - s) * a for a in alphas], axis=1)  # (shadows, K, samples)
    mean = inter.mean(axis=0)[:-1]
    std = np.std(inter, axis=(0, 2))[:-1]
    beta = np.sqrt(6) * std / np.pi
    mu = mean - beta[:, None] * 0.5772
    cdf = gumbel_r.cdf(t[None, :], mu, beta[:, None])
    weighted = (alphas[1:, None] * cdf).sum(axis=0) / alphas[1:].sum()
    return float((1 - weighted).mean())


def test_signal_endpoints_and_monotonicity():
    assert M1 == pytest.approx(-math.log(EPS1 - math.log(1 + EPS2)))
    assert M0 == pytest.approx(-math.log(EPS1 - math.log(EPS2)))
    np.testing.assert_allclose(iam_signal(np.array([-800.0, 800.0])), [0.0, 1.0], atol=1e-15)  # p = 0 and p = 1
    half = (-math.log(EPS1 - math.log(EPS2 + 0.5)) - M0) / (M1 - M0)
    assert iam_signal(np.array([0.0]))[0] == pytest.approx(half)  # margin 0 is p = 1/2
    grid = np.linspace(-30, 30, 2001)
    assert (np.diff(iam_signal(grid)) > 0).all()


def test_scores_match_the_published_interpolation_restated():
    n, f = 8, 30
    orig = RNG.normal(4, 1, (n, f))
    unl = RNG.normal(2, 1.5, (n, f))
    orc = RNG.normal(0.5, 1.5, (n, f))
    res = iam_scores(orig, unl, orc, k=20, seed=2)
    split = iam_split(n, seed=2)
    shadows = orc[split.shadows]
    expected = [reference_u(orig[i], unl[i], shadows, k=20) for i in range(n)]
    np.testing.assert_allclose(res.per_model, expected, rtol=1e-10)
    expected_ref = [reference_u(orig[r], orc[r], shadows, k=20) for r in split.reference]
    np.testing.assert_allclose(res.reference_per_model, expected_ref, rtol=1e-10)
    assert res.iam_mean == pytest.approx(np.mean(expected))
    np.testing.assert_array_equal(res.reference_rows, split.reference)


def test_chunks_give_the_whole_matrix_score():
    orig, unl, orc = RNG.normal(3, 1, (6, 41)), RNG.normal(1, 1, (6, 41)), RNG.normal(0, 1, (6, 41))
    whole = iam_scores(orig, unl, orc)
    parts = iam_scores(orig, unl, orc, chunk=9)
    np.testing.assert_allclose(parts.per_model, whole.per_model, rtol=1e-12)
    np.testing.assert_allclose(parts.reference_per_model, whole.reference_per_model, rtol=1e-12)


def test_direction_doing_nothing_scores_low_retraining_matches_the_reference():
    n, f = 40, 200
    orig = RNG.normal(5, 1, (n, f))
    orc = RNG.normal(0, 1.5, (n, f))
    nothing = iam_scores(orig, orig.copy(), orc)
    retrained = iam_scores(orig, RNG.normal(0, 1.5, (n, f)), orc)
    assert nothing.iam_mean < 0.3 < retrained.iam_mean
    assert abs(retrained.iam_mean - retrained.reference_mean) < 0.05
    assert ((0 <= nothing.per_model) & (nothing.per_model <= 1)).all()


def test_zero_gumbel_scale_is_undefined():
    c = np.full((4, 5), 2.0)
    assert np.isnan(iam_scores(c, c.copy(), c.copy()).per_model).all()


def test_rejects_unpaired_input():
    with pytest.raises(ValueError):
        iam_scores(np.zeros((4, 3)), np.zeros((5, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError):
        iam_scores(np.zeros((4, 3)), np.zeros((4, 3)), np.zeros((6, 3)))
