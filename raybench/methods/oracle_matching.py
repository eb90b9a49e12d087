"""Oracle Matching (docs/methods.md#oracle_matching, DMMc ``oracle_matching``): regress the originals' logits onto those
of oracles retrained without F, on F and a sample of R.

OM uses no true labels: the oracles' outputs are the target. Its oracles must be *disjoint* from the oracles
that score KLOM (§3.3, §8 item 7): the engine passes a separate set as ``data.oracles``.

Pairing. DMMc matches every student to the *mean* of ``num_oracles`` oracles (``pairing="mean"``). KLOM scores
the *distribution* of the unlearned models, and 100 students pulled towards one common target collapse onto it:
on digits their retain/val KLOM rose to 4–5 (from the 0.6 floor). With ``pairing="per_model"`` (the default)
student m matches its own oracle m, so the students inherit the oracles' spread; it needs as many matching
oracles as students (the engine trains them once per forget set).
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
def eval_logits(models: StackedModel, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Logits (K, n, C) float32 of each of the K models on ``x`` in eval mode (their mode is restored), without
    gradients: targets that the fine-tuning must not move."""
    was_training = models.training
    models.eval()
    try:
        return torch.cat([models(x[s:s + batch_size]).float() for s in range(0, len(x), batch_size)], dim=1)
    finally:
        models.train(was_training)


def oracle_targets(oracles: StackedModel, x: torch.Tensor, batch_size: int = 4096, *,
                   per_model: bool = False) -> torch.Tensor:
    """Logits of the K oracles on ``x`` in eval mode (their mode is restored): their mean (n, C), or with
    ``per_model`` each oracle's own (K, n, C)."""
    out = eval_logits(oracles, x, batch_size)
    return out if per_model else out.mean(0)


def oracle_matching(stack: StackedModel, data: UnlearnData, params: dict, epochs: Sequence[int],
                    seed: int) -> Snapshots:
    """OM (docs/methods.md#oracle_matching): fine-tune each model on ``matching_indices`` minimising MSE(student logits,
    mean oracle logits), mean over batch × classes, summed over models; Adam(lr, weight decay), ExponentialLR(γ)
    stepped per epoch, student in train mode.

    Needs ``data.oracles``: ``num_oracles`` models with ``pairing="mean"``, one per student (in the stack's
    order) with ``pairing="per_model"``. The targets are computed once (the oracles never change). fp32
    throughout (DMMc uses an fp16 autocast forward).
    """
    oracles = data.oracles
    per_model = params["pairing"] == "per_model"
    if params["pairing"] not in ("mean", "per_model"):
        raise ValueError(f"oracle_matching: pairing must be 'mean' or 'per_model', got {params['pairing']!r}")
    want = stack.n_models if per_model else params["num_oracles"]
    if oracles is None or oracles.n_models != want:
        have = "none" if oracles is None else oracles.n_models
        what = f"one per student ({want})" if per_model else f"num_oracles={want}"
        raise ValueError(f"oracle_matching needs data.oracles with {what} models, got {have}")
    ids = matching_indices(data.forget_idx, data.retain_idx, params["forget_multiplier"],
                           params["retain_multiplier"], seed)
    x = data.x_train[ids]
    target = oracle_targets(oracles, x, per_model=per_model)
    yield from match_logits(stack, x, target, params, epochs, seed)


def match_logits(stack: StackedModel, x: torch.Tensor, target: torch.Tensor, params: dict, epochs: Sequence[int],
                 seed: int) -> Snapshots:
    """The matching loop shared by OM and DMM: fine-tune the stack so that its logits on ``x`` regress onto
    ``target``, one common target (n, C) or one per student (M, n, C), yielding at each of ``epochs``.

    MSE averaged over batch × classes, summed over models; Adam(``lr``, ``weight_decay``), ExponentialLR(``gamma``)
    stepped per epoch, batches of ``batch_size`` drawn by ``per_model_batches``, student in train mode.
    """
    per_model = target.dim() == 3
    if target.shape[-2] != len(x) or (per_model and target.shape[0] != stack.n_models):
        raise ValueError(f"matching targets of shape {tuple(target.shape)} do not fit {stack.n_models} students "
                         f"on {len(x)} samples")
    target = target.to(dtype=next(stack.parameters()).dtype)
    rows = torch.arange(stack.n_models, device=x.device)[:, None]
    optimizer = torch.optim.Adam(stack.parameters(), lr=params["lr"], weight_decay=params["weight_decay"])
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=params["gamma"])
    stack.train()
    for epoch in range(1, max(epochs) + 1):
        for idx in per_model_batches(len(x), params["batch_size"], stack.seeds, seed, epoch, x.device):
            logits = stack(x[idx])
            # sum over models of each model's MSE averaged over its batch × classes
            goal = target[rows, idx] if per_model else target[idx]
            loss = F.mse_loss(logits, goal, reduction="sum") / (idx.shape[1] * logits.shape[-1])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        schedule.step()
        if epoch in epochs:
            yield epoch, stack
