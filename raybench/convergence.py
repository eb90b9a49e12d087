"""Convergence in N: P95 KLOM per split as the ensembles grow, recomputed from a run folder's stored margins.

KLOM compares two ensembles, and even two ensembles of one recipe differ by a floor that falls roughly as 1/N
(docs/metrics.md#noise-floor), so a row can only be read against rows of the same N. This module answers the next
question, "would more models change the verdict?": for every ensemble of the folder's summary (each method,
do_nothing and the floor) and every size n on a grid up to the run's N, it draws n of the ensemble's models and a
proportional share of its forget set's oracles without replacement, several times (seeded, every draw recorded),
and takes the mean and spread over draws of P95 KLOM per split view (docs/metrics.md#convergence).

Memory stays bounded by one chunk: margins are read one (ensemble, epoch, split, chunk) at a time, as the reducer
reads them, and only per-sample KLOM values (draws × samples of one ensemble) are kept. At the run's N the one
draw is every model, so that point is the summary's P95 bit for bit.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from raybench.metrics import DIRECTIONS, klom, summarize
from raybench.reduce import _groups, read_summary, split_views
from raybench.store import FLOOR_METHOD, RunStore, StoreError, csv_text, margins_matrix

if TYPE_CHECKING:  # matplotlib is imported only when the plot is drawn
    from matplotlib.figure import Figure

COLUMNS = ["forget_set", "method", "params", "epoch", "split", "n_models", "draws", "klom_p95", "klom_p95_sd"]
DEFAULT_DRAWS = 10
DEFAULT_SEED = 0
MAX_DRAWS = 1000
GRID_STEPS = (10, 25, 50)
"""The default grid: 10, 25, 50, 100, 250, 500, 1000, … below the run's N, then N itself."""
SPLITS = ("retain", "forget", "val")


class ConvergenceError(ValueError):
    """Settings that cannot be used with this run folder (a grid size out of range, no draws)."""


@dataclass(frozen=True)
class Subsample:
    """One draw at one size: positions (in model-id order) of the ensemble's models and of the oracles used."""

    n_models: int
    draw: int
    models: np.ndarray
    oracles: np.ndarray

    def to_dict(self) -> dict:
        return {"n_models": self.n_models, "n_oracles": len(self.oracles), "draw": self.draw,
                "models": self.models.tolist(), "oracles": self.oracles.tolist()}


@dataclass(frozen=True)
class Convergence:
    """The rows of convergence.csv and what convergence.json records (settings and every draw)."""

    rows: list[dict]
    record: dict


def default_grid(n: int) -> list[int]:
    """10, 25, 50, 100, 250, … below ``n``, then ``n``: about three points a decade, so a log axis is even."""
    grid, scale = [], 1
    while True:
        for step in GRID_STEPS:
            if step * scale >= n:
                return [*grid, n]
            grid.append(step * scale)
        scale *= 10


def check_grid(grid: Sequence[int] | None, n: int) -> list[int]:
    """The sizes to compute, ascending, the run's N always among them (the point that must equal the summary)."""
    if grid is None:
        return default_grid(n)
    sizes = sorted(set(grid))
    bad = [g for g in sizes if isinstance(g, bool) or not isinstance(g, int) or not 1 <= g <= n]
    if bad:
        raise ConvergenceError(f"ensemble sizes must be integers in 1..{n} (the run's N), got {bad[0]!r}")
    return sorted({*sizes, n})


def subsamples(n_models: int, n_oracles: int, grid: Sequence[int], draws: int, seed: int) -> list[Subsample]:
    """The draws of every size: at size n < N, ``draws`` times n of the N models and round(n·K/N) of the K oracles
    without replacement, from ``numpy.random.default_rng([seed, n, draw])`` (models first, then oracles); at N the
    one draw that there is, every model. Positions are sorted: KLOM does not depend on the models' order."""
    if isinstance(draws, bool) or not isinstance(draws, int) or not 1 <= draws <= MAX_DRAWS:
        raise ConvergenceError(f"draws must be an integer in 1..{MAX_DRAWS}, got {draws!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConvergenceError(f"seed must be a non-negative integer, got {seed!r}")
    out = []
    for n in check_grid(grid, n_models):
        if n == n_models:
            out.append(Subsample(n, 0, np.arange(n_models), np.arange(n_oracles)))
            continue
        k = max(1, (n * n_oracles + n_models // 2) // n_models)
        for d in range(draws):
            rng = np.random.default_rng([seed, n, d])
            models = np.sort(rng.choice(n_models, n, replace=False))
            out.append(Subsample(n, d, models, np.sort(rng.choice(n_oracles, k, replace=False))))
    return out


@dataclass(frozen=True)
class _Entry:
    """One (forget set, method, params, epoch) of the summary, with the files of its ensemble and oracles."""

    forget_set: str
    method: str
    params: str
    epoch: int
    stored_epoch: int | None  # None: the originals' one snapshot, read whatever its epoch
    files: tuple[str, ...]
    oracle_files: tuple[str, ...]
    forget_idx: np.ndarray


def _entries(store: RunStore, summary: dict) -> tuple[list[_Entry], int, int]:
    """The summary's ensembles as the reducer scored them (newest units, model-id order), checked: each is complete
    with the sizes its rows state, computed for its forget set's recorded indices, and its files are intact."""
    role_groups, oracle_groups, method_groups = _groups(store.completed_units())
    original = role_groups["original"]
    out, sizes, units = [], set(), {}
    stale = f"; its summary.json is older than its units: rerun `raybench reduce {store.uri}` first"
    for row in summary["rows"]:
        if row.get("selection"):  # a --select row: half of an ensemble already listed, not one of its own
            continue
        key = (row["forget_set"], row["method"], row["params"], row["epoch"])
        if out and (out[-1].forget_set, out[-1].method, out[-1].params, out[-1].epoch) == key:
            continue
        fs = row["forget_set"]
        oracle = oracle_groups.get(fs)
        group = original if row["method"] == "do_nothing" else method_groups.get(key[:3])
        what = f"{row['method']} {row['params']} on forget set {fs}"
        if oracle is None or group is None or not group.units:
            raise StoreError(f"{store.uri} has no stored ensemble for {what}{stale}")
        if (group.n_models, oracle.n_models) != (row["n_models"], row["n_oracles"]) or (
                group is not original and row["epoch"] not in group.epochs):
            raise StoreError(f"{store.uri}: the stored ensemble of {what} is not the one its summary row scored "
                             f"({group.n_models} models, {oracle.n_models} oracles){stale}")
        forget_idx = store.check_forget_set(fs, oracle.units + (() if group is original else group.units))
        units.update({u.unit_id: u for u in group.units + oracle.units})
        out.append(_Entry(fs, row["method"], row["params"], row["epoch"], None if group is original else row["epoch"],
                          tuple(f for u in group.units for f in u.files),
                          tuple(f for u in oracle.units for f in u.files), forget_idx))
        sizes.add((group.n_models, oracle.n_models))
    if len(sizes) != 1:
        raise StoreError(f"{store.uri}: its ensembles have several sizes {sorted(sizes)}; subsampling needs one N")
    store.verify_units(list(units.values()))
    n_models, n_oracles = sizes.pop()
    return out, n_models, n_oracles


def _chunk(store: RunStore, files: tuple[str, ...], split: str, chunk: int, epoch: int | None, rows: int,
           width: int, what: str) -> np.ndarray:
    matrix = margins_matrix(store.read_margin_files(files, split=split, chunk=chunk, epoch=epoch))
    if matrix.shape != (rows, width):
        raise StoreError(f"{what} {split} chunk {chunk}: stored margins have shape {matrix.shape}, expected "
                         f"{(rows, width)}")
    return matrix


def entry_p95(store: RunStore, entry: _Entry, subs: Sequence[Subsample], n_split: dict[str, int], chunk_size: int,
              n_models: int, n_oracles: int, direction: str = DIRECTIONS[0]) -> dict[str, np.ndarray]:
    """P95 KLOM per split view of one ensemble for every subsample (view -> array over ``subs``), reading one
    chunk of its margins and of its oracles' at a time. KLOM is computed sample by sample, so the draws of one
    size are scored in one call with their columns side by side (draws × chunk width samples): the same numbers,
    without a kernel launch per draw."""
    what = f"{entry.method} {entry.params} on forget set {entry.forget_set}"
    values = {split: np.empty((len(subs), n)) for split, n in n_split.items()}
    by_size: dict[int, list[int]] = {}
    for j, sub in enumerate(subs):
        by_size.setdefault(sub.n_models, []).append(j)
    for split, n in n_split.items():
        for chunk in range(math.ceil(n / chunk_size)):
            cols = slice(chunk * chunk_size, min(n, (chunk + 1) * chunk_size))
            width = cols.stop - cols.start
            oracles = _chunk(store, entry.oracle_files, split, chunk, None, n_oracles, width, f"oracles of {what}")
            models = _chunk(store, entry.files, split, chunk, entry.stored_epoch, n_models, width, what)
            for js in by_size.values():  # one kernel call per size: the draws side by side, as more samples
                wide = klom(np.hstack([models[subs[j].models] for j in js]),
                            np.hstack([oracles[subs[j].oracles] for j in js]), direction=direction)
                values[split][js, cols] = wide.reshape(len(js), width)
    return {view: np.array([summarize(values[source][j, idx])["p95"] for j in range(len(subs))])
            for view, (source, idx) in split_views(entry.forget_idx, n_split).items()}


def convergence(store: RunStore, *, grid: Sequence[int] | None = None, draws: int = DEFAULT_DRAWS,
                seed: int = DEFAULT_SEED) -> Convergence:
    """convergence.csv's rows for every ensemble of the folder's summary (read from summary.json, whose KL
    direction it keeps) at every size of ``grid`` (default ``default_grid``; the run's N is always added), and
    convergence.json's record. ``StoreError`` for a folder that cannot be read so, ``ConvergenceError`` for bad
    settings."""
    summary = read_summary(store)
    identity = summary.get("identity") or {}
    chunk_size = identity.get("chunk_size")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise StoreError(f"{store.path('summary.json')} has no run identity with a chunk_size; rerun "
                         f"`raybench reduce {store.uri}`")
    dataset = store.read_record(store.path("dataset.json"), "dataset.json", {"n_train": int, "n_val": int})
    n_split = {"train": dataset["n_train"], "val": dataset["n_val"]}
    direction = summary.get("kl_direction", DIRECTIONS[0])
    if direction not in DIRECTIONS:
        raise StoreError(f"{store.path('summary.json')} names an unknown KL direction {direction!r}")
    entries, n_models, n_oracles = _entries(store, summary)
    subs = subsamples(n_models, n_oracles, grid, draws, seed)
    sizes = sorted({s.n_models for s in subs})
    rows = []
    for entry in entries:
        p95 = entry_p95(store, entry, subs, n_split, chunk_size, n_models, n_oracles, direction)
        for split in SPLITS:
            for n in sizes:
                picked = np.array([v for v, s in zip(p95[split], subs, strict=True) if s.n_models == n])
                sd = float(picked.std(ddof=1)) if len(picked) > 1 else 0.0 if n == n_models else None
                rows.append({"forget_set": entry.forget_set, "method": entry.method, "params": entry.params,
                             "epoch": entry.epoch, "split": split, "n_models": n, "draws": len(picked),
                             "klom_p95": float(picked.mean()), "klom_p95_sd": sd})
    record = {"run": summary["run"], "klom_version": summary["klom_version"], "kl_direction": direction,
              "n_models": n_models, "n_oracles": n_oracles, "grid": sizes, "draws": draws, "seed": seed,
              "draw_rule": "numpy.random.default_rng([seed, n, draw]): choice(N, n, replace=False) of the models, "
                           "then choice(K, round(n*K/N), replace=False) of the oracles; positions in model-id order; "
                           "at n = N every model, one draw",
              "subsamples": [s.to_dict() for s in subs]}
    return Convergence(rows, record)


def convergence_csv(rows: list[dict]) -> str:
    """The text of convergence.csv (floats as repr, so the run's-N point reads back as the summary's P95)."""
    return csv_text(rows, COLUMNS)


def _label(method: str, params: str, epoch: int, swept: bool) -> str:
    import json

    text = ",".join(f"{k}={v}" for k, v in json.loads(params).items())
    if len(text) > 36:
        text = text[:35] + "…"
    return f"{method} ({text}) ep {epoch}" if swept else f"{method} ep {epoch}"


def convergence_figure(rows: list[dict]) -> Figure:
    """P95 KLOM against N per split (columns) and forget set (rows): one line per (method, params) at its last
    epoch, ± the spread over draws; the floor black and dashed; log x axis ticked at the grid, y from 0."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    forget_sets = list(dict.fromkeys(r["forget_set"] for r in rows))
    last: dict[tuple, int] = {}
    for r in rows:
        key = (r["method"], r["params"])
        last[key] = max(last.get(key, r["epoch"]), r["epoch"])
    settings: dict[str, set[str]] = {}
    for method, params in last:
        settings.setdefault(method, set()).add(params)
    lines = list(last)
    tab20 = colormaps["tab20"].colors
    palette = tab20[0::2] + tab20[1::2]  # ten distinct hues, then their light shades; the marker changes too
    colours = {key: palette[i % len(palette)] for i, key in enumerate(k for k in lines if k[0] != FLOOR_METHOD)}
    sizes = sorted({r["n_models"] for r in rows})
    fig = Figure(figsize=(13, 0.8 + 3.4 * len(forget_sets)))
    axes = fig.subplots(len(forget_sets), len(SPLITS), squeeze=False)
    for i, fs in enumerate(forget_sets):
        for j, split in enumerate(SPLITS):
            ax = axes[i][j]
            for k, (method, params) in enumerate(lines):
                points = sorted((r["n_models"], r["klom_p95"], r["klom_p95_sd"] or 0.0) for r in rows
                                if (r["forget_set"], r["method"], r["params"], r["epoch"], r["split"])
                                == (fs, method, params, last[(method, params)], split))
                if not points:
                    continue
                label = _label(method, params, last[(method, params)], len(settings[method]) > 1)
                style = (dict(color="black", linestyle="--", linewidth=2.4, marker="s", zorder=5,
                              label=f"{label} (noise floor)") if method == FLOOR_METHOD else
                         dict(color=colours[(method, params)], linewidth=1.2, marker="os^Dv*"[k % 6], markersize=4,
                              label=label))
                ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points],
                            capsize=2, **style)
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(FixedLocator(sizes))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xlim(sizes[0] / 1.25, sizes[-1] * 1.25)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.set_title(f"forget set {fs}: {split}", fontsize=10)
            if i == len(forget_sets) - 1:
                ax.set_xlabel("N (models per ensemble)")
            if j == 0:
                ax.set_ylabel("P95 KLOM")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.suptitle("P95 KLOM against ensemble size (mean ± sd over draws of models)")
    fig.tight_layout()
    return fig


def write_convergence(store: RunStore, result: Convergence) -> list[str]:
    """convergence.csv, convergence.json and plots/convergence.png in the run folder, each written atomically by
    the store; returns their paths."""
    import json

    paths = [store.path("convergence.csv"), store.path("convergence.json"), store.path("plots", "convergence.png")]
    store.write_bytes(paths[0], convergence_csv(result.rows).encode())
    store.write_bytes(paths[1], json.dumps(result.record, indent=1).encode())
    buffer = io.BytesIO()
    convergence_figure(result.rows).savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    store.write_bytes(paths[2], buffer.getvalue())
    return paths
