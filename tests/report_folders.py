"""Small run folders for the report's tests, written straight through the store (no training, no Ray).

``synthetic_folder`` writes originals, oracles, a floor ensemble and two methods (retrain at three budgets,
finetune at two epochs, plus a stale finetune unit of an older code version that the report must ignore) and
keeps every margin matrix it wrote, so that a test can compare what the report reads with what was written.
``add_contract_outputs`` then adds what the other issue-12 outputs hold, in their contract formats: interval and
metric columns in the summary rows, ``per_sample/`` Parquet (per-sample KLOM computed here by the literal
reference, not by raybench) and ``convergence.csv``.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from klom_reference import reference_klom

from raybench.ids import digest
from raybench.reduce import FIELD_COLUMNS, reduce_run, split_views, write_summary
from raybench.store import RunStore, margins_table

N, CHUNK, N_TRAIN, N_VAL = 40, 32, 90, 40
FORGET = [5, 1, 33, 40, 64, 70, 88, 89, 20, 50]  # across chunks, not sorted: the forget split keeps this order
N_RETAIN = N_TRAIN - len(FORGET)
FINETUNE = '{"lr": 0.01}'
BUDGETS, RECIPE_EPOCHS = (0.25, 0.5, 1.0), 20


@dataclass
class Folder:
    """A synthetic run folder and what was written into it: (method, params, stored epoch) -> split -> matrix."""

    store: RunStore
    margins: dict[tuple, dict[str, np.ndarray]] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)

    def split_matrix(self, method: str, params: str, epoch: int | None, split: str) -> np.ndarray:
        """(models, samples) of a scored split view (retain, forget, val), in that view's sample order."""
        source, idx = split_views(np.asarray(FORGET), {"train": N_TRAIN, "val": N_VAL})[split]
        return self.margins[(method, params, epoch)][source][:, idx]


def _unit(folder: Folder, rng, *, role: str, method: str, params: str, epochs: list[int | None], forget_set: str,
          make, work: list[int] | None = None, method_version: int = 1, keep: bool = True) -> None:
    unit = digest([role, method, params, forget_set, method_version])
    tables = []
    for e in epochs:
        stored = 20 if e is None else e
        margins = {"train": make(rng, e, N_TRAIN, True).astype(np.float32),
                   "val": make(rng, e, N_VAL, False).astype(np.float32)}
        top1 = {k: v + 1.0 for k, v in margins.items()}
        tables.append(margins_table(run="synthetic", unit=unit, role=role, method=method, params=params,
                                    forget_set=forget_set, model_ids=range(N), seeds=range(N), epoch=stored,
                                    chunk_size=CHUNK, margins=margins, top1=top1))
        if keep:
            folder.margins[(method, params, e)] = margins
    meta = {"unit": unit, "kind": "synthetic", "role": role, "forget_set": forget_set, "method": method,
            "params": params, "epochs": [20 if e is None else e for e in epochs], "model_ids": list(range(N)),
            "seeds": list(range(N)),
            "code_versions": {"training": 1, "margins": 1, "method": method_version}}
    if work is not None:
        meta["grad_samples"] = work
        meta["compute_s_by_epoch"] = [0.1 * k for k in range(1, len(work) + 1)]
    folder.store.write_unit(meta, pa.concat_tables(tables))


def _forget_mask(n: int, train: bool) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    if train:
        mask[FORGET] = True
    return mask


def synthetic_folder(root: str, seed: int = 0) -> Folder:
    """The folder with its summary written (``reduce_run`` in this process)."""
    rng = np.random.default_rng(seed)
    store = RunStore(root)
    folder = Folder(store)
    store.open_run({"n_models": N, "chunk_size": CHUNK, "synthetic": True})
    store.write_json(store.path("dataset.json"), {"n_train": N_TRAIN, "n_val": N_VAL})
    store.write_json(store.path("forget_sets", "a.json"), {"id": "a", "indices": FORGET})

    def oracle_like(rng, epoch, n, train):  # never saw the forget set: lower margins there
        m = rng.normal(2.0, 1.5, (N, n))
        m[:, _forget_mask(n, train)] = rng.normal(-0.5, 1.5, (N, int(_forget_mask(n, train).sum())))
        return m

    def original(rng, epoch, n, train):  # memorised the forget set
        m = rng.normal(2.0, 1.5, (N, n))
        m[:, _forget_mask(n, train)] = rng.normal(6.0, 0.4, (N, int(_forget_mask(n, train).sum())))
        return m

    def retrain(budget):  # short budgets are not converged: shifted, narrower
        return lambda rng, epoch, n, train: oracle_like(rng, epoch, n, train) * (0.5 + 0.5 * budget) + 0.5 / budget

    def finetune(rng, epoch, n, train):  # forgets only part of the way
        m = rng.normal(2.0, 1.5, (N, n))
        m[:, _forget_mask(n, train)] = rng.normal(4.0 - epoch / 2, 0.8, (N, int(_forget_mask(n, train).sum())))
        return m

    def stale(rng, epoch, n, train):  # an older code version's unit: must never be read
        return np.full((N, n), 50.0)

    _unit(folder, rng, role="original", method="none", params="{}", epochs=[None], forget_set="none",
          make=original)
    folder.margins[("do_nothing", "{}", None)] = folder.margins.pop(("none", "{}", None))
    _unit(folder, rng, role="oracle", method="none", params="{}", epochs=[None], forget_set="a", make=oracle_like)
    folder.margins[("oracle", "{}", None)] = folder.margins.pop(("none", "{}", None))
    _unit(folder, rng, role="unlearned", method="oracle_floor", params="{}", epochs=[20], forget_set="a",
          make=oracle_like, work=[RECIPE_EPOCHS * N_RETAIN])
    for budget in BUDGETS:  # retrain yields one snapshot (label 1): its compute is swept through ``budget``
        _unit(folder, rng, role="unlearned", method="retrain", params=json.dumps({"budget": budget}), epochs=[1],
              forget_set="a", make=retrain(budget), work=[round(budget * RECIPE_EPOCHS) * N_RETAIN])
    _unit(folder, rng, role="unlearned", method="finetune", params=FINETUNE, epochs=[1, 3], forget_set="a",
          make=finetune, work=[e * N_RETAIN // 4 for e in (1, 3)])
    _unit(folder, rng, role="unlearned", method="finetune", params=FINETUNE, epochs=[1, 3], forget_set="a",
          make=stale, work=[1, 3], method_version=0, keep=False)
    # as reduced before the interval and the field's metrics existed: the report must say what is not computed
    rows = [{k: v for k, v in r.items() if k not in FIELD_COLUMNS} for r in reduce_run(store, n_boot=0)]
    folder.summary = write_summary(store, rows)
    return folder


def _stored_epoch(method: str, epoch: int) -> int | None:
    return None if method == "do_nothing" else epoch


def per_sample_table(folder: Folder) -> pa.Table:
    """Per-sample KLOM of every (method, params, epoch, split), computed by the literal reference from the
    matrices written, in the per_sample/ contract's schema."""
    columns: dict[str, list] = {c: [] for c in ("forget_set", "method", "params", "epoch", "split", "sample_id",
                                                "klom", "degenerate", "accuracy", "oracle_accuracy")}
    views = split_views(np.asarray(FORGET), {"train": N_TRAIN, "val": N_VAL})
    entries = dict.fromkeys((r["method"], r["params"], r["epoch"]) for r in folder.summary["rows"])
    for method, params, epoch in entries:
        stored = _stored_epoch(method, epoch)
        for split, (_, idx) in views.items():
            values = reference_klom(folder.split_matrix(method, params, stored, split).astype(np.float64),
                                    folder.split_matrix("oracle", "{}", None, split).astype(np.float64))
            n = len(idx)
            columns["forget_set"] += ["a"] * n
            columns["method"] += [method] * n
            columns["params"] += [params] * n
            columns["epoch"] += [stored] * n
            columns["split"] += [split] * n
            columns["sample_id"] += idx.tolist()
            columns["klom"] += values.tolist()
            columns["degenerate"] += [False] * n
            columns["accuracy"] += [1.0] * n
            columns["oracle_accuracy"] += [None] * n
    schema = pa.schema([("forget_set", pa.string()), ("method", pa.string()), ("params", pa.string()),
                        ("epoch", pa.int32()), ("split", pa.string()), ("sample_id", pa.int64()),
                        ("klom", pa.float64()), ("degenerate", pa.bool_()), ("accuracy", pa.float64()),
                        ("oracle_accuracy", pa.float64())])
    return pa.table(columns, schema=schema)


def add_contract_outputs(folder: Folder, *, per_sample: pa.Table | None = None) -> dict:
    """Interval and metric columns in the rows (made-up values in the contract's format), summary.json's
    ``bootstrap`` and ``metrics``, per_sample/ and convergence.csv; returns the summary to report."""
    summary = json.loads(json.dumps(folder.summary))
    for k, row in enumerate(summary["rows"]):
        p95, mean = row["klom_p95"], row["klom_mean"]
        row.update(klom_p95_ci_low=0.8 * p95, klom_p95_ci_high=1.25 * p95, klom_mean_ci_low=0.9 * mean,
                   klom_mean_ci_high=1.1 * mean)
        row.update(tow=0.5 + 0.01 * (k // 3), epsilon_score=None, challenge_score=None, mia_auc=None, svc_mia=None,
                   iam_mean=None)
        if row["split"] == "forget":
            row.update(epsilon_score=0.25 + 0.001 * k, mia_auc=0.6)
    summary["bootstrap"] = {"n_boot": 200, "seed": 0, "method": "percentile over models"}
    summary["metrics"] = {"tow": {"pairing": "by model id"}, "epsilon": {"delta": 1e-5}}
    store = folder.store
    table = per_sample if per_sample is not None else per_sample_table(folder)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    store.write_bytes(store.path("per_sample", "forget_set=a", "part-0.parquet"), buffer.getvalue())
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["forget_set", "method", "params", "epoch", "split", "n_models", "draws", "klom_p95",
                     "klom_p95_sd"])
    finals = {}
    for r in summary["rows"]:
        finals[(r["method"], r["params"])] = max(r["epoch"], finals.get((r["method"], r["params"]), r["epoch"]))
    by_key = {(r["method"], r["params"], r["epoch"], r["split"]): r for r in summary["rows"]}
    for (method, params), epoch in finals.items():
        for split in ("retain", "forget", "val"):
            top = by_key[(method, params, epoch, split)]["klom_p95"]
            for n in (N // 4, N // 2, N):  # P95 falling about as 1/N to the full ensemble's
                epoch_cell = "" if method == "do_nothing" else epoch
                writer.writerow(["a", method, params, epoch_cell, split, n, 20, repr(top * N / n),
                                 repr(0.05 * top * N / n)])
    store.write_bytes(store.path("convergence.csv"), out.getvalue().encode())
    return summary
