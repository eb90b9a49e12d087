"""Feldman–Zhang memorisation of every train sample, from an ensemble of models trained on random subsets.

mem(i) = P(correct on i | i in the model's subset) − P(correct on i | i not in it), with top-1 correctness. Both
probabilities are the means over the models that did (IN) and did not (OUT) train on i, so a sample the models
get right only when they saw it is memorised (mem near 1), and one they get right either way is not (mem near 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HIGH_MEM = 0.5
"""The memorisation above which a sample counts as highly memorised in summaries (RUM's centre of the mid group)."""


@dataclass(frozen=True)
class Memorization:
    """Per-sample memorisation, its standard error and what is behind it (all arrays of length n)."""

    mem: np.ndarray  # float64: p_in − p_out; NaN where a sample has no IN or no OUT model
    mem_se: np.ndarray  # float64: sqrt(p_in(1 − p_in)/n_in + p_out(1 − p_out)/n_out)
    n_in: np.ndarray  # int64: models that trained on the sample
    n_out: np.ndarray  # int64: models that did not
    p_in: np.ndarray  # float64: accuracy on the sample of the IN models
    p_out: np.ndarray  # float64: accuracy on the sample of the OUT models


def memorization(masks: np.ndarray, correct: np.ndarray) -> Memorization:
    """Memorisation of n samples from K models: ``masks[k, i]`` is True when model k trained on sample i and
    ``correct[k, i]`` when its top-1 prediction on i is the label (both (K, n) bool).

    The standard error is that of a difference of two independent Bernoulli means, with the plug-in variances
    p(1 − p): it is 0 for a sample every IN and every OUT model gets right (or wrong), which says the models
    agree, not that the estimate is exact; read it with ``n_in`` and ``n_out``."""
    masks = np.asarray(masks)
    correct = np.asarray(correct)
    if masks.ndim != 2 or masks.shape != correct.shape:
        raise ValueError(f"masks and correct must both be (models, samples), got {masks.shape} and {correct.shape}")
    if masks.dtype != bool or correct.dtype != bool:
        raise ValueError(f"masks and correct must be bool arrays, got {masks.dtype} and {correct.dtype}")
    n_in = masks.sum(axis=0).astype(np.int64)
    n_out = masks.shape[0] - n_in
    hits_in = (masks & correct).sum(axis=0)
    hits_out = (~masks & correct).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        p_in = np.where(n_in > 0, hits_in / np.maximum(n_in, 1), np.nan)
        p_out = np.where(n_out > 0, hits_out / np.maximum(n_out, 1), np.nan)
        se = np.sqrt(p_in * (1 - p_in) / n_in + p_out * (1 - p_out) / n_out)
    return Memorization(p_in - p_out, se, n_in, n_out, p_in, p_out)


def memorization_summary(mem: np.ndarray, mem_se: np.ndarray | None = None, *, high: float = HIGH_MEM) -> dict:
    """Quantiles of the defined memorisation values, the count (and share) above ``high``, the count of negative
    values and of undefined ones (no IN or no OUT model); with ``mem_se``, its median."""
    mem = np.asarray(mem, dtype=np.float64)
    ok = np.isfinite(mem)
    values = mem[ok]
    out: dict = {"n_samples": int(mem.size), "n_undefined": int((~ok).sum())}
    for q in (0.05, 0.25, 0.5, 0.75, 0.95, 0.99):
        out[f"mem_q{round(q * 100):02d}"] = float(np.quantile(values, q)) if values.size else float("nan")
    out["mem_mean"] = float(values.mean()) if values.size else float("nan")
    out["mem_max"] = float(values.max()) if values.size else float("nan")
    out["high_threshold"] = float(high)
    out["n_high"] = int((values > high).sum())
    out["share_high"] = float((values > high).mean()) if values.size else float("nan")
    out["n_negative"] = int((values < 0).sum())
    if mem_se is not None:
        se = np.asarray(mem_se, dtype=np.float64)[ok]
        out["mem_se_median"] = float(np.median(se)) if se.size else float("nan")
    return out
