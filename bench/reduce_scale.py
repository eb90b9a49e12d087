"""The reducer at EasyDUB scale: 2,000 unlearned + 2,000 oracle models × 60,000 samples, from synthetic Parquet.

Writes a run folder in raybench's own layout straight with pyarrow (``margins_table`` + ``RunStore.write_unit``:
the same row groups and manifests as a real run, no training), then times ``reduce_run`` on it and reports the
peak memory it added. Every reduce runs in a fresh child process, so its peak RSS is its own and not the
writer's. The "unlearned" ensemble is the originals (scored as ``do_nothing``), exactly as in a real run.

    python bench/reduce_scale.py                       # 2000 + 2000 × (50,000 + 10,000), in-process and Ray
    python bench/reduce_scale.py --models 200 --mode in-process --out /tmp/rs  # smaller, keep the folder

Peak memory is bounded by one chunk of every model (models × chunk_size floats per ensemble, plus the KLOM
kernel's buffers), not by the number of samples.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

FORGET_SET = "1"


def write_run(out: str, *, models: int, n_train: int, n_val: int, block: int, chunk: int, seed: int = 0) -> float:
    """Originals and the oracles of one forget set, in blocks of ``block`` models; returns seconds taken."""
    from raybench.ids import digest
    from raybench.store import RunStore, margins_table

    t0 = time.perf_counter()
    store = RunStore(out)
    store.open_run({"synthetic": "bench/reduce_scale.py", "n_models": models, "chunk_size": chunk,
                    "n_train": n_train, "n_val": n_val, "block_size": block, "seed": seed})
    store.write_json(store.path("dataset.json"), {"name": "synthetic", "n_train": n_train, "n_val": n_val})
    rng = np.random.default_rng(seed)
    forget = np.sort(rng.choice(n_train, size=max(1, n_train // 50), replace=False))
    store.write_json(store.path("forget_sets", f"{FORGET_SET}.json"),
                     {"id": FORGET_SET, "description": "synthetic", "indices": forget.tolist()})
    done = store.completed_units()
    for role, forget_set, shift in (("original", "none", 3.0), ("oracle", FORGET_SET, 2.5)):
        for start in range(0, models, block):
            ids = list(range(start, min(models, start + block)))
            unit = digest({"role": role, "forget_set": forget_set, "ids": ids, "seed": seed})
            if unit in done:
                continue
            margins = {split: rng.normal(shift, 3.0, size=(len(ids), n)).astype(np.float32)
                       for split, n in (("train", n_train), ("val", n_val))}
            top1 = {split: m + rng.exponential(1.0, size=m.shape).astype(np.float32) for split, m in margins.items()}
            table = margins_table(run="synthetic", unit=unit, role=role, method="none", params="{}",
                                  forget_set=forget_set, model_ids=ids, seeds=ids, epoch=1, margins=margins,
                                  chunk_size=chunk, top1=top1)
            store.write_unit({"unit": unit, "kind": "train", "role": role, "forget_set": forget_set,
                              "method": "none", "params": "{}", "epochs": [1], "model_ids": ids, "seeds": ids},
                             table)
    return time.perf_counter() - t0


def reduce_child(out: str, mode: str) -> dict:
    """Runs in a fresh process: time ``reduce_run`` and measure the peak memory it adds."""
    import pyarrow as pa

    from raybench.reduce import reduce_run
    from raybench.store import RunStore

    map_tasks = None
    if mode == "ray":
        from raybench.engine import map_tasks, prepare_ray_environment

        prepare_ray_environment()
        import ray

        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    store = RunStore(out)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, after imports
    t0 = time.perf_counter()
    rows = reduce_run(store, mapper=map_tasks)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    workers_peak = 0.0
    if mode == "ray":  # the reduce ran in Ray's worker processes: ask the (reused) workers for their peak RSS
        import ray

        probe = ray.remote(num_cpus=1)(_peak_rss_mib)
        workers_peak = max(ray.get([probe.remote() for _ in range(4 * int(ray.cluster_resources()["CPU"]))]))
    return {"mode": mode, "seconds": seconds, "rss_baseline_mib": baseline / 1024, "rss_peak_mib": peak / 1024,
            "rss_added_mib": (peak - baseline) / 1024, "arrow_pool_peak_mib": pa.default_memory_pool().max_memory()
            / 2**20, "workers_peak_rss_mib": workers_peak, "rows": rows}


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=2000, help="models per ensemble (unlearned and oracle)")
    parser.add_argument("--train", type=int, default=50_000)
    parser.add_argument("--val", type=int, default=10_000)
    parser.add_argument("--block", type=int, default=50, help="models per unit (file)")
    parser.add_argument("--chunk", type=int, default=8192, help="samples per Parquet row (chunk_size)")
    parser.add_argument("--mode", choices=["in-process", "ray", "both"], default="both")
    parser.add_argument("--out", help="run folder (kept; reused if it holds the same synthetic run)")
    parser.add_argument("--child", nargs=2, metavar=("OUT", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(reduce_child(*args.child)))
        return

    out = args.out or tempfile.mkdtemp(prefix="raybench-reduce-scale-")
    try:
        print(f"writing {args.models} + {args.models} models x ({args.train} + {args.val}) samples to {out} ...",
              flush=True)
        seconds = write_run(out, models=args.models, n_train=args.train, n_val=args.val, block=args.block,
                            chunk=args.chunk)
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
        print(f"  written in {seconds:.1f} s, {size / 2**20:.0f} MiB on disk "
              f"({2 * args.models * (args.train + args.val) * 4 / 2**20:.0f} MiB of float32 margins)")
        results = []
        for mode in (["in-process", "ray"] if args.mode == "both" else [args.mode]):
            proc = subprocess.run([sys.executable, __file__, "--child", out, mode], capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{mode} reduce failed:\n{proc.stderr[-4000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(result)
            print(f"reduce {mode:<10}: {result['seconds']:6.1f} s; peak RSS +{result['rss_added_mib']:.0f} MiB "
                  f"(process {result['rss_peak_mib']:.0f} MiB), Arrow pool peak "
                  f"{result['arrow_pool_peak_mib']:.0f} MiB"
                  + (f" in the driver; Ray workers' peak RSS {result['workers_peak_rss_mib']:.0f} MiB"
                     if mode == "ray" else ""))
        if len(results) == 2:
            same = results[0]["rows"] == results[1]["rows"]
            print(f"rows identical in-process vs Ray tasks: {same}")
            if not same:
                sys.exit(1)
        for row in results[0]["rows"]:
            print(f"  {row['split']:<7} n={row['n_samples']:<6} KLOM p50 {row['klom_p50']:.3f} "
                  f"p95 {row['klom_p95']:.3f}")
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
