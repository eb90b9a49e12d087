"""The linear datamodel (raybench.metrics.datamodel): a planted linear effect is recovered on a toy problem, its
held-out correlation is high there and about 0 on pure noise, and the dual-form fit equals the primal ridge."""

import numpy as np
import pytest

from raybench.metrics.datamodel import fit_datamodel, fold_of, folds_for, per_target_corr


def _planted(k=400, n=60, d=5, noise=0.3, seed=0):
    rng = np.random.default_rng(seed)
    masks = rng.random((k, n)) < 0.5
    beta = np.zeros((n, d))
    hot = rng.choice(n, 12, replace=False)
    beta[hot] = rng.normal(0, 2, (12, d))
    outputs = 1.5 + masks @ beta + rng.normal(0, noise, (k, d))
    return masks, outputs, beta, hot


def test_a_planted_linear_effect_is_recovered():
    masks, outputs, beta, hot = _planted()
    fit = fit_datamodel(masks, outputs)
    coef = fit.model.coefficients(np.arange(masks.shape[1]))
    assert np.abs(coef - beta).max() < 0.25  # every planted effect, within noise
    assert np.corrcoef(coef.ravel(), beta.ravel())[0, 1] > 0.98
    forget = hot[:4]
    assert np.allclose(fit.model.effect(forget), beta[forget].sum(axis=0), atol=0.5)
    assert np.allclose(fit.model.effect(forget), coef[forget].sum(axis=0))  # the effect is the sum of rows
    assert fit.heldout_corr > 0.9
    assert fit.model.predict(masks[:3]).shape == (3, 5)


def test_held_out_correlation_is_about_zero_on_pure_noise():
    rng = np.random.default_rng(1)
    masks = rng.random((300, 80)) < 0.5
    fit = fit_datamodel(masks, rng.normal(0, 1, (300, 50)))
    assert abs(fit.heldout_corr) < 0.05
    assert all(abs(c) < 0.1 for c in fit.grid_corr)


def test_dual_fit_equals_primal_ridge():
    masks, outputs, _, _ = _planted(k=50, n=30, d=3)
    fit = fit_datamodel(masks, outputs)
    x = masks.astype(float) - masks.mean(axis=0)
    y = outputs - outputs.mean(axis=0)
    primal = np.linalg.solve(x.T @ x + fit.model.lam * np.eye(x.shape[1]), x.T @ y)
    assert np.allclose(fit.model.coefficients(np.arange(30)), primal, atol=1e-4)
    assert np.allclose(fit.model.predict(masks), outputs.mean(axis=0) + x @ primal, atol=1e-4)


def test_lambda_is_chosen_by_held_out_models():
    masks, outputs, _, _ = _planted(k=120, n=200, d=4, noise=2.0)
    fit = fit_datamodel(masks, outputs)
    assert fit.heldout_mse == min(fit.grid_mse)
    assert fit.lam_scale == fit.grid[fit.grid_mse.index(fit.heldout_mse)]
    assert fit.heldout_corr == fit.grid_corr[fit.grid_mse.index(fit.heldout_mse)]
    # the held-out error of a straightforward refit at each λ: fit on 4 folds, predict the fifth
    from raybench.metrics.datamodel import fold_of as folds_of
    fold = folds_of(len(masks), 5)
    for g in (0, 5, 10):
        lam = fit.grid[g] * np.mean(np.sum((masks - masks.mean(axis=0)) ** 2, axis=1))
        errs = []
        for f in range(5):
            tr, te = fold != f, fold == f
            x = masks[tr].astype(float)
            xm, ym = x.mean(axis=0), outputs[tr].mean(axis=0)
            beta = np.linalg.solve((x - xm).T @ (x - xm) + lam * np.eye(x.shape[1]), (x - xm).T @ (outputs[tr] - ym))
            errs.append(np.mean((ym + (masks[te] - xm) @ beta - outputs[te]) ** 2))
        assert fit.grid_mse[g] == pytest.approx(np.mean(errs), rel=1e-6)


def test_target_maps_outputs_before_scoring():
    masks, outputs, _, _ = _planted()
    fit = fit_datamodel(masks, outputs, target=lambda y: y[:, :1] - y[:, 1:2])
    assert fit.heldout_corr > 0.8
    assert fit.n_targets_scored == 5  # one target per fold


def test_folds_and_inputs():
    assert folds_for(6) == 2 and folds_for(9) == 3 and folds_for(400) == 5
    fold = fold_of(23, 5)
    assert sorted(np.bincount(fold).tolist()) == [4, 4, 5, 5, 5]
    with pytest.raises(ValueError, match="folds"):
        fit_datamodel(np.zeros((5, 3), bool), np.zeros((5, 2)), folds=5)
    with pytest.raises(ValueError, match="bool"):
        fit_datamodel(np.zeros((10, 3)), np.zeros((10, 2)))
    with pytest.raises(ValueError, match="NaN"):
        fit_datamodel(np.ones((10, 3), bool), np.full((10, 2), np.nan), folds=2)


def test_per_target_corr_is_pearson_and_nan_when_constant():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(30, 3)), rng.normal(size=(30, 3))
    b[:, 2] = 1.0
    corr = per_target_corr(a, b)
    assert corr[0] == pytest.approx(np.corrcoef(a[:, 0], b[:, 0])[0, 1])
    assert np.isnan(corr[2])
