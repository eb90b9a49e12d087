"""Gradient-ascent family (docs/methods.md#gradient_ascent, #ascent_descent, #neggrad_plus): push the loss on the forget
set up, optionally while holding the retain set down.

These are the KLOM benchmark's simplest baselines. Ascent alone (``gradient_ascent``) is known to trade forget
quality against everything else; the descent variants (``ascent_descent``, ``neggrad_plus``) add retain-set CE
to keep the models useful.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from raybench.ids import model_seed
from raybench.methods.base import (
    Snapshots,
    UnlearnData,
    cycled_batches,
    per_model_batches,
    stacked_cross_entropy,
)
from raybench.models import StackedModel


def _ce_pass(stack: StackedModel, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
             batches: Iterable[torch.Tensor], sign: float) -> None:
    """One pass of SGD steps on ``sign · CE`` over index batches (M, b): sign -1 is ascent, +1 descent."""
    for idx in batches:
        loss = sign * stacked_cross_entropy(stack(x[idx]), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def gradient_ascent(stack: StackedModel, data: UnlearnData, params: dict, epochs: Sequence[int],
                    seed: int) -> Snapshots:
    """NegGrad (docs/methods.md#gradient_ascent; DUB ``ascent_forget``): each epoch, one pass over F minimising −CE.

    Plain SGD (no momentum, no weight decay) as in the KLOM benchmark; the models stay in train mode. F is
    shuffled per model each epoch (EasyDUB, §3.2) rather than read in index order (DUB).
    """
    optimizer = torch.optim.SGD(stack.parameters(), lr=params["lr"])
    x, y = data.x_forget, data.y_forget
    stack.train()
    for epoch in range(1, max(epochs) + 1):
        batches = per_model_batches(len(y), params["forget_batch_size"], stack.seeds, seed, epoch, x.device)
        _ce_pass(stack, optimizer, x, y, batches, sign=-1.0)
        if epoch in epochs:
            yield epoch, stack


def ascent_descent(stack: StackedModel, data: UnlearnData, params: dict, epochs: Sequence[int],
                   seed: int) -> Snapshots:
    """GA+GD (docs/methods.md#ascent_descent): at epoch t, if t ≤ ``ascent_epochs`` one ascent pass over
    F (−CE), then always one descent pass over R (CE).

    Plain SGD with one optimiser for both passes, as in the benchmark; the descent pass repairs the damage the
    ascent does to retain accuracy, and keeps going after ascent stops.
    """
    optimizer = torch.optim.SGD(stack.parameters(), lr=params["lr"])
    forget_seed = model_seed(seed, "forget")
    stack.train()
    for epoch in range(1, max(epochs) + 1):
        if epoch <= params["ascent_epochs"]:
            batches = per_model_batches(len(data.forget_idx), params["forget_batch_size"], stack.seeds,
                                        forget_seed, epoch, data.x_train.device)
            _ce_pass(stack, optimizer, data.x_forget, data.y_forget, batches, sign=-1.0)
        batches = per_model_batches(len(data.retain_idx), params["batch_size"], stack.seeds, seed, epoch,
                                    data.x_train.device)
        _ce_pass(stack, optimizer, data.x_retain, data.y_retain, batches, sign=1.0)
        if epoch in epochs:
            yield epoch, stack


def neggrad_plus(stack: StackedModel, data: UnlearnData, params: dict, epochs: Sequence[int],
                 seed: int) -> Snapshots:
    """NegGrad+ (docs/methods.md#neggrad_plus; RUM ``NG``): retain batches zipped with a cycled stream of forget
    batches, each step minimising α·CE_R − (1−α)·CE_F.

    RUM's shared optimiser (SGD, momentum 0.9, weight decay 5e-4, constant lr). An epoch is one pass over R;
    F restarts (reshuffled) whenever it runs out, so every retain step also sees forget samples.
    """
    optimizer = torch.optim.SGD(stack.parameters(), lr=params["lr"], momentum=params["momentum"],
                                weight_decay=params["weight_decay"])
    alpha = params["alpha"]
    xf, yf, xr, yr = data.x_forget, data.y_forget, data.x_retain, data.y_retain
    forget_seed = model_seed(seed, "forget")
    stack.train()
    for epoch in range(1, max(epochs) + 1):
        forget = cycled_batches(len(yf), params["forget_batch_size"], stack.seeds, forget_seed, epoch, xf.device)
        for ridx in per_model_batches(len(yr), params["batch_size"], stack.seeds, seed, epoch, xr.device):
            fidx = next(forget)
            loss = alpha * stacked_cross_entropy(stack(xr[ridx]), yr[ridx]) \
                - (1 - alpha) * stacked_cross_entropy(stack(xf[fidx]), yf[fidx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if epoch in epochs:
            yield epoch, stack
