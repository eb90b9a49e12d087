"""Readable output of a summary: one terminal line per (forget set, method, params, epoch), and in the run folder
``report.html`` with ``plots/*.png`` (P95 KLOM per split; effect against cost per forget set).

P95 KLOM is the headline (lower is better; about 0.6-0.8 at N=100 is the noise floor of two independent
ensembles, docs/metrics.md#noise-floor); accuracies show what the method cost, and ``work`` its compute: samples per
model forwarded with gradients (``grad_samples``; retraining costs epochs × retain size).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # matplotlib and the store are imported only when a report is written
    from matplotlib.figure import Figure

    from raybench.store import RunStore

SPLITS = ("retain", "forget", "val")


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
    """A fixed-width table of P95 KLOM and top-1 accuracy per split, with degenerate-sample counts flagged."""
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


# -- plots and the HTML page -----------------------------------------------------------------------------------------
def _by_entry(rows: list[dict], forget_set: str) -> dict[tuple, dict[str, dict]]:
    """(method, params, epoch) -> split -> row, for one forget set, in summary order."""
    return {key[1:]: by_split for key, by_split in _entries(rows).items() if key[0] == forget_set}


def _names(entries: dict[tuple, dict]) -> dict[tuple, str]:
    """(method, params) -> a short name: the method, plus its parameters only where the run sweeps them."""
    settings: dict[str, set[str]] = {}
    for method, params, _ in entries:
        settings.setdefault(method, set()).add(params)
    return {(m, p): m if len(settings[m]) == 1 else f"{m} ({_short_params(p, 36)})" for m, p, _ in entries}


def _png(fig: Figure) -> bytes:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def klom_figure(rows: list[dict], forget_set: str) -> Figure:
    """P95 KLOM per split for every (method, params, epoch) of one forget set: horizontal bars, lower is better."""
    import numpy as np
    from matplotlib.figure import Figure

    entries = _by_entry(rows, forget_set)
    names = _names(entries)
    labels = [f"{names[(m, p)]} ep {e}" for m, p, e in entries]
    fig = Figure(figsize=(9, 1.2 + 0.38 * len(entries)))
    ax = fig.add_subplot()
    y = np.arange(len(entries))
    for k, split in enumerate(SPLITS):
        values = [e[split]["klom_p95"] if split in e else np.nan for e in entries.values()]
        ax.barh(y + (k - 1) * 0.27, values, height=0.27, label=split)
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("P95 KLOM (lower = closer to the oracles)")
    ax.set_title(f"forget set {forget_set}")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def work_figure(rows: list[dict], forget_set: str) -> Figure | None:
    """P95 forget KLOM against each method's work (samples per model forwarded with gradients): cost vs effect,
    one colour per method (and swept setting), snapshots joined by a line and labelled by epoch. None when no
    row carries a work figure."""
    from matplotlib.figure import Figure

    entries = {k: e["forget"] for k, e in _by_entry(rows, forget_set).items()
               if "forget" in e and e["forget"].get("grad_samples") not in (None, "")}
    if not entries:
        return None
    names = _names(entries)
    series: dict[str, list[tuple[float, float, int]]] = {}
    for (method, params, epoch), row in entries.items():
        series.setdefault(names[(method, params)], []).append((float(row["grad_samples"]), row["klom_p95"], epoch))
    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    for i, (name, points) in enumerate(series.items()):
        points.sort()  # colours repeat after ten series, so the marker changes too
        ax.plot([w for w, _, _ in points], [k for _, k, _ in points], marker="os^Dv*"[i % 6], markersize=5,
                label=name)
        if len(points) > 1:
            for w, k, epoch in points:
                ax.annotate(f"ep {epoch}", (w, k), fontsize=6, xytext=(3, 3), textcoords="offset points")
    positive = [w for points in series.values() for w, _, _ in points if w > 0]
    ax.set_xscale("symlog", linthresh=min(positive, default=1.0))
    ax.set_xlabel("work: samples per model forwarded with gradients (0 = do_nothing)")
    ax.set_ylabel("P95 KLOM on the forget set")
    ax.set_title(f"forget set {forget_set}: effect against cost")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def write_report(store: RunStore, summary: dict) -> str:
    """``report.html`` and ``plots/*.png`` in the run folder, from a summary (``summary.json``'s content): the table
    of every row, what produced it, and per forget set the KLOM bars and the effect-against-cost plot. Returns
    the page's path."""
    import html

    rows = summary["rows"]
    forget_sets = list(dict.fromkeys(r["forget_set"] for r in rows))
    images = []
    for fs in forget_sets:
        for name, fig in ((f"klom_p95_forget_set_{fs}.png", klom_figure(rows, fs)),
                          (f"work_forget_set_{fs}.png", work_figure(rows, fs))):
            if fig is not None:
                store.write_bytes(store.path("plots", name), _png(fig))
                images.append(f"plots/{name}")
    columns = ["forget_set", "method", "params", "epoch", "split", "n_models", "n_oracles", "n_samples", "klom_mean",
               "klom_p50", "klom_p95", "klom_p99", "klom_degenerate", "accuracy", "oracle_accuracy", "grad_samples"]

    def cell(value: object) -> str:
        text = f"{value:.4g}" if isinstance(value, float) else "" if value is None else str(value)
        return f"<td>{html.escape(text)}</td>"

    table = "\n".join("<tr>" + "".join(cell(r.get(c)) for c in columns) + "</tr>" for r in rows)
    identity = html.escape(json.dumps(summary.get("identity", {}), indent=2, sort_keys=True))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>raybench run {html.escape(summary['run'])}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}} img{{max-width:100%;margin:1em 0}}</style>
</head><body>
<h1>raybench run {html.escape(summary['run'])}</h1>
<p>KLOM {html.escape(summary['klom_version'])}: per sample, KL divergence between the margins of the unlearned
models and of the oracles; P95 over the samples of each split, lower is better. Full rows: summary.csv.</p>
<details><summary>run identity</summary><pre>{identity}</pre></details>
{''.join(f'<img src="{src}" alt="{src}">' for src in images)}
<table><tr>{''.join(f'<th>{c}</th>' for c in columns)}</tr>
{table}
</table></body></html>
"""
    path = store.path("report.html")
    store.write_bytes(path, page.encode())
    return path
