"""``write_report`` on a run folder with every plot drawn in this process (the baseline) and with the plots drawn by
the forked helper processes (the default on Linux with 2+ CPUs), alternating, in one process; prints both, the
ratio, and whether the two wrote the same bytes.

    python bench/report_draw.py RUN [--repeats 2]

RUN is a reduced run folder (``raybench run --methods all`` makes the digits default's); its report.html and
plots/ are rewritten (with the same content).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from raybench import report
from raybench.store import RunStore


def _draw(store: RunStore, summary: dict, helpers: int) -> tuple[float, dict[str, bytes]]:
    report._render_processes = lambda: helpers  # the one seam: how many helpers a page gets
    t0 = time.perf_counter()
    report.write_report(store, summary)
    seconds = time.perf_counter() - t0
    root = Path(store.uri)
    return seconds, {p.name: p.read_bytes() for p in [root / "report.html", *sorted(root.glob("plots/*.png"))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    store = RunStore(args.run)
    summary = json.loads(store.read_bytes(store.path("summary.json")))
    helpers = report._render_processes()
    _draw(store, summary, 0)  # warm: imports, font cache, the folder's files in the page cache
    times: dict[int, list[float]] = {0: [], helpers: []}
    outputs = {}
    for _ in range(args.repeats):
        for n in (0, helpers):
            seconds, outputs[n] = _draw(store, summary, n)
            times[n].append(seconds)
    here, pooled = min(times[0]), min(times[helpers])
    a, b = outputs[0], outputs[helpers]
    differ = sorted(set(a) ^ set(b) | {name for name in a if a[name] != b.get(name)})  # named, to find out why
    same = "yes" if not differ else "no: " + ", ".join(differ)
    print(f"{len(a) - 1} plots; drawn here {here:.1f} s, by {helpers} helper processes {pooled:.1f} s "
          f"(best of {args.repeats}): {here / pooled:.2f}x; same bytes: {same}")


if __name__ == "__main__":
    main()
