"""Score one snapshot (train + val margins and top-1 margins) of a digits stack, as a CPU worker does after every
unit, with the default CPU batches (``CPU_EVAL_BUDGET`` samples × models) against the baseline of one batch of
up to 4,096 samples (the default before); prints seconds, the ratio and whether the bits agree. Then, for the
MLP, the scoring forward in place (the default: ReLU and the shared first layer's bias without new buffers)
against the out-of-place forward before, alternating.

    python bench/eval_batch.py [--models 50] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from raybench.data import load_dataset
from raybench.models import build_stack
from raybench.models.mlp import StackedMLP
from raybench.training import compute_scores

BASELINE_BATCH = 4096


def _snapshot(stack: torch.nn.Module, splits: list, batch_size: int | None) -> tuple[float, list[np.ndarray]]:
    """Seconds to score every split, and the scores."""
    t0 = time.perf_counter()
    out = [a for x, y in splits for a in compute_scores(stack, x, y, batch_size=batch_size)]
    return time.perf_counter() - t0, out


def _out_of_place_forward(self: StackedMLP, x: torch.Tensor, shared: bool) -> torch.Tensor:
    """The baseline: the MLP's scoring forward before, every activation a new tensor (shared inputs only)."""
    z = torch.matmul(x.flatten(1), self.fc1.weight) + self.fc1.bias.unsqueeze(1)
    return self.fc3(F.relu(self.fc2(F.relu(z))))


def _in_place_vs_before(models: int, splits: list, repeats: int) -> None:
    stack = build_stack("mlp", range(models), splits[0][0].shape[1:], 10)
    in_place = StackedMLP._forward
    seconds: dict[str, list[float]] = {"in place": [], "before": []}
    scores = {}
    try:
        for r in range(2 * repeats):
            for name in (("in place", "before") if r % 2 == 0 else ("before", "in place")):
                StackedMLP._forward = in_place if name == "in place" else _out_of_place_forward
                spent, scores[name] = _snapshot(stack, splits, None)
                seconds[name].append(spent)
    finally:
        StackedMLP._forward = in_place
    a, b = (statistics.median(seconds[k]) for k in ("in place", "before"))
    same = all(np.array_equal(u, v) for u, v in zip(scores["in place"], scores["before"], strict=True))
    print(f"{models} mlp scoring forward: in place {a:.3f} s, before {b:.3f} s (medians of {2 * repeats}) "
          f"-> {b / a:.2f}x; bits identical: {same}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5, help="timed snapshots per setting (best is kept)")
    args = p.parse_args()
    torch.set_num_threads(1)  # as a CPU worker
    ds = load_dataset("digits")
    splits = [(torch.tensor(ds.x_train), torch.tensor(ds.y_train)), (torch.tensor(ds.x_val), torch.tensor(ds.y_val))]
    for arch in ("mlp", "cnn"):
        stack = build_stack(arch, range(args.models), ds.input_shape, ds.num_classes)
        _snapshot(stack, splits, None), _snapshot(stack, splits, BASELINE_BATCH)  # warm-up
        best = {"default": float("inf"), "baseline": float("inf")}
        for _ in range(args.repeats):  # alternating, so that the box's drift hits both
            for name, batch in (("default", None), ("baseline", BASELINE_BATCH)):
                seconds, out = _snapshot(stack, splits, batch)
                best[name] = min(best[name], seconds)
                if name == "default":
                    default_out = out
                else:
                    same = all(np.array_equal(a, b) for a, b in zip(default_out, out, strict=True))
        print(f"{args.models} {arch}: default batches {best['default']:.3f} s, one batch {best['baseline']:.3f} s "
              f"-> {best['baseline'] / best['default']:.2f}x; bits identical: {same}")
    _in_place_vs_before(args.models, splits, args.repeats)


if __name__ == "__main__":
    main()
