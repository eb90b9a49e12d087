"""Time ``raybench reduce``'s two halves on a run folder, in a fresh process: the reduce itself (KLOM, intervals,
field metrics, summary and per-sample files) and the report drawn after it, so each is measured against its own
target (the default run's reduce: 30 s on two cores).

    python bench/reduce_parts.py RUN [--n-boot B]
"""

from __future__ import annotations

import argparse
import time

T0, C0 = time.perf_counter(), time.process_time()  # imports count: `raybench reduce` pays them too

from raybench import pipeline  # noqa: E402
from raybench.store import RunStore  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--n-boot", type=int, default=None, help="the intervals' replicates (default: reduce's)")
    args = parser.parse_args()
    marks: dict[str, tuple[float, float]] = {}
    draw = pipeline.write_report

    def timed_report(store: RunStore, summary: dict) -> str:
        marks["report"] = (time.perf_counter(), time.process_time())
        return draw(store, summary)

    pipeline.write_report = timed_report  # the one seam between the halves
    pipeline.summarize(RunStore(args.run), n_boot=args.n_boot)
    t1, c1 = time.perf_counter(), time.process_time()
    r, rc = marks["report"]
    print(f"n_boot={args.n_boot if args.n_boot is not None else 'default'}: reduce {r - T0:.1f} s wall "
          f"{rc - C0:.1f} s CPU (imports included); report {t1 - r:.1f} s wall {c1 - rc:.1f} s CPU")


if __name__ == "__main__":
    main()
