"""Influence unlearning with a WoodFisher inverse-Fisher estimate (docs/methods.md#influence; RUM ``wfisher`` / IU).

One Newton-like step that removes F's first-order contribution to the weights: the difference between the
forget and retain gradients, preconditioned by an inverse empirical Fisher built from per-sample retain
gradients by a rank-1 (Sherman–Morrison style) recursion. No training loop, so it yields a single snapshot.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.func import functional_call, grad, vmap

from raybench.methods.base import (
    Snapshots,
    UnlearnData,
    flatten_per_model,
    model_generators,
    single_snapshot,
    stacked_cross_entropy,
    unflatten_per_model,
)
from raybench.models import StackedModel, count_grad_samples

# Per-sample gradients are computed this many float elements (samples × models × parameters) at a time.
_GRAD_BUDGET = 1 << 26


def _summed_gradient(stack: StackedModel, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Per model, Σ over the samples (x, y) of ∇ CE, as (M, P); every model sees the same samples."""
    params = list(stack.parameters())
    total = torch.zeros(stack.n_models, sum(p[0].numel() for p in params), device=x.device, dtype=params[0].dtype)
    for start in range(0, len(y), batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        loss = stacked_cross_entropy(stack(xb), yb) * len(yb)  # sum (not mean) over the batch, per model
        total += flatten_per_model(torch.autograd.grad(loss, params))
    return total


def _per_sample_gradients(stack: StackedModel, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x (c, M, *input), y (c, M): sample i of model m is (x[i, m], y[i, m]). Returns (c, M, P), each model's
    own gradient of its own sample's CE (vmap over samples of the stack's summed per-model loss)."""
    names = [n for n, _ in stack.named_parameters()]
    params = {n: p.detach() for n, p in stack.named_parameters()}
    buffers = dict(stack.named_buffers())

    def loss(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return stacked_cross_entropy(functional_call(stack, (p, buffers), (xi.unsqueeze(1),)), yi.unsqueeze(1))

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    count_grad_samples(len(y))  # forward passes inside vmap/grad do not count themselves
    return torch.cat([grads[n].reshape(len(y), stack.n_models, -1) for n in names], dim=2)


def woodfisher_direction(stack: StackedModel, data: UnlearnData, params: dict, seed: int) -> list[torch.Tensor]:
    """k ≈ F⁻¹(g_F − g_R) per model (docs/methods.md#influence, steps 1–2), shaped like the stack's parameters.

    g_F = Σ_F ∇ℓ/(n_F + n_R) and g_R = n_F/(n_F + n_R)·mean_R ∇ℓ, in eval mode at the current weights. The
    recursion starts from k = g_F − g_R and o = g_1 and, for each further per-sample retain gradient g, does
    t = o·g; k ← k − (k·g/(N + t))·o; o ← o − (t/(N + t))·o. Each model draws its own ``num_grads`` retain
    samples (RUM takes the first ~1,002 in index order) and N = ``num_grads`` (RUM hard-codes N = 1000 for its
    1,002 gradients). All of it is per model: rows of (M, P) tensors, dot products along P.
    """
    n_grads = params["num_grads"]
    if n_grads < 1:
        raise ValueError(f"num_grads must be >= 1, got {n_grads}")
    was_training = stack.training
    stack.eval()
    try:
        n_f, n_r = len(data.forget_idx), len(data.retain_idx)
        g_f = _summed_gradient(stack, data.x_forget, data.y_forget, params["batch_size"]) / (n_f + n_r)
        g_r = _summed_gradient(stack, data.x_retain, data.y_retain, params["batch_size"]) * (n_f / ((n_f + n_r) * n_r))
        k = g_f - g_r

        device = data.x_train.device
        picks = torch.stack([torch.randperm(n_r, generator=g)[:n_grads]
                             for g in model_generators(stack.seeds, seed, "influence-samples")]).to(device)
        sample_idx = data.retain_idx[picks].t()  # (n, M): the i-th gradient of every model
        n_fisher = float(sample_idx.shape[0])
        chunk = max(1, _GRAD_BUDGET // (stack.n_models * k.shape[1]))
        o = None
        for start in range(0, len(sample_idx), chunk):
            idx = sample_idx[start:start + chunk]
            for g in _per_sample_gradients(stack, data.x_train[idx], data.y_train[idx]):
                if o is None:
                    o = g.clone()
                    continue
                t = (o * g).sum(1, keepdim=True)
                k = k - ((k * g).sum(1, keepdim=True) / (n_fisher + t)) * o
                o = o - (t / (n_fisher + t)) * o
    finally:
        stack.train(was_training)
    return unflatten_per_model(k, list(stack.parameters()))


def influence(stack: StackedModel, data: UnlearnData, params: dict, epochs: Sequence[int], seed: int) -> Snapshots:
    """IU / WoodFisher (docs/methods.md#influence): θ ← θ + α·k with k = ``woodfisher_direction``, a single step.

    Yields once, under the single requested epoch (default 1): there is no trajectory to snapshot.
    """
    epoch = single_snapshot("influence", epochs)
    direction = woodfisher_direction(stack, data, params, seed)
    with torch.no_grad():
        for p, k in zip(stack.parameters(), direction, strict=True):
            p.add_(k, alpha=params["alpha"])
    yield epoch, stack
