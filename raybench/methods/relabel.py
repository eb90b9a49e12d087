"""Random-label fine-tuning and SalUn (docs/methods.md#random_label, docs/methods.md#salun; RUM ``RL_og`` and ``RL``).

Both train on F with freshly drawn random labels, mixed with R under its true labels: the random labels wipe out
what the models learned about F, the retain data keeps the rest. SalUn restricts the update to the weights most
*salient* for F (largest |∇ forget loss|), so the rest of the network is left alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from raybench.methods.base import (
    Snapshots,
    UnlearnData,
    flatten_per_model,
    model_generators,
    per_model_batches,
    stacked_cross_entropy,
    unflatten_per_model,
)
from raybench.models import StackedModel


def _random_label_training(stack: StackedModel, data: UnlearnData, params: dict, epochs: Sequence[int], seed: int,
                           mask: list[torch.Tensor] | None = None) -> Snapshots:
    """Each epoch: redraw uniform labels in {0..C−1} for F (per model; a draw may equal the truth), then one
    pass of CE over the shuffled union F_random ∪ R; with ``mask``, each gradient is multiplied by it before
    the step (RUM's SGD: momentum and weight decay still act on masked weights)."""
    optimizer = torch.optim.SGD(stack.parameters(), lr=params["lr"], momentum=params["momentum"],
                                weight_decay=params["weight_decay"])
    n_forget = len(data.forget_idx)
    x = torch.cat([data.x_forget, data.x_retain])
    y_retain = data.y_retain.expand(stack.n_models, -1)
    stack.train()
    for epoch in range(1, max(epochs) + 1):
        random = torch.stack([torch.randint(data.num_classes, (n_forget,), generator=g)
                              for g in model_generators(stack.seeds, seed, "random-labels", epoch)])
        y = torch.cat([random.to(y_retain.device), y_retain], dim=1)  # (M, |F| + |R|)
        for idx in per_model_batches(len(x), params["batch_size"], stack.seeds, seed, epoch, x.device):
            loss = stacked_cross_entropy(stack(x[idx]), y.gather(1, idx))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if mask is not None:
                for p, m in zip(stack.parameters(), mask, strict=True):
                    p.grad.mul_(m)
            optimizer.step()
        if epoch in epochs:
            yield epoch, stack


def random_label(stack: StackedModel, data: UnlearnData, params: dict, epochs: Sequence[int],
                 seed: int) -> Snapshots:
    """Random-label fine-tuning (docs/methods.md#random_label; RUM ``RL_og``): CE on F with fresh uniform labels each
    epoch ∪ R, with RUM's SGD (momentum, weight decay, constant lr)."""
    yield from _random_label_training(stack, data, params, epochs, seed)


def forget_saliency(stack: StackedModel, data: UnlearnData, batch_size: int, seed: int) -> list[torch.Tensor]:
    """SalUn's saliency: Σ over F batches of ∇θ[−CE(batch mean)], all at the originals' θ0, in eval mode.

    Nothing is stepped while accumulating (RUM steps θ between batches, docs/methods.md#not-copied). Returns
    one tensor per parameter, shaped like it (leading model dimension), so every model's saliency is its own.
    """
    params = list(stack.parameters())
    total = [torch.zeros_like(p) for p in params]
    x, y = data.x_forget, data.y_forget
    was_training = stack.training
    stack.eval()
    try:
        for idx in per_model_batches(len(y), batch_size, stack.seeds, seed, 0, x.device):
            loss = -stacked_cross_entropy(stack(x[idx]), y[idx])
            for acc, g in zip(total, torch.autograd.grad(loss, params), strict=True):
                acc.add_(g)
    finally:
        stack.train(was_training)
    return total


def saliency_mask(saliency: Sequence[torch.Tensor], tau: float, largest: bool = True) -> list[torch.Tensor]:
    """Per model, 1 on the ⌊τ·P⌋ of its P parameters with the largest |saliency| (SalUn), 0 elsewhere.

    Ranked over all of a model's parameters at once, never over the whole stack. ``largest=False`` marks the
    smallest instead: RUM's ``generate_mask`` drops the negation before its argsort (docs/methods.md#not-copied).
    """
    if not 0 <= tau <= 1:
        raise ValueError(f"tau must be in [0, 1], got {tau}")
    scores = flatten_per_model([s.detach().abs() for s in saliency])
    k = int(scores.shape[1] * tau)
    mask = torch.zeros_like(scores)
    if k:
        mask.scatter_(1, scores.topk(k, dim=1, largest=largest).indices, 1.0)
    return unflatten_per_model(mask, saliency)


def salun(stack: StackedModel, data: UnlearnData, params: dict, epochs: Sequence[int], seed: int) -> Snapshots:
    """SalUn (docs/methods.md#salun; RUM ``RL``): random-label training (as ``random_label``) with every gradient
    multiplied by a per-model saliency mask over the top-τ fraction of |∇θ forget loss| at θ0.

    ``rum_mask_bug=True`` reproduces RUM's mask (the smallest-τ fraction), for comparison with its numbers only.
    """
    saliency = forget_saliency(stack, data, params["forget_batch_size"], seed)
    mask = saliency_mask(saliency, params["tau"], largest=not params["rum_mask_bug"])
    yield from _random_label_training(stack, data, params, epochs, seed, mask=mask)
