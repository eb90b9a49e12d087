"""Membership-inference views of unlearning: per-sample U-LiRA AUC and SVC-MIA "MIA efficacy".

**U-LiRA** (after Hayes et al., "Inexact Unlearning Needs More Careful Evaluations to Avoid a False Sense of
Privacy", 2024, which applies LiRA — Carlini et al., "Membership Inference Attacks From First Principles",
2022, tensorflow/privacy ``mi_lira_2021`` — to unlearned vs retrained models): for each sample, a Gaussian
(mean, std floored at ``std_floor``) is fitted to the margins of a *fitting half* of the unlearned ensemble
and of the oracle ensemble; the other halves are scored with the log-likelihood ratio
``log N(v; μ_u, σ_u) − log N(v; μ_o, σ_o)`` and the per-sample AUC of telling held-out unlearned models from
held-out oracles is the Mann–Whitney statistic (ties count ½). AUC is in [0, 1]; **0.5 = indistinguishable**
(what exact retraining gets, up to noise of sd ≈ √((n₁+n₂+1)/(12 n₁ n₂)) per sample, about 0.08 for 25 vs 25
held-out models), 1 = perfectly told apart; below 0.5 is noise, not "better than retraining". The halves
come from one seeded permutation per ensemble, the same for every sample, so chunks of samples can be scored
independently and concatenated (per-sample values; the summary is their mean). Cost per sample:
O((n_u + n_o) log(n_u + n_o)) for the ranks.

**SVC-MIA efficacy** (SalUn, OPTML-Group/Unlearn-Saliency ``Classification/evaluation/SVC_MIA.py``, the
"confidence" entry of ``SVC_MIA_forget_efficacy``; also used by RUM): per model, an RBF SVC
(``C=3, gamma="auto"``) is fitted on the true-class probability ``p_y`` of retain samples (members, label 1)
and val samples (non-members, label 0), then predicts the forget samples; the value is the fraction of forget
samples predicted *non-member*, averaged over models. Here ``p_y = sigmoid(margin)`` exactly, since the margin
is ``log p_y − log(1 − p_y)``. SalUn uses the first |test| retain samples and the whole test set (10,000
each on CIFAR-10); we use the first ``n = min(len(retain), len(val), max_shadow=10000)`` samples of each, so
the two classes are balanced. Direction: in [0, 1]; there is no fixed ideal — a retrained model scores the
forget set like unseen data only as far as the forget samples resemble val samples, so compare with the same
number computed on the oracles (the reference level), not with 1. The fit is deterministic (libsvm without
probability estimates draws no random numbers). Cost per model: one libsvm fit on 2n one-dimensional points
plus a prediction over the forget set, measured about 6 s of CPU at n = 10,000 (1 s at n = 1,437), superlinear
in n: 10 minutes for 100 models, hours for 2,000; models are
independent, so reduce can run row blocks of models in parallel and concatenate ``per_model``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raybench.metrics.inputs import margin_matrix

SVC_MAX_SHADOW = 10000


@dataclass(frozen=True)
class UliraSplit:
    """Row indices of the fitting and held-out halves of each ensemble (one seeded draw, used for every sample)."""

    fit_unlearned: np.ndarray
    test_unlearned: np.ndarray
    fit_oracle: np.ndarray
    test_oracle: np.ndarray


def ulira_split(n_unlearned: int, n_oracle: int, *, seed: int = 0) -> UliraSplit:
    """Seeded halves: the first ``n // 2`` rows of a permutation fit, the rest are scored (one stream per ensemble)."""
    if n_unlearned < 2 or n_oracle < 2:
        raise ValueError(f"U-LiRA needs at least 2 models per ensemble, got {n_unlearned} and {n_oracle}")
    ss_u, ss_o = np.random.SeedSequence(seed).spawn(2)
    pu = np.random.default_rng(ss_u).permutation(n_unlearned)
    po = np.random.default_rng(ss_o).permutation(n_oracle)
    return UliraSplit(np.sort(pu[: n_unlearned // 2]), np.sort(pu[n_unlearned // 2 :]),
                      np.sort(po[: n_oracle // 2]), np.sort(po[n_oracle // 2 :]))


def ulira_auc(
    unlearned: np.ndarray, oracle: np.ndarray, *, seed: int = 0, std_floor: float = 1e-3
) -> np.ndarray:
    """Per-sample AUC (float64, shape (samples,)) of held-out unlearned vs held-out oracle models by LLR score."""
    u, o = _pair(unlearned, oracle, "unlearned", "oracle")
    if not std_floor > 0:
        raise ValueError(f"std_floor must be positive, got {std_floor!r}")
    split = ulira_split(u.shape[0], o.shape[0], seed=seed)
    mu_u, sd_u = _gaussian(u[split.fit_unlearned], std_floor)
    mu_o, sd_o = _gaussian(o[split.fit_oracle], std_floor)
    held_u = u[split.test_unlearned]
    held_o = o[split.test_oracle]
    score_u = _llr(held_u, mu_u, sd_u, mu_o, sd_o)
    score_o = _llr(held_o, mu_u, sd_u, mu_o, sd_o)
    from scipy.stats import rankdata  # imported here: scipy.stats is slow to import (CLI start-up)

    n1, n2 = score_u.shape[0], score_o.shape[0]
    ranks = rankdata(np.concatenate([score_u, score_o]), method="average", axis=0)
    return (ranks[:n1].sum(axis=0) - n1 * (n1 + 1) / 2) / (n1 * n2)


@dataclass(frozen=True)
class SvcMiaResult:
    """Fraction of forget samples predicted non-member, per model and averaged; ``n_shadow`` per class."""

    per_model: np.ndarray
    mean: float
    n_shadow: int


def svc_mia_efficacy(
    retain: np.ndarray, val: np.ndarray, forget: np.ndarray, *, max_shadow: int = SVC_MAX_SHADOW
) -> SvcMiaResult:
    """SVC-MIA efficacy (confidence feature) per model from ``(models, samples)`` margins of the three splits.

    Rows are models and must be aligned across the three splits; only the first ``n`` retain and val columns are
    read, with ``n = min(len(retain), len(val), max_shadow)``.
    """
    r, v = _pair(retain, val, "retain", "val", same_samples=False)
    f = margin_matrix(forget, "forget")
    if not r.shape[0] == v.shape[0] == f.shape[0]:
        raise ValueError(f"model counts differ: retain {r.shape[0]}, val {v.shape[0]}, forget {f.shape[0]}")
    if int(max_shadow) != max_shadow or max_shadow < 1:
        raise ValueError(f"max_shadow must be a positive integer, got {max_shadow!r}")
    from sklearn.svm import SVC  # imported here: scikit-learn is slow to import and only this metric needs it

    n = min(r.shape[1], v.shape[1], int(max_shadow))
    labels = np.concatenate([np.ones(n), np.zeros(n)])
    per_model = np.empty(r.shape[0], dtype=np.float64)
    for m in range(r.shape[0]):
        x = _sigmoid(np.concatenate([r[m, :n], v[m, :n]])).reshape(-1, 1)
        clf = SVC(C=3, gamma="auto", kernel="rbf").fit(x, labels)
        per_model[m] = 1.0 - clf.predict(_sigmoid(f[m]).reshape(-1, 1)).mean()
    return SvcMiaResult(per_model, float(per_model.mean()), n)


def _sigmoid(margins: np.ndarray) -> np.ndarray:
    """``p_y = 1 / (1 + exp(−margin))``; saturates to exactly 0 or 1 far out, without warnings."""
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-margins))


def _gaussian(a: np.ndarray, floor: float) -> tuple[np.ndarray, np.ndarray]:
    return a.mean(axis=0), np.maximum(a.std(axis=0), floor)


def _llr(v, mu_u, sd_u, mu_o, sd_o) -> np.ndarray:
    """``log N(v; μ_u, σ_u) − log N(v; μ_o, σ_o)`` (the 2π terms cancel)."""
    zu = (v - mu_u) / sd_u
    zo = (v - mu_o) / sd_o
    return -0.5 * zu * zu - np.log(sd_u) + 0.5 * zo * zo + np.log(sd_o)


def _pair(a, b, name_a: str, name_b: str, *, same_samples: bool = True) -> tuple[np.ndarray, np.ndarray]:
    a, b = margin_matrix(a, name_a), margin_matrix(b, name_b)
    if same_samples and a.shape[1] != b.shape[1]:
        raise ValueError(f"sample counts differ: {name_a} has {a.shape[1]}, {name_b} has {b.shape[1]}")
    return a, b
