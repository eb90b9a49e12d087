"""The field's other metrics of one scored ensemble, as summary columns: ToW, the challenge's ε score, U-LiRA AUC,
SVC-MIA efficacy and IAM (docs/metrics.md#the-fields-other-metrics).

Why a second pass beside the KLOM jobs: these metrics need whole-ensemble quantities (per-model accuracies over a
split, per-example ε over the forget set, one SVC per model) that the per-(split, chunk) KLOM jobs do not keep.
One job per scored ensemble reads, epoch by epoch, its margins and its forget set's oracles chunk by chunk through
the store (``RunStore.read_margin_files``, the reduce's own reader and checks) and keeps only:

* per sample of every stored split, the U-LiRA AUC (float64);
* per model, the top-1 counts of the retain, forget and val views;
* the forget view of both ensembles (models × F) and the first ``n`` retain and val columns of the ensemble that
  SVC-MIA fits on (models × n each, n = min(retain, val, 10,000)).

Memory is therefore one chunk of each ensemble plus those views of one epoch of one ensemble, whatever the
number of samples (bounded by F and by the SVC shadow cap, not by the train split), plus libsvm's kernel cache
(up to 200 MB per concurrent fit, ``SVC_MAX_THREADS``). Every value is the tested function of
``raybench.metrics`` applied to exactly the matrices it names, so a restatement that reads the Parquet whole
gives the same numbers (tests/test_field_metrics.py).

Which row holds what: ``mia_auc`` is per sample, so each split's row has its own (mean over that split's samples).
The other five are one number per (ensemble, epoch) — ToW and the challenge score combine all three splits, ε,
SVC-MIA and IAM are defined on F — and sit on the **forget** row only, blank on retain and val (a column's
filled cells are then exactly the scored ensembles). Models are paired by model id (unlearned model i with oracle
i, and with original i for IAM): ToW and IAM are blank unless every model of the ensemble has an oracle of its id
(and, for IAM, an original). ToW and the challenge score are blank where some model of either ensemble has no
stored top-1 margins (imports that publish margins only). A metric that is undefined on the data (ε with no
surviving rule, IAM with a zero Gumbel scale) is blank too, never NaN: JSON has no NaN, and a blank is what the
summary means by "cannot be computed".
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from raybench.metrics import challenge_score, forget_score_from_epsilons, iam_scores, per_example_epsilon, ulira_auc
from raybench.metrics.epsilon import DELTA, EPSILON_CAP, THRESHOLDS_PER_UNIT, max_epsilon
from raybench.metrics.iam import EPS1, EPS2, iam_split
from raybench.metrics.mia import SVC_MAX_SHADOW, svc_mia_efficacy, ulira_split
from raybench.metrics.tow import TOW_SPLITS, tug_of_war
from raybench.store import RunStore, StoreError, margins_matrix, top1_matrix

if TYPE_CHECKING:
    from raybench.reduce import Group, _Scoring

FIELD_COLUMNS: tuple[str, ...] = ("tow", "epsilon_score", "challenge_score", "mia_auc", "svc_mia", "iam_mean")
"""The summary columns of this module, in their order: appended to ``raybench.reduce.SUMMARY_COLUMNS`` as one
block, so the order is set here alone."""
PER_SPLIT: tuple[str, ...] = ("mia_auc",)
"""Columns filled on every split's row; the others are filled on the forget row only."""
JSON_ONLY: tuple[str, ...] = ("tow_ci_low", "tow_ci_high", "iam_reference")
"""Per-row values kept in summary.json only (the CSV's columns are a contract): ToW's t-interval over pairs and
IAM's reference level (the held-out oracles scored as if unlearned, each with the original of its id)."""

ULIRA_SEED = 0
ULIRA_STD_FLOOR = 1e-3
IAM_SEED = 0
IAM_K = 100
TOW_LEVEL = 0.95
SVC_MAX_MODELS = 10
"""SVC-MIA is fitted on the first ``min(N, 10)`` models by id of each ensemble, not all N. One libsvm fit takes
9-15 ms of CPU on the default run's 2 × 360 points (about 6 s at CIFAR-10's 2 × 10,000): all 100 models of the
default run's 51 scored (ensemble, epoch)s would add 45-75 s of CPU to a reduce that takes 9 s of CPU without the
field's metrics; 10 add 5-8 s. The published protocol fits the one model it evaluates (SalUn). Ids are
exchangeable (every model has its own seed), so the first ones are an unbiased subset; the mean's standard error
is the per-model sd over √10."""

SVC_MAX_THREADS = 8
"""Concurrent SVC fits in one process: each holds libsvm's kernel cache (scikit-learn's default 200 MB, as SalUn),
so memory grows by up to 200 MB per thread once n is large (1.6 GB at 8)."""

TaskMapper = Callable[[Callable, list], Iterator]


@dataclass(frozen=True, eq=False)
class FieldJob:
    """One ensemble's field metrics against its forget set's oracles, every epoch: plain data for a Ray task."""

    files: tuple[str, ...]  # the ensemble's Parquet files, relative to the run folder
    oracle_files: tuple[str, ...]
    epochs: tuple[int | None, ...]  # stored epochs; None: the one snapshot of the originals
    model_ids: tuple[int, ...]  # the ensemble's ids in row order (ascending, as margins_matrix orders rows)
    oracle_ids: tuple[int, ...]
    forget_idx: np.ndarray  # train ids of the forget set, in its own order
    n_train: int
    n_val: int
    chunk_size: int
    original_forget: np.ndarray | None  # originals of model_ids (rows in that order) on F; None: IAM blank
    label: str


EpochValues = dict[str, dict[str, float | None]]
"""view (retain / forget / val) -> column -> value (None: blank), for one epoch."""


def fill_field_metrics(store: RunStore, rows: list[dict], scorings: Sequence[_Scoring], original: Group, *,
                       n_split: dict[str, int], chunk_size: int, mapper: TaskMapper | None = None) -> None:
    """Add the ``FIELD_COLUMNS`` (and ``JSON_ONLY``) values to ``reduce_run``'s rows, in place.

    ``scorings`` are the ensembles reduce scored (their units already verified), ``original`` the originals'
    group (IAM's fit end-point). ``mapper`` runs the jobs as reduce's does (Ray tasks on a cluster); None runs them
    here, fitting SVC-MIA's per-model classifiers on this machine's cores.
    """
    verified = {u.unit_id for sc in scorings for u in sc.group.units + sc.oracle.units}
    original_ids = _ids(original)
    originals_read: dict[str, np.ndarray] = {}  # forget set -> the originals' forget view, read once
    jobs = []
    for sc in scorings:
        ids = _ids(sc.group)
        orig = None
        if original_ids and set(ids) <= set(original_ids) and set(ids) <= set(_ids(sc.oracle)):
            if sc.forget_set not in originals_read:
                pending = [u for u in original.units if u.unit_id not in verified]
                if pending:  # originals not scored in this reduce (a --methods filter): check them before reading
                    store.verify_units(pending)
                    verified.update(u.unit_id for u in pending)
                originals_read[sc.forget_set] = forget_view(store, tuple(f for u in original.units for f in u.files),
                                                            sc.forget_idx, len(original_ids), chunk_size,
                                                            f"originals of forget set {sc.forget_set}")
            rows_of = np.searchsorted(original_ids, ids)
            orig = originals_read[sc.forget_set][rows_of]
        jobs.append(FieldJob(tuple(f for u in sc.group.units for f in u.files),
                             tuple(f for u in sc.oracle.units for f in u.files), sc.stored_epochs, ids,
                             _ids(sc.oracle), sc.forget_idx, n_split["train"], n_split["val"], chunk_size, orig,
                             f"{sc.group.method} {sc.group.params} on forget set {sc.forget_set}"))
    if mapper is not None and jobs:
        results = mapper(field_metrics_at, [(store.uri, job) for job in jobs])
    else:
        results = (field_metrics(store, job, threads=min(_cores(), SVC_MAX_THREADS)) for job in jobs)
    by_key = {(r["forget_set"], r["method"], r["params"], r["epoch"], r["split"]): r for r in rows}
    for sc, per_epoch in zip(scorings, results, strict=True):
        for epoch, values in zip(sc.epochs, per_epoch, strict=True):
            for view, columns in values.items():
                by_key[(sc.forget_set, sc.group.method, sc.group.params, epoch, view)].update(columns)


def field_metrics(store: RunStore, job: FieldJob, *, threads: int = 1) -> list[EpochValues]:
    """The job's values per epoch. ``threads``: SVC fits run on that many threads (libsvm releases the GIL)."""
    views = _views(job.forget_idx, job.n_train, job.n_val)
    return [_epoch(store, job, epoch, views, threads) for epoch in job.epochs]


@functools.lru_cache(maxsize=4)
def _open_store(uri: str) -> RunStore:
    return RunStore(uri)


def field_metrics_at(uri: str, job: FieldJob) -> list[EpochValues]:
    """``field_metrics`` for a Ray task (one CPU each: the cluster runs the ensembles in parallel)."""
    return field_metrics(_open_store(uri), job, threads=1)


def forget_view(store: RunStore, files: tuple[str, ...], forget_idx: np.ndarray, n_models: int, chunk_size: int,
                what: str) -> np.ndarray:
    """(models, F) margins of the forget set, in its order, reading only the train chunks that hold it."""
    out = np.empty((n_models, len(forget_idx)), dtype=np.float32)
    chunks = forget_idx // chunk_size
    for c in np.unique(chunks):
        matrix, _ = _read(store, files, "train", int(c), None, n_models, None, what)
        at = np.flatnonzero(chunks == c)
        out[:, at] = matrix[:, forget_idx[at] - c * chunk_size]
    return out


@dataclass(frozen=True)
class _Views:
    """Sample ids of the views, and where each stored sample goes in them."""

    retain: np.ndarray  # train ids, ascending
    forget: np.ndarray  # train ids, the forget set's order
    forget_pos: np.ndarray  # per train id: its position in the forget view, -1 if not in F
    n_shadow: int  # SVC-MIA fits on the first n_shadow retain and val samples
    sizes: dict[str, int]


def _views(forget_idx: np.ndarray, n_train: int, n_val: int) -> _Views:
    """The split views as ``reduce.split_views`` defines them (retain ascending, forget in F's order, val whole)."""
    pos = np.full(n_train, -1, dtype=np.int64)
    pos[forget_idx] = np.arange(len(forget_idx))
    retain = np.flatnonzero(pos < 0)
    return _Views(retain, np.asarray(forget_idx), pos, min(len(retain), n_val, SVC_MAX_SHADOW),
                  {"retain": len(retain), "forget": len(forget_idx), "val": n_val})


class _Ensemble:
    """What one epoch of one ensemble keeps of its chunks: the views the metrics need, filled chunk by chunk."""

    def __init__(self, n_models: int, v: _Views, n_train: int, n_val: int, *, shadow_models: int) -> None:
        self.forget = np.empty((n_models, len(v.forget)), dtype=np.float32)
        self.n_shadow_models = shadow_models  # SVC-MIA's models: the first rows
        self.shadow = {split: np.empty((shadow_models, v.n_shadow), dtype=np.float32) for split in ("train", "val")}
        self.correct = {view: np.zeros(n_models, dtype=np.int64) for view in ("retain", "forget", "val")}
        self.top1_known = True
        self.n = {"train": n_train, "val": n_val}

    def add(self, split: str, start: int, matrix: np.ndarray, top1: np.ndarray | None, v: _Views) -> None:
        width = matrix.shape[1]
        if split == "train":
            pos = v.forget_pos[start : start + width]
            in_f = pos >= 0
            self.forget[:, pos[in_f]] = matrix[:, in_f]
            masks = {"forget": in_f, "retain": ~in_f}
            # the first n_shadow retain ids: retain ids below the n_shadow-th one (retain is ascending)
            shadow_ids = v.retain[: v.n_shadow]
        else:
            masks = {"val": np.ones(width, dtype=bool)}
            shadow_ids = np.arange(v.n_shadow)
        take = shadow_ids[(shadow_ids >= start) & (shadow_ids < start + width)]
        if self.n_shadow_models and len(take):
            first = int(np.searchsorted(shadow_ids, take[0]))
            self.shadow[split][:, first : first + len(take)] = matrix[: self.n_shadow_models, take - start]
        if top1 is None:
            self.top1_known = False
        elif self.top1_known:
            for view, mask in masks.items():
                self.correct[view] += np.count_nonzero(top1[:, mask] > 0, axis=1)

    def accuracy(self, v: _Views) -> dict[str, np.ndarray] | None:
        """Per-model top-1 accuracy per view (``metrics.top1_accuracy`` of the view), None if not stored."""
        return {view: c / v.sizes[view] for view, c in self.correct.items()} if self.top1_known else None


def _epoch(store: RunStore, job: FieldJob, epoch: int | None, v: _Views, threads: int) -> EpochValues:
    n_u, n_o = len(job.model_ids), len(job.oracle_ids)
    unlearned = _Ensemble(n_u, v, job.n_train, job.n_val, shadow_models=min(n_u, SVC_MAX_MODELS))
    oracle = _Ensemble(n_o, v, job.n_train, job.n_val, shadow_models=0)
    auc = {"train": np.empty(job.n_train), "val": np.empty(job.n_val)}
    for split, n in (("train", job.n_train), ("val", job.n_val)):
        for chunk in range((n + job.chunk_size - 1) // job.chunk_size):
            start = chunk * job.chunk_size
            width = min(job.chunk_size, n - start)
            o, o_top1 = _read(store, job.oracle_files, split, chunk, None, n_o, width, f"{job.label} (oracles)")
            oracle.add(split, start, o, o_top1, v)
            del o_top1
            u, u_top1 = _read(store, job.files, split, chunk, epoch, n_u, width, f"{job.label} (models)")
            unlearned.add(split, start, u, u_top1, v)
            del u_top1
            if n_u >= 2 and n_o >= 2:
                auc[split][start : start + width] = ulira_auc(u, o, seed=ULIRA_SEED, std_floor=ULIRA_STD_FLOOR)
            del u, o
    ids = {view: (s, idx) for view, s, idx in (("retain", "train", v.retain), ("forget", "train", v.forget),
                                                ("val", "val", np.arange(job.n_val)))}
    out: EpochValues = {view: dict.fromkeys(FIELD_COLUMNS + JSON_ONLY) for view in ids}
    for view, (split, idx) in ids.items():
        if n_u >= 2 and n_o >= 2:
            out[view]["mia_auc"] = _value(auc[split][idx].mean())
    forget = out["forget"]
    pairs = _pair_rows(job.model_ids, job.oracle_ids)
    acc_u, acc_o = unlearned.accuracy(v), oracle.accuracy(v)
    if pairs is not None and acc_u is not None and acc_o is not None:
        tow = tug_of_war({s: acc_u[s] for s in TOW_SPLITS}, {s: acc_o[s][pairs] for s in TOW_SPLITS},
                         level=TOW_LEVEL)
        forget.update(tow=_value(tow.mean), tow_ci_low=_value(tow.ci_low), tow_ci_high=_value(tow.ci_high))
    if n_u >= 2 and n_o >= 2:
        eps = per_example_epsilon(unlearned.forget, oracle.forget)
        forget["epsilon_score"] = _value(forget_score_from_epsilons(eps, n_u))
        if forget["epsilon_score"] is not None and acc_u is not None and acc_o is not None:
            forget["challenge_score"] = _value(challenge_score(
                forget["epsilon_score"], acc_u["retain"], acc_o["retain"], acc_u["val"], acc_o["val"]))
    forget["svc_mia"] = _value(_svc(unlearned, threads))
    if job.original_forget is not None and pairs is not None and len(pairs) >= 2:
        iam = iam_scores(job.original_forget, unlearned.forget, oracle.forget[pairs], k=IAM_K, seed=IAM_SEED)
        forget.update(iam_mean=_value(iam.iam_mean), iam_reference=_value(iam.reference_mean))
    return out


def _svc(e: _Ensemble, threads: int) -> float:
    """SVC-MIA efficacy's mean over SVC_MAX_MODELS models, their fits spread over ``threads`` row blocks."""
    retain, val, forget = e.shadow["train"], e.shadow["val"], e.forget[: e.n_shadow_models]
    size = -(-retain.shape[0] // max(1, threads))  # rows per block, rounded up
    blocks = [slice(s, s + size) for s in range(0, retain.shape[0], size)]
    if len(blocks) == 1:
        return svc_mia_efficacy(retain, val, forget).mean
    with ThreadPoolExecutor(len(blocks)) as pool:
        parts = list(pool.map(lambda b: svc_mia_efficacy(retain[b], val[b], forget[b]).per_model, blocks))
    return float(np.concatenate(parts).mean())  # svc_mia_efficacy's mean over the same per-model values


def _pair_rows(model_ids: tuple[int, ...], oracle_ids: tuple[int, ...]) -> np.ndarray | None:
    """Row of the oracle with each model's id (oracle rows are ids ascending); None if some model has none."""
    if not set(model_ids) <= set(oracle_ids):
        return None
    return np.searchsorted(np.asarray(oracle_ids), np.asarray(model_ids))


def _read(store: RunStore, files: tuple[str, ...], split: str, chunk: int, epoch: int | None, n_models: int,
          width: int | None, what: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Margins and top-1 margins (None: not stored for some model) of one chunk, with their shape checked."""
    table = store.read_margin_files(files, split=split, chunk=chunk, epoch=epoch)
    matrix, top1 = margins_matrix(table), top1_matrix(table)
    for name, m in (("margins", matrix), ("top-1 margins", top1)):
        if m is not None and (m.shape[0] != n_models or (width is not None and m.shape[1] != width)):
            raise StoreError(f"{what} {split} chunk {chunk}: stored {name} have shape {m.shape}, expected "
                             f"({n_models}, {width if width is not None else 'chunk width'})")
    return matrix, top1


def _ids(group: Group) -> tuple[int, ...]:
    return tuple(sorted(i for u in group.units for i in u.meta["model_ids"]))


def _value(x: float | None) -> float | None:
    """A float for the summary, or None (blank) where it is undefined (NaN) or absent."""
    return None if x is None or not math.isfinite(x) else float(x)


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def metrics_record(rows: list[dict]) -> dict:
    """summary.json's ``"metrics"``: every setting of the field's metrics, including the seeded halves actually
    used (as rows of each ensemble in model-id order) for the ensemble sizes of these rows."""
    forget_rows = [r for r in rows if r["split"] == "forget"]
    sizes = sorted({(r["n_models"], r["n_oracles"]) for r in forget_rows})
    n_split = {(r["forget_set"], r["split"]): r["n_samples"] for r in rows}
    n_shadow = {fs: min(n_split[(fs, "retain")], n_split[(fs, "val")], SVC_MAX_SHADOW)
                for fs in sorted({r["forget_set"] for r in forget_rows})
                if (fs, "retain") in n_split and (fs, "val") in n_split}
    halves = []
    for n_u, n_o in sizes:
        if n_u >= 2 and n_o >= 2:
            s = ulira_split(n_u, n_o, seed=ULIRA_SEED)
            halves.append({"n_models": n_u, "n_oracles": n_o, "fit_models": s.fit_unlearned.tolist(),
                           "fit_oracles": s.fit_oracle.tolist()})
    shadows = {str(n): iam_split(n, seed=IAM_SEED).shadows.tolist() for n in sorted({u for u, _ in sizes}) if n >= 2}
    return {
        "columns": list(FIELD_COLUMNS),
        "rows": {"per_split": list(PER_SPLIT), "forget_only": [c for c in FIELD_COLUMNS if c not in PER_SPLIT]},
        "pairing": "model id: unlearned model i with oracle i (ToW, IAM) and original i (IAM)",
        "tow": {"splits": list(TOW_SPLITS), "accuracy": "top-1 (top-1 margin > 0)", "level": TOW_LEVEL,
                "interval": "Student t over pairs (summary.json tow_ci_low / tow_ci_high)"},
        "epsilon": {"delta": DELTA, "thresholds_per_unit": THRESHOLDS_PER_UNIT, "epsilon_clip": EPSILON_CAP,
                    "bucket_cap_by_n_models": {str(n): max_epsilon(n) for n in sorted({u for u, _ in sizes})
                                               if n >= 2},
                    "challenge_score": "epsilon_score × (retain acc / oracle retain acc) × (val acc / oracle val acc)"},
        "ulira": {"seed": ULIRA_SEED, "std_floor": ULIRA_STD_FLOOR, "halves": halves},
        "svc_mia": {"feature": "confidence p_y = sigmoid(margin)", "C": 3, "gamma": "auto", "kernel": "rbf",
                    "max_shadow": SVC_MAX_SHADOW, "n_shadow_by_forget_set": n_shadow,
                    "models": f"the first min(N, {SVC_MAX_MODELS}) model ids of each ensemble",
                    "members": "first n retain samples (ascending ids)", "non_members": "first n val samples"},
        "iam": {"seed": IAM_SEED, "k": IAM_K, "eps1": EPS1, "eps2": EPS2,
                "fit_end_point": "the original of the same model id",
                "shadow_rows_by_n_paired_oracles": shadows,
                "reference": "the other half of the oracles, scored as unlearned (summary.json iam_reference)"},
    }
