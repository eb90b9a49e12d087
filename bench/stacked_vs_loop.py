"""Benchmark: train M digits MLPs as one stack vs. a Python loop over M ordinary models.

Both sides run the default digits/mlp recipe with the same per-model data order, schedule and number of
optimiser steps; the loop trains one plain ``nn.Sequential`` at a time with its own ``torch.optim.SGD``, the
way one would without raybench. The loop is slow, so ``--epochs`` can run it for fewer epochs: every epoch
has the same number of identical-sized steps, so its time is scaled by (recipe epochs / measured epochs),
which the output states. Model initialisation is outside both timings.

    python bench/stacked_vs_loop.py                       # M = 100 and 200, full loop
    python bench/stacked_vs_loop.py --epochs 2 --repeats 3
    python bench/stacked_vs_loop.py --device cuda --epochs 2
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time

import torch
import torch.nn.functional as F
from throughput_common import STACKED  # timed as named: on CUDA `auto` could pick the per-model path
from torch import nn

from raybench.data import load_dataset
from raybench.models import StackedModel, build_stack
from raybench.training import (
    Recipe,
    compute_margins,
    data_order_seed,
    default_recipe,
    lr_multiplier,
    train_stack,
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_loop_baseline(
    models: list[nn.Module], seeds: list[int], x: torch.Tensor, y: torch.Tensor, recipe: Recipe, epochs: int
) -> None:
    """One model after the other, each with its own optimiser: ``epochs`` epochs of the recipe's schedule."""
    n, batch = len(y), recipe.batch_size
    iters = math.ceil(n / batch)
    total = recipe.epochs * iters
    for seed, model in zip(seeds, models, strict=True):
        opt = torch.optim.SGD(
            model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay
        )
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda t: lr_multiplier(t, total, recipe.warmup_fraction)
        )
        gen = torch.Generator().manual_seed(data_order_seed(seed))
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen).to(x.device)
            for k in range(iters):
                idx = perm[k * batch : (k + 1) * batch]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()


def time_stacked(m: int, x, y, recipe: Recipe, device: torch.device) -> tuple[float, StackedModel]:
    stack = build_stack("mlp", range(m), tuple(x.shape[1:]), 10).to(device)
    sync(device)
    start = time.perf_counter()
    train_stack(stack, x, y, recipe, execution=STACKED)
    sync(device)
    return time.perf_counter() - start, stack


def time_loop(m: int, x, y, recipe: Recipe, epochs: int, device: torch.device) -> float:
    seeds = list(range(m))
    stack = build_stack("mlp", seeds, tuple(x.shape[1:]), 10).to(device)
    models = [stack.unstack(i) for i in range(m)]  # plain nn.Sequential(Flatten, Linear, ReLU, ...)
    sync(device)
    start = time.perf_counter()
    train_loop_baseline(models, seeds, x, y, recipe, epochs)
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=int, nargs="+", default=[100, 200], help="stack sizes M")
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs the loop baseline actually runs (default: all); its time is extrapolated",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="torch intra-op threads (default: the CPUs this process may use)",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="time each side this many times, keep the best"
    )
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    recipe = default_recipe("digits", "mlp")
    loop_epochs = min(args.epochs or recipe.epochs, recipe.epochs)
    ds = load_dataset("digits")
    x, y = torch.tensor(ds.x_train, device=device), torch.tensor(ds.y_train, device=device)
    xv, yv = torch.tensor(ds.x_val), torch.tensor(ds.y_val)
    steps = recipe.epochs * math.ceil(len(y) / recipe.batch_size)

    print(
        f"device {device}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
        f"cpu {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"digits/mlp default recipe {recipe.to_dict()}: {steps} SGD steps per model")
    if loop_epochs < recipe.epochs:
        print(
            f"NOTE: the loop baseline runs {loop_epochs} of {recipe.epochs} epochs; its time is scaled by "
            f"{recipe.epochs}/{loop_epochs} (every epoch has the same {steps // recipe.epochs} steps)"
        )

    # Warm up: the first optimiser construction imports torch._dynamo (~2 s), and kernels initialise lazily.
    train_stack(
        build_stack("mlp", [0, 1], ds.input_shape, 10).to(device), x, y, Recipe(1, 64, 0.1, 0.9, 0, 0.5),
        execution=STACKED,
    )
    time_loop(1, x, y, recipe, 1, device)

    print(
        f"{'M':>5} {'stacked s':>10} {'models/s':>9} {'loop s':>10} {'models/s':>9} {'speed-up':>9}  val acc"
    )
    for m in args.models:
        stacked, stack = min(
            (time_stacked(m, x, y, recipe, device) for _ in range(args.repeats)), key=lambda r: r[0]
        )
        loop = min(time_loop(m, x, y, recipe, loop_epochs, device) for _ in range(args.repeats))
        loop_full = loop * recipe.epochs / loop_epochs
        acc = float((compute_margins(stack, xv, yv) > 0).mean())
        scaled = "*" if loop_epochs < recipe.epochs else " "
        print(
            f"{m:>5} {stacked:>10.2f} {m / stacked:>9.1f} {loop_full:>9.2f}{scaled} {m / loop_full:>9.2f} "
            f"{loop_full / stacked:>8.1f}x  {acc:.4f}",
            flush=True,
        )
    if loop_epochs < recipe.epochs:
        print(f"* loop time extrapolated from {loop_epochs} measured epochs")


if __name__ == "__main__":
    main()
