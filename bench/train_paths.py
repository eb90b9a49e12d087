"""Time one train unit of the digits default (50 MLPs, the 14-epoch recipe, one torch thread, as a CPU worker) on
each training path of ``raybench.training.Execution``: stacked (the baseline), per-model, and stacked compiled
(Inductor). Prints each one's seconds and ratio to stacked, the compile warm-up apart, what ``choose_path`` would
pick here, and how far the compiled models are from the eager ones (parameters, margins), next to how far models
of other seeds are.

    python bench/train_paths.py [--models 50] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from raybench.data import load_dataset
from raybench.models import build_stack
from raybench.training import Execution, choose_path, compute_margins, default_recipe, train_stack


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=int, default=50)
    p.add_argument("--repeats", type=int, default=2, help="timed units per path after the first (best is kept)")
    args = p.parse_args()
    torch.set_num_threads(1)
    ds = load_dataset("digits")
    x, y = torch.tensor(ds.x_train), torch.tensor(ds.y_train)
    recipe = default_recipe("digits", "mlp")

    def unit(execution: Execution, first_seed: int) -> tuple[float, dict, torch.nn.Module]:
        stack = build_stack("mlp", range(first_seed, first_seed + args.models), ds.input_shape, ds.num_classes)
        stats: dict = {}
        t0 = time.perf_counter()
        train_stack(stack, x, y, recipe, execution=execution, stats=stats)
        return time.perf_counter() - t0, stats, stack

    unit(Execution(path="stacked"), 10_000)  # warm-up: lazy kernel and allocator initialisation
    rows, models = {}, {}
    for name, execution in (("stacked", Execution(path="stacked")), ("per_model", Execution(path="per_model")),
                            ("stacked compiled", Execution(path="stacked", compile=True))):
        first_s, stats, models[name] = unit(execution, 0)
        best = min(unit(execution, 1000 * (r + 1))[0] for r in range(args.repeats))
        rows[name] = (first_s, stats["compile_s"], best)
    base = rows["stacked"][2]
    print(f"{args.models} digits MLPs, {recipe.epochs} epochs, 1 thread; seconds per unit (best of {args.repeats} "
          "after the first)")
    for name, (first_s, compile_s, best) in rows.items():
        print(f"  {name:<17} {best:7.2f} s  {best / base:5.2f}x stacked   first unit {first_s:6.2f} s "
              f"(compile warm-up {compile_s:.2f} s)")
    choice = choose_path(build_stack("mlp", range(args.models), ds.input_shape, ds.num_classes), x, y, recipe)
    print(f"  choose_path here: {choice['path']} (stacked {choice['stacked_ms']:.3f} ms, per-model "
          f"{choice['per_model_ms']:.3f} ms per model-step)")
    eager, compiled = models["stacked"], models["stacked compiled"]
    param_diff = max((p - q).abs().max().item() for p, q in zip(eager.parameters(), compiled.parameters(),
                                                                strict=True))
    margins = compute_margins(eager, x, y)
    margin_diff = np.abs(margins - compute_margins(compiled, x, y))
    # the scale to judge it by: the same models' margins under other seeds (model m against model m of seeds +M)
    seed_diff = np.abs(margins - compute_margins(unit(Execution(path="stacked"), args.models)[2], x, y))
    same = all(torch.equal(p, q) for p, q in zip(eager.parameters(), models["per_model"].parameters(), strict=True))
    print(f"  per-model models equal to stacked bit for bit: {same}")
    print(f"  compiled vs eager after {recipe.epochs} epochs: max |parameter difference| {param_diff:.2e}, "
          f"|margin difference| mean {margin_diff.mean():.2e}, max {margin_diff.max():.2e}")
    print(f"  eager vs eager of other seeds: |margin difference| mean {seed_diff.mean():.2e}, "
          f"max {seed_diff.max():.2e}")


if __name__ == "__main__":
    main()
