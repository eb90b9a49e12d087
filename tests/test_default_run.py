"""The README's first command, end to end: ``raybench run --methods all`` on the embedded digits data writes the
summary.csv stored in ``tests/data/default_summary.csv``: the same rows, in order, and in every column the stored
copy has the same text, byte for byte (columns added since, appended after them, are not in the copy).

The stored copy was written by raybench before the pipeline and sources restructuring (format version 2, with
the ``oracle_floor`` rows): moving code between modules must not change one number. It holds on the CPUs CI runs
on (every CPU worker trains with one torch thread whatever the core count, ``engine.runtime.worker_options``); a
change that alters results on purpose (a version bump) regenerates it with ``raybench run --methods all --out DIR``
and says why in the commit.

Columns are only ever added (docs/metrics.md#summary-columns): the run's summary.csv is compared, row by row, on
the columns the stored copy has, as text; columns added since (the intervals, …) are checked by their own tests.
"""

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

STORED = Path(__file__).parent / "data" / "default_summary.csv"


def test_the_default_run_reproduces_the_stored_summary(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-m", "raybench.cli", "run", "--methods", "all", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    stored_text, text = STORED.read_text(), (out / "summary.csv").read_text()
    stored, header = stored_text.splitlines()[0].split(","), text.splitlines()[0].split(",")
    assert header[: len(stored)] == stored  # the stored columns first, in their order; new ones only appended
    stored_rows, rows = csv.DictReader(io.StringIO(stored_text)), csv.DictReader(io.StringIO(text))
    n = 0
    for n, (old, new) in enumerate(zip(stored_rows, rows, strict=True), start=1):
        assert {c: new[c] for c in stored} == old, f"row {n}"
    assert n == stored_text.count("\n") - 1
