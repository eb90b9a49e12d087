"""SCRUB (docs/methods.md#scrub): a student distilled away from its teacher on F and
towards it on R.

The teacher is a frozen copy of the originals; the student *is* the stack. Max passes on F raise the student's
divergence from the teacher there (forgetting), min passes on R pull it back (keeping everything else).

⚠ DUB's SCRUB builds its optimiser on the teacher's parameters, which only ever run under no_grad, so its
student never changes (docs/methods.md#not-copied). Here the optimiser holds the student's parameters and the
teacher has gradients switched off entirely.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from raybench.ids import model_seed
from raybench.methods.base import (
    Snapshots,
    UnlearnData,
    frozen_copy,
    per_model_batches,
    stacked_cross_entropy,
)
from raybench.models import StackedModel

# lr × 0.1 after each of these epochs (DUB / DMMc SCRUB, docs/methods.md#scrub): ×0.1 from epoch 4, ×0.01 from 6 …
LR_MILESTONES = (3, 5, 9)


def scrub_lr(lr: float, epoch: int) -> float:
    """lr·0.1^k at 1-based ``epoch``, k = the number of ``LR_MILESTONES`` strictly below it."""
    return lr * 0.1 ** sum(m < epoch for m in LR_MILESTONES)


def stacked_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sum over models of T²·KL(softmax(t/T) ‖ softmax(s/T)), each model's KL summed over classes and averaged
    over its batch: logits (M, b, C)."""
    log_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = F.kl_div(log_s.flatten(0, 1), log_t.flatten(0, 1), log_target=True, reduction="sum")
    return temperature ** 2 * kl / student_logits.shape[1]


def scrub(stack: StackedModel, data: UnlearnData, params: dict, epochs: Sequence[int], seed: int) -> Snapshots:
    """SCRUB max/min (docs/methods.md#scrub): at epoch t, lr = ``scrub_lr``; if t ≤ ``ascent_epochs`` one max pass on
    F minimising −KD; then one min pass on R minimising γ·CE + α·KD (γ ``ce_weight``, α ``kd_weight``).

    KD = T²·KL(teacher ‖ student) at temperature T; the teacher sees the student's batch. One optimiser (on
    the student) serves both passes, as in RUM. Defaults: γ 0.99 and α 0.1 as in the KLOM benchmark, but SGD
    with momentum 0.9 and weight decay 5e-4 as in DMMc / RUM, because the benchmark's plain SGD barely moves
    the digits models; all are parameters.
    """
    teacher = make_teacher(stack)
    optimizer = torch.optim.SGD(stack.parameters(), lr=params["lr"], momentum=params["momentum"],
                                weight_decay=params["weight_decay"])
    temperature = params["temperature"]
    xf, xr, yr = data.x_forget, data.x_retain, data.y_retain
    forget_seed = model_seed(seed, "forget")
    stack.train()
    for epoch in range(1, max(epochs) + 1):
        for group in optimizer.param_groups:
            group["lr"] = scrub_lr(params["lr"], epoch)
        if epoch <= params["ascent_epochs"]:
            for idx in per_model_batches(len(xf), params["forget_batch_size"], stack.seeds, forget_seed, epoch,
                                         xf.device):
                batch = xf[idx]
                with torch.no_grad():
                    target = teacher(batch)
                loss = -stacked_kd(stack(batch), target, temperature)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        for idx in per_model_batches(len(yr), params["batch_size"], stack.seeds, seed, epoch, xr.device):
            batch = xr[idx]
            with torch.no_grad():
                target = teacher(batch)
            logits = stack(batch)
            loss = params["ce_weight"] * stacked_cross_entropy(logits, yr[idx]) \
                + params["kd_weight"] * stacked_kd(logits, target, temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if epoch in epochs:
            yield epoch, stack


def make_teacher(stack: StackedModel) -> StackedModel:
    """The frozen teacher: a copy of the originals in eval mode with gradients off (a separate function so
    tests can check that it never moves)."""
    return frozen_copy(stack)
