"""Subset masks and difficulty forget sets: which train samples a subset model saw, and groups of samples by score.

A subset model's inclusion mask is a function of its seed and the fraction alone, never of the block it is
trained in or of the other models, so the same seed always sees the same samples and a resumed ensemble keeps
its masks. The difficulty groups follow RUM's construction (Zhao et al., NeurIPS 2024) from per-sample scores.
"""

from __future__ import annotations

import numpy as np

from raybench.data.forget_sets import ForgetSet, validate_indices

DIFFICULTY_IDS = ("mem_low", "mem_mid", "mem_high", "mem_mix")
"""Forget-set ids built from a subset run's memorisation scores (``raybench run --scores SUB``)."""

MEM_CENTRE = 0.5
"""The centre of the ``mid`` group for memorisation (RUM's rule; a proxy would use its median)."""


def subset_size(fraction: float, n_train: int) -> int:
    """Samples per subset model: ``round(fraction * n_train)``, at least 1 and at most ``n_train - 1`` (a model
    needs a sample to train on, and a sample every model sees has no OUT models)."""
    return min(max(1, round(fraction * n_train)), n_train - 1)


def subset_indices(seed: int, fraction: float, n_train: int) -> np.ndarray:
    """The sorted train ids a subset model of this seed trains on: ``numpy.random.default_rng(seed)`` picks
    ``subset_size(fraction, n_train)`` of them without replacement."""
    rng = np.random.default_rng(int(seed))
    return np.sort(rng.choice(n_train, subset_size(fraction, n_train), replace=False)).astype(np.int64)


def subset_masks(seeds: list[int] | tuple[int, ...], fraction: float, n_train: int) -> np.ndarray:
    """(K, n_train) bool inclusion masks of the models of these seeds, in seed order."""
    masks = np.zeros((len(seeds), n_train), dtype=bool)
    for k, seed in enumerate(seeds):
        masks[k, subset_indices(seed, fraction, n_train)] = True
    return masks


def difficulty_groups(scores: np.ndarray, size: int, centre: float = MEM_CENTRE) -> dict[str, np.ndarray]:
    """RUM's groups of ``size`` samples each from per-sample ``scores`` (higher = more memorised), ids ascending:

    * ``mem_high``: the ``size`` highest scores; ``mem_low``: the ``size`` lowest;
    * ``mem_mid``: the ``size`` scores closest to ``centre`` (0.5 for memorisation);
    * ``mem_mix``: the union of the three (RUM's mix: a third from each group; where groups overlap, as mid and
      high can when few samples are memorised past the centre, a shared sample is counted once).

    Ties are broken by the lower sample id, so the groups are a function of the scores alone.
    """
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    if scores.ndim != 1 or n == 0:
        raise ValueError(f"scores must be a non-empty 1-D array, got shape {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores hold NaN or inf values")
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
        raise ValueError(f"the difficulty group size must be a positive integer, got {size!r}")
    if 3 * size >= n:
        raise ValueError(f"difficulty groups of {size} samples need more than {3 * size} train samples (the mix "
                         f"holds three groups and something must be retained); the train set has {n}")
    ids = np.arange(n)
    high = np.lexsort((ids, -scores))[:size]  # last key sorts first: score descending, then id ascending
    low = np.lexsort((ids, scores))[:size]
    mid = np.lexsort((ids, np.abs(scores - centre)))[:size]
    groups = {"mem_low": low, "mem_mid": mid, "mem_high": high}
    groups["mem_mix"] = np.unique(np.concatenate([high, mid, low]))
    return {k: np.sort(v).astype(np.int64) for k, v in groups.items()}


_GROUP_RULES = {
    "mem_low": "the {n} lowest memorisation scores",
    "mem_mid": "the {n} memorisation scores closest to 0.5",
    "mem_high": "the {n} highest memorisation scores",
    "mem_mix": "the union of mem_low, mem_mid and mem_high ({n} each)",
}


def difficulty_forget_sets(ids: list[str] | tuple[str, ...], scores: np.ndarray, size: int,
                           origin: str) -> dict[str, ForgetSet]:
    """The difficulty forget sets ``ids`` (of ``DIFFICULTY_IDS``) built from ``scores`` by ``difficulty_groups``,
    validated like every forget set; ``origin`` (e.g. "subset run 3f2a…") goes into their descriptions."""
    unknown = [i for i in ids if i not in DIFFICULTY_IDS]
    if unknown:
        raise ValueError(f"not difficulty forget sets: {', '.join(unknown)}; known: {', '.join(DIFFICULTY_IDS)}")
    groups = difficulty_groups(scores, size)
    out = {}
    for set_id in ids:
        indices = validate_indices(groups[set_id], len(scores), source=f"difficulty forget set {set_id!r}")
        indices.setflags(write=False)
        desc = f"{len(indices)} train samples: {_GROUP_RULES[set_id].format(n=size)} of {origin}"
        out[set_id] = ForgetSet(set_id, indices, desc)
    return out
