"""Retraining from scratch on the retain set (docs/methods.md#retrain; the compute-vs-KLOM baseline,
docs/metrics.md#noise-floor).

With the full base recipe this is exact unlearning: the models are fresh draws from the oracle distribution,
so their KLOM is the noise floor at this ensemble size. A smaller ``budget`` trains for a fraction of the
recipe's epochs (the schedule compressed accordingly), tracing how much compute forgetting costs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from raybench.ids import model_seed
from raybench.methods.base import Snapshots, UnlearnData, single_snapshot
from raybench.models import StackedModel, build_stack
from raybench.models.stacked import MAX_SEED
from raybench.training import train_stack


def retrain_epochs(budget: float, recipe_epochs: int) -> int:
    """round(budget · recipe epochs), at least 1."""
    if budget <= 0:
        raise ValueError(f"budget must be > 0, got {budget}")
    return max(1, round(budget * recipe_epochs))


def retrain(stack: StackedModel, data: UnlearnData, params: dict, epochs: Sequence[int], seed: int) -> Snapshots:
    """Retrain (docs/methods.md#retrain): train fresh models on R with the base recipe (``data.recipe``)
    for ``retrain_epochs(budget, …)`` epochs.

    Model m restarts from seed ``model_seed(seed, "retrain", stack.seeds[m])`` (reduced below ``MAX_SEED``):
    new initial weights and data order, never an original's or an oracle's. The new weights are copied into
    ``stack``, which is yielded.
    Intermediate epochs of one retraining are not retrains with a smaller budget (the lr schedule spans the
    whole run), so this yields exactly once, under the single requested epoch; sweep ``budget`` instead.
    """
    epoch = single_snapshot("retrain", epochs)
    recipe = dataclasses.replace(data.recipe, epochs=retrain_epochs(params["budget"], data.recipe.epochs))
    param = next(stack.parameters())
    seeds = [model_seed(seed, "retrain", s) % MAX_SEED for s in stack.seeds]
    fresh = build_stack(stack.arch, seeds, stack.input_shape, stack.num_classes)
    fresh = fresh.to(device=param.device, dtype=param.dtype)
    train_stack(fresh, data.x_retain, data.y_retain, recipe)
    stack.load_state_dict(fresh.state_dict())
    stack.train()
    yield epoch, stack
