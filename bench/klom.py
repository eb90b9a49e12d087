"""KLOM speed: raybench's kernel against the reference per-sample loop, in the same process.

    python bench/klom.py                 # 100 models x 50,000 samples vs the reference, then 2,000 x 60,000
    python bench/klom.py --ref-samples 5000   # time the (slow) reference on fewer samples and scale it

Prints the speed ratio, checks that both give identical values, and reports the wall time and the peak extra
resident memory for 2,000 unlearned + 2,000 oracle models x 60,000 samples (the CIFAR-10 train+val size).
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import time
from pathlib import Path

import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from klom_reference import reference_klom  # noqa: E402

from raybench.metrics import klom  # noqa: E402


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=100)
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--ref-samples", type=int, default=None, help="samples timed for the reference (default all)")
    parser.add_argument("--skip-large", action="store_true", help="skip the 2,000 x 60,000 run")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, numba threads {numba.get_num_threads()}, "
          f"numpy {np.__version__}")

    rng = np.random.default_rng(0)
    u = rng.normal(0.5, 1.0, (args.models, args.samples)).astype(np.float32)
    o = rng.normal(0.0, 1.0, (args.models, args.samples)).astype(np.float32)
    klom(u[:, :10], o[:, :10])  # compile / load the cached kernel outside the timing

    fast_times = []
    for _ in range(5):
        t = time.perf_counter()
        fast = klom(u, o)
        fast_times.append(time.perf_counter() - t)
    fast_s = min(fast_times)

    n_ref = args.ref_samples or args.samples
    t = time.perf_counter()
    slow = reference_klom(u[:, :n_ref], o[:, :n_ref])
    ref_s = (time.perf_counter() - t) * args.samples / n_ref
    assert np.array_equal(fast[:n_ref], slow), "fast KLOM differs from the reference"
    note = "" if n_ref == args.samples else f" (timed on {n_ref} samples, scaled)"
    print(f"{args.models} x {args.samples}: reference loop {ref_s:.2f} s{note}, raybench {fast_s * 1e3:.1f} ms "
          f"(best of 5) -> {ref_s / fast_s:.0f}x faster, values identical")

    if args.skip_large:
        return
    del u, o, fast, slow
    # Drawn straight in float32 so that no float64 temporary inflates the high-water mark measured below.
    big_u = rng.standard_normal((2000, 60_000), dtype=np.float32) + np.float32(0.5)
    big_o = rng.standard_normal((2000, 60_000), dtype=np.float32)
    before = _max_rss_mb()
    t = time.perf_counter()
    values = klom(big_u, big_o)
    elapsed = time.perf_counter() - t
    extra = _max_rss_mb() - before
    print(f"2000 x 60000 (+2000 oracles): {elapsed:.2f} s, inputs {2 * big_u.nbytes / 2**20:.0f} MiB, "
          f"peak extra memory {extra:.0f} MiB, mean KLOM {values.mean():.4f}")


if __name__ == "__main__":
    main()
