"""What the KLOM intervals cost the reduce of a finished run: the publish step with and without them.

    python bench/reduce_ci.py RUN                  # RUN: a finished run folder, e.g. of `raybench run --methods all`
    python bench/reduce_ci.py RUN --n-boot 0,100,200 --repeat 3

Each measurement is a fresh process doing what `raybench reduce RUN` does (reduce_run, write_summary, write_report;
imports and numba's cached kernels included), with ``n_boot`` replicates (0: no interval), in turns so that load
from other processes spreads over all settings. Prints wall and CPU seconds (user + sys of the child) per setting,
and checks that every column but the intervals is identical across settings. RUN's summary files and report are
rewritten (with the last setting's rows).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import json, sys
from raybench.reduce import BASE_COLUMNS, reduce_run, write_summary
from raybench.report import write_report
from raybench.store import RunStore
store = RunStore(sys.argv[1])
rows = reduce_run(store, n_boot=int(sys.argv[2]))
write_report(store, write_summary(store, rows))
print(json.dumps([{k: r[k] for k in BASE_COLUMNS} for r in rows]))
"""


def _once(run: str, n_boot: int) -> tuple[float, float, list]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, run, str(n_boot)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}, check=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--n-boot", default="0,200", help="comma-separated replicate counts (0: no interval)")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    settings = [int(b) for b in args.n_boot.split(",")]
    print(f"cores {os.cpu_count()}, load {os.getloadavg()[0]:.1f} at start")
    times: dict[int, list] = {b: [] for b in settings}
    base = None
    for _ in range(args.repeat):
        for b in settings:
            wall, cpu, rows = _once(args.run, b)
            times[b].append((wall, cpu))
            assert base is None or rows == base, "columns other than the intervals changed"
            base = rows
    print(f"load {os.getloadavg()[0]:.1f} at end; every other column identical across settings")
    print("| n_boot | wall s (each run) | CPU s (each run) |")
    print("| --- | --- | --- |")
    for b, ts in times.items():
        print(f"| {b} | {', '.join(f'{w:.1f}' for w, _ in ts)} | {', '.join(f'{c:.1f}' for _, c in ts)} |")


if __name__ == "__main__":
    main()
