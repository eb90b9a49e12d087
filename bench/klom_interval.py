"""Which interval for KLOM summaries covers? Resampling schemes against the known sampling distribution.

    python bench/klom_interval.py                      # Gaussian scenarios, 40 trials each, B = 200
    python bench/klom_interval.py --trials 20 --scenarios null,sparse
    python bench/klom_interval.py --run /tmp/ci-default   # the default run's retain-trained ensembles

Simulation: per scenario, margins are Gaussian per sample (mean ~ N(5, 3²), sd ~ U(0.5, 2) across samples); the
unlearned ensemble is shifted by ``shift`` sd on a share of the samples. The *true* sampling distribution of P95
and of the mean of per-sample KLOM at N (each side) comes from ``--truth`` independent ensemble pairs; its mean is
the estimand (the expected summary at this N, floor included). Then ``--trials`` further independent pairs each
get every scheme's interval, and the table reports how often it contains the estimand and its width against the
true 2.5–97.5 % range. Schemes:

* ``replace``: rows of each ensemble resampled with replacement, percentile interval (Efron–Tibshirani ch. 13);
* ``basic``: the same replicates reflected about the point estimate (2θ̂ − q_hi, 2θ̂ − q_lo);
* ``replace-centred``: the same replicates' quantiles minus their mean, added to the point estimate;
* ``half``: N/2 rows of each ensemble drawn without replacement, quantiles minus their mean added to the point
  estimate, no rescaling (raybench's choice, ``raybench.metrics.bootstrap``; cross-checked against it);
* ``half-sqrt``: the same spread times sqrt(m/N) (the rescaling of subsampling for m ≪ N).

``--run DIR`` reads a finished default run (``raybench run --methods all``) instead: per forget set, the scoring
oracles, the matching oracles and the floor oracles are three independent ensembles of one recipe. The val split
is the same samples for every forget set, so val P95 of disjoint pairs of these ensembles (across forget sets)
are independent draws at N = 100: their spread is an independent estimate of the sampling sd, to compare with the
``half`` interval of each ``oracle_floor`` row (the run's own interval computation, ``reduce_run``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from pathlib import Path

import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from raybench.metrics import klom  # noqa: E402
from raybench.metrics.bootstrap import bootstrap_draws, klom_bootstrap  # noqa: E402

SCENARIOS = {  # name: (samples, share of samples shifted, shift in sd)
    "null": (1500, 0.0, 0.0),
    "sparse": (1500, 0.1, 1.0),
    "dense": (1500, 1.0, 1.0),
    "forget10": (10, 1.0, 2.0),
}
SCHEMES = ("replace", "basic", "replace-centred", "half", "half-sqrt")
STATS = ("p95", "mean")


def _summaries(values: np.ndarray) -> np.ndarray:
    """(…, samples) per-sample KLOM -> (…, 2): P95 (NumPy linear) and mean over samples."""
    return np.stack([np.percentile(values, 95, axis=-1), values.mean(axis=-1)], axis=-1)


def _replicates(u: np.ndarray, o: np.ndarray, rows_u: np.ndarray, rows_o: np.ndarray) -> np.ndarray:
    """(B, 2) summaries of the replicates whose row indices are given; one stacked KLOM call (per-sample KLOM
    depends on its column only, so stacking replicates side by side changes no value)."""
    b, s = len(rows_u), u.shape[1]
    uu = u[rows_u].transpose(1, 0, 2).reshape(rows_u.shape[1], b * s)
    oo = o[rows_o].transpose(1, 0, 2).reshape(rows_o.shape[1], b * s)
    return _summaries(klom(uu, oo).reshape(b, s))


def intervals(u: np.ndarray, o: np.ndarray, n_boot: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every scheme's (2 bounds, 2 stats) interval for one observed pair of ensembles."""
    n_u, n_o = len(u), len(o)
    point = _summaries(klom(u, o))
    wr = _replicates(u, o, rng.integers(0, n_u, (n_boot, n_u)), rng.integers(0, n_o, (n_boot, n_o)))
    half = _replicates(u, o, *[np.stack([rng.permutation(n)[: n // 2] for _ in range(n_boot)]) for n in (n_u, n_o)])
    q = np.percentile(wr, [2.5, 97.5], axis=0)
    qh = np.percentile(half, [2.5, 97.5], axis=0)
    scale = np.sqrt(0.5 * ((n_u // 2) / n_u + (n_o // 2) / n_o))
    return {
        "replace": q,
        "basic": np.stack([2 * point - q[1], 2 * point - q[0]]),
        "replace-centred": point + q - wr.mean(axis=0),
        "half": point + qh - half.mean(axis=0),
        "half-sqrt": point + scale * (qh - half.mean(axis=0)),
    }


def simulate(name: str, n: int, truth_pairs: int, trials: int, n_boot: int, seed: int) -> None:
    samples, share, shift = SCENARIOS[name]
    rng = np.random.default_rng(seed)
    mu, sd = rng.normal(5, 3, samples), rng.uniform(0.5, 2, samples)
    delta = np.where(rng.random(samples) < share, shift, 0.0) * sd

    def pair() -> tuple[np.ndarray, np.ndarray]:
        u = (mu + delta + sd * rng.standard_normal((n, samples))).astype(np.float32)
        return u, (mu + sd * rng.standard_normal((n, samples))).astype(np.float32)

    t0 = time.perf_counter()
    truth = np.array([_summaries(klom(*pair())) for _ in range(truth_pairs)])
    target, true_q = truth.mean(axis=0), np.percentile(truth, [2.5, 97.5], axis=0)
    true_w = true_q[1] - true_q[0]
    got = {k: [] for k in SCHEMES}
    checked = False
    for _ in range(trials):
        u, o = pair()
        for k, v in intervals(u, o, n_boot, rng).items():
            got[k].append(v)
        if not checked:  # the library's interval is the bench's "half" scheme for the same draws
            lib = klom_bootstrap(u, o, n_boot=n_boot, seed=seed)
            draws = bootstrap_draws(n, n, n_boot=n_boot, seed=seed)
            mine = point_plus(u, o, draws.unlearned, draws.oracle)
            assert np.allclose([lib.low["p95"], lib.high["p95"], lib.low["mean"], lib.high["mean"]],
                               [mine[0, 0], mine[1, 0], mine[0, 1], mine[1, 1]], rtol=0, atol=1e-12), (lib, mine)
            checked = True
    print(f"\n### {name}: {samples} samples, {share:.0%} shifted by {shift} sd, N = {n} + {n}; truth from "
          f"{truth_pairs} independent pairs, {trials} trials, B = {n_boot} ({time.perf_counter() - t0:.0f} s)")
    print(f"estimand E[P95] = {target[0]:.4f}, true 95% range width {true_w[0]:.4f} "
          f"(sd {truth[:, 0].std(ddof=1):.4f}); E[mean] = {target[1]:.4f}, width {true_w[1]:.5f} "
          f"(sd {truth[:, 1].std(ddof=1):.5f})")
    print("| scheme | P95 coverage | P95 width / true | mean coverage | mean width / true |")
    print("| --- | --- | --- | --- | --- |")
    for k in SCHEMES:
        v = np.array(got[k])  # trials, 2 bounds, 2 stats
        cover = ((v[:, 0] <= target) & (target <= v[:, 1])).mean(axis=0)
        ratio = (v[:, 1] - v[:, 0]).mean(axis=0) / true_w
        print(f"| {k} | {cover[0]:.2f} | {ratio[0]:.2f} | {cover[1]:.2f} | {ratio[1]:.2f} |")


def point_plus(u: np.ndarray, o: np.ndarray, rows_u: np.ndarray, rows_o: np.ndarray) -> np.ndarray:
    """The ``half`` interval for given draws (bench restatement, to cross-check the library)."""
    point = _summaries(klom(u, o))
    half = _replicates(u, o, rows_u, rows_o)
    return point + np.percentile(half, [2.5, 97.5], axis=0) - half.mean(axis=0)


def real_run(folder: str) -> None:
    """Spread of P95 / mean over independent retain-trained ensembles at N against the run's intervals."""
    from raybench.reduce import reduce_run, split_views
    from raybench.store import RunStore, margins_matrix

    store = RunStore(folder)
    kinds = ("oracle", "matching_oracle", "oracle_floor", "retrain")  # four ensembles of one recipe on the retain set
    parts: dict[tuple[str, str, str], list] = {}
    for u in store.completed_units().values():
        m = u.meta
        kind = m["role"] if m["role"] != "unlearned" else m["method"]
        if kind not in kinds:
            continue
        epoch = None if m["kind"] == "train" else max(m["epochs"])
        for split in ("train", "val"):
            table = store.read_margin_files(u.files, split=split, epoch=epoch)
            parts.setdefault((m["forget_set"], kind, split), []).append((min(m["model_ids"]), margins_matrix(table)))
    ens = {k: np.concatenate([x for _, x in sorted(v, key=lambda t: t[0])]) for k, v in parts.items()}
    info = store.read_json(store.path("dataset.json"))
    n_split = {"train": info["n_train"], "val": info["n_val"]}
    forget_sets = sorted({fs for fs, _, _ in ens})
    t0 = time.perf_counter()
    rows = {(r["forget_set"], r["split"]): r for r in reduce_run(store, methods=[("oracle_floor", "{}")])
            if r["method"] == "oracle_floor"}
    took = time.perf_counter() - t0
    print(f"\n### default run {folder}: per forget set {len(kinds)} independent retain-trained ensembles "
          f"({', '.join(kinds)}) of {ens[(forget_sets[0], 'oracle', 'val')].shape[0]} models")
    print("Independent sd: per forget set, each split of the four ensembles into two disjoint ordered pairs gives two "
          "independent values x1, x2 at N; (x1 - x2)^2 / 2 estimates the variance (averaged over the 12 splits, "
          "pooled over forget sets). Against it, the mean width of the oracle_floor rows' intervals (reduce_run, "
          f"{took:.1f} s).")
    print("| split | stat | independent sd | 3.92 sd | interval width (mean of rows) | width / 3.92 sd |")
    print("| --- | --- | --- | --- | --- | --- |")
    for view in ("retain", "forget", "val"):
        for k, stat in enumerate(STATS):
            variances, widths = [], []
            for fs in forget_sets:
                idx = np.asarray(json.loads(store.read_bytes(store.path(f"forget_sets/{fs}.json")))["indices"])
                source, cols = split_views(idx, n_split)[view]
                mats = {kind: ens[(fs, kind, source)][:, cols] for kind in kinds}
                value = {(a, b): _summaries(klom(mats[a], mats[b]))[k] for a, b in itertools.permutations(kinds, 2)}
                est = []
                for a, b, c, d in _pairings(kinds):
                    est.append((value[(a, b)] - value[(c, d)]) ** 2 / 2)
                variances.append(np.mean(est))
                r = rows[(fs, view)]
                widths.append(r[f"klom_{stat}_ci_high"] - r[f"klom_{stat}_ci_low"])
            sd = float(np.sqrt(np.mean(variances)))
            print(f"| {view} | {stat} | {sd:.4f} | {3.92 * sd:.4f} | {np.mean(widths):.4f} | "
                  f"{np.mean(widths) / (3.92 * sd):.2f} |")
    print("\noracle_floor rows:")
    print("| forget set | split | P95 | interval | mean | interval |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (fs, view), r in rows.items():
        print(f"| {fs} | {view} | {r['klom_p95']:.4f} | [{r['klom_p95_ci_low']:.4f}, {r['klom_p95_ci_high']:.4f}] | "
              f"{r['klom_mean']:.4f} | [{r['klom_mean_ci_low']:.4f}, {r['klom_mean_ci_high']:.4f}] |")
    print("\nval split, floor oracles against scoring oracles, P95 interval of every scheme (B = 200):")
    for fs in forget_sets:
        got = intervals(ens[(fs, "oracle_floor", "val")], ens[(fs, "oracle", "val")], 200, np.random.default_rng(1))
        print(f"  forget set {fs}: " + ", ".join(f"{s} [{v[0, 0]:.3f}, {v[1, 0]:.3f}]" for s, v in got.items()))


def _pairings(kinds: tuple[str, ...]) -> list[tuple[str, str, str, str]]:
    """Every split of four ensembles into two disjoint ordered pairs (a, b), (c, d): 3 matchings × 4 orientations."""
    out = []
    a = kinds[0]
    for b in kinds[1:]:
        c, d = [k for k in kinds if k not in (a, b)]
        for x, y in ((a, b), (b, a)):
            for z, w in ((c, d), (d, c)):
                out.append((x, y, z, w))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--n", type=int, default=100, help="models per ensemble")
    parser.add_argument("--truth", type=int, default=400, help="independent pairs for the true distribution")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--n-boot", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run", default=None, help="a finished default run folder: the real-data check instead")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, numba threads {numba.get_num_threads()}, "
          f"numpy {np.__version__}")
    if args.run:
        real_run(args.run)
        return
    for k, name in enumerate(args.scenarios.split(",")):
        simulate(name, args.n, args.truth, args.trials, args.n_boot, args.seed + k)


if __name__ == "__main__":
    main()
