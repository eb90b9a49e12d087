"""Ray's overhead: the same units run in a plain in-process loop, then through the Ray engine, in one process.

In-process: one ``UnitContext``, ``run_unit`` on every unit of the plan in order (torch using all cores), each
unit's margins written and committed with plain pyarrow (``RunStore.write_unit``): the work with no scheduling.
Ray: ``pipeline.execute`` on a fresh run folder with Ray already started (its start-up is timed separately):
worker actors (one torch thread each), write waves, manifests. The ratio Ray / in-process is the price of
going through Ray on this machine; on a cluster the same engine spreads the units over many nodes.

    python bench/ray_overhead.py                         # 200 models, 1 forget set: 8 units of 50 models
    python bench/ray_overhead.py --n-models 100 --epochs 5 --block-size 25
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-models", type=int, default=200)
    parser.add_argument("--block-size", type=int, default=50)
    parser.add_argument("--forget-sets", default="1")
    parser.add_argument("--epochs", type=int, help="training epochs (default: the recipe's)")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    args = parser.parse_args()

    from raybench.engine import prepare_ray_environment

    prepare_ray_environment()
    import torch

    from raybench.config import build_config
    from raybench.data import load_dataset
    from raybench.engine import start_ray
    from raybench.pipeline import execute, plan_run
    from raybench.store import RunStore
    from raybench.units import UnitContext, run_unit

    tmp = tempfile.mkdtemp(prefix="raybench-overhead-")
    try:
        options = {"n_models": args.n_models, "block_size": args.block_size, "forget_sets": args.forget_sets,
                   "methods": "do_nothing", "num_cpus": args.num_cpus}
        if args.epochs:
            options["recipe"] = {"epochs": args.epochs}
        config = build_config(None, **options, out=os.path.join(tmp, "inprocess"))
        dataset = load_dataset(config.dataset)
        plan = plan_run(config, dataset)
        models = sum(u.n_models for u in plan.units)
        print(f"{len(plan.units)} units, {models} model trainings ({config.resolved_recipe().epochs} epochs), "
              f"{args.num_cpus} CPUs")

        # -- in-process --------------------------------------------------------------------------------------
        torch.set_num_threads(args.num_cpus)
        t0 = time.perf_counter()
        store = RunStore(config.output_uri())
        run_id = store.open_run({**config.identity(), "data": dataset.fingerprint()})
        for fs_id, fs in plan.forget_sets.items():  # units of a forget set are committed against its record
            store.record_forget_set(fs_id, fs.description, fs.indices)
        ctx = UnitContext.create(run_id=run_id, dataset=dataset, arch=config.resolved_arch,
                                 recipe=config.resolved_recipe().to_dict(), chunk_size=config.chunk_size,
                                 store_uri=store.uri,
                                 forget_indices={k: fs.indices for k, fs in plan.forget_sets.items()})
        unit_s = 0.0
        for unit in plan.units:
            table, meta = run_unit(unit, ctx)
            unit_s += meta["wall_s"]
            store.write_unit(meta, table, row_group_size=config.block_size)
        local_s = time.perf_counter() - t0
        print(f"in-process loop : {local_s:7.1f} s ({models / local_s:.1f} models/s; {unit_s:.1f} s inside units, "
              f"torch threads {args.num_cpus})")

        # -- Ray -----------------------------------------------------------------------------------------------
        t0 = time.perf_counter()
        ray_config = build_config(None, **options, out=os.path.join(tmp, "ray"))
        start_ray(ray_config)
        start_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, _, report = execute(ray_config)
        ray_s = time.perf_counter() - t0
        print(f"Ray start       : {start_s:7.1f} s (once per driver)")
        print(f"Ray engine      : {ray_s:7.1f} s ({models / ray_s:.1f} models/s; {report.n_workers} workers, "
              f"{100 * report.model_share():.0f}% of worker time inside units)")
        print(f"Ray overhead ratio (engine / in-process): {ray_s / local_s:.2f}  "
              f"(with Ray start: {(ray_s + start_s) / local_s:.2f})")
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
