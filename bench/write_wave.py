"""One write wave two ways, in one process on a local Ray: through Ray Data (the baseline: ``from_arrow_refs`` →
``write_parquet`` → commit) and direct (fetched tables written by the driver with pyarrow → commit), the two
paths of ``raybench.engine.writer.write_wave``. Units are shaped like the digits default's (50 models, one
epoch, the train and val splits' margins and top-1 margins); each wave commits into a fresh run folder.

    python bench/write_wave.py [--units 1,3,10] [--models 50] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--units", default="1,3,10", help="units per wave")
    p.add_argument("--models", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3, help="waves per size and path (best is kept)")
    args = p.parse_args()

    from raybench.engine import prepare_ray_environment, start_ray

    prepare_ray_environment()
    import numpy as np
    import ray

    from raybench.engine import writer
    from raybench.plan import Unit
    from raybench.store import Manifest, RunStore, margins_table

    start_ray()
    rng = np.random.default_rng(0)
    n_train, n_val = 1437, 360  # the digits splits

    def wave(n_units: int, tag: str) -> list:
        finished = []
        for i in range(n_units):
            uid = f"{tag}{i:04d}"
            unit = Unit(id=uid, kind="train", role="original", forget_set="none", model_ids=tuple(range(args.models)),
                        seeds=tuple(range(args.models)))
            margins = {s: rng.standard_normal((args.models, n), dtype=np.float32)
                       for s, n in (("train", n_train), ("val", n_val))}
            table = margins_table(run="bench", unit=uid, role="original", method="none", params="{}",
                                  forget_set="none", model_ids=unit.model_ids, seeds=unit.seeds, epoch=1,
                                  margins=margins, top1=margins, chunk_size=8192)
            meta = Manifest(uid, "train", "original", "none", "none", "{}", [1], list(unit.model_ids),
                            list(unit.seeds), table.num_rows).to_dict()
            finished.append((unit, ray.put(table), meta))
        return finished

    def timed(n_units: int, ray_data: bool, tag: str) -> float:
        folder = tempfile.mkdtemp(prefix="raybench-wave-")
        try:
            store = RunStore(folder)
            store.open_run({"bench": "write_wave"})
            finished = wave(n_units, tag)
            t0 = time.perf_counter()
            if ray_data:
                writer._write_ray_data(store, finished, args.models)
            else:
                writer.write_wave(store, finished, args.models)
            seconds = time.perf_counter() - t0
            assert len(store.completed_units()) == n_units
            return seconds
        finally:
            shutil.rmtree(folder)

    timed(1, True, "warm")  # Ray Data's first Dataset starts its executor: not a wave's cost
    print(f"write wave of N units of {args.models} models ({n_train} + {n_val} samples, margins and top-1), "
          f"best of {args.repeats}")
    for n_units in (int(v) for v in args.units.split(",")):
        base = min(timed(n_units, True, f"r{r}") for r in range(args.repeats))
        direct = min(timed(n_units, False, f"d{r}") for r in range(args.repeats))
        print(f"  {n_units:3d} units: Ray Data {base * 1e3:8.1f} ms, direct {direct * 1e3:7.1f} ms: "
              f"{base / direct:5.1f}x")
    ray.shutdown()


if __name__ == "__main__":
    main()
