"""The README's first command, end to end: ``raybench run --methods all`` on the embedded digits data writes the
summary.csv stored in ``tests/data/default_summary.csv``: the same rows, in order, and in every column the stored
copy has the same text, byte for byte (columns added since, appended after them, are not in the copy).

Bit-identity holds on one kind of machine: a unit's output depends only on the unit and the torch thread count
(every CPU worker trains with one thread, ``engine.runtime.worker_options``), but torch's CPU kernels differ by
CPU vendor, instruction set and torch release, and training amplifies a last-bit difference into another draw of
the same models. So the stored copy carries the machine it was written on
(``tests/data/default_summary.machine.json``): on a matching machine every stored column must match as text; on
another one the rows, their keys and counts must still match exactly, and the scores within what a fresh draw of
100 models moves them (measured between two CPU kinds: klom_mean and klom_p95 within 9 %, accuracies within 0.005).
A change that alters results on purpose (a version bump) regenerates both files with
``raybench run --methods all --out DIR`` and says why in the commit.

Columns are only ever added (docs/metrics.md#summary-columns): the run's summary.csv is compared, row by row, on
the columns the stored copy has; columns added since (the intervals, …) are checked by their own tests.
"""

import csv
import io
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

STORED = Path(__file__).parent / "data" / "default_summary.csv"
MACHINE = Path(__file__).parent / "data" / "default_summary.machine.json"
EXACT = ("forget_set", "method", "params", "epoch", "split", "n_models", "n_oracles", "n_samples", "grad_samples",
         "klom_version", "run")  # what defines a row: identical on every machine
RELATIVE = {"klom_mean": 0.2, "klom_p95": 0.2}  # twice the largest difference seen between two CPU kinds
ABSOLUTE = {"accuracy": 0.02, "oracle_accuracy": 0.02}


def this_machine() -> dict:
    """What torch's CPU results depend on besides the code: its release, the CPU vendor and instruction set."""
    vendor = platform.processor()
    if Path("/proc/cpuinfo").is_file():
        vendor = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                       if line.startswith("vendor_id")), vendor)
    return {"torch": torch.__version__, "cpu_vendor": vendor,
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


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
    exact = json.loads(MACHINE.read_text()) == this_machine()
    print(f"comparing {'every stored column as text' if exact else 'keys exactly, scores within tolerance'}: "
          f"stored on {json.loads(MACHINE.read_text())}, running on {this_machine()}")
    stored_rows, rows = csv.DictReader(io.StringIO(stored_text)), csv.DictReader(io.StringIO(text))
    n = 0
    for n, (old, new) in enumerate(zip(stored_rows, rows, strict=True), start=1):
        if exact:
            assert {c: new[c] for c in stored} == old, f"row {n}"
            continue
        assert {c: new[c] for c in EXACT} == {c: old[c] for c in EXACT}, f"row {n}"
        for column, rel in RELATIVE.items():
            assert math.isclose(float(new[column]), float(old[column]), rel_tol=rel), f"row {n} {column}"
        for column, tol in ABSOLUTE.items():
            assert abs(float(new[column]) - float(old[column])) <= tol, f"row {n} {column}"
    assert n == stored_text.count("\n") - 1
