"""Training a block of digits models on the CPU in parts of at most ``CPU_TRAIN_PART`` models (``auto``, the
default) against the baseline of one stacked step over the whole block (``--train-path stacked``), with as many
processes training side by side as a run has workers on this box (they share the last-level cache). Each process
alternates the two, round after round, so the box's drift hits both; prints the median seconds per model and the
median of the per-round ratios, and whether the MLPs come out bit for bit alike.

    python bench/train_parts.py [--models 50] [--rounds 8] [--workers 2] [--mlp-epochs 4] [--cnn-epochs 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import statistics
import time

import torch

from raybench.data import load_dataset
from raybench.models import build_stack
from raybench.training import CPU_TRAIN_PART, Execution, default_recipe, train_stack

PATHS = {"parts": Execution(), "one step": Execution(path="stacked")}


def _train(arch: str, models: int, epochs: int, execution: Execution) -> tuple[float, torch.nn.Module]:
    ds = load_dataset("digits")
    recipe = dataclasses.replace(default_recipe("digits", arch), epochs=epochs)
    stack = build_stack(arch, range(models), ds.input_shape, ds.num_classes)
    t0 = time.perf_counter()
    train_stack(stack, torch.tensor(ds.x_train), torch.tensor(ds.y_train), recipe, execution=execution)
    return time.perf_counter() - t0, stack


def _worker(arch: str, models: int, epochs: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per model of each path, round by round (the order flips every round)."""
    torch.set_num_threads(1)  # as a CPU worker
    seconds: dict[str, list[float]] = {name: [] for name in PATHS}
    _train(arch, models, 1, PATHS["parts"])  # warm-up
    for r in range(rounds):
        for name in (list(PATHS) if r % 2 == 0 else list(PATHS)[::-1]):
            seconds[name].append(_train(arch, models, epochs, PATHS[name])[0] / models)
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=int, default=50)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--mlp-epochs", type=int, default=4)
    p.add_argument("--cnn-epochs", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(1)
    a, b = (_train("mlp", args.models, 2, PATHS[name])[1] for name in PATHS)
    same = all(torch.equal(u, v) for u, v in zip(a.parameters(), b.parameters(), strict=True))
    print(f"{args.models} models, parts of at most {CPU_TRAIN_PART}; MLPs bit for bit alike: {same}")
    with mp.get_context("spawn").Pool(args.workers) as pool:
        for arch, epochs in (("mlp", args.mlp_epochs), ("cnn", args.cnn_epochs)):
            runs = pool.starmap(_worker, [(arch, args.models, epochs, args.rounds)] * args.workers)
            ratios = [one / part for run in runs for one, part in zip(run["one step"], run["parts"], strict=True)]
            medians = {name: statistics.median(s for run in runs for s in run[name]) for name in PATHS}
            print(f"{arch} ({epochs} epochs, {args.workers} processes): parts {medians['parts'] * 1e3:.1f} ms/model, "
                  f"one step {medians['one step'] * 1e3:.1f} ms/model; median ratio one step / parts "
                  f"{statistics.median(ratios):.3f} (quartiles {statistics.quantiles(ratios, n=4)[0]:.3f}, "
                  f"{statistics.quantiles(ratios, n=4)[2]:.3f})")


if __name__ == "__main__":
    main()
