"""A slow, literal restatement of the published KLOM algorithm (docs/metrics.md#klom), one sample at a time.

Kept deliberately naive: it is the yardstick the fast implementation is compared with, bit for bit.
"""

import numpy as np


def reference_sample(p_samples, q_samples, bins=20, eps=1e-5, lo=-100.0, hi=100.0, closed=False):
    p = np.clip(p_samples, lo, hi)
    q = np.clip(q_samples, lo, hi)
    start = min(p.min(), q.min())
    stop = max(p.max(), q.max())
    if start >= stop:
        stop = start + 1.0
    edges = np.linspace(start, stop, bins + 1)
    p_bin = np.digitize(p, edges)
    q_bin = np.digitize(q, edges)
    if closed:
        p_bin = np.minimum(p_bin, bins)
        q_bin = np.minimum(q_bin, bins)
    p_counts = np.array([np.sum(p_bin == i) for i in range(1, bins + 1)])
    q_counts = np.array([np.sum(q_bin == i) for i in range(1, bins + 1)])
    p_prob = p_counts / p_counts.sum() if p_counts.sum() > 0 else np.zeros(bins)
    q_prob = q_counts / q_counts.sum() if q_counts.sum() > 0 else np.zeros(bins)
    q_floor = np.where(p_prob > 0.0, np.maximum(q_prob, eps), q_prob)
    keep = p_prob > 0.0
    return float(np.sum(p_prob[keep] * np.log(p_prob[keep] / q_floor[keep])))


def reference_klom(unlearned, oracle, **kwargs):
    """KL(unlearned ‖ oracle) per sample: columns of (models, samples) matrices."""
    return np.array([reference_sample(unlearned[:, i], oracle[:, i], **kwargs) for i in range(unlearned.shape[1])])
