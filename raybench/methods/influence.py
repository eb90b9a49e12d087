"""Influence unlearning with a WoodFisher inverse-Fisher estimate (docs/methods.md#influence; RUM ``wfisher`` / IU).

One Newton-like step that removes F's first-order contribution to the weights: the difference between the
forget and retain gradients, preconditioned by an inverse empirical Fisher built from per-sample retain
gradients by a rank-1 (Sherman–Morrison style) recursion. No training loop, so it yields a single snapshot.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp, vmap

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

# Per-sample dot products are taken for at most this many (sample, model) pairs per forward-mode pass, and for
# half an architecture's ``eval_batch_budget`` (large activations): a forward-mode pass carries two of each.
_DOT_BUDGET = 1 << 14


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


def _per_sample_dots(stack: StackedModel, x: torch.Tensor, y: torch.Tensor, directions: Sequence[torch.Tensor]
                     ) -> torch.Tensor:
    """x (c, M, *input), y (c, M) as ``_per_sample_gradients``; ``directions`` (M, P) each. Returns (c, M, D):
    the dot product of each model's per-sample gradient with each direction, without forming the gradients. A
    gradient's dot product with d is the derivative of that sample's loss along d, and one forward-mode pass
    (``jvp``) gives it for every sample and model at once: a forward pass instead of a backward per sample."""
    names = [n for n, _ in stack.named_parameters()]
    params = {n: p.detach() for n, p in stack.named_parameters()}
    buffers = dict(stack.named_buffers())
    inputs, labels = x.transpose(0, 1), y.t()  # (M, c, *input): model m's own samples

    def losses(p: dict) -> torch.Tensor:
        logits = functional_call(stack, (p, buffers), (inputs,))
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)

    out = []
    for direction in directions:
        tangent = dict(zip(names, unflatten_per_model(direction, list(params.values())), strict=True))
        out.append(jvp(losses, (params,), (tangent,))[1].t())
    count_grad_samples(len(y))  # as many per-sample gradients' worth of work; jvp's forward does not count itself
    return torch.stack(out, dim=2)


def _woodfisher_coefficient(dots: torch.Tensor, n_fisher: float) -> torch.Tensor:
    """The recursion of ``woodfisher_direction`` on scalars: ``dots`` (n, M, 2) holds, per further gradient g and
    model, (v·g, g_1·g). With o = c·g_1 and k = v − s·g_1, t = c·(g_1·g), k·g = v·g − s·(g_1·g), and a step adds
    c·(k·g)/(N + t) to s and multiplies c by N/(N + t). Returns s per model, (M,), in float64."""
    s = torch.zeros(dots.shape[1], dtype=torch.float64)
    c = torch.ones_like(s)
    for vg, g1g in dots.cpu().permute(0, 2, 1):  # per gradient: v·g and g_1·g, each (M,)
        t = c * g1g
        s = s + c * (vg - s * g1g) / (n_fisher + t)
        c = c * n_fisher / (n_fisher + t)
    return s.to(dots.device)


def woodfisher_direction(stack: StackedModel, data: UnlearnData, params: dict, seed: int) -> list[torch.Tensor]:
    """k ≈ F⁻¹(g_F − g_R) per model (docs/methods.md#influence, steps 1–2), shaped like the stack's parameters.

    g_F = Σ_F ∇ℓ/(n_F + n_R) and g_R = n_F/(n_F + n_R)·mean_R ∇ℓ, in eval mode at the current weights. The
    recursion starts from k = g_F − g_R and o = g_1 and, for each further per-sample retain gradient g, does
    t = o·g; k ← k − (k·g/(N + t))·o; o ← o − (t/(N + t))·o. Each model draws its own ``num_grads`` retain
    samples (RUM takes the first ~1,002 in index order) and N = ``num_grads`` (RUM hard-codes N = 1000 for its
    1,002 gradients). All of it is per model: rows of (M, P) tensors, dot products along P; the recursion itself
    runs on two dot products per gradient (``_woodfisher_coefficient``), which is the same algebra.
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
        budget = min(_DOT_BUDGET, getattr(stack, "eval_batch_budget", 2 * _DOT_BUDGET) // 2)
        chunk = max(1, budget // stack.n_models)
        first = _per_sample_gradients(stack, data.x_train[sample_idx[:1]], data.y_train[sample_idx[:1]])[0]
        # o stays a multiple c·g_1 (its update only rescales it), so k = v − s·g_1 and the whole recursion needs
        # only each further gradient's dot products with v and g_1, which forward mode gives without the gradient.
        dots = []
        for start in range(1, len(sample_idx), chunk):
            idx = sample_idx[start:start + chunk]
            dots.append(_per_sample_dots(stack, data.x_train[idx], data.y_train[idx], (k, first)).double())
        if dots:
            k = k - _woodfisher_coefficient(torch.cat(dots), n_fisher).to(k.dtype).unsqueeze(1) * first
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
