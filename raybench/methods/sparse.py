"""ℓ1-sparse fine-tuning (docs/methods.md#l1_sparse; RUM ``FT_prune``): fine-tune on R with a decaying ℓ1 penalty.

The idea (Jia et al., "model sparsity can simplify machine unlearning") is that pushing weights towards zero
while fine-tuning on R erases more of what only F supported than plain fine-tuning does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from raybench.methods.base import Snapshots, UnlearnData, per_model_batches, stacked_cross_entropy
from raybench.models import StackedModel


def l1_weight(alpha: float, epoch: int, horizon_epochs: int, no_l1_epochs: int) -> float:
    """α_t = α·(1 − t/(E − no_l1_epochs)) for 0-based epoch t = ``epoch`` − 1 below E − no_l1_epochs, else 0.

    RUM lays the schedule over its run length E (``unlearn_epochs``); here E is the parameter
    ``horizon_epochs``, so a snapshot at epoch 3 is the same model whatever later snapshots were requested.
    """
    t, active = epoch - 1, horizon_epochs - no_l1_epochs
    return alpha * (1 - t / active) if t < active else 0.0


def l1_sparse(stack: StackedModel, data: UnlearnData, params: dict, epochs: Sequence[int], seed: int) -> Snapshots:
    """Fine-tune on R minimising CE + α_t·‖θ‖₁ (docs/methods.md#l1_sparse; RUM ``FT_prune``), with ``l1_weight``'s
    schedule.

    RUM's optimiser: SGD with momentum and weight decay, constant lr. ‖θ‖₁ covers every parameter (biases
    too), per model: summed over the stack it is the sum of each model's own penalty, so gradients stay
    per model.
    """
    optimizer = torch.optim.SGD(stack.parameters(), lr=params["lr"], momentum=params["momentum"],
                                weight_decay=params["weight_decay"])
    x, y = data.x_retain, data.y_retain
    stack.train()
    for epoch in range(1, max(epochs) + 1):
        alpha_t = l1_weight(params["alpha"], epoch, params["horizon_epochs"], params["no_l1_epochs"])
        for idx in per_model_batches(len(y), params["batch_size"], stack.seeds, seed, epoch, x.device):
            loss = stacked_cross_entropy(stack(x[idx]), y[idx])
            if alpha_t:
                loss = loss + alpha_t * sum(p.abs().sum() for p in stack.parameters())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if epoch in epochs:
            yield epoch, stack
