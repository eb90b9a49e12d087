"""Readable output of a summary: one terminal line per (forget set, method, params, epoch), and in the run folder
``report.html`` with ``plots/*.png``.

P95 KLOM is the headline (lower is better; about 0.6-0.8 at N=100 is the noise floor of two independent
ensembles, docs/metrics.md#noise-floor); accuracies show what the method cost, and ``work`` its compute: samples per
model forwarded with gradients (``grad_samples``; retraining costs epochs × retain size).

The page is built from ``summary.json`` and, where a folder has them, ``per_sample/`` (per-sample KLOM: the CDFs
and the worst samples) and ``convergence.csv`` (P95 against N); the columns of the bootstrap intervals and of the
other metrics are shown when the summary has them. Whatever is absent (a folder written before they existed) is
said in the page as "not computed", never drawn from a substitute. The only margins read are those of the few worst
samples of each method, one chunk at a time, for their histograms. Every KLOM axis starts at 0 (or is logarithmic
where the values span more than two decades, which its label says) and shows the noise floor. Docs:
docs/design.md#report.
"""

from __future__ import annotations

import csv
import html
import io
import json
import logging
import math
import os
import pickle
import re
import struct
import sys
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # matplotlib, numpy, pyarrow and the store are imported only when a report is written
    import numpy as np
    import pyarrow as pa
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from raybench.store import RunStore

log = logging.getLogger(__name__)

SPLITS = ("retain", "forget", "val")
FLOOR = "oracle_floor"  # raybench.store.FLOOR_METHOD, spelt here so that the terminal table needs no pyarrow
RETRAIN = "retrain"
CI_COLUMNS = ("klom_p95_ci_low", "klom_p95_ci_high", "klom_mean_ci_low", "klom_mean_ci_high")
METRIC_COLUMNS = {
    "tow": "ToW (RUM): product of 1 − |accuracy gap| to the oracles over the splits; 1 is best",
    "epsilon_score": "forget score of the NeurIPS 2023 unlearning challenge (ε buckets); 1 is best",
    "challenge_score": "the challenge's final score: forget score × retain and val accuracy ratios; 1 is best",
    "mia_auc": "U-LiRA AUC, per sample, averaged: 0.5 = unlearned models indistinguishable from oracles",
    "svc_mia": "SVC-MIA efficacy: share of forget samples an SVC calls non-members; compare with the floor row",
    "iam_mean": "IAM score U on the forget split: high = looks unlearned; compare with the floor row",
}
"""The other metrics' summary columns (docs/metrics.md), with what a reader needs to read them."""
SIMULATED_FLOOR_P95 = {50: 1.73, 100: 0.65, 200: 0.28, 400: 0.12, 1000: 0.040, 2000: 0.019}
"""P95 KLOM of two independent Gaussian ensembles of N models each (docs/metrics.md#noise-floor): drawn, labelled
as simulated, only where a run measured no floor of its own."""
WORST_SAMPLES = 3
WORST_ENTRIES = 12
OWN_PLOTS = ("p95_forget_set_", "compute_forget_set_", "cdf_forget_set_", "worst_forget_set_",
             "convergence_forget_set_", "klom_p95_forget_set_", "work_forget_set_")
"""Name prefixes of the images this module writes (the last two by older versions): stale ones are removed,
anything else in plots/ (e.g. ``raybench convergence``'s own plot) is left alone."""


def _short_params(params: str, width: int = 28) -> str:
    text = ",".join(f"{k}={v}" for k, v in json.loads(params).items()) or "-"
    return text if len(text) <= width else text[: width - 1] + "…"


def _work(samples: float | None) -> str:
    if samples is None or samples == "":
        return "-"
    samples = float(samples)
    if samples >= 1e6:
        return f"{samples / 1e6:.2f}M"
    return f"{samples / 1e3:.1f}k" if samples >= 1e3 else f"{samples:.0f}"


def _accuracy(value: float | None) -> str:
    """Top-1 accuracy, or "-" where it is not known (models imported with their margins only)."""
    return f"{'-':>11}" if value is None or value == "" else f"{float(value):>11.3f}"


def _entries(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    """(forget set, method, params, epoch) -> split -> row, in summary order: one line of the table."""
    entries: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        entries.setdefault((row["forget_set"], row["method"], row["params"], row["epoch"]), {})[row["split"]] = row
    return entries


def summary_table(rows: list[dict]) -> str:
    """A fixed-width table of P95 KLOM and top-1 accuracy per split, with degenerate-sample counts flagged; the
    rows of ``--select`` (``selection`` set) in a second table under it, since they score half the ensembles."""
    full, selected = _split_selected(rows)
    text = _table(full)
    if selected:
        rules = ", ".join(sorted({r["selection"] for r in selected}))
        text += (f"\n\nselected by {rules} on a tuning half of the models and oracles, scored on the other half "
                 "(N/2: not comparable with the rows above):\n" + _table(selected))
    return text


def _split_selected(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(the full rows, the rows ``--select`` added): the second are halves of ensembles the first hold."""
    return [r for r in rows if not r.get("selection")], [r for r in rows if r.get("selection")]


def _table(rows: list[dict]) -> str:
    keyed = _entries(rows)
    header = (f"{'forget':>6} {'method':<16} {'params':<28} {'ep':>3} {'N':>5}  "
              + "  ".join(f"{'P95 ' + s:>11}" for s in SPLITS) + "  "
              + "  ".join(f"{'acc ' + s:>11}" for s in SPLITS) + f"  {'work':>8}")
    lines = [header, "-" * len(header)]
    for (fs, method, params, epoch), by_split in keyed.items():
        first = next(iter(by_split.values()))
        p95 = []
        for s in SPLITS:
            r = by_split.get(s)
            flag = "*" if r and r["klom_degenerate"] else " "
            p95.append(f"{r['klom_p95']:>10.3f}{flag}" if r else f"{'':>11}")
        acc = [_accuracy(by_split[s]["accuracy"]) if s in by_split else f"{'':>11}" for s in SPLITS]
        lines.append(f"{fs:>6} {method:<16} {_short_params(params):<28} {epoch:>3} {first['n_models']:>5}  "
                     + "  ".join(p95) + "  " + "  ".join(acc) + f"  {_work(first.get('grad_samples')):>8}")
    if any(r["klom_degenerate"] for r in rows):
        lines.append("* some samples are degenerate (every unlearned margin on the top edge): the reference "
                     "scores them 0; see klom_degenerate in summary.csv")
    return "\n".join(lines)


# -- what the plots share ------------------------------------------------------------------------------------------
def _num(value: object) -> float | None:
    """A summary value as a float, None where it is empty (None in JSON, "" in CSV) or not finite."""
    if value is None or value == "":
        return None
    value = float(value)  # type: ignore[arg-type]
    return value if math.isfinite(value) else None


def _by_entry(rows: list[dict], forget_set: str) -> dict[tuple, dict[str, dict]]:
    """(method, params, epoch) -> split -> row, for one forget set, in summary order."""
    return {key[1:]: by_split for key, by_split in _entries(rows).items() if key[0] == forget_set}


def _names(entries: dict[tuple, dict]) -> dict[tuple, str]:
    """(method, params) -> a short name: the method, plus its parameters only where the run sweeps them."""
    settings: dict[str, set[str]] = {}
    for method, params, _ in entries:
        settings.setdefault(method, set()).add(params)
    return {(m, p): m if len(settings[m]) == 1 else f"{m} ({_short_params(p, 36)})" for m, p, _ in entries}


def _final_epochs(entries: dict[tuple, dict]) -> dict[tuple[str, str], int]:
    """(method, params) -> its last scored epoch: the one snapshot a plot with one curve per method shows."""
    final: dict[tuple[str, str], int] = {}
    for method, params, epoch in entries:
        final[(method, params)] = max(epoch, final.get((method, params), epoch))
    return final


@dataclass
class _Styles:
    """One colour and marker per (method, params), the same in every plot of a forget set; do_nothing grey and
    the floor black, as the references they are."""

    styles: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)

    def __call__(self, method: str, params: str) -> tuple[str, str]:
        key = (method, params)
        if key not in self.styles:
            if method == "do_nothing":
                self.styles[key] = ("0.45", "x")
            elif method == FLOOR:
                self.styles[key] = ("black", "D")
            else:
                k = sum(1 for m, _ in self.styles if m not in ("do_nothing", FLOOR))
                self.styles[key] = (f"C{k % 10}", "os^v<>p*hP"[(k // 10 + k) % 10])
        return self.styles[key]


def _floor_n(entries: dict[tuple, dict]) -> int | None:
    """N of the ensembles when every entry has N models and N oracles (the simulated floor is for equal sizes)."""
    sizes = {(r["n_models"], r["n_oracles"]) for by_split in entries.values() for r in by_split.values()}
    if len(sizes) == 1:
        n, k = next(iter(sizes))
        return n if n == k else None
    return None


def simulated_floor(n: int | None) -> float | None:
    """The simulated P95 floor at N (log-log interpolation of ``SIMULATED_FLOOR_P95``; it falls about as 1/N),
    None outside the simulated range."""
    if n is None:
        return None
    known = sorted(SIMULATED_FLOOR_P95)
    if not known[0] <= n <= known[-1]:
        return None
    for lo, hi in zip(known, known[1:], strict=False):
        if lo <= n <= hi:
            t = (math.log(n) - math.log(lo)) / (math.log(hi) - math.log(lo))
            return math.exp((1 - t) * math.log(SIMULATED_FLOOR_P95[lo]) + t * math.log(SIMULATED_FLOOR_P95[hi]))
    return None


@dataclass(frozen=True)
class FloorRef:
    """The noise floor drawn on a KLOM plot of one split: the run's own ``oracle_floor`` row (with its interval
    where computed), else the simulated one at this N, else none (said in the legend's absence and the caption)."""

    value: float | None
    low: float | None
    high: float | None
    label: str


def floor_reference(entries: dict[tuple, dict], split: str) -> FloorRef:
    """The floor of one split of one forget set (see ``FloorRef``)."""
    measured = [by_split[split] for (m, _, _), by_split in entries.items() if m == FLOOR and split in by_split]
    if measured:
        row = measured[-1]
        return FloorRef(_num(row["klom_p95"]), _num(row.get("klom_p95_ci_low")), _num(row.get("klom_p95_ci_high")),
                        f"floor: {FLOOR} (oracles vs oracles, N={row['n_models']})")
    n = _floor_n(entries)
    value = simulated_floor(n)
    if value is not None:
        return FloorRef(value, None, None, f"floor: simulated Gaussian, N={n} (no {FLOOR} row in this run)")
    return FloorRef(None, None, None, f"no floor: no {FLOOR} row, and N outside the simulated table")


def _klom_axis(ax: Axes, values: list[float | None], which: str, label: str) -> None:
    """KLOM on ``which`` ("x" or "y"): linear from 0, or log when the positive values span more than two decades,
    which the label then says."""
    positive = [v for v in values if v is not None and v > 0]
    spans_decades = bool(positive) and max(positive) > 100 * min(positive)
    set_scale, set_lim, set_label = ((ax.set_xscale, ax.set_xlim, ax.set_xlabel) if which == "x"
                                     else (ax.set_yscale, ax.set_ylim, ax.set_ylabel))
    if spans_decades:
        set_scale("log")
        set_label(f"{label} (log scale: the values span decades)")
    else:
        top = max([v for v in values if v is not None] + [1e-3])
        set_lim(0, top * 1.1)
        set_label(label)


PLOT_TIMEOUT_S = 300  # a figure takes 0.5-3 s to draw; far past that its helper is stuck, not slow


def _render_processes() -> int:
    """Helper processes that draw the report's PNGs: one per CPU, up to 2 (the page keeps building meanwhile);
    0 with one CPU, off Linux (fork is the only start that does not re-run the caller's script, and only Linux's
    is safe), or in a process connected to Ray (a forked child would share its gRPC connections)."""
    if not sys.platform.startswith("linux"):
        return 0
    ray = sys.modules.get("ray")  # never imported here: a report needs no Ray
    if ray is not None and ray.is_initialized():
        return 0
    cpus = len(os.sched_getaffinity(0))
    return min(2, cpus) if cpus > 1 else 0


def _png_of_pickled(blob: bytes) -> bytes:
    return _png(pickle.loads(blob))


def _placeholder(name: str) -> str:
    return f"<!--raybench-plot:{name}-->"


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)  # constrained layout already fits the figure: one draw
    return buffer.getvalue()


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) in pixels from a PNG's IHDR chunk."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    return struct.unpack(">II", data[16:24])


def _ci_error(rows: list[dict], column: str = "klom_p95") -> tuple[list[float], list[float]] | None:
    """Asymmetric error-bar lengths (below, above) from the interval columns, None when some row has none."""
    lows = [_num(r.get(f"{column}_ci_low")) for r in rows]
    highs = [_num(r.get(f"{column}_ci_high")) for r in rows]
    if any(v is None for v in lows + highs):
        return None
    points = [float(r[column]) for r in rows]
    return ([max(0.0, p - lo) for p, lo in zip(points, lows, strict=True)],
            [max(0.0, hi - p) for p, hi in zip(points, highs, strict=True)])


def _draw_floor_line(ax: Axes, ref: FloorRef, orientation: str) -> None:
    if ref.value is None:
        return
    line, span = (ax.axhline, ax.axhspan) if orientation == "h" else (ax.axvline, ax.axvspan)
    line(ref.value, color="black", linestyle=":", linewidth=1.6, label=ref.label, zorder=1)
    if ref.low is not None and ref.high is not None:
        span(ref.low, ref.high, color="black", alpha=0.10, linewidth=0, label="floor's interval", zorder=0)


def _figure_legend(fig: Figure, axes) -> None:
    """One legend below the panels with every label any panel has (a split may lack a reference another has)."""
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(4, len(labels)), fontsize=8)


# -- P95 with its interval -------------------------------------------------------------------------------------------
def p95_figure(rows: list[dict], forget_set: str) -> Figure:
    """P95 KLOM per split (one panel each) for every (method, params, epoch) of one forget set: a bar from 0, the
    bootstrap interval as whiskers where computed, and the floor as a dotted line (its interval shaded)."""
    import numpy as np
    from matplotlib.figure import Figure

    entries = _by_entry(rows, forget_set)
    names = _names(entries)
    styles = _Styles()
    labels = [f"{names[(m, p)]} · ep {e}" for m, p, e in entries]
    fig = Figure(figsize=(13, 1.6 + 0.32 * len(entries)), layout="constrained")
    axes = fig.subplots(1, len(SPLITS), sharey=True)
    y = np.arange(len(entries))
    for ax, split in zip(axes, SPLITS, strict=True):
        present = [(k, by_split[split]) for k, by_split in enumerate(entries.values()) if split in by_split]
        ys = [k for k, _ in present]
        values = [float(r["klom_p95"]) for _, r in present]
        colours = [styles(r["method"], r["params"])[0] for _, r in present]
        ax.barh(ys, values, height=0.7, color=colours, alpha=0.85)
        error = _ci_error([r for _, r in present])
        if error is not None:
            ax.errorbar(values, ys, xerr=error, fmt="none", ecolor="black", elinewidth=1, capsize=2,
                        label="bootstrap interval")
        ref = floor_reference(entries, split)
        _draw_floor_line(ax, ref, "v")
        highs = [_num(r.get("klom_p95_ci_high")) for _, r in present]
        _klom_axis(ax, values + highs + [ref.value, ref.high], "x", f"P95 KLOM, {split}")
        ax.set_title(f"{split} (lower = closer to the oracles)", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, labels, fontsize=8)
    axes[0].invert_yaxis()
    _figure_legend(fig, axes)
    fig.suptitle(f"forget set {forget_set}: P95 of per-sample KLOM", fontsize=11)
    return fig


# -- compute against KLOM --------------------------------------------------------------------------------------------
@dataclass
class ComputePlot:
    """The compute-vs-KLOM figure and what it could not place (rows without a positive ``grad_samples``)."""

    figure: Figure | None
    unplaced: list[str]


def _decade_limits(values: list[float]) -> tuple[float, float]:
    """Log-axis limits on whole decades around the values, at least one decade wide: two labelled ticks or more,
    whatever the data's spread."""
    lo = 10 ** math.floor(math.log10(min(values)))
    hi = 10 ** math.ceil(math.log10(max(values)))
    return (lo, hi * 10) if hi <= lo else (lo, hi)


def _mantissa_label(value: float, _: object = None) -> str:
    """A minor log tick's label, only at 2× and 5× a power of ten (mathtext, as the decade labels)."""
    if value <= 0:
        return ""
    exponent = math.floor(math.log10(value) + 1e-9)
    mantissa = round(value / 10**exponent, 6)
    return f"${mantissa:g}\\times10^{{{exponent}}}$" if mantissa in (2, 5) else ""


# module-level, not lambdas: a figure is pickled to be drawn in a helper process (``_Page``)
def _divide(value: float, by: float) -> float:
    return value / by


def _multiply(value: float, by: float) -> float:
    return value * by


def _plain_label(value: float, _: object = None) -> str:
    return f"{value:g}"


def _plain_mantissa_label(value: float, _: object = None) -> str:
    """The secondary axis' minor label: plain, at the ticks ``_mantissa_label`` labels."""
    return f"{value:g}" if _mantissa_label(value) else ""


def compute_figure(rows: list[dict], forget_set: str) -> ComputePlot:
    """P95 KLOM against compute, one panel per split, like EasyDUB's figure: x = ``grad_samples`` (samples per
    model forwarded with gradients, log), every retrain row (its ``budget`` sweep, or its epochs) joined by one
    line in order of compute, every other method's row a point (labelled by epoch; whiskers: its interval),
    do_nothing and the floor as horizontal references."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogFormatterSciNotation, LogLocator, NullFormatter

    entries = _by_entry(rows, forget_set)
    names = _names(entries)
    styles = _Styles()
    placed: dict[tuple[str, str], list[tuple[str, dict[str, dict]]]] = {}
    unplaced = []
    references = {}
    for (method, params, epoch), by_split in entries.items():
        work = _num(next(iter(by_split.values())).get("grad_samples"))
        if method == "do_nothing":
            references[method] = by_split
        elif method == FLOOR:
            continue  # drawn from floor_reference
        elif work is None or work <= 0:
            unplaced.append(f"{names[(method, params)]} ep {epoch}")
        elif method == RETRAIN:  # one line through every budget; each point says which it is
            setting = _short_params(params, 20)
            several = sum(1 for m, p, _ in entries if (m, p) == (method, params)) > 1
            label = f"ep {epoch}" if setting == "-" else f"{setting} ep {epoch}" if several else setting
            placed.setdefault((RETRAIN, "*"), []).append((label, by_split))
        else:
            placed.setdefault((method, params), []).append((f"ep {epoch}", by_split))
    if not placed:
        return ComputePlot(None, unplaced)
    xs = [float(next(iter(b.values()))["grad_samples"]) for pts in placed.values() for _, b in pts]
    n_retain = next((r["n_samples"] for b in entries.values() for s, r in b.items() if s == "retain"), None)
    fig = Figure(figsize=(15, 5.2), layout="constrained")
    axes = fig.subplots(1, len(SPLITS))
    for ax, split in zip(axes, SPLITS, strict=True):
        ys: list[float | None] = []
        for (method, params), points in placed.items():
            colour, marker = styles(method, params)
            pts = sorted(((float(b[split]["grad_samples"]), e, b[split]) for e, b in points if split in b),
                         key=lambda t: t[0])
            if not pts:
                continue
            x = [w for w, _, _ in pts]
            y = [float(r["klom_p95"]) for _, _, r in pts]
            ys += y + [_num(r.get("klom_p95_ci_high")) for _, _, r in pts]
            error = _ci_error([r for _, _, r in pts])
            if method == RETRAIN:
                ax.plot(x, y, color=colour, marker=marker, markersize=5, linewidth=2, label="retrain (budgets)",
                        zorder=3)
            else:
                ax.plot(x, y, color=colour, marker=marker, markersize=7, linestyle="none",
                        label=names[(method, params)], zorder=3)
            if error is not None:
                ax.errorbar(x, y, yerr=error, fmt="none", ecolor=colour, elinewidth=1, capsize=2, zorder=2)
            for w, text, r in pts:
                ax.annotate(text, (w, float(r["klom_p95"])), fontsize=6, xytext=(3, 3), textcoords="offset points")
        if "do_nothing" in references and split in references["do_nothing"]:
            value = float(references["do_nothing"][split]["klom_p95"])
            ax.axhline(value, color="0.45", linestyle="--", linewidth=1.4, label="do_nothing (the originals)")
            ys.append(value)
        ref = floor_reference(entries, split)
        _draw_floor_line(ax, ref, "h")
        _klom_axis(ax, ys + [ref.value, ref.high], "y", f"P95 KLOM, {split}")
        ax.set_xscale("log")
        ax.set_xlim(*_decade_limits(xs))
        ax.xaxis.set_major_locator(LogLocator(base=10))
        ax.xaxis.set_major_formatter(LogFormatterSciNotation(base=10))
        ax.xaxis.set_minor_locator(LogLocator(base=10, subs=tuple(range(2, 10))))
        narrow = ax.get_xlim()[1] <= 10 * ax.get_xlim()[0]  # one decade: label 2× and 5× too
        ax.xaxis.set_minor_formatter(FuncFormatter(_mantissa_label) if narrow else NullFormatter())
        ax.set_xlabel("compute: samples per model forwarded with gradients (log)")
        if n_retain:
            top = ax.secondary_xaxis("top", functions=(partial(_divide, by=n_retain), partial(_multiply, by=n_retain)))
            top.xaxis.set_major_formatter(FuncFormatter(_plain_label))
            top.xaxis.set_minor_formatter(FuncFormatter(_plain_mantissa_label) if narrow else NullFormatter())
            top.set_xlabel(f"= passes over the retain set ({n_retain} samples)", fontsize=8)
        ax.set_title(split, fontsize=10)
        ax.grid(which="major", alpha=0.3)
    _figure_legend(fig, axes)
    fig.suptitle(f"forget set {forget_set}: compute against P95 KLOM (lower left is better)", fontsize=11)
    return ComputePlot(fig, unplaced)


# -- per-sample KLOM -------------------------------------------------------------------------------------------------
def read_per_sample(store: RunStore, forget_set: str) -> pa.Table | None:
    """The per-sample KLOM of one forget set (``per_sample/forget_set=<fs>/*.parquet``), only the columns the
    report uses; None when the folder has none."""
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    folder = store.path("per_sample", f"forget_set={forget_set}")
    infos = store.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet"))
    if not files:
        return None
    columns = ["method", "params", "epoch", "split", "sample_id", "klom"]
    tables = [pq.read_table(f, filesystem=store.fs, columns=columns, partitioning=None) for f in files]
    table = pa.concat_tables(tables)
    # do_nothing's epoch is null there (the originals' one snapshot) and 0 in the summary
    return table.set_column(2, "epoch", table.column("epoch").fill_null(0))


def _per_sample_values(table: pa.Table) -> dict[tuple[str, str, int, str], tuple[np.ndarray, np.ndarray]]:
    """(method, params, epoch, split) -> (sample ids, KLOM), from a per-sample table: keys in order of first
    appearance, each key's rows in table order. One stable sort of the combined key codes, not a loop over rows
    (a run's per-sample table has a row per sample, epoch and ensemble)."""
    import numpy as np
    import pyarrow.compute as pc

    codes, levels = [], []
    for name in ("method", "params", "epoch", "split"):
        encoded = pc.dictionary_encode(table.column(name).combine_chunks())
        codes.append(encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64))
        levels.append(encoded.dictionary.to_pylist())
    key = np.zeros(table.num_rows, dtype=np.int64)
    for code, level in zip(codes, levels, strict=True):
        key = key * len(level) + code
    order = np.argsort(key, kind="stable")
    starts = np.concatenate([[0], np.flatnonzero(np.diff(key[order])) + 1]) if len(order) else np.zeros(0, int)
    bounds = zip(starts, [*starts[1:], len(order)], strict=True)
    ids, klom = table.column("sample_id").to_numpy(), table.column("klom").to_numpy()
    groups = sorted((order[a], order[a:b]) for a, b in bounds)  # first row of a key = its first appearance
    return {tuple(level[code[first]] for code, level in zip(codes, levels, strict=True)): (ids[at], klom[at])
            for first, at in groups}


def cdf_figure(rows: list[dict], forget_set: str, table: pa.Table) -> Figure:
    """The distribution of per-sample KLOM, one panel per split: for every (method, params) at its last epoch, the
    share of samples with KLOM ≤ x; the floor's own curve dotted black; P95 is where a curve crosses 0.95."""
    import numpy as np
    from matplotlib.figure import Figure

    entries = _by_entry(rows, forget_set)
    names = _names(entries)
    styles = _Styles()
    values = _per_sample_values(table)
    final = _final_epochs(entries)
    fig = Figure(figsize=(15, 4.8), layout="constrained")
    axes = fig.subplots(1, len(SPLITS), sharey=True)
    for ax, split in zip(axes, SPLITS, strict=True):
        top = []
        for (method, params), epoch in final.items():
            found = values.get((method, params, epoch, split))
            if found is None or not len(found[1]):
                continue
            klom = np.sort(found[1])
            share = np.arange(1, len(klom) + 1) / len(klom)
            colour, _ = styles(method, params)
            floor = method == FLOOR
            ax.step(np.concatenate([[0.0], klom]), np.concatenate([[0.0], share]), where="post", color=colour,
                    linestyle=":" if floor else "-", linewidth=2.2 if floor else 1.4,
                    label=f"{names[(method, params)]} · ep {epoch}" + (" (the floor)" if floor else ""))
            top.append(float(klom[-1]))
        ax.axhline(0.95, color="0.6", linewidth=0.8, linestyle="--", label="0.95 (P95)")
        ax.set_xlim(0, max(top + [1e-3]) * 1.05)
        ax.set_ylim(0, 1.0)
        ax.set_xlabel(f"per-sample KLOM, {split} (linear from 0)")
        ax.set_title(split, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("share of samples with KLOM ≤ x")
    _figure_legend(fig, axes)
    fig.suptitle(f"forget set {forget_set}: per-sample KLOM distribution (each method at its last epoch)",
                 fontsize=11)
    return fig


# -- the worst samples' margins ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorstSample:
    """One of a method's worst samples: where it is, its KLOM in per_sample/, and both ensembles' margins."""

    split: str
    sample_id: int
    klom: float
    unlearned: np.ndarray
    oracle: np.ndarray


def worst_samples(table: pa.Table, method: str, params: str, epoch: int, k: int = WORST_SAMPLES
                  ) -> list[tuple[str, int, float]]:
    """The ``k`` samples of a (method, params, epoch) with the highest per-sample KLOM over all three splits:
    (split, sample id, KLOM), worst first; ties broken by split then id, so the choice is stable."""
    import numpy as np
    import pyarrow.compute as pc

    mine = table.filter(pc.and_(pc.and_(pc.equal(table.column("method"), method),
                                        pc.equal(table.column("params"), params)),
                                pc.equal(table.column("epoch"), epoch)))
    splits = mine.column("split").to_pylist()
    ids, klom = mine.column("sample_id").to_numpy(), mine.column("klom").to_numpy().astype(np.float64)
    rank = np.array([SPLITS.index(s) if s in SPLITS else 9 for s in splits], dtype=np.int64)
    worst = np.lexsort((ids, rank, -klom))[:k]  # the last key is the primary one
    return [(splits[i], int(ids[i]), float(klom[i])) for i in worst]


def _newest(units: list) -> list:
    """The units made by the newest code (training, margins, method versions), as the reduce scores them: after a
    version bump the old units stay in the folder, with other margins for the same models."""
    def version(u) -> tuple[int, int, int]:
        v = u.meta.get("code_versions") or {}
        return v.get("training") or 0, v.get("margins") or 0, v.get("method") or 0

    if not units:
        return units
    newest = max(version(u) for u in units)
    return [u for u in units if version(u) == newest]


def ensemble_files(units: list, forget_set: str, method: str, params: str) -> tuple[list[str], list[str]]:
    """(files of the scored ensemble, files of the forget set's oracles) among committed ``units``
    (``RunStore.completed_units``): do_nothing is the originals; anything else is the role ``unlearned`` of
    (forget set, method, params)."""
    if method == "do_nothing":
        chosen = [u for u in units if u.meta["role"] == "original"]
    else:
        chosen = [u for u in units if u.meta["role"] == "unlearned" and u.meta["forget_set"] == forget_set
                  and u.meta["method"] == method and u.meta["params"] == params]
    oracles = [u for u in units if u.meta["role"] == "oracle" and u.meta["forget_set"] == forget_set]
    return ([f for u in _newest(chosen) for f in u.files], [f for u in _newest(oracles) for f in u.files])


class _Margins:
    """Margins of single samples, read one (split, chunk) of an ensemble at a time and kept for the next sample
    in the same chunk: the worst samples cost a few chunks, never a whole file."""

    def __init__(self, store: RunStore) -> None:
        self.store = store
        self.chunk_size = int(store.run_info()["identity"]["chunk_size"])
        self.units = list(store.completed_units().values())  # the manifests, read once for every method
        self.cache: dict[tuple, np.ndarray] = {}

    def column(self, files: list[str], split: str, sample_id: int, epoch: int | None) -> np.ndarray:
        from raybench.store import margins_matrix

        stored = "val" if split == "val" else "train"  # retain and forget are columns of the stored train split
        chunk, at = divmod(sample_id, self.chunk_size)
        key = (tuple(files), stored, chunk, epoch)
        if key not in self.cache:
            table = self.store.read_margin_files(files, split=stored, chunk=chunk, epoch=epoch)
            self.cache = {k: v for k, v in self.cache.items() if k[0] != key[0]}  # one chunk per ensemble
            self.cache[key] = margins_matrix(table)
        return self.cache[key][:, at]


def worst_sample_margins(store: RunStore, forget_set: str, method: str, params: str, epoch: int,
                         chosen: list[tuple[str, int, float]], reader: _Margins | None = None) -> list[WorstSample]:
    """Both ensembles' margins of the chosen samples (``worst_samples``) of one (method, params, epoch)."""
    reader = reader or _Margins(store)
    files, oracle_files = ensemble_files(reader.units, forget_set, method, params)
    if not files or not oracle_files:
        raise LookupError(f"no committed units of {'the originals' if method == 'do_nothing' else method} "
                          f"{params} or of the oracles of forget set {forget_set}")
    stored_epoch = None if method == "do_nothing" else epoch  # the originals have one snapshot
    return [WorstSample(split, sample_id, value, reader.column(files, split, sample_id, stored_epoch),
                        reader.column(oracle_files, split, sample_id, None))
            for split, sample_id, value in chosen]


def _klom_bins(unlearned: np.ndarray, oracle: np.ndarray) -> np.ndarray:
    """The 21 edges KLOM bins this sample with (docs/metrics.md#klom: both clipped to ±100, 20 equal bins over
    their joint range), so that the histograms show what KLOM compares."""
    import numpy as np

    u, o = np.clip(unlearned, -100, 100), np.clip(oracle, -100, 100)
    lo, hi = float(min(u.min(), o.min())), float(max(u.max(), o.max()))
    return np.linspace(lo, hi if hi > lo else lo + 1, 21)


def _bars(ax: object, centres: np.ndarray, heights: np.ndarray, width: float, colour: str, label: str) -> None:
    """A bar chart as one polygon collection (what ``ax.bar`` draws, without one artist per bar): the worst-samples
    figure has 36 panels of 40 bars, and per-bar artists made it the report's slowest part."""
    import numpy as np
    from matplotlib.collections import PolyCollection

    left, right = centres - width / 2, centres + width / 2
    boxes = np.stack([np.stack([left, np.zeros_like(heights)], 1), np.stack([left, heights], 1),
                      np.stack([right, heights], 1), np.stack([right, np.zeros_like(heights)], 1)], 1)
    ax.add_collection(PolyCollection(boxes, facecolors=colour, edgecolors="none", label=label))
    ax.update_datalim([(left.min(), 0.0), (right.max(), float(heights.max(initial=0.0)))])
    ax.autoscale_view()


def worst_figure(groups: list[tuple[str, list[WorstSample]]], forget_set: str,
                 direction: str = "unlearned-oracle") -> Figure:
    """Per (method, params, epoch) a row of its worst samples: for each, the unlearned and oracle margins
    histogrammed side by side on KLOM's own 20 bins (shares of each ensemble, so sizes may differ). Each title
    gives the sample's KLOM from per_sample/, in red with the value the margins read give where the two differ
    (margins read from other units or samples than those scored). ``groups``: (row label, samples)."""
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from raybench.metrics import klom

    columns = max(len(s) for _, s in groups)
    width_in, height_in = 4.2 * columns, 2.5 * len(groups) + 0.8
    fig = Figure(figsize=(width_in, height_in))
    # fixed margins, not constrained layout: with 12 rows x 3 panels the layout solver took most of the report's
    # time (about 9 s a figure on two cores), and every panel here has the same furniture, so one spacing fits all
    spacing = {"left": 0.75 / width_in, "right": 1 - 0.15 / width_in, "bottom": 0.45 / height_in,
               "top": 1 - 0.8 / height_in, "wspace": 0.25, "hspace": 0.75}
    axes = np.atleast_2d(fig.subplots(len(groups), columns, squeeze=False, gridspec_kw=spacing))
    for row, (label, samples) in enumerate(groups):
        for col in range(columns):
            ax = axes[row, col]
            if col >= len(samples):
                ax.set_axis_off()
                continue
            s = samples[col]
            edges = _klom_bins(s.unlearned, s.oracle)
            width = (edges[1] - edges[0]) * 0.42
            centres = (edges[:-1] + edges[1:]) / 2
            for values, shift, colour, name in ((s.unlearned, -0.5, "C3", "unlearned"),
                                                (s.oracle, 0.5, "C0", "oracles")):
                counts, _ = np.histogram(np.clip(values, -100, 100), bins=edges)
                _bars(ax, centres + shift * width, counts / max(1, len(values)), width, colour,
                      f"{name} ({len(values)})")
            again = float(klom(s.unlearned[:, None].astype(np.float32), s.oracle[:, None].astype(np.float32),
                               direction=direction)[0])
            agrees = math.isclose(again, s.klom, rel_tol=1e-6, abs_tol=1e-9)
            title = f"{s.split} #{s.sample_id}: KLOM {s.klom:.3g}"
            if not agrees:
                title += f" (margins read give {again:.3g}!)"
            ax.set_title(title, fontsize=8, color="black" if agrees else "red")
            ax.set_xlabel("margin", fontsize=7)
            ax.tick_params(labelsize=7)
            ax.xaxis.set_major_locator(MaxNLocator(5))
            ax.yaxis.set_major_locator(MaxNLocator(4))
            if col == 0:
                ax.set_ylabel(f"{label}\nshare of models", fontsize=7)
            if row == 0 and col == 0:
                ax.legend(fontsize=7)
    fig.suptitle(f"forget set {forget_set}: the worst samples of each method (highest KLOM), margins of its models "
                 "and of the oracles on KLOM's bins", fontsize=10, y=1 - 0.2 / height_in)
    return fig


# -- N convergence ---------------------------------------------------------------------------------------------------
CONVERGENCE_COLUMNS = ("forget_set", "method", "params", "epoch", "split", "n_models", "draws", "klom_p95",
                       "klom_p95_sd")


def read_convergence(store: RunStore) -> list[dict] | None:
    """``convergence.csv`` (``raybench convergence``) as typed rows; None when the folder has none. A file
    without the contract's columns raises ValueError (said in the page, not drawn)."""
    path = store.path("convergence.csv")
    if not store.exists(path):
        return None
    reader = csv.DictReader(io.StringIO(store.read_bytes(path).decode()))
    missing = [c for c in CONVERGENCE_COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
        raise ValueError(f"convergence.csv has no column {missing[0]!r}")
    rows = []
    for r in reader:
        rows.append({"forget_set": r["forget_set"], "method": r["method"], "params": r["params"],
                     "epoch": int(r["epoch"]) if r["epoch"] not in ("", None) else 0, "split": r["split"],
                     "n_models": int(r["n_models"]), "draws": int(r["draws"]) if r["draws"] else None,
                     "klom_p95": _num(r["klom_p95"]), "klom_p95_sd": _num(r["klom_p95_sd"])})
    return rows


def convergence_figure(rows: list[dict], forget_set: str, convergence: list[dict]) -> Figure | None:
    """P95 KLOM against the ensemble size N, one panel per split: a line per (method, params) at its last epoch,
    ± the sd over subsample draws; the floor's own line dotted black, else the simulated floor over N. None when
    the file has no row of this forget set."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, NullLocator

    mine = [r for r in convergence if r["forget_set"] == forget_set and r["klom_p95"] is not None]
    if not mine:
        return None
    entries = _by_entry(rows, forget_set)
    names = _names(entries) if entries else {}
    styles = _Styles()
    final: dict[tuple[str, str], int] = {}
    for r in mine:
        final[(r["method"], r["params"])] = max(r["epoch"], final.get((r["method"], r["params"]), r["epoch"]))
    ns = sorted({r["n_models"] for r in mine})
    fig = Figure(figsize=(15, 4.8), layout="constrained")
    axes = fig.subplots(1, len(SPLITS))
    for ax, split in zip(axes, SPLITS, strict=True):
        ys: list[float | None] = []
        has_floor = False
        for (method, params), epoch in final.items():
            pts = sorted((r["n_models"], r["klom_p95"], r["klom_p95_sd"]) for r in mine
                         if (r["method"], r["params"], r["epoch"], r["split"]) == (method, params, epoch, split))
            if not pts:
                continue
            colour, marker = styles(method, params)
            floor = method == FLOOR
            has_floor |= floor
            name = names.get((method, params), f"{method} ({_short_params(params)})")
            x, y = [n for n, _, _ in pts], [v for _, v, _ in pts]
            sd = [s or 0.0 for _, _, s in pts]
            ax.errorbar(x, y, yerr=sd, color=colour, marker=marker, markersize=4, capsize=2,
                        linestyle=":" if floor else "-", linewidth=2 if floor else 1.3,
                        label=f"{name} · ep {epoch}" + (" (the floor)" if floor else ""))
            ys += [v + s for v, s in zip(y, sd, strict=True)]
        if not has_floor:
            grid = [n for n in ns if simulated_floor(n) is not None]
            if grid:
                sim = [simulated_floor(n) for n in grid]
                ax.plot(grid, sim, color="black", linestyle=":", linewidth=1.6,
                        label=f"simulated floor (Gaussian; no {FLOOR} in convergence.csv)")
                ys += sim
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(ns))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(ns, [str(n) for n in ns], fontsize=8)
        ax.set_xlim(ns[0] / 1.15, ns[-1] * 1.15)
        ax.set_xlabel("N: models per ensemble (log)")
        _klom_axis(ax, ys, "y", f"P95 KLOM, {split}")
        ax.set_title(split, fontsize=10)
        ax.grid(alpha=0.3)
    _figure_legend(fig, axes)
    fig.suptitle(f"forget set {forget_set}: P95 KLOM against N (subsamples of the run's models; ± sd over draws)",
                 fontsize=11)
    return fig


# -- the HTML page ---------------------------------------------------------------------------------------------------
def _esc(value: object) -> str:
    return html.escape(str(value))


def _fmt(value: object, digits: int = 3) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.4g}"
    return str(value)


def _not_computed(what: str, why: str) -> str:
    return f'<p class="absent"><b>{_esc(what)}: not computed</b> — {_esc(why)}</p>'


def _slug(forget_set: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", forget_set)


def _p95_cell(row: dict | None) -> str:
    if row is None:
        return "<td></td>"
    text = f"{float(row['klom_p95']):.3f}"
    lo, hi = _num(row.get("klom_p95_ci_low")), _num(row.get("klom_p95_ci_high"))
    if lo is not None and hi is not None:
        text += f' <span class="ci">[{lo:.3f}, {hi:.3f}]</span>'
    flag = " *" if row.get("klom_degenerate") else ""
    return f"<td>{text}{flag}</td>"


def _p95_table(rows: list[dict], forget_set: str) -> str:
    """The headline table of one forget set: P95 per split (with its interval where computed), accuracy, N and
    compute per (method, params, epoch)."""
    entries = _by_entry(rows, forget_set)
    names = _names(entries)
    head = ("<tr><th>method</th><th>epoch</th><th>N</th>"
            + "".join(f"<th>P95 {s}</th>" for s in SPLITS) + "".join(f"<th>acc {s}</th>" for s in SPLITS)
            + "<th>grad_samples</th></tr>")
    body = []
    for (method, params, epoch), by_split in entries.items():
        first = next(iter(by_split.values()))
        cls = ' class="ref"' if method in ("do_nothing", FLOOR) else ""
        body.append(f"<tr{cls}><td class='l' title='{_esc(params)}'>{_esc(names[(method, params)])}</td>"
                    f"<td>{_esc(epoch)}</td><td>{_esc(first['n_models'])}</td>"
                    + "".join(_p95_cell(by_split.get(s)) for s in SPLITS)
                    + "".join(f"<td>{_fmt(_num(by_split[s]['accuracy'])) if s in by_split else ''}</td>"
                              for s in SPLITS)
                    + f"<td>{_esc(_work(first.get('grad_samples')))}</td></tr>")
    return f"<table>{head}\n" + "\n".join(body) + "</table>"


def _selection_table(record: dict, forget_set: str) -> str:
    """What ``--select`` chose per method of one forget set: the choice, its P95 on the scoring half, and what
    the leaky choices (best on all the oracles, or on the scoring half itself) report instead."""
    rule = record.get("rule", "?")
    choices = [c for c in record.get("choices", []) if c.get("forget_set") == forget_set]
    if not choices:
        return "<p class='note'>No selection for this forget set.</p>"
    head = ("<tr><th>method</th><th>candidates</th><th>chosen (tuning half)</th>"
            + "".join(f"<th>P95 {s} (scoring half)</th>" for s in SPLITS)
            + f"<th>{_esc(rule)}: honest</th><th>leaky on the scoring half</th><th>flattery</th>"
            "<th>leaky on all oracles (choice, value)</th></tr>")
    body = []
    for c in choices:
        leaky, half = c["leaky"], c["leaky_scoring_half"]
        swept = _swept(record.get("candidates", []), forget_set, c["method"])
        cls = ' class="ref"' if c["method"] in ("do_nothing", FLOOR) else ""
        body.append(f"<tr{cls}><td class='l'>{_esc(c['method'])}</td><td>{_esc(c['candidates'])}</td>"
                    f"<td class='l' title='{_esc(c['params'])}'>{_esc(swept(c['params']))}ep {_esc(c['epoch'])}</td>"
                    + "".join(f"<td>{_fmt(c['scoring'].get(s))}</td>" for s in SPLITS)
                    + f"<td>{_fmt(c['scoring']['rule'])}</td><td title='{_esc(half['params'])}'>"
                    f"{_fmt(half['rule'])} ({_esc(swept(half['params']))}ep {_esc(half['epoch'])})</td>"
                    f"<td>{_fmt(c['flattery'])}</td><td class='l' title='{_esc(leaky['params'])}'>"
                    f"{_esc(swept(leaky['params']))}ep {_esc(leaky['epoch'])}: {_fmt(leaky['rule'])}</td></tr>")
    return (f"<p>Each method's params and epoch chosen by <code>{_esc(rule)}</code> ({_esc(record.get('minimises'))}) "
            f"on a tuning half of the models and oracles, scored on the disjoint other half (N = "
            f"{_esc(record.get('n_models'))} models, {_esc(record.get('n_oracles'))} oracles: not comparable with "
            "the table above). <i>Leaky on the scoring half</i>: the best candidate picked by the numbers that score "
            "it, at the same N; <i>flattery</i> is how much lower that reads than the honest choice. <i>Leaky on all "
            "oracles</i>: the choice and value the table above suggests, at the full N. Rows with "
            "<code>selection</code> in summary.csv (docs/metrics.md#selection-without-leaking).</p>"
            f"<table>{head}\n" + "\n".join(body) + "</table>")


def _swept(candidates: list[dict], forget_set: str, method: str):
    """A labeller of one method's params that names only the parameters its candidates vary ("lr=0.01 · ")."""
    params = [json.loads(c["params"]) for c in candidates if (c.get("forget_set"), c.get("method")) == (forget_set,
                                                                                                          method)]
    keys = sorted({k for p in params for k in p if len({json.dumps(q.get(k)) for q in params}) > 1})

    def label(text: str) -> str:
        p = json.loads(text)
        return "".join(f"{k}={p.get(k)} · " for k in keys)
    return label


def _metric_value(by_split: dict[str, dict], column: str) -> str:
    """One metric of one entry: its value once where every split row that has one agrees (the metrics are
    computed on a split or over all three), else per split."""
    values = {s: _num(r.get(column)) for s, r in by_split.items()}
    known = {s: v for s, v in values.items() if v is not None}
    if not known:
        return ""
    distinct = set(known.values())
    if len(distinct) == 1:
        return _fmt(next(iter(distinct)), 4)
    return ", ".join(f"{s} {_fmt(v, 4)}" for s, v in known.items())


def _metrics_section(rows: list[dict], forget_set: str, settings: dict | None) -> str:
    computed = [c for c in METRIC_COLUMNS if any(_num(r.get(c)) is not None for r in rows)]
    absent = [c for c in METRIC_COLUMNS if c not in computed]
    parts = []
    if computed:
        entries = _by_entry(rows, forget_set)
        names = _names(entries)
        head = "<tr><th>method</th><th>epoch</th>" + "".join(
            f"<th title='{_esc(METRIC_COLUMNS[c])}'>{_esc(c)}</th>" for c in computed) + "</tr>"
        body = [f"<tr><td class='l'>{_esc(names[(m, p)])}</td><td>{_esc(e)}</td>"
                + "".join(f"<td>{_metric_value(b, c)}</td>" for c in computed) + "</tr>"
                for (m, p, e), b in entries.items()]
        legend = "".join(f"<li><code>{_esc(c)}</code>: {_esc(METRIC_COLUMNS[c])}</li>" for c in computed)
        parts.append(f"<table>{head}\n" + "\n".join(body) + f"</table><ul class='small'>{legend}</ul>")
    if absent:
        parts.append(_not_computed(", ".join(absent), "summary.json has no values in these columns "
                                   "(a summary written before they existed, or metrics switched off)"))
    if settings:
        parts.append(f"<details><summary>metric settings</summary><pre>"
                     f"{_esc(json.dumps(settings, indent=2, sort_keys=True))}</pre></details>")
    return "\n".join(parts)


@dataclass
class _Page:
    """What the page collects while its plots are drawn: images (name, alt, caption) and notes per section.

    Drawing a PNG is most of a report's time and holds the GIL, so each figure is pickled to a pool of forked
    helper processes as soon as it is built and the page goes on building the next; ``finish`` writes the PNGs and
    puts each ``<figure>`` (its size read from the PNG) where ``image`` left a placeholder. A figure that cannot be
    pickled, or whose helper died, is drawn here: the bytes are the same either way (one matplotlib, one Agg).
    """

    store: RunStore
    written: list[str] = field(default_factory=list)
    pending: dict[str, tuple[Figure, Future | None, str, str]] = field(default_factory=dict)
    pool: ProcessPoolExecutor | None = None
    helpers: bool = True  # False once the pool broke: the rest is drawn here

    def image(self, name: str, fig: Figure, alt: str, caption: str) -> str:
        self.pending[name] = (fig, self._submit(fig), alt, caption)
        self.written.append(name)
        return _placeholder(name)

    def _submit(self, fig: Figure) -> Future | None:
        if self.pool is None and self.helpers and (n := _render_processes()) > 1:
            import multiprocessing

            self.pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("fork"))
        if self.pool is None:
            return None
        try:
            blob = pickle.dumps(fig)
        except (pickle.PicklingError, TypeError, AttributeError) as err:
            log.debug("figure not picklable (%s): drawn in this process", err)
            return None
        try:
            return self.pool.submit(_png_of_pickled, blob)
        except BrokenProcessPool as err:  # a helper died earlier: no more helpers for this page
            self._stop_helpers(f"the report's helper processes died ({err}): drawing the remaining plots here")
            return None

    def finish(self, page_html: str) -> str:
        """Write every queued PNG and return ``page_html`` with each placeholder replaced by its figure."""
        for name, (fig, future, alt, caption) in self.pending.items():
            data = self._drawn(name, future) if future is not None else None
            data = data if data is not None else _png(fig)
            self.store.write_bytes(self.store.path("plots", name), data)
            width, height = png_size(data)
            page_html = page_html.replace(_placeholder(name), (
                f'<figure><img src="plots/{_esc(name)}" alt="{_esc(alt)}" width="{width}" height="{height}">'
                f"<figcaption>{caption}</figcaption></figure>"))
        self.pending.clear()
        return page_html

    def _drawn(self, name: str, future: Future) -> bytes | None:
        """The helper's PNG of plot ``name``, or None to draw it here (the helpers stopped, hung or died)."""
        if not self.helpers and not future.done():
            return None
        try:
            return future.result(timeout=PLOT_TIMEOUT_S)
        except TimeoutError:  # a helper that hangs (a lock a forked child inherited taken): stop them all
            self._stop_helpers(f"plot {name} not drawn by its helper process in {PLOT_TIMEOUT_S} s: drawing it and "
                               "the rest here", kill=True)
        except BrokenProcessPool as err:  # a helper was killed: the figure is still here
            self._stop_helpers(f"plot {name} not drawn by its helper process ({err}): drawing it and the rest here")
        return None

    def _stop_helpers(self, why: str, kill: bool = False) -> None:
        """No more helpers for this page: say why (once), end them, draw the rest here."""
        if self.helpers:
            log.warning(why)
        self.close(kill=kill)
        self.helpers = False

    def close(self, kill: bool = False) -> None:
        """End the helper processes; ``kill``: without waiting for the one drawing (Python 3.11's pool has no
        public way to stop a running call, hence its process table)."""
        if self.pool is None:
            return
        if kill:
            for process in list(getattr(self.pool, "_processes", {}).values()):
                process.kill()
        self.pool.shutdown(wait=not kill, cancel_futures=True)
        self.pool = None

    def remove_stale(self) -> None:
        """Delete images of earlier reports that this one did not write again (only this module's names)."""
        import pyarrow.fs as pafs

        infos = self.store.fs.get_file_info(pafs.FileSelector(self.store.path("plots"), allow_not_found=True))
        for info in infos:
            if (info.type == pafs.FileType.File and info.base_name.endswith(".png")
                    and info.base_name.startswith(OWN_PLOTS) and info.base_name not in self.written):
                self.store.fs.delete_file(info.path)


def _worst_section(page: _Page, rows: list[dict], fs: str, table: pa.Table, direction: str) -> str:
    entries = _by_entry(rows, fs)
    names = _names(entries)
    final = _final_epochs(entries)
    chosen = list(final.items())
    shown, left_out = chosen[:WORST_ENTRIES], chosen[WORST_ENTRIES:]
    reader = _Margins(page.store)
    groups, notes = [], []
    for (method, params), epoch in shown:
        picked = worst_samples(table, method, params, epoch)
        if not picked:
            notes.append(f"{names[(method, params)]}: no per-sample rows at epoch {epoch}")
            continue
        try:
            samples = worst_sample_margins(page.store, fs, method, params, epoch, picked, reader)
        except (LookupError, ValueError, OSError) as err:  # StoreError is a ValueError: a damaged or absent file
            notes.append(f"{names[(method, params)]}: margins not read ({err})")
            continue
        groups.append((f"{names[(method, params)]} · ep {epoch}", samples))
    if left_out:
        notes.append(f"{len(left_out)} more (method, params) not shown: "
                     + ", ".join(names[k] for k, _ in left_out))
    out = []
    if groups:
        out.append(page.image(
            f"worst_forget_set_{_slug(fs)}.png", worst_figure(groups, fs, direction), f"worst samples, forget set {fs}",
            f"The {WORST_SAMPLES} samples with the highest per-sample KLOM of each method (all splits, its last "
            "epoch): the unlearned models' margins (red) and the oracles' (blue) side by side on the 20 bins KLOM "
            "uses for that sample; each bar is a share of its ensemble. A title in red means the margins read do "
            "not give the KLOM in per_sample/."))
    out += [f"<p class='note'>{_esc(n)}</p>" for n in notes]
    return "\n".join(out)


def write_report(store: RunStore, summary: dict) -> str:
    """``report.html`` and ``plots/*.png`` in the run folder, from a summary (``summary.json``'s content) and
    whatever else the folder holds (per_sample/, convergence.csv); every section the folder lacks says so.
    Returns the page's path."""
    page = _Page(store)
    try:
        return _write_page(store, summary, page)
    finally:
        page.close()  # the helper processes end with the report, whatever it raised


def _write_page(store: RunStore, summary: dict, page: _Page) -> str:
    all_rows = summary["rows"]
    rows, _ = _split_selected(all_rows)  # every plot and table but the selection's reads the full ensembles
    forget_sets = list(dict.fromkeys(r["forget_set"] for r in rows))
    direction = summary.get("kl_direction") or "unlearned-oracle"
    has_ci = any(_num(r.get("klom_p95_ci_low")) is not None for r in rows)
    try:
        convergence = read_convergence(store)
        convergence_error = None
    except (ValueError, KeyError, OSError) as err:
        convergence, convergence_error = None, str(err)

    sections = []
    for fs in forget_sets:
        entries = _by_entry(rows, fs)
        slug = _slug(fs)
        part = [f'<h2 id="fs-{_esc(slug)}">forget set {_esc(fs)}</h2>']
        sizes = ", ".join(f"{s} {r['n_samples']}" for s, r in next(iter(entries.values())).items())
        part.append(f"<p>Samples per split: {_esc(sizes)}. Reference rows (grey): <code>do_nothing</code>, the "
                    f"originals as they are (the upper reference), and <code>{FLOOR}</code>, independent oracles "
                    "scored against the oracles (the noise floor: no method can be judged below it).</p>")

        part.append("<h3>P95 KLOM per method and split</h3>")
        if not has_ci:
            part.append(_not_computed("intervals", "summary.json has no klom_p95_ci_low / klom_p95_ci_high "
                                      "(a summary written before they existed)"))
        part.append(_p95_table(rows, fs))
        floors = {s: floor_reference(entries, s) for s in SPLITS}
        labels = {f.label for f in floors.values()}
        floor_text = (f"{next(iter(labels)).removeprefix('floor: ')}: " if len(labels) == 1 else "") + ", ".join(
            f"{s} {f.value:.3f}" for s, f in floors.items() if f.value is not None)
        part.append(page.image(f"p95_forget_set_{slug}.png", p95_figure(rows, fs), f"P95 KLOM, forget set {fs}",
                               "P95 of per-sample KLOM from 0; whiskers: the bootstrap interval where computed; "
                               f"dotted: the floor ({_esc(floor_text or 'not measured in this run')})."))

        if isinstance(summary.get("selection"), dict):
            part.append("<h3>Selection without leaking</h3>")
            part.append(_selection_table(summary["selection"], fs))

        part.append("<h3>Compute against KLOM</h3>")
        plot = compute_figure(rows, fs)
        if plot.figure is None:
            part.append(_not_computed("compute plot", "no row other than the references has a positive "
                                      "grad_samples (imported ensembles record none)"))
        else:
            part.append(page.image(
                f"compute_forget_set_{slug}.png", plot.figure, f"compute against P95 KLOM, forget set {fs}",
                "x: samples per model forwarded with gradients up to that epoch (log; the top axis in passes "
                "over the retain set); y: P95 KLOM from 0. retrain's rows (its budget sweep) are joined by a line, "
                "each point labelled by its setting; every other method's row is a point labelled by its epoch; "
                "dashed grey: do_nothing; dotted black: the floor."))
        if plot.unplaced:
            part.append(f"<p class='note'>Not placed (no grad_samples recorded): {_esc(', '.join(plot.unplaced))}"
                        "</p>")

        part.append("<h3>Per-sample KLOM</h3>")
        try:
            table = read_per_sample(store, fs)
            table_error = None
        except (OSError, ValueError) as err:
            table, table_error = None, str(err)
        if table is None:
            why = (f"per_sample/forget_set={fs}/ could not be read: {table_error}" if table_error else
                   f"this folder has no per_sample/forget_set={fs}/ (a run reduced before per-sample output "
                   "existed: `raybench reduce` writes it)")
            part.append(_not_computed("per-sample distribution and worst samples", why))
        else:
            part.append(page.image(
                f"cdf_forget_set_{slug}.png", cdf_figure(rows, fs, table), f"per-sample KLOM CDF, forget set {fs}",
                "Share of samples whose KLOM is at most x (linear from 0), each method at its last epoch; a curve "
                "crosses the dashed 0.95 line at its P95. The floor's own curve is dotted black."))
            part.append("<h3>The worst samples</h3>")
            part.append(_worst_section(page, rows, fs, table, direction))

        part.append("<h3>Convergence in N</h3>")
        fig = convergence_figure(rows, fs, convergence) if convergence is not None else None
        if fig is not None:
            draws = sorted({r["draws"] for r in convergence if r["draws"]})
            part.append(page.image(
                f"convergence_forget_set_{slug}.png", fig, f"P95 KLOM against N, forget set {fs}",
                f"P95 KLOM of random subsamples of N models of each ensemble (draws per N: "
                f"{_esc(', '.join(map(str, draws)) or 'unknown')}), ± their sd; from convergence.csv."))
        elif convergence_error:
            part.append(_not_computed("convergence", f"convergence.csv could not be read: {convergence_error}"))
        else:
            why = ("this folder has no convergence.csv (`raybench convergence RUN` writes it)" if convergence is None
                   else f"convergence.csv has no row of forget set {fs}")
            part.append(_not_computed("convergence", why))

        part.append("<h3>Other metrics</h3>")
        part.append(_metrics_section([r for r in rows if r["forget_set"] == fs], fs, summary.get("metrics")))
        sections.append("\n".join(part))
    page.remove_stale()

    base = ["forget_set", "method", "params", "epoch", "split", "n_models", "n_oracles", "n_samples", "klom_mean",
            "klom_p50", "klom_p95", "klom_p99", "klom_degenerate", "accuracy", "oracle_accuracy", "grad_samples"]
    extra = [c for c in (*CI_COLUMNS, *METRIC_COLUMNS) if any(c in r for r in rows)]
    columns = base + extra + ["compute_s"] + (["selection"] if len(all_rows) > len(rows) else [])

    def cell(value: object) -> str:
        text = f"{value:.4g}" if isinstance(value, float) else "" if value is None else str(value)
        return f"<td>{html.escape(text)}</td>"

    full = "\n".join("<tr>" + "".join(cell(r.get(c)) for c in columns) + "</tr>" for r in all_rows)
    identity = _esc(json.dumps(summary.get("identity", {}), indent=2, sort_keys=True))
    bootstrap = summary.get("bootstrap")
    ci_text = ("Intervals: " + _esc(", ".join(f"{k} = {v}" for k, v in bootstrap.items())) + " (docs/metrics.md)."
               if isinstance(bootstrap, dict) else "")
    toc = " · ".join(f'<a href="#fs-{_esc(_slug(fs))}">forget set {_esc(fs)}</a>' for fs in forget_sets)
    degenerate = ("<p class='note'>* some samples are degenerate (every unlearned margin on the top edge): the "
                  "reference scores them 0; see klom_degenerate.</p>" if any(r["klom_degenerate"] for r in rows)
                  else "")
    kl = "oracle ‖ unlearned" if direction == "oracle-unlearned" else "unlearned ‖ oracle"
    direction_text = f" Direction: KL({kl})."
    page_html = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>raybench run {_esc(summary['run'])}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:1.5em 2em;max-width:1500px;color:#222}}
table{{border-collapse:collapse;font-size:12px;margin:.5em 0}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}} .wide td{{white-space:nowrap}}
td.l{{text-align:left}} th{{background:#f3f3f3}}
tr.ref td{{background:#f6f6f6;color:#555}} .ci{{color:#666;font-size:11px}}
img{{max-width:100%;height:auto}} figure{{margin:1em 0}} figcaption{{font-size:12px;color:#444;max-width:1100px}}
.absent{{background:#fff6e0;border-left:4px solid #e0a000;padding:.3em .6em;font-size:13px}}
.note,.small{{font-size:12px;color:#444}} .wide{{overflow-x:auto;max-width:100%}}
h2{{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}}
</style>
</head><body>
<h1>raybench run {_esc(summary['run'])}</h1>
<p>KLOM {_esc(summary['klom_version'])}: per sample, the KL divergence between the margins of the unlearned models
and of the oracles (retrained without the forget set); P95 over the samples of each split is the headline, lower is
better, 0 is indistinguishable, ln 1e5 ≈ 11.5 the maximum.{_esc(direction_text)} Two independent ensembles of one
recipe already differ by the noise floor (the <code>{FLOOR}</code> row), so read every row against it and against
<code>do_nothing</code>. {ci_text} Full rows: summary.csv.</p>
<p>{toc} · <a href="#rows">all rows</a></p>
<details><summary>run identity</summary><pre>{identity}</pre></details>
{degenerate}
{''.join(sections)}
<h2 id="rows">All rows</h2>
<details open><summary>{len(all_rows)} rows of summary.json</summary><div class="wide">
<table><tr>{''.join(f'<th>{_esc(c)}</th>' for c in columns)}</tr>
{full}
</table></div></details>
</body></html>
"""
    path = store.path("report.html")
    store.write_bytes(path, page.finish(page_html).encode())
    return path
