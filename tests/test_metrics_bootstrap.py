"""Bootstrap intervals of KLOM summaries: a plain restatement, chunk invariance, seeds and the finaliser."""

import numpy as np
import pytest
from klom_reference import reference_klom

from raybench.metrics.bootstrap import (
    bootstrap_draws,
    bootstrap_interval,
    klom_bootstrap,
    klom_replicates,
    replicate_statistics,
)

RNG = np.random.default_rng(4242)


def _pair(n_u, n_o, n, shift=0.7):
    return (RNG.normal(shift, 1, (n_u, n)).astype(np.float32), RNG.normal(0, 1, (n_o, n)).astype(np.float32))


def test_matches_a_plain_restatement_of_the_percentile_bootstrap():
    u, o = _pair(12, 9, 40)
    b, seed = 25, 7
    draws = bootstrap_draws(12, 9, n_boot=b, seed=seed)
    p95, mean = [], []
    for i in range(b):  # resample the rows of each ensemble, recompute per-sample KLOM, summarise over samples
        v = reference_klom(u[draws.unlearned[i]], o[draws.oracle[i]])
        p95.append(np.percentile(v, 95))
        mean.append(v.mean())
    res = klom_bootstrap(u, o, n_boot=b, seed=seed)
    assert res.low["p95"] == np.percentile(p95, 2.5) and res.high["p95"] == np.percentile(p95, 97.5)
    assert res.low["mean"] == np.percentile(mean, 2.5) and res.high["mean"] == np.percentile(mean, 97.5)
    assert res.replicate_mean["p95"] == pytest.approx(np.mean(p95))
    assert (res.n_boot, res.seed, res.level) == (b, seed, 0.95)
    assert res.flat()["klom_p95_ci_low"] == res.low["p95"] and res.flat()["klom_boot_n"] == b


def test_draws_resample_rows_with_replacement_and_streams_are_independent():
    d = bootstrap_draws(30, 20, n_boot=50, seed=3)
    assert d.unlearned.shape == (50, 30) and d.oracle.shape == (50, 20)
    assert d.unlearned.min() >= 0 and d.unlearned.max() < 30 and d.oracle.max() < 20
    assert any(len(np.unique(row)) < 30 for row in d.unlearned)  # with replacement: duplicates occur
    np.testing.assert_array_equal(d.unlearned, bootstrap_draws(30, 99, n_boot=50, seed=3).unlearned)
    assert not np.array_equal(d.unlearned, bootstrap_draws(30, 20, n_boot=50, seed=4).unlearned)


def test_chunkwise_replicates_equal_the_whole_matrix_exactly():
    u, o = _pair(15, 11, 103)
    draws = bootstrap_draws(15, 11, n_boot=10, seed=1)
    whole = klom_replicates(u, o, draws)
    parts = np.concatenate([klom_replicates(u[:, s : s + 17], o[:, s : s + 17], draws) for s in range(0, 103, 17)],
                           axis=1)
    np.testing.assert_array_equal(parts, whole)
    a = klom_bootstrap(u, o, n_boot=10, seed=1, chunk=17)
    b = klom_bootstrap(u, o, n_boot=10, seed=1)
    assert a == b


def test_reproducible_with_the_seed_and_different_with_another():
    u, o = _pair(20, 20, 60)
    assert klom_bootstrap(u, o, n_boot=20, seed=5) == klom_bootstrap(u, o, n_boot=20, seed=5)
    assert klom_bootstrap(u, o, n_boot=20, seed=5).low != klom_bootstrap(u, o, n_boot=20, seed=6).low


def test_interval_narrows_as_the_ensembles_grow():
    small = klom_bootstrap(*_pair(25, 25, 200, shift=1.5), n_boot=40, seed=0)
    large = klom_bootstrap(*_pair(200, 200, 200, shift=1.5), n_boot=40, seed=0)
    for stat in ("p95", "mean"):
        assert large.high[stat] - large.low[stat] < 0.6 * (small.high[stat] - small.low[stat])


def test_resampling_bias_is_upward_and_reported():
    # KLOM is a plug-in divergence: duplicated models make histograms lumpier, so replicates sit above the point
    # estimate. The result exposes the replicates' mean so that this shift is visible next to the interval.
    u, o = _pair(40, 40, 400, shift=0.0)
    point = reference_klom(u, o).mean()
    res = klom_bootstrap(u, o, n_boot=40, seed=0)
    assert res.replicate_mean["mean"] > point
    assert res.low["mean"] <= res.replicate_mean["mean"] <= res.high["mean"]


def test_finaliser_on_hand_made_replicates():
    # replicate b has every sample equal to b, so its mean and P95 are b; B = 41 values 0..40
    reps = np.repeat(np.arange(41, dtype=np.float64)[:, None], 5, axis=1)
    res = bootstrap_interval(reps, stats=("mean", "p95", "p50"), seed=0)
    # linear percentiles of 0..40: position q/100 * 40
    assert res.low == pytest.approx({"mean": 1.0, "p95": 1.0, "p50": 1.0})
    assert res.high == pytest.approx({"mean": 39.0, "p95": 39.0, "p50": 39.0})
    res90 = bootstrap_interval(reps, stats=("mean",), level=0.9, seed=0)
    assert (res90.low["mean"], res90.high["mean"]) == pytest.approx((2.0, 38.0))
    # P95 over samples of one replicate, linear: samples 0..20 -> 19
    assert replicate_statistics(np.tile(np.arange(21.0), (2, 1)), ("p95",))["p95"].tolist() == [19.0, 19.0]


@pytest.mark.parametrize("kwargs", [{"stats": ("p101",)}, {"stats": ("median",)}, {"level": 1.0}])
def test_rejects_bad_statistics_and_levels(kwargs):
    with pytest.raises(ValueError):
        bootstrap_interval(np.ones((3, 4)), seed=0, **kwargs)


def test_rejects_draws_for_other_ensembles():
    u, o = _pair(10, 10, 5)
    with pytest.raises(ValueError, match="draws were made"):
        klom_replicates(u, o, bootstrap_draws(11, 10, n_boot=3))
