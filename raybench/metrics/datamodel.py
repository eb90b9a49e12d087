"""A linear datamodel: each model's outputs regressed on the inclusion mask of the subset it was trained on.

outputs_k ≈ b + Σ_i mask_{k,i} β_i, fitted by ridge on centred masks and outputs (the intercept is the means).
The fit is in the dual form: with X the (K, n) centred masks and Y the (K, D) centred outputs, β = Xᵀ(XXᵀ + λI)⁻¹Y,
so the work grows with the K models, not with the n train samples (CIFAR-10's 50,000 features cost a K × K
solve). β itself (n × D) is never formed: ``coefficients`` gives the rows asked for and ``effect`` the sum over a
forget set, which is what unlearning by datamodel matching needs. λ is chosen on a grid by cross-validation over
models: each fold's models are predicted by a fit on the others, and the grid point with the smallest held-out
squared error wins (an error, not a correlation: with K < n random masks XXᵀ is close to a multiple of I, so λ
mostly scales the predictions, which a correlation cannot see and datamodel matching, which subtracts the effect,
can). The held-out correlation at that λ is the datamodel's reported quality.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

LAMBDA_GRID = tuple(float(v) for v in np.logspace(-3, 2, 11))
"""λ candidates, in units of the mean diagonal of XXᵀ (about n·α(1 − α)), so the grid fits every data-set size."""

DEFAULT_FOLDS = 5
MIN_HELD_OUT = 3
"""Models per fold at least: a correlation over two held-out models is ±1 whatever the fit."""


def folds_for(n_models: int) -> int:
    """``DEFAULT_FOLDS``, or fewer where K models cannot fill them with ``MIN_HELD_OUT`` each (at least 2)."""
    return max(2, min(DEFAULT_FOLDS, n_models // MIN_HELD_OUT))


@dataclass(frozen=True)
class LinearDatamodel:
    """A fitted datamodel: ``predict(masks)`` ≈ outputs; ``effect(F)`` = Σ_{i∈F} β_i."""

    mask_mean: np.ndarray  # (n,) float64: the fitting models' inclusion rate of each sample
    centred_masks: np.ndarray  # (K, n) float32: the fitting models' masks minus ``mask_mean``
    output_mean: np.ndarray  # (D,) float64
    dual: np.ndarray  # (K, D) float32: (XXᵀ + λI)⁻¹ Y
    lam: float  # the λ used (absolute, not in grid units)

    @property
    def n_train(self) -> int:
        return self.centred_masks.shape[1]

    def coefficients(self, rows: np.ndarray) -> np.ndarray:
        """β_i for the train samples ``rows``: (len(rows), D), the change in the outputs from including each."""
        rows = np.asarray(rows, dtype=np.int64)
        return (self.centred_masks[:, rows].T.astype(np.float64) @ self.dual.astype(np.float64))

    def effect(self, forget_idx: np.ndarray) -> np.ndarray:
        """Σ_{i∈F} β_i: (D,), the predicted change in every output from including the forget set."""
        idx = np.asarray(forget_idx, dtype=np.int64)
        weights = self.centred_masks[:, idx].astype(np.float64).sum(axis=1)
        return weights @ self.dual.astype(np.float64)

    def predict(self, masks: np.ndarray) -> np.ndarray:
        """Outputs (K', D) predicted for models trained on ``masks`` (K', n)."""
        x = np.asarray(masks, dtype=np.float64) - self.mask_mean
        return self.output_mean + (x @ self.centred_masks.T.astype(np.float64)) @ self.dual.astype(np.float64)


@dataclass(frozen=True)
class DatamodelFit:
    """The final datamodel (fitted on every model with the chosen λ) and how λ was chosen."""

    model: LinearDatamodel
    lam_scale: float  # the chosen grid value (λ / mean diagonal of XXᵀ)
    heldout_corr: float  # mean over targets of the held-out Pearson correlation (within folds), at the chosen λ
    heldout_corr_pooled: float  # Pearson over every held-out (model, target) pair of a fold, mean over folds
    heldout_mse: float  # mean squared error of the held-out targets, mean over folds: what chooses λ
    grid: tuple[float, ...]
    grid_corr: tuple[float, ...]  # ``heldout_corr`` at each grid value
    grid_mse: tuple[float, ...]  # ``heldout_mse`` at each grid value
    folds: int
    n_targets_scored: int  # (fold, target) pairs with a defined correlation (non-constant truth and prediction)


def per_target_corr(pred: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Pearson correlation of each column of ``pred`` with the same column of ``actual`` (over rows); NaN where
    either column is constant."""
    p = pred - pred.mean(axis=0)
    a = actual - actual.mean(axis=0)
    denom = np.sqrt((p * p).sum(axis=0) * (a * a).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (p * a).sum(axis=0) / np.where(denom > 0, denom, 1), np.nan)


def pooled_corr(pred: np.ndarray, actual: np.ndarray) -> float:
    """Pearson correlation over every entry."""
    p, a = pred.ravel() - pred.mean(), actual.ravel() - actual.mean()
    denom = np.sqrt((p * p).sum() * (a * a).sum())
    return float((p * a).sum() / denom) if denom > 0 else float("nan")


def fold_of(n_models: int, folds: int, seed: int = 0) -> np.ndarray:
    """Fold number of each model: a seeded permutation cut into ``folds`` near-equal parts."""
    order = np.random.default_rng(seed).permutation(n_models)
    fold = np.empty(n_models, dtype=np.int64)
    fold[order] = np.arange(n_models) % folds
    return fold


def fit_datamodel(masks: np.ndarray, outputs: np.ndarray, *,
                  target: Callable[[np.ndarray], np.ndarray] | None = None,
                  grid: tuple[float, ...] = LAMBDA_GRID, folds: int = DEFAULT_FOLDS, seed: int = 0) -> DatamodelFit:
    """Fit ``outputs`` (K, D) of K models on their ``masks`` (K, n) bool; choose λ by ``folds``-fold
    cross-validation over models.

    ``target`` maps outputs (K', D) to what the quality is measured on (K', T), e.g. logits to margins; the
    default is the outputs themselves. Each fold's models are predicted by a fit on the other folds; per fold and
    target (column), Pearson over the fold's held-out models of ``target`` of the prediction against ``target`` of
    the truth. Correlations are taken within a fold, where the fit is one: across folds, each fit's intercept (the
    mean of the other folds) would anti-correlate with the held-out values and bias the score below 0 even for a
    perfect null. The quality is the mean over targets with a defined correlation, averaged over folds. The λ
    with the smallest held-out mean squared error of the targets is refitted on all K models.
    """
    masks = np.asarray(masks)
    outputs = np.asarray(outputs, dtype=np.float64)
    if masks.ndim != 2 or masks.dtype != bool:
        raise ValueError(f"masks must be a (models, samples) bool array, got {masks.dtype} {masks.shape}")
    if outputs.ndim != 2 or outputs.shape[0] != masks.shape[0]:
        raise ValueError(f"outputs must be (models, D) with one row per mask, got {outputs.shape}")
    k = masks.shape[0]
    if not 2 <= folds <= k // MIN_HELD_OUT:
        raise ValueError(f"{k} models cannot be split into {folds} folds of at least {MIN_HELD_OUT} models")
    if not np.all(np.isfinite(outputs)):
        raise ValueError("outputs hold NaN or inf values")
    target = target or (lambda y: y)
    x = masks.astype(np.float64)
    scale = float(np.mean(np.sum((x - x.mean(axis=0)) ** 2, axis=1)))  # mean diagonal of XXᵀ
    scale = scale if scale > 0 else 1.0
    fold = fold_of(k, folds, seed)
    per_fold = np.full((folds, len(grid)), np.nan)  # mean per-target correlation on each fold's held-out models
    mse = np.zeros((folds, len(grid)))
    pooled = np.full((folds, len(grid)), np.nan)
    counts = np.zeros((folds, len(grid)), dtype=np.int64)
    for f in range(folds):
        fit, held = fold != f, fold == f
        xm, ym = x[fit].mean(axis=0), outputs[fit].mean(axis=0)
        xf, yf = x[fit] - xm, outputs[fit] - ym
        s, u = np.linalg.eigh(xf @ xf.T)  # XXᵀ = U diag(s) Uᵀ: one decomposition serves every λ
        s = np.clip(s, 0, None)
        a = ((x[held] - xm) @ xf.T) @ u  # (held, K_fit)
        b = u.T @ yf  # (K_fit, D)
        actual = target(outputs[held])
        for g, lam_scale in enumerate(grid):
            pred = target(ym + (a / (s + lam_scale * scale)) @ b)
            corr = per_target_corr(pred, actual)
            ok = np.isfinite(corr)
            counts[f, g] = int(ok.sum())
            per_fold[f, g] = corr[ok].mean() if ok.any() else np.nan
            pooled[f, g] = pooled_corr(pred, actual)
            mse[f, g] = float(np.mean((pred - actual) ** 2))
    with np.errstate(invalid="ignore"):
        scores = [float(np.nanmean(per_fold[:, g])) if np.isfinite(per_fold[:, g]).any() else float("nan")
                  for g in range(len(grid))]
        pooled = [float(np.nanmean(pooled[:, g])) if np.isfinite(pooled[:, g]).any() else float("nan")
                  for g in range(len(grid))]
    counts = counts.sum(axis=0).tolist()
    errors = mse.mean(axis=0).tolist()
    best = min(range(len(grid)), key=lambda i: (errors[i], i))
    lam = grid[best] * scale
    xm, ym = x.mean(axis=0), outputs.mean(axis=0)
    xc = x - xm
    dual = np.linalg.solve(xc @ xc.T + lam * np.eye(k), outputs - ym)
    model = LinearDatamodel(xm, xc.astype(np.float32), ym, dual.astype(np.float32), float(lam))
    return DatamodelFit(model, float(grid[best]), scores[best], pooled[best], errors[best], tuple(grid),
                        tuple(scores), tuple(errors), folds, counts[best])
