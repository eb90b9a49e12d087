"""IAM unlearning score on the forget split: how "non-member" each unlearned model looks on forget samples.

Published: IAM (Interpolated Approximate Measurement), repository Happy2Git/Unlearning_Inference_IAM,
``unlearning_lib/metrics/iam_score.py`` (``interpolate_appro``, Gumbel fit, fixed variance) with the signal
and online end-point of ``new_records.py`` (``p_IPapprox_simp_online``). Adapted here to margin ensembles:

* signal ``s = [−log(ε₁ + ℓ) − m₀] / (m₁ − m₀)``, ``ℓ = −log(ε₂ + p)``, ``p = sigmoid(margin)`` (the true-class
  probability exactly), ε₁ = 1e-2, ε₂ = 1e-5, ``m₁ = −log(ε₁ − log(1 + ε₂))``, ``m₀ = −log(ε₁ − log ε₂)``; so
  p = 0 ↦ 0, p = 1 ↦ 1, increasing in p;
* fit end-point ``s_fit(x)`` = the signal of the *original* model the unlearned model started from (online);
* shadows = OUT models: a seeded half of the oracles (the other half is scored as a reference, below);
* K = 100 steps ``α_j = linspace(0, 1, K)[j]``; ``I_j^k(x) = s_sh^k(x) + α_j (s_fit(x) − s_sh^k(x))``;
* for j ≤ K − 2, a right-Gumbel by moments: ``μ_j(x)`` = mean over shadows k, ``σ_j`` = std (ddof 0) over
  (k, all forget samples) — one number per j, and per model since s_fit is; ``b = √6 σ_j / π``,
  location ``μ_j − 0.5772 b`` (IAM's truncated Euler constant); ``F_j(x)`` = the Gumbel CDF at ``s_u(x)``;
* ``M(x) = Σ_{j=0}^{K−2} α_{j+1} F_j(x) / Σ_{j=1}^{K−1} α_j`` and ``U(x) = 1 − M(x)``.

U is in [0, 1]; **high = looks unlearned** (the unlearned model's signal sits low, on the OUT side, relative
to the interpolation between OUT shadows and its own original). The reference level is the same score of the
held-out oracles treated as unlearned models (each paired with the original of its model id): what exact
retraining earns under this protocol. Rows are model ids: unlearned model i is paired with original i, and
held-out oracle r with original r.

What differs from IAM's own protocol: their shadows are trained on disjoint splits of a 20k-sample pool for
201 epochs, and IAM uses at most 128 of them; ours are the run's oracles (all of the shadow half), which
exclude the forget set by definition. They audit one target model; we score every unlearned model with its own
original as the online end-point and average. We report the mean U over forget samples, not IAM's BinUI AUC
over members vs non-members (there are no IN forget samples to rank against). Their signal uses float32
softmax probabilities; ours is float64 from the margins. If σ_j = 0 for some j (all shadow and fit signals
equal), the Gumbel scale is 0 and, as with scipy in IAM's code, the score is undefined: NaN.

Cost: O(N · (K−1) · F) Gumbel CDF evaluations (two exps each): about 1.2e9 for N = 2,000 models and 6,000 forget
samples. Chunkwise over samples the score takes two passes, because σ_j is a statistic over all forget
samples: :func:`iam_moments` per chunk (sums, added with :meth:`IamMoments.__add__`), then :func:`iam_chunk`
per chunk with the total moments (per-model sums of U), then :meth:`IamSums.finish` divides by F.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raybench.metrics.inputs import margin_matrix

EPS1 = 1e-2
EPS2 = 1e-5
EULER_GAMMA_IAM = 0.5772  # IAM uses this truncated constant in its method-of-moments fit
M1 = float(-np.log(EPS1 - np.log(1 + EPS2)))
M0 = float(-np.log(EPS1 - np.log(EPS2)))
_MODEL_BLOCK = 256  # models per vectorised step: bounds the temporaries to block × chunk float64


def iam_signal(margins: np.ndarray) -> np.ndarray:
    """IAM's normalised log-log-loss signal of true-class probability ``sigmoid(margin)``, in [0, 1]."""
    with np.errstate(over="ignore"):  # exp overflows to inf far below 0: p is then exactly 0
        p = 1.0 / (1.0 + np.exp(-np.asarray(margins, dtype=np.float64)))
    return (-np.log(EPS1 - np.log(EPS2 + p)) - M0) / (M1 - M0)


@dataclass(frozen=True)
class IamSplit:
    """Oracle rows used as shadows and oracle rows scored as the exact-retraining reference."""

    shadows: np.ndarray
    reference: np.ndarray


def iam_split(n_oracle: int, *, seed: int = 0) -> IamSplit:
    """Seeded halves of the oracles: the first ``n // 2`` of a permutation are shadows, the rest reference."""
    if n_oracle < 2:
        raise ValueError(f"IAM needs at least 2 oracles (shadows and reference), got {n_oracle}")
    perm = np.random.default_rng(np.random.SeedSequence(seed)).permutation(n_oracle)
    return IamSplit(np.sort(perm[: n_oracle // 2]), np.sort(perm[n_oracle // 2 :]))


@dataclass(frozen=True)
class IamMoments:
    """Sums over forget samples that fix σ_j per model; additive across chunks of samples.

    Per model i with fit signal f_i and shadows S_k: σ_j² = (1−α)² Var(S) + 2α(1−α) Cov(S̄, f_i) + α² Var(f_i),
    all over (k, x) / x, from these sums.
    """

    n_samples: int
    n_shadows: int
    sum_s: float  # Σ_{k,x} S
    sum_s2: float  # Σ_{k,x} S²
    sum_sbar_f: np.ndarray  # per target model: Σ_x S̄(x) f(x)
    sum_f: np.ndarray  # per target model: Σ_x f(x)
    sum_f2: np.ndarray  # per target model: Σ_x f(x)²

    def __add__(self, other: IamMoments) -> IamMoments:
        if self.n_shadows != other.n_shadows or self.sum_f.shape != other.sum_f.shape:
            raise ValueError("IAM moments of different shadow sets or model counts cannot be added")
        return IamMoments(self.n_samples + other.n_samples, self.n_shadows, self.sum_s + other.sum_s,
                          self.sum_s2 + other.sum_s2, self.sum_sbar_f + other.sum_sbar_f,
                          self.sum_f + other.sum_f, self.sum_f2 + other.sum_f2)

    def sigma(self, alphas: np.ndarray) -> np.ndarray:
        """σ_j per (model, j) for the given α_j: shape (models, len(alphas))."""
        nk = self.n_samples * self.n_shadows
        mean_s = self.sum_s / nk
        var_s = max(self.sum_s2 / nk - mean_s**2, 0.0)
        mean_f = self.sum_f / self.n_samples
        var_f = np.maximum(self.sum_f2 / self.n_samples - mean_f**2, 0.0)
        cov = self.sum_sbar_f / self.n_samples - mean_s * mean_f
        a = np.asarray(alphas)[None, :]
        var = (1 - a) ** 2 * var_s + 2 * a * (1 - a) * cov[:, None] + a**2 * var_f[:, None]
        return np.sqrt(np.maximum(var, 0.0))


@dataclass(frozen=True)
class IamSums:
    """Per-model sums of U over the samples seen so far; additive across chunks."""

    n_samples: int
    sum_u: np.ndarray

    def __add__(self, other: IamSums) -> IamSums:
        return IamSums(self.n_samples + other.n_samples, self.sum_u + other.sum_u)

    def finish(self) -> np.ndarray:
        """Mean U over all forget samples, per model."""
        return self.sum_u / self.n_samples


@dataclass(frozen=True)
class IamResult:
    """Per-model mean U of the unlearned models and of the held-out oracles (reference), with their means."""

    per_model: np.ndarray
    iam_mean: float
    reference_per_model: np.ndarray
    reference_mean: float
    reference_rows: np.ndarray  # oracle rows scored as the reference


def iam_moments(original: np.ndarray, shadows: np.ndarray) -> IamMoments:
    """First pass over one chunk: ``original`` (targets' originals, models × chunk), ``shadows`` (k × chunk)."""
    f = iam_signal(margin_matrix(original, "original"))
    s = iam_signal(margin_matrix(shadows, "shadow"))
    if f.shape[1] != s.shape[1]:
        raise ValueError(f"sample counts differ: original {f.shape[1]}, shadows {s.shape[1]}")
    sbar = s.mean(axis=0)
    return IamMoments(f.shape[1], s.shape[0], float(s.sum()), float((s * s).sum()),
                      f @ sbar, f.sum(axis=1), (f * f).sum(axis=1))


def iam_chunk(
    original: np.ndarray, target: np.ndarray, shadows: np.ndarray, moments: IamMoments, *, k: int = 100
) -> IamSums:
    """Second pass over one chunk: per-model sums of U for ``target`` (models × chunk) paired row-wise with
    ``original``, given the moments of all forget samples (from the same originals and shadows)."""
    f = iam_signal(margin_matrix(original, "original"))
    t = iam_signal(margin_matrix(target, "target"))
    s = iam_signal(margin_matrix(shadows, "shadow"))
    if f.shape != t.shape or s.shape[1] != f.shape[1]:
        raise ValueError(f"shapes differ: original {f.shape}, target {t.shape}, shadows {s.shape}")
    if moments.sum_f.shape[0] != f.shape[0] or moments.n_shadows != s.shape[0]:
        raise ValueError("moments were computed for other models or shadows")
    if int(k) != k or k < 2:
        raise ValueError(f"k must be an integer >= 2, got {k!r}")
    alphas = np.linspace(0, 1, int(k))
    weights = alphas[1:] / alphas[1:].sum()  # α_{j+1} / Σ α, for j = 0 … K−2
    sigma = moments.sigma(alphas[:-1])  # (models, K−1)
    scale = np.sqrt(6) * sigma / np.pi
    sbar = s.mean(axis=0)
    sum_u = np.empty(f.shape[0], dtype=np.float64)
    for m0 in range(0, f.shape[0], _MODEL_BLOCK):
        fb, tb, bb = f[m0 : m0 + _MODEL_BLOCK], t[m0 : m0 + _MODEL_BLOCK], scale[m0 : m0 + _MODEL_BLOCK]
        m = np.zeros_like(fb)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            for j, a in enumerate(alphas[:-1]):
                mu = sbar + a * (fb - sbar)  # mean over shadows of I_j^k(x), = (1−α) S̄ + α f
                b = bb[:, j : j + 1]
                z = (tb - (mu - EULER_GAMMA_IAM * b)) / b
                m += weights[j] * np.exp(-np.exp(-z))
        sum_u[m0 : m0 + _MODEL_BLOCK] = (1.0 - m).sum(axis=1)
    sum_u[~(scale > 0).all(axis=1)] = np.nan  # a zero Gumbel scale: the fit is undefined
    return IamSums(f.shape[1], sum_u)


def iam_scores(
    original: np.ndarray,
    unlearned: np.ndarray,
    oracle: np.ndarray,
    *,
    k: int = 100,
    seed: int = 0,
    chunk: int = 8192,
) -> IamResult:
    """IAM U per unlearned model and per held-out oracle from forget-split margins (models × forget samples).

    ``original`` and ``unlearned`` have one row per model id; ``oracle`` rows are model ids too, and held-out
    oracle r is paired with ``original[r]`` (so there must be at least as many originals as oracles).
    """
    orig = margin_matrix(original, "original")
    unl = margin_matrix(unlearned, "unlearned")
    orc = margin_matrix(oracle, "oracle")
    if orig.shape != unl.shape:
        raise ValueError(f"original {orig.shape} and unlearned {unl.shape} must pair row by row")
    if orc.shape[1] != orig.shape[1] or orc.shape[0] > orig.shape[0]:
        raise ValueError(f"oracle {orc.shape} must have the originals' samples and at most their rows {orig.shape}")
    split = iam_split(orc.shape[0], seed=seed)
    ref_orig = orig[split.reference]
    results = []
    for fit, target in ((orig, unl), (ref_orig, orc[split.reference])):
        mom = None
        for s0 in range(0, fit.shape[1], chunk):
            part = iam_moments(fit[:, s0 : s0 + chunk], orc[split.shadows, s0 : s0 + chunk])
            mom = part if mom is None else mom + part
        sums = None
        for s0 in range(0, fit.shape[1], chunk):
            part = iam_chunk(fit[:, s0 : s0 + chunk], target[:, s0 : s0 + chunk],
                             orc[split.shadows, s0 : s0 + chunk], mom, k=k)
            sums = part if sums is None else sums + part
        results.append(sums.finish())
    return IamResult(results[0], float(results[0].mean()), results[1], float(results[1].mean()), split.reference)


