"""Oracle Matching (METHODS.md §3.3, DMMc ``oracle_matching``): regress the originals' logits onto those of
oracles retrained without F, on F and a sample of R.

OM uses no true labels: the oracles' outputs are the target. Its oracles must be *disjoint* from the oracles
that score KLOM (§3.3, §8 item 7): the engine passes a separate set as ``data.oracles``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from raybench.methods.base import Snapshots, UnlearnData, per_model_batches
from raybench.models import StackedModel


def matching_indices(forget_idx: torch.Tensor, retain_idx: torch.Tensor, forget_multiplier: float,
                     retain_multiplier: float, seed: int) -> torch.Tensor:
    """The fine-tuning multiset of §3.3 step 1, as train-set sample ids.

    F repeated ``forget_multiplier`` times (a fractional part adds the first ⌊|F|·frac⌋ of F), then
    ⌊``retain_multiplier``·|F|⌋ retain ids drawn without replacement by ``numpy.random.default_rng(seed)``
    (DMMc uses ``default_rng(42)``), capped at |R|. Shared by all models of the stack, as in DMMc.
    """
    n_f = len(forget_idx)
    whole, frac = divmod(forget_multiplier, 1)
    forget_part = [forget_idx] * int(whole) + [forget_idx[:math.floor(n_f * frac)]]
    n_sub = min(math.floor(retain_multiplier * n_f), len(retain_idx))
    picks = np.random.default_rng(seed).choice(len(retain_idx), n_sub, replace=False)
    retain_part = retain_idx[torch.as_tensor(picks, dtype=torch.long, device=retain_idx.device)]
    return torch.cat([*forget_part, retain_part])


@torch.no_grad()
def oracle_targets(oracles: StackedModel, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Mean logits of the K oracles on ``x``: (n, C), in eval mode (the oracles' mode is restored)."""
    was_training = oracles.training
    oracles.eval()
    try:
        return torch.cat([oracles(x[s:s + batch_size]).float().mean(0) for s in range(0, len(x), batch_size)])
    finally:
        oracles.train(was_training)


def oracle_matching(stack: StackedModel, data: UnlearnData, params: dict, epochs: Sequence[int],
                    seed: int) -> Snapshots:
    """OM (METHODS.md §3.3): fine-tune each model on ``matching_indices`` minimising MSE(student logits, mean
    oracle logits), mean over batch × classes, summed over models; Adam(lr, weight decay), ExponentialLR(γ)
    stepped per epoch, student in train mode.

    Needs ``data.oracles`` holding exactly ``num_oracles`` models. The targets are computed once (the oracles
    never change). fp32 throughout (DMMc uses an fp16 autocast forward).
    """
    oracles = data.oracles
    if oracles is None or oracles.n_models != params["num_oracles"]:
        have = "none" if oracles is None else oracles.n_models
        raise ValueError(f"oracle_matching needs data.oracles with num_oracles={params['num_oracles']} models, "
                         f"got {have}")
    ids = matching_indices(data.forget_idx, data.retain_idx, params["forget_multiplier"],
                           params["retain_multiplier"], seed)
    x = data.x_train[ids]
    target = oracle_targets(oracles, x).to(dtype=next(stack.parameters()).dtype)
    optimizer = torch.optim.Adam(stack.parameters(), lr=params["lr"], weight_decay=params["weight_decay"])
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=params["gamma"])
    stack.train()
    for epoch in range(1, max(epochs) + 1):
        for idx in per_model_batches(len(ids), params["batch_size"], stack.seeds, seed, epoch, x.device):
            logits = stack(x[idx])
            # sum over models of each model's MSE averaged over its batch × classes
            loss = F.mse_loss(logits, target[idx], reduction="sum") / (idx.shape[1] * logits.shape[-1])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        schedule.step()
        if epoch in epochs:
            yield epoch, stack
