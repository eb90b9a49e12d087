"""Datamodel matching on digits with an *ideal* datamodel, to set its digits defaults.

    python bench/dmm_digits.py --forget-set 3 --n 100

The datamodel effect is what a perfect datamodel would predict on average: the mean logits of N further originals
minus the mean logits of N further oracles, on every train sample. DMM then runs on N originals (seeds 0..N−1),
and its KLOM is taken against N scoring oracles (seeds 100..), with do_nothing, the oracle-vs-oracle floor and
oracle matching (per-model pairing, matched to the further oracles) as references. A real datamodel is noisier,
so these are the best DMM can do with each setting, not what it will do.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from raybench.data import load_dataset, resolve_forget_set
from raybench.methods import UnlearnData, get_method
from raybench.methods.oracle_matching import eval_logits
from raybench.metrics.klom import klom
from raybench.models import StackedModel, build_stack
from raybench.training import compute_margins, default_recipe, train_stack

SETTINGS = [({"lr": 3e-4}, 4), ({"lr": 1e-3}, 4), ({"lr": 3e-4}, 10), ({"lr": 1e-3}, 10), ({"lr": 3e-3}, 10)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forget-set", default="3")
    parser.add_argument("--n", type=int, default=100)
    args = parser.parse_args()
    n = args.n
    ds = load_dataset("digits")
    x, y = torch.tensor(ds.x_train), torch.tensor(ds.y_train)
    xv, yv = torch.tensor(ds.x_val), torch.tensor(ds.y_val)
    forget = torch.tensor(resolve_forget_set(args.forget_set, ds).indices)
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[forget] = False
    retain = torch.nonzero(keep).squeeze(1)
    recipe = default_recipe("digits", "mlp")

    def trained(first_seed: int, xs: torch.Tensor, ys: torch.Tensor) -> StackedModel:
        seeds = list(range(first_seed, first_seed + n))
        return train_stack(build_stack("mlp", seeds, ds.input_shape, ds.num_classes), xs, ys, recipe)

    t0 = time.perf_counter()
    originals, oracles = trained(0, x, y), trained(100, x[retain], y[retain])
    more_originals, more_oracles = trained(200, x, y), trained(300, x[retain], y[retain])
    print(f"trained {4 * n} models in {time.perf_counter() - t0:.0f} s")
    effect = eval_logits(more_originals, x).mean(0) - eval_logits(more_oracles, x).mean(0)
    data = UnlearnData(x, y, forget, retain, ds.num_classes, recipe, oracles=more_oracles, datamodel_effect=effect)

    def score(stack: StackedModel, name: str) -> None:
        cells = []
        for split, xs, ys in (("retain", x[retain], y[retain]), ("forget", x[forget], y[forget]), ("val", xv, yv)):
            k = klom(compute_margins(stack, xs, ys), compute_margins(oracles, xs, ys))
            cells.append(f"{split} P95 {np.percentile(k, 95):.2f} mean {k.mean():.2f}")
        print(f"{name:<30}", " | ".join(cells), flush=True)

    score(originals, "do_nothing")
    score(more_oracles, "floor (further oracles)")
    om = get_method("oracle_matching")
    score(list(om.fn(originals.select(range(n)), data, dict(om.defaults), (10,), 1))[-1][1], "oracle_matching")
    dmm = get_method("datamodel_matching")
    for override, epochs in SETTINGS:
        out = list(dmm.fn(originals.select(range(n)), data, {**dmm.defaults, **override}, (epochs,), 1))[-1][1]
        score(out, f"dmm lr {override['lr']:g}, {epochs} epochs")


if __name__ == "__main__":
    main()
