"""Tug-of-War (ToW): how closely an unlearned model's accuracies match its retrained counterpart's.

Published in RUM (Zhao et al., "What makes unlearning hard and what to do about it", NeurIPS 2024; repository
kairanzhao/RUM): for an unlearned model u and the model r retrained without the forget set,

    ToW(u, r) = Π_{S ∈ {forget, retain, val}} (1 − |acc_S(u) − acc_S(r)|)

with accuracies as fractions in [0, 1] (RUM writes percentages and divides by 100: the same number). ToW is in
[0, 1]; 1 is best (every accuracy equals the retrained model's); the reference level of exact retraining is 1
only up to the seed-to-seed spread of retrained models, so compare with ToW between two oracle draws where
that matters.

Pairs are (unlearned model i, oracle i) by model id: arrays are aligned by row. The summary is the mean over
pairs with a 95% interval ``mean ± t_{0.975, n−1} · SEM`` (Student t over pairs, SEM = sd(ddof=1)/√n).

Chunkwise: top-1 accuracy per model is a count over samples; accumulate :func:`top1_correct` over chunks and
divide by the split's sample count at the end (that is exactly :func:`top1_accuracy` of the whole split).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

TOW_SPLITS: tuple[str, ...] = ("forget", "retain", "val")


@dataclass(frozen=True)
class TowResult:
    """Per-pair ToW and its mean over pairs with a t-interval (``None`` bounds when there is a single pair)."""

    per_pair: np.ndarray
    mean: float
    ci_low: float | None
    ci_high: float | None

    @property
    def n_pairs(self) -> int:
        return int(self.per_pair.shape[0])


def top1_correct(top1_margins: np.ndarray) -> np.ndarray:
    """Per-model count of samples classified correctly, ``sum(top1 > 0, axis=1)`` (a tie is wrong), int64."""
    t = _matrix(top1_margins, "top1 margins")
    return np.count_nonzero(t > 0, axis=1).astype(np.int64)


def top1_accuracy(top1_margins: np.ndarray) -> np.ndarray:
    """Per-model top-1 accuracy from top-1 margins ``z_y − max_{j≠y} z_j`` (models × samples): ``mean(top1 > 0)``.

    A margin of exactly 0 is a tie between the true class and another; argmax would pick either, so it is
    counted as wrong, as a strict ``> 0`` does.
    """
    t = _matrix(top1_margins, "top1 margins")
    return top1_correct(t) / t.shape[1]


def tug_of_war(
    unlearned_acc: Mapping[str, np.ndarray],
    oracle_acc: Mapping[str, np.ndarray],
    *,
    splits: Sequence[str] = TOW_SPLITS,
    level: float = 0.95,
) -> TowResult:
    """ToW per (unlearned i, oracle i) pair from per-model accuracies per split (fractions, shape (models,))."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    tow = None
    for split in splits:
        if split not in unlearned_acc or split not in oracle_acc:
            raise ValueError(f"ToW needs accuracies on split {split!r} for both ensembles")
        a_u = _accuracies(unlearned_acc[split], f"unlearned {split}")
        a_r = _accuracies(oracle_acc[split], f"oracle {split}")
        if a_u.shape != a_r.shape:
            raise ValueError(f"{split}: {a_u.shape[0]} unlearned vs {a_r.shape[0]} oracle accuracies; pairs need both")
        factor = 1.0 - np.abs(a_u - a_r)
        tow = factor if tow is None else tow * factor
    if tow is None:
        raise ValueError("ToW needs at least one split")
    n = tow.shape[0]
    mean = float(tow.mean())
    if n < 2:
        return TowResult(tow, mean, None, None)
    from scipy.stats import t as student_t  # imported here: scipy.stats is slow to import (CLI start-up)

    half = float(student_t.ppf((1 + level) / 2, n - 1) * tow.std(ddof=1) / np.sqrt(n))
    return TowResult(tow, mean, mean - half, mean + half)


def _matrix(a: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{name} must have shape (models, samples) with both > 0, got {a.shape}")
    if a.dtype.kind not in "fiu":
        raise ValueError(f"{name} must be numeric, got dtype {a.dtype}")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ValueError(f"{name} contain NaN/inf values")
    return a


def _accuracies(a: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 1 or a.shape[0] == 0:
        raise ValueError(f"{name} accuracies must have shape (models,), got {a.shape}")
    if not (np.isfinite(a).all() and (a >= 0).all() and (a <= 1).all()):
        raise ValueError(f"{name} accuracies must be fractions in [0, 1]")
    return a
