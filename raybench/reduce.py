"""Reduce stored margins to the summary: KLOM and accuracy per (forget set, method, params, epoch, split).

Reads the run folder alone (``raybench reduce OUT`` needs nothing else) and never retrains. Margins are read one
(split, chunk) at a time with pyarrow filters, so memory holds one chunk of every model, not the run. The retain
and forget splits are the columns of the stored ``train`` split outside / inside the forget set; the forget
split keeps the forget set's own order.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from raybench.metrics import KLOM_VERSION, klom_details, summarize
from raybench.store import RunStore, StoreError, UnitOutput, margins_matrix

log = logging.getLogger(__name__)

SUMMARY_COLUMNS = [
    "forget_set", "method", "params", "epoch", "split", "n_models", "n_oracles", "n_samples",
    "klom_mean", "klom_p5", "klom_p25", "klom_p50", "klom_p75", "klom_p95", "klom_p99", "klom_degenerate",
    "accuracy", "oracle_accuracy", "klom_version", "run",
]


@dataclass(frozen=True)
class Group:
    """The units whose models together form one ensemble (all blocks of one role/method/params/forget set)."""

    forget_set: str
    method: str
    params: str
    units: tuple[UnitOutput, ...]

    @property
    def n_models(self) -> int:
        return sum(len(u.meta["model_ids"]) for u in self.units)

    @property
    def epochs(self) -> list[int]:
        return sorted({e for u in self.units for e in u.meta["epochs"]})


def _groups(units: dict[str, UnitOutput]) -> tuple[dict, dict, dict]:
    """Committed units by role: originals (one group), oracles and unlearned (keyed by forget set, method…)."""
    originals, oracles, unlearned = [], defaultdict(list), defaultdict(list)
    for u in units.values():
        m = u.meta
        if m["role"] == "original":
            originals.append(u)
        elif m["role"] == "oracle":
            oracles[m["forget_set"]].append(u)
        elif m["role"] == "unlearned":  # matching oracles are inputs of methods, not scored
            unlearned[(m["forget_set"], m["method"], m["params"])].append(u)

    def ordered(us: list) -> tuple:
        return tuple(sorted(us, key=lambda u: min(u.meta["model_ids"])))

    original_group = Group("none", "do_nothing", "{}", ordered(originals))
    oracle_groups = {fs: Group(fs, "none", "{}", ordered(us)) for fs, us in oracles.items()}
    method_groups = {key: Group(*key, ordered(us)) for key, us in unlearned.items()}
    return {"original": original_group}, oracle_groups, method_groups


def _check_complete(group: Group, n_expected: int, what: str) -> bool:
    ids = sorted(i for u in group.units for i in u.meta["model_ids"])
    if len(ids) != len(set(ids)):
        raise StoreError(f"{what}: model ids stored twice ({len(ids)} rows for {len(set(ids))} models)")
    if len(ids) != n_expected:
        log.warning("%s: %d of %d models stored; skipped (rerun `raybench run` to finish it)", what, len(ids),
                    n_expected)
        return False
    return True


def _ensemble(store: RunStore, group: Group, split: str, n_samples: int, epoch: int | None,
              chunk_size: int, chunk: int) -> np.ndarray:
    table = store.read_margins(group.units, split=split, chunk=chunk, epoch=epoch)
    matrix = margins_matrix(table)
    width = min(chunk_size, n_samples - chunk * chunk_size)
    if matrix.shape != (group.n_models, width):
        raise StoreError(f"{group.method}/{group.forget_set} {split} chunk {chunk}: stored margins have shape "
                         f"{matrix.shape}, expected {(group.n_models, width)}")
    return matrix


def reduce_run(store: RunStore, *, forget_sets: list[str] | None = None,
               methods: list[tuple[str, str]] | None = None) -> list[dict]:
    """Summary rows for every complete (forget set, method, params) group, or only the ones asked for.

    ``methods`` is a list of (method, params JSON); ``do_nothing`` is scored from the originals.
    """
    info = store.run_info()
    identity = info["identity"]
    n_models, chunk_size = identity["n_models"], identity["chunk_size"]
    dataset = store.read_json(store.path("dataset.json"))
    n_split = {"train": dataset["n_train"], "val": dataset["n_val"]}
    role_groups, oracle_groups, method_groups = _groups(store.completed_units())
    original = role_groups["original"]

    rows = []
    for fs in sorted(oracle_groups, key=_natural):
        if forget_sets is not None and fs not in forget_sets:
            continue
        oracle = oracle_groups[fs]
        if not _check_complete(oracle, n_models, f"oracles of forget set {fs}"):
            continue
        forget_idx = np.asarray(store.read_json(store.path("forget_sets", f"{fs}.json"))["indices"], dtype=np.int64)
        candidates = [(original, [0])] + [(g, g.epochs) for (f, _, _), g in sorted(method_groups.items()) if f == fs]
        for group, epochs in candidates:
            if methods is not None and (group.method, group.params) not in methods:
                continue
            what = f"method {group.method} {group.params} on forget set {fs}"
            if not _check_complete(group, n_models, what):
                continue
            for epoch in epochs:
                stored_epoch = None if group is original else epoch
                rows.extend(_score(store, group, oracle, fs, forget_idx, epoch, stored_epoch, n_split, chunk_size,
                                   info["run"]))
    return rows


def _score(store: RunStore, group: Group, oracle: Group, fs: str, forget_idx: np.ndarray, epoch: int,
           stored_epoch: int | None, n_split: dict[str, int], chunk_size: int, run_id: str) -> list[dict]:
    """Per-sample KLOM over every chunk of train and val, then one row per split."""
    per_sample = {}
    for split, n in n_split.items():
        values = np.empty(n)
        degenerate = np.zeros(n, dtype=bool)
        correct = np.zeros(n)
        oracle_correct = np.zeros(n)
        for chunk in range((n + chunk_size - 1) // chunk_size):
            u = _ensemble(store, group, split, n, stored_epoch, chunk_size, chunk)
            o = _ensemble(store, oracle, split, n, None, chunk_size, chunk)
            result = klom_details(u, o)
            cols = slice(chunk * chunk_size, chunk * chunk_size + u.shape[1])
            values[cols] = result.values
            degenerate[cols] = result.degenerate
            correct[cols] = (u > 0).mean(axis=0)
            oracle_correct[cols] = (o > 0).mean(axis=0)
        per_sample[split] = (values, degenerate, correct, oracle_correct)

    in_forget = np.zeros(n_split["train"], dtype=bool)
    in_forget[forget_idx] = True
    views = {"retain": ("train", np.flatnonzero(~in_forget)), "forget": ("train", forget_idx),
             "val": ("val", np.arange(n_split["val"]))}
    rows = []
    for split, (source, idx) in views.items():
        values, degenerate, correct, oracle_correct = (a[idx] for a in per_sample[source])
        rows.append({
            "forget_set": fs, "method": group.method, "params": group.params, "epoch": epoch, "split": split,
            "n_models": group.n_models, "n_oracles": oracle.n_models, "n_samples": len(idx),
            **summarize(values, prefix="klom_"), "klom_degenerate": int(degenerate.sum()),
            "accuracy": float(correct.mean()), "oracle_accuracy": float(oracle_correct.mean()),
            "klom_version": KLOM_VERSION, "run": run_id,
        })
    return rows


def _natural(s: str) -> tuple:
    return (0, int(s), "") if s.isdigit() else (1, 0, s)


def write_summary(store: RunStore, rows: list[dict]) -> None:
    """``summary.csv`` and ``summary.json`` in the run folder; the JSON also carries the run's identity."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
    store.write_bytes(store.path("summary.csv"), buffer.getvalue().encode())
    info = store.run_info()
    store.write_bytes(store.path("summary.json"), json.dumps(
        {"run": info["run"], "identity": info["identity"], "klom_version": KLOM_VERSION, "rows": rows},
        indent=2).encode())
