"""Time ``influence``'s WoodFisher direction against the way it was computed before (per-sample gradients with
``vmap``, then the vector recursion six passes per gradient), on the default run's shapes: 50 digits MLPs, forget
set 3, ``num_grads`` 256, one torch thread (as a CPU worker). Prints both, their ratio and how far the two ks differ.

    python bench/influence.py [--models 50] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from raybench.data import load_dataset, resolve_forget_set
from raybench.methods import UnlearnData, get_method
from raybench.methods.base import flatten_per_model, model_generators
from raybench.methods.influence import _per_sample_gradients, _summed_gradient, woodfisher_direction
from raybench.models import build_stack
from raybench.training import default_recipe


def vector_recursion(stack, data: UnlearnData, params: dict, seed: int) -> torch.Tensor:
    """The baseline: every per-sample gradient formed (vmap), the recursion on (M, P) vectors as specified."""
    stack.eval()
    n_f, n_r = len(data.forget_idx), len(data.retain_idx)
    k = (_summed_gradient(stack, data.x_forget, data.y_forget, params["batch_size"]) / (n_f + n_r)
         - _summed_gradient(stack, data.x_retain, data.y_retain, params["batch_size"]) * (n_f / ((n_f + n_r) * n_r)))
    picks = torch.stack([torch.randperm(n_r, generator=g)[:params["num_grads"]]
                         for g in model_generators(stack.seeds, seed, "influence-samples")])
    sample_idx = data.retain_idx[picks].t()
    n = float(len(sample_idx))
    chunk = max(1, (1 << 26) // (stack.n_models * k.shape[1]))
    o = None
    for start in range(0, len(sample_idx), chunk):
        idx = sample_idx[start:start + chunk]
        for g in _per_sample_gradients(stack, data.x_train[idx], data.y_train[idx]):
            if o is None:
                o = g.clone()
                continue
            t = (o * g).sum(1, keepdim=True)
            k = k - ((k * g).sum(1, keepdim=True) / (n + t)) * o
            o = o - (t / (n + t)) * o
    return k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ds = load_dataset("digits")
    x, y = torch.tensor(ds.x_train), torch.tensor(ds.y_train)
    forget = torch.tensor(resolve_forget_set("3", ds).indices)
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[forget] = False
    data = UnlearnData(x, y, forget, torch.nonzero(keep).squeeze(1), ds.num_classes, default_recipe("digits", "mlp"))
    stack = build_stack("mlp", list(range(args.models)), ds.input_shape, ds.num_classes)
    params = get_method("influence").defaults
    times: dict[str, float] = {}
    results: dict[str, torch.Tensor] = {}
    for name, fn in (("vmap + vector recursion", lambda: vector_recursion(stack, data, params, 1)),
                     ("jvp dots + scalar recursion", lambda: flatten_per_model(
                         woodfisher_direction(stack, data, params, 1)))):
        results[name] = fn()  # warm-up: torch.func traces its transforms once
        start = time.perf_counter()
        for _ in range(args.repeats):
            fn()
        times[name] = (time.perf_counter() - start) / args.repeats
        print(f"{name:28s} {times[name]:.3f} s per {args.models}-model direction")
    base, ours = times.values()
    a, b = results.values()
    print(f"ratio baseline / ours: {base / ours:.1f}x; max |k difference| {float((a - b).abs().max()):.2e} "
          f"(max |k| {float(a.abs().max()):.2e})")


if __name__ == "__main__":
    main()
