"""The base training's SGD step on the CPU: ``training._StackSGD`` (torch's SGD kernels called directly, the
default) against the baseline of ``torch.optim.SGD`` stepped by ``LambdaLR`` over the same groups (the step
before). Times the update alone inside real train steps of one part of 25 digits MLPs, then whole train units of
50 MLPs (14 epochs), alternating round by round so that the box's drift hits both; prints medians and ratios, and
whether the two train the models bit for bit alike.

    python bench/stack_sgd.py [--models 50] [--rounds 6]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from raybench import training
from raybench.data import load_dataset
from raybench.models import build_stack


class TorchOptimSGD:
    """The baseline, with ``_StackSGD``'s interface: torch.optim.SGD and LambdaLR as the training used them."""

    def __init__(self, groups: list[dict], recipe: training.Recipe, total_steps: int) -> None:
        self.optimizer = torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum,
                                         weight_decay=recipe.weight_decay)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: training.lr_multiplier(step, total_steps, recipe.warmup_fraction))

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.optimizer.step()
        self.schedule.step()


STEPS = {"direct": training._StackSGD, "torch.optim": TorchOptimSGD}


def _update_us(sgd_class: type, x: torch.Tensor, y: torch.Tensor, recipe: training.Recipe, steps: int) -> float:
    """Mean µs of the update (step and zero_grad) over ``steps`` real steps of a part of 25 MLPs."""
    stack = build_stack("mlp", range(25), (1, 8, 8), 10)
    sgd = sgd_class(training._sgd_groups(stack), recipe, steps)
    gen, spent = torch.Generator().manual_seed(0), 0.0
    for _ in range(steps):
        idx = torch.stack([torch.randperm(len(y), generator=gen)[: recipe.batch_size] for _ in range(25)])
        t0 = time.perf_counter()
        sgd.zero_grad()
        spent += time.perf_counter() - t0
        training._stack_loss(stack, x[idx], y[idx], None).backward()
        t0 = time.perf_counter()
        sgd.step()
        spent += time.perf_counter() - t0
    return spent / steps * 1e6


def _train(sgd_class: type, x: torch.Tensor, y: torch.Tensor, recipe: training.Recipe, models: int
           ) -> tuple[float, torch.nn.Module]:
    """Seconds of one train unit of ``models`` MLPs with ``sgd_class`` as the epoch runner's update."""
    default, training._StackSGD = training._StackSGD, sgd_class
    try:
        stack = build_stack("mlp", range(models), (1, 8, 8), 10)
        t0 = time.perf_counter()
        training.train_stack(stack, x, y, recipe)
        return time.perf_counter() - t0, stack
    finally:
        training._StackSGD = default


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=int, default=50)
    p.add_argument("--rounds", type=int, default=6)
    args = p.parse_args()
    torch.set_num_threads(1)  # as a CPU worker
    ds = load_dataset("digits")
    x, y = torch.tensor(ds.x_train), torch.tensor(ds.y_train)
    recipe = training.default_recipe("digits", "mlp")
    update: dict[str, list[float]] = {name: [] for name in STEPS}
    unit: dict[str, list[float]] = {name: [] for name in STEPS}
    stacks = {}
    for r in range(args.rounds):
        for name in (list(STEPS) if r % 2 == 0 else list(STEPS)[::-1]):
            update[name].append(_update_us(STEPS[name], x, y, recipe, 200))
            seconds, stacks[name] = _train(STEPS[name], x, y, recipe, args.models)
            unit[name].append(seconds)
    same = all(torch.equal(a, b) for a, b in zip(*(s.parameters() for s in stacks.values()), strict=True))
    a, b = (statistics.median(update[name]) for name in STEPS)
    print(f"update of 25 MLPs a step: direct {a:.0f} us, torch.optim {b:.0f} us (medians of {args.rounds})")
    ratios = [base / new for new, base in zip(unit["direct"], unit["torch.optim"], strict=True)]
    a, b = (statistics.median(unit[name]) for name in STEPS)
    print(f"one train unit of {args.models} MLPs ({recipe.epochs} epochs): direct {a:.2f} s, torch.optim {b:.2f} s; "
          f"median ratio {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}); "
          f"bit for bit alike: {same}")


if __name__ == "__main__":
    main()
