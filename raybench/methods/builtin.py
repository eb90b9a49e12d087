"""Built-in unlearning methods (docs/methods.md), each written once against the stacked representation."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from raybench.methods.base import Snapshots, UnlearnData, per_model_batches, stacked_cross_entropy
from raybench.models import StackedModel


def do_nothing() -> None:
    """The originals, unchanged: the upper reference every method must beat (scored from stored margins)."""


def finetune(stack: StackedModel, data: UnlearnData, params: dict, epochs: Sequence[int], seed: int) -> Snapshots:
    """Fine-tune on the retain set with SGD (RUM's ``FT``: momentum 0.9, weight decay 5e-4, constant lr).

    Catastrophic forgetting of F is the hoped-for effect; the retain data keeps accuracy up.
    """
    optimizer = torch.optim.SGD(stack.parameters(), lr=params["lr"], momentum=params["momentum"],
                                weight_decay=params["weight_decay"])
    x, y = data.x_retain, data.y_retain
    stack.train()
    for epoch in range(1, max(epochs) + 1):
        for idx in per_model_batches(len(y), params["batch_size"], stack.seeds, seed, epoch, x.device):
            loss = stacked_cross_entropy(stack(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if epoch in epochs:
            yield epoch, stack
