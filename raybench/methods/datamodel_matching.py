"""Datamodel Matching (docs/methods.md#datamodel_matching, DMMc ``dm_matching``): OM's fine-tuning with a simulated
oracle as the target, so that no oracle trained without F is needed.

The simulated oracle of sample j is the original's own logits minus the datamodel's summed effect of F,
ŷ(x_j) = θ0(x_j) − c·Σ_{i∈F} β_i(x_j): what the model would output had F been left out, to first order. The
engine passes that sum, for every train sample, as ``data.datamodel_effect``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from raybench.methods.base import Snapshots, UnlearnData
from raybench.methods.oracle_matching import eval_logits, match_logits, matching_indices
from raybench.models import StackedModel


def datamodel_targets(stack: StackedModel, effect: torch.Tensor, x: torch.Tensor, ids: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """Per-student targets (M, n, C): each original's eval-mode logits on ``x`` (= train samples ``ids``) minus
    ``scale`` times the datamodel's effect on those samples (the same for every student)."""
    return eval_logits(stack, x) - scale * effect[ids].float()


def datamodel_matching(stack: StackedModel, data: UnlearnData, params: dict, epochs: Sequence[int],
                       seed: int) -> Snapshots:
    """DMM (docs/methods.md#datamodel_matching): OM's loop (``match_logits``) on ``matching_indices``, each student
    regressing onto its own logits before fine-tuning minus ``scale``·(the datamodel's summed effect of F).

    Needs ``data.datamodel_effect`` (n_train, C). The targets are computed once, from the originals as given,
    in eval mode; no oracle is seen.
    """
    effect = data.datamodel_effect
    if effect is None:
        raise ValueError("datamodel_matching needs data.datamodel_effect (the run has no datamodel)")
    n_train, n_classes = len(data.x_train), data.num_classes
    if tuple(effect.shape) != (n_train, n_classes):
        raise ValueError(f"datamodel_matching: data.datamodel_effect must have shape ({n_train}, {n_classes}) "
                         f"(train samples × classes), got {tuple(effect.shape)}")
    ids = matching_indices(data.forget_idx, data.retain_idx, params["forget_multiplier"],
                           params["retain_multiplier"], seed)
    x = data.x_train[ids]
    target = datamodel_targets(stack, effect, x, ids, params["scale"])
    yield from match_logits(stack, x, target, params, epochs, seed)
