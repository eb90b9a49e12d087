"""Readable output of a summary: one terminal line per (forget set, method, params, epoch).

P95 KLOM is the headline (lower is better; about 0.6-0.8 at N=100 is the noise floor of two independent
ensembles, METHODS.md §1.6); accuracies show what the method cost, and ``work`` its compute: samples per model
forwarded with gradients (``grad_samples``; retraining costs epochs × retain size).
"""

from __future__ import annotations

import json

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


def summary_table(rows: list[dict]) -> str:
    """A fixed-width table of P95 KLOM and accuracy per split, with degenerate-sample counts flagged."""
    keyed: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        key = (row["forget_set"], row["method"], row["params"], row["epoch"])
        keyed.setdefault(key, {})[row["split"]] = row
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
        acc = [f"{by_split[s]['accuracy']:>11.3f}" if s in by_split else f"{'':>11}" for s in SPLITS]
        lines.append(f"{fs:>6} {method:<16} {_short_params(params):<28} {epoch:>3} {first['n_models']:>5}  "
                     + "  ".join(p95) + "  " + "  ".join(acc) + f"  {_work(first.get('grad_samples')):>8}")
    if any(r["klom_degenerate"] for r in rows):
        lines.append("* some samples are degenerate (every unlearned margin on the top edge): the reference "
                     "scores them 0; see klom_degenerate in summary.csv")
    return "\n".join(lines)
