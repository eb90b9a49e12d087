"""The base training's step on the CPU: the batch gathered with ``index_select`` (the default) against ``x[idx]``
(before); the loss with its logits padded with -inf to whole runs of ``CPU_LOSS_CLASS_BLOCK``
classes (the default) against the baseline of the 10 classes as they are (the loss before): the loss's forward and
backward alone, then one digits train unit (14 epochs) of the default recipe; prints seconds and ratios.

    python bench/stack_loss.py [--models 50] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from raybench import training
from raybench.data import load_dataset
from raybench.models import build_stack


def _unpadded_loss(stack: torch.nn.Module, xb: torch.Tensor, yb: torch.Tensor, autocast: torch.dtype | None
                   ) -> torch.Tensor:
    """The baseline: ``training._stack_loss`` without the class padding."""
    logits = stack(xb)
    return F.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="sum") / yb.shape[1]


def _loss_seconds(logits: torch.Tensor, y: torch.Tensor, pad: bool, repeats: int) -> float:
    """Best seconds of one forward and backward of the cross-entropy over ``logits`` (M, B, C)."""
    best = float("inf")
    for _ in range(repeats):
        z = logits.detach().requires_grad_()
        t0 = time.perf_counter()
        for _ in range(20):
            zz = training._pad_classes(z) if pad else z
            F.cross_entropy(zz.flatten(0, 1), y.flatten(), reduction="sum").backward()
        best = min(best, (time.perf_counter() - t0) / 20)
    return best


def _gather_seconds(x: torch.Tensor, idx: torch.Tensor, repeats: int) -> tuple[float, float, bool]:
    """Best seconds of gathering a (M, b) batch of rows by ``index_select`` and by ``x[idx]``; whether they agree."""
    best = {"index_select": float("inf"), "indexing": float("inf")}
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(100):
            a = x.index_select(0, idx.flatten()).view(*idx.shape, *x.shape[1:])
        t1 = time.perf_counter()
        for _ in range(100):
            b = x[idx]
        best = {"index_select": min(best["index_select"], (t1 - t0) / 100),
                "indexing": min(best["indexing"], (time.perf_counter() - t1) / 100)}
    return best["index_select"], best["indexing"], torch.equal(a, b)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per setting (best is kept)")
    args = p.parse_args()
    torch.set_num_threads(1)  # as a CPU worker
    ds = load_dataset("digits")
    x, y = torch.tensor(ds.x_train), torch.tensor(ds.y_train)
    recipe = training.default_recipe("digits", "mlp")
    batch = recipe.batch_size
    idx = torch.randint(0, len(y), (args.models, batch))
    selected, indexed, same = _gather_seconds(x, idx, args.repeats)
    print(f"{args.models} x {batch} rows gathered: index_select {selected * 1e6:.0f} us, x[idx] {indexed * 1e6:.0f} us "
          f"-> {indexed / selected:.2f}x; identical: {same}")
    logits = torch.randn(args.models, batch, ds.num_classes) * 3
    labels = torch.randint(0, ds.num_classes, (args.models, batch))
    padded, plain = (_loss_seconds(logits, labels, pad, args.repeats) for pad in (True, False))
    print(f"{args.models} x {batch} logits, loss forward + backward: padded {padded * 1e3:.3f} ms, "
          f"unpadded {plain * 1e3:.3f} ms -> {plain / padded:.2f}x")
    padded_loss, best = training._stack_loss, {"padded": float("inf"), "unpadded": float("inf")}
    try:
        for _ in range(args.repeats):  # alternating, so that the box's drift hits both
            for name, loss in (("padded", padded_loss), ("unpadded", _unpadded_loss)):
                training._stack_loss = loss  # what _loss_fn hands the epoch runner (eager)
                stack = build_stack("mlp", range(args.models), ds.input_shape, ds.num_classes)
                t0 = time.perf_counter()
                training.train_stack(stack, x, y, recipe)
                best[name] = min(best[name], time.perf_counter() - t0)
    finally:
        training._stack_loss = padded_loss
    print(f"one train unit of {args.models} MLPs ({recipe.epochs} epochs): padded {best['padded']:.2f} s, "
          f"unpadded {best['unpadded']:.2f} s -> {best['unpadded'] / best['padded']:.2f}x")


if __name__ == "__main__":
    main()
