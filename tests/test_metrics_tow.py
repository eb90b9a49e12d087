"""Tug-of-War and top-1 accuracy against values computed by hand."""

import numpy as np
import pytest

from raybench.metrics.tow import top1_accuracy, top1_correct, tug_of_war

T_975_DF1 = 12.706204736174707  # Student t quantile, 0.975, 1 degree of freedom (tables)
T_975_DF3 = 3.182446305284263


def test_tow_of_known_accuracies():
    u = {"forget": [0.9, 0.5], "retain": [1.0, 0.8], "val": [0.85, 0.7]}
    r = {"forget": [0.8, 0.5], "retain": [0.95, 0.8], "val": [0.85, 0.6]}
    res = tug_of_war(u, r)
    # pair 0: (1 - 0.1)(1 - 0.05)(1 - 0) = 0.855; pair 1: 1 · 1 · (1 - 0.1) = 0.9
    np.testing.assert_allclose(res.per_pair, [0.855, 0.9])
    assert res.mean == pytest.approx(0.8775)
    half = T_975_DF1 * (0.045 / np.sqrt(2)) / np.sqrt(2)  # t · sd(ddof=1) / √n
    assert res.ci_low == pytest.approx(0.8775 - half) and res.ci_high == pytest.approx(0.8775 + half)
    assert res.n_pairs == 2


def test_tow_is_one_for_identical_accuracies_and_zero_for_opposite():
    acc = {"forget": [0.3, 0.7, 0.1, 0.9], "retain": [0.5] * 4, "val": [0.2] * 4}
    res = tug_of_war(acc, acc)
    assert res.per_pair.tolist() == [1.0] * 4 and res.mean == 1.0 and res.ci_low == res.ci_high == 1.0
    far = tug_of_war({"forget": [1.0], "retain": [0.5], "val": [0.5]},
                     {"forget": [0.0], "retain": [0.5], "val": [0.5]})
    assert far.per_pair.tolist() == [0.0] and far.ci_low is None and far.ci_high is None


def test_tow_interval_with_four_pairs():
    u = {"forget": [0.9, 0.8, 0.7, 0.6], "retain": [1.0] * 4, "val": [1.0] * 4}
    r = {"forget": [1.0] * 4, "retain": [1.0] * 4, "val": [1.0] * 4}
    res = tug_of_war(u, r)
    v = np.array([0.9, 0.8, 0.7, 0.6])
    half = T_975_DF3 * v.std(ddof=1) / 2
    assert res.mean == pytest.approx(0.75)
    assert (res.ci_low, res.ci_high) == pytest.approx((0.75 - half, 0.75 + half))


@pytest.mark.parametrize("bad", [
    ({"forget": [0.5], "retain": [0.5]}, {"forget": [0.5], "retain": [0.5], "val": [0.5]}),  # missing split
    ({"forget": [50.0], "retain": [0.5], "val": [0.5]}, {"forget": [0.5], "retain": [0.5], "val": [0.5]}),  # percent
    ({"forget": [0.5, 0.4], "retain": [0.5], "val": [0.5]}, {"forget": [0.5], "retain": [0.5], "val": [0.5]}),
])
def test_tow_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        tug_of_war(*bad)


def test_top1_accuracy_counts_ties_as_wrong_and_sums_over_chunks():
    t = np.array([[1.0, 0.0, -1.0, 2.0], [-0.5, 0.1, 0.2, 0.0]], dtype=np.float32)
    np.testing.assert_array_equal(top1_accuracy(t), [0.5, 0.5])
    np.testing.assert_array_equal(top1_correct(t[:, :1]) + top1_correct(t[:, 1:]), [2, 2])
    with pytest.raises(ValueError):
        top1_accuracy(np.array([[np.nan, 1.0]]))
