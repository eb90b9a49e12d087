"""EasyDUB import at full size: how long `raybench import-easydub` (and the first step of an EasyDUB run) takes,
and what reading the imported Parquet costs against scoring the hub's .npy files directly.

Builds a synthetic folder in the exact hub layout at the published sizes (50,000 train / 10,000 val margins per
model, forget sets of 100), then times, in this process:

* ``import``: ``pipeline.import_source("easydub", …)`` of N originals and N oracles per forget set (margins only);
* ``+ checkpoints``: adding the originals' state dicts stacked per block (what an EasyDUB *run* imports too);
* ``rerun``: the same import again, every unit already committed;
* ``reduce`` vs ``direct``: ``reduce_run`` on the imported folder against the baseline of EasyDUB's own
  evaluation path (``np.load`` every file, stack, KLOM with the same kernel), which must give the same numbers.

    python bench/import_easydub.py                      # N = 100, forget sets 2, 5, 10
    python bench/import_easydub.py --models 20 --forget-sets 2 --no-checkpoints   # quick
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

N_TRAIN, N_VAL, FORGET_SIZE = 50_000, 10_000, 100


def build_hub(root: Path, models: int, forget_sets: list[str], checkpoints: bool) -> None:
    from raybench import easydub

    rng = np.random.default_rng(0)
    center = rng.normal(4, 3, N_TRAIN).astype(np.float32)

    def save(rel: str, arr: np.ndarray) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, arr)

    pretrain = [center + rng.normal(0, 1.5, N_TRAIN).astype(np.float32) for _ in range(models)]
    for x in range(models):
        save(easydub.pretrain_margins_path("retain", x), pretrain[x])
        save(easydub.pretrain_margins_path("val", x), rng.normal(2, 3, N_VAL).astype(np.float32))
    for fs in forget_sets:
        idx = rng.choice(N_TRAIN, FORGET_SIZE, replace=False).astype(np.int64)
        save(easydub.forget_set_file(fs), idx)
        retain = np.setdiff1d(np.arange(N_TRAIN), idx)
        for x in range(models):
            save(easydub.pretrain_margins_path("forget", x, fs), pretrain[x][idx])
            oracle = center + rng.normal(0, 1.5, N_TRAIN).astype(np.float32)
            oracle[idx] -= 6
            save(easydub.oracle_margins_path(fs, "retain", x), oracle[retain])
            save(easydub.oracle_margins_path(fs, "forget", x), oracle[idx])
            save(easydub.oracle_margins_path(fs, "val", x), rng.normal(2, 3, N_VAL).astype(np.float32))
    if checkpoints:
        import torch

        from raybench.models.resnet9 import resnet9

        for x in range(models):
            torch.manual_seed(x)
            path = root / easydub.checkpoint_file(x)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(resnet9().state_dict(), path)


def direct_scores(root: Path, models: int, fs: str) -> dict[str, np.ndarray]:
    """The baseline: EasyDUB's eval_pretrain path on the .npy files (retain = the 50k file minus F)."""
    from raybench import easydub
    from raybench.metrics import klom

    idx = np.load(root / easydub.forget_set_file(fs))
    out = {}
    for split in ("retain", "forget", "val"):
        oracle = np.stack([np.load(root / easydub.oracle_margins_path(fs, split, x)) for x in range(models)])
        pretrain = np.stack([np.load(root / easydub.pretrain_margins_path(split, x, fs)) for x in range(models)])
        if split == "retain":
            pretrain = np.delete(pretrain, idx, axis=1)
        out[split] = klom(pretrain, oracle)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=100)
    parser.add_argument("--forget-sets", default="2,5,10")
    parser.add_argument("--no-checkpoints", action="store_true")
    parser.add_argument("--block-size", type=int, default=50)
    args = parser.parse_args()
    forget_sets = args.forget_sets.split(",")

    from raybench.metrics import klom, summarize
    from raybench.pipeline import import_source
    from raybench.reduce import reduce_run
    from raybench.store import RunStore

    tmp = Path(tempfile.mkdtemp(prefix="raybench-import-"))
    try:
        t0 = time.perf_counter()
        build_hub(tmp / "hub", args.models, forget_sets, not args.no_checkpoints)
        print(f"synthetic hub: {args.models} originals, {args.models} oracles x forget sets {args.forget_sets}, "
              f"{N_TRAIN} train / {N_VAL} val margins per model ({time.perf_counter() - t0:.1f} s to write)")
        out = str(tmp / "run")
        common = {"block_size": args.block_size}

        t0 = time.perf_counter()
        report = import_source("easydub", tmp / "hub", forget_sets, args.models, out, **common)
        t_import = time.perf_counter() - t0
        models = args.models * (1 + len(forget_sets))
        print(f"import           : {t_import:6.2f} s  ({len(report.units_written)} units, {models} models, "
              f"{models / t_import:.0f} models/s)")
        if not args.no_checkpoints:
            t0 = time.perf_counter()
            import_source("easydub", tmp / "hub", forget_sets, args.models, out, checkpoints=True, **common)
            print(f"+ checkpoints    : {time.perf_counter() - t0:6.2f} s  ({args.models} state dicts stacked in "
                  f"blocks of {args.block_size})")
        t0 = time.perf_counter()
        again = import_source("easydub", tmp / "hub", forget_sets, args.models, out,
                              checkpoints=not args.no_checkpoints, **common)
        print(f"rerun            : {time.perf_counter() - t0:6.2f} s  ({len(again.units_skipped)} units skipped, "
              f"{len(again.units_written)} written)")

        klom(np.zeros((2, 8), np.float32), np.ones((2, 8), np.float32))  # compile the kernel outside the timings
        t0 = time.perf_counter()
        rows = reduce_run(RunStore(out))
        t_reduce = time.perf_counter() - t0
        t0 = time.perf_counter()
        direct = {fs: direct_scores(tmp / "hub", args.models, fs) for fs in forget_sets}
        t_direct = time.perf_counter() - t0
        worst = 0.0
        for row in rows:
            expected = summarize(direct[row["forget_set"]][row["split"]], prefix="klom_")
            worst = max(worst, *(abs(row[k] - v) for k, v in expected.items()))
        print(f"reduce (Parquet) : {t_reduce:6.2f} s   direct from .npy: {t_direct:6.2f} s   "
              f"ratio direct/reduce {t_direct / t_reduce:.2f}x   max |difference| in the summary {worst:.1e}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
