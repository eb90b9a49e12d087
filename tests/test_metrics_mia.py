"""U-LiRA per-sample AUC and SVC-MIA efficacy against plain restatements and synthetic cases with known answers."""

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.svm import SVC

from raybench.metrics.mia import svc_mia_efficacy, ulira_auc, ulira_split

RNG = np.random.default_rng(1337)


def test_ulira_matches_a_pairwise_restatement():
    u, o = RNG.normal(0.4, 1.2, (11, 7)), RNG.normal(0, 1, (9, 7))
    u[:, 0] = 2.0  # a constant ensemble: the std floor applies
    split = ulira_split(11, 9, seed=3)
    expected = []
    for s in range(7):
        fu, fo = u[split.fit_unlearned, s], o[split.fit_oracle, s]
        mu_u, sd_u = fu.mean(), max(fu.std(), 1e-3)
        mu_o, sd_o = fo.mean(), max(fo.std(), 1e-3)

        def score(v, mu_u=mu_u, sd_u=sd_u, mu_o=mu_o, sd_o=sd_o):
            return norm.logpdf(v, mu_u, sd_u) - norm.logpdf(v, mu_o, sd_o)

        su, so = score(u[split.test_unlearned, s]), score(o[split.test_oracle, s])
        wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in su for b in so)
        expected.append(wins / (len(su) * len(so)))
    np.testing.assert_allclose(ulira_auc(u, o, seed=3), expected, rtol=0, atol=1e-12)


def test_ulira_halves_partition_each_ensemble():
    s = ulira_split(11, 9, seed=0)
    assert sorted(np.concatenate([s.fit_unlearned, s.test_unlearned])) == list(range(11))
    assert sorted(np.concatenate([s.fit_oracle, s.test_oracle])) == list(range(9))
    assert (len(s.fit_unlearned), len(s.fit_oracle)) == (5, 4)


def test_ulira_separated_vs_identical_gaussians():
    far = ulira_auc(RNG.normal(6, 1, (40, 300)), RNG.normal(0, 1, (40, 300)))
    assert far.min() > 0.97
    same = ulira_auc(RNG.normal(0, 1, (40, 2000)), RNG.normal(0, 1, (40, 2000)))
    # 20 vs 20 held-out models: per-sample sd sqrt(41 / (12·400)) ≈ 0.092, so the mean's sd ≈ 0.002
    assert abs(same.mean() - 0.5) < 0.01
    assert 0.07 < same.std() < 0.12


def test_ulira_chunks_equal_the_whole_matrix():
    u, o = RNG.normal(0.2, 1, (20, 50)), RNG.normal(0, 1, (16, 50))
    whole = ulira_auc(u, o, seed=9)
    parts = np.concatenate([ulira_auc(u[:, s : s + 13], o[:, s : s + 13], seed=9) for s in range(0, 50, 13)])
    np.testing.assert_array_equal(parts, whole)
    assert not np.array_equal(whole, ulira_auc(u, o, seed=10))


def test_svc_mia_on_separable_confidences():
    n_models = 2
    retain = RNG.normal(8, 0.5, (n_models, 300))  # members: p_y ≈ 1
    val = RNG.normal(-3, 0.5, (n_models, 200))  # non-members: p_y ≈ 0.05
    forgotten = RNG.normal(-3, 0.5, (n_models, 40))  # forget samples that look unseen
    remembered = RNG.normal(8, 0.5, (n_models, 40))
    a = svc_mia_efficacy(retain, val, forgotten)
    b = svc_mia_efficacy(retain, val, remembered)
    assert a.n_shadow == 200  # balanced: min(300, 200, 10000)
    np.testing.assert_array_equal(a.per_model, [1.0, 1.0])
    np.testing.assert_array_equal(b.per_model, [0.0, 0.0])
    assert svc_mia_efficacy(retain, val, forgotten, max_shadow=50).n_shadow == 50


def test_svc_mia_matches_sklearn_on_plain_probabilities():
    retain, val, forget = RNG.normal(2, 2, (3, 120)), RNG.normal(0, 2, (3, 90)), RNG.normal(1, 2, (3, 60))
    res = svc_mia_efficacy(retain, val, forget, max_shadow=80)
    expected = []
    for m in range(3):
        x = 1 / (1 + np.exp(-np.concatenate([retain[m, :80], val[m, :80]])))
        clf = SVC(C=3, gamma="auto", kernel="rbf").fit(x[:, None], np.r_[np.ones(80), np.zeros(80)])
        expected.append(1 - clf.predict((1 / (1 + np.exp(-forget[m])))[:, None]).mean())
    np.testing.assert_allclose(res.per_model, expected)
    assert res.mean == pytest.approx(np.mean(expected))


def test_mia_rejects_bad_input():
    with pytest.raises(ValueError):
        ulira_auc(np.zeros((1, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError):
        ulira_auc(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError):
        svc_mia_efficacy(np.zeros((2, 3)), np.zeros((3, 3)), np.zeros((2, 3)))
