"""A subset run's analysis, and what a later run reads from it (``--scores SUB``).

``raybench subsets`` trains K models, each on a random fraction of the train set (role ``subset``, masks from the
models' seeds). This module turns the committed ensemble into its two products and reads them back:

* ``memorization.parquet``: Feldman–Zhang memorisation of every train sample (``metrics.memorization``), with its
  standard error and the IN / OUT model counts behind it;
* ``datamodel.npz`` and ``subsets.json``: a linear datamodel of every model's train logits on its mask
  (``metrics.datamodel``, dual form), λ and its held-out quality on margins.

A run given ``--scores SUB`` loads both (``load_subset_scores``): the scores define the difficulty forget sets and
feed methods that declare ``needs_scores``; the datamodel's summed effect of each forget set on the train logits
feeds those that declare ``needs_datamodel``.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raybench.data import subset_masks
from raybench.metrics.datamodel import DatamodelFit, LinearDatamodel, fit_datamodel, folds_for
from raybench.metrics.memorization import Memorization, memorization, memorization_summary
from raybench.plan import SUBSET_ROLE
from raybench.store import RunStore, StoreError, check_record
from raybench.training import margins_from_logits, top1_margins_from_logits

log = logging.getLogger(__name__)

ANALYSIS_VERSION = 1
"""Version of what the analysis computes (memorisation, the datamodel fit); recorded in subsets.json."""

MEMORIZATION_FILE = "memorization.parquet"
DATAMODEL_FILE = "datamodel.npz"
SUBSETS_RECORD = "subsets.json"
MASKS_FILE = "masks.npy"
HISTOGRAM_FILE = "plots/memorization.png"


class SubsetError(StoreError):
    """A folder that is not a usable subset run (not one, unfinished, of other data): exit code 2."""


def write_masks(store: RunStore, seeds: list[int], fraction: float, n_train: int) -> np.ndarray:
    """``masks.npy``: (K, n_train) bool, row k the samples model k trains on, a function of its seed and the
    fraction (``data.subset_masks``); written once, and checked against the seeds on every later run."""
    masks = subset_masks(seeds, fraction, n_train)
    path = store.path(MASKS_FILE)
    if store.exists(path):
        if not np.array_equal(store.read_array(path), masks):
            raise StoreError(f"{path} holds other masks than these seeds and fraction give; use a new --out")
        return masks
    store.write_array(path, masks)
    return masks


@dataclass(frozen=True)
class SubsetEnsemble:
    """The committed subset ensemble of a folder: masks, train logits (K, n, C) and labels."""

    masks: np.ndarray
    logits: np.ndarray
    labels: np.ndarray
    seeds: list[int]
    fraction: float
    unit_ids: list[str]


def read_ensemble(store: RunStore, labels: np.ndarray) -> SubsetEnsemble:
    """Every model of the folder's subset ensemble, in model-id order; refuses an unfinished one."""
    info = subset_info(store)
    k = info["n_models"]
    units = sorted((u for u in store.completed_units().values() if u.meta["role"] == SUBSET_ROLE),
                   key=lambda u: min(u.meta["model_ids"]))
    ids = [i for u in units for i in u.meta["model_ids"]]
    if ids != list(range(k)):
        raise SubsetError(f"{store.uri} holds {len(set(ids))} of its {k} subset models: rerun `raybench subsets` "
                          "with the same options to finish it")
    logits = np.concatenate([store.read_array(store.subset_logits_path(u.unit_id)) for u in units])
    seeds = [s for u in units for s in u.meta["seeds"]]
    masks = store.read_array(store.path(MASKS_FILE))
    if masks.shape != (k, len(labels)) or not np.array_equal(masks, subset_masks(seeds, info["fraction"],
                                                                                   len(labels))):
        raise SubsetError(f"{store.path(MASKS_FILE)} does not match the stored models' seeds")
    return SubsetEnsemble(masks, logits, labels, seeds, info["fraction"], [u.unit_id for u in units])


def subset_info(store: RunStore) -> dict:
    """The ``subsets`` entry of a subset run's identity (n_models, fraction); refuses any other folder."""
    try:
        info = store.run_info()
    except StoreError as err:
        raise SubsetError(str(err)) from None
    subsets = info["identity"].get("subsets")
    if not isinstance(subsets, dict):
        raise SubsetError(f"{store.uri} is not a subset run (made by `raybench subsets`): its run.json has no "
                          "subsets entry")
    return check_record(subsets, store.path("run.json"), "subsets identity", {"n_models": int, "fraction": float})


def _scores(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(margins, top-1 margins) of logits (K, n, C), by the one margin definition (``training``)."""
    z, y = torch.from_numpy(np.ascontiguousarray(logits)), torch.from_numpy(np.array(labels, dtype=np.int64))
    return margins_from_logits(z, y).numpy(), top1_margins_from_logits(z, y).numpy()


def analyse(store: RunStore, labels: np.ndarray, *, seed: int = 0) -> dict:
    """Memorisation and the datamodel of the folder's complete subset ensemble, written to the folder
    (``memorization.parquet``, ``datamodel.npz``, ``subsets.json``) and returned as subsets.json's content."""
    ens = read_ensemble(store, labels)
    k, n, c = ens.logits.shape
    _, top1 = _scores(ens.logits, labels)
    mem = memorization(ens.masks, top1 > 0)
    write_memorization(store, mem)
    fit = fit_datamodel(ens.masks, ens.logits.reshape(k, n * c),
                        target=lambda out: _scores(out.reshape(len(out), n, c).astype(np.float32), labels)[0],
                        folds=folds_for(k), seed=seed)
    write_datamodel(store, fit.model, n, c)
    record = {"analysis_version": ANALYSIS_VERSION, "run": store.run_info()["run"], "n_models": k,
              "fraction": ens.fraction, "n_train": n, "num_classes": c, "units": ens.unit_ids,
              "memorization": memorization_summary(mem.mem, mem.mem_se),
              "memorization_sha256": scores_digest(mem.mem),
              "datamodel": datamodel_record(fit)}
    store.write_json(store.path(SUBSETS_RECORD), record)
    return record


def datamodel_record(fit: DatamodelFit) -> dict:
    return {"outputs": "train logits", "quality_on": "train margins", "lambda": fit.model.lam,
            "lambda_scale": fit.lam_scale, "heldout_corr": fit.heldout_corr,
            "heldout_corr_pooled": fit.heldout_corr_pooled, "heldout_mse": fit.heldout_mse, "folds": fit.folds,
            "n_targets_scored": fit.n_targets_scored, "chosen_by": "held-out mse of train margins",
            "grid": [{"lambda_scale": g, "heldout_corr": v, "heldout_mse": e}
                     for g, v, e in zip(fit.grid, fit.grid_corr, fit.grid_mse, strict=True)]}


def scores_digest(values: np.ndarray) -> str:
    """sha256 of an array as float32, as a run receives it (scores, a datamodel effect): what enters the ids of
    units that use it."""
    return hashlib.sha256(np.ascontiguousarray(values, dtype=np.float32).tobytes()).hexdigest()


def write_memorization(store: RunStore, mem: Memorization) -> None:
    """``memorization.parquet``: one row per train sample id, atomically."""
    table = pa.table({"sample_id": pa.array(np.arange(len(mem.mem)), pa.int64()), "mem": mem.mem,
                      "mem_se": mem.mem_se, "n_in": mem.n_in, "n_out": mem.n_out, "p_in": mem.p_in,
                      "p_out": mem.p_out})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd", write_page_checksum=True)
    store.write_bytes(store.path(MEMORIZATION_FILE), buffer.getvalue())


def read_memorization(store: RunStore) -> pa.Table:
    path = store.path(MEMORIZATION_FILE)
    if not store.exists(path):
        raise SubsetError(f"{store.uri} has no {MEMORIZATION_FILE}: rerun `raybench subsets` on it to finish it")
    try:
        return pq.read_table(io.BytesIO(store.read_bytes(path)), page_checksum_verification=True)
    except (pa.ArrowInvalid, OSError) as err:
        raise SubsetError(f"{path} cannot be read ({err}); rerun `raybench subsets` on the folder") from err


def write_datamodel(store: RunStore, model: LinearDatamodel, n_train: int, num_classes: int) -> None:
    """``datamodel.npz``: the dual-form fit (no n × D matrix), written atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, mask_mean=model.mask_mean, centred_masks=model.centred_masks, output_mean=model.output_mean,
             dual=model.dual, lam=np.float64(model.lam), shape=np.array([n_train, num_classes]))
    store.write_bytes(store.path(DATAMODEL_FILE), buffer.getvalue())


def read_datamodel(store: RunStore) -> tuple[LinearDatamodel, int, int]:
    path = store.path(DATAMODEL_FILE)
    if not store.exists(path):
        raise SubsetError(f"{store.uri} has no {DATAMODEL_FILE}: rerun `raybench subsets` on it to finish it")
    try:
        with np.load(io.BytesIO(store.read_bytes(path)), allow_pickle=False) as z:
            model = LinearDatamodel(z["mask_mean"], z["centred_masks"], z["output_mean"], z["dual"],
                                    float(z["lam"]))
            n, c = (int(v) for v in z["shape"])
    except (ValueError, KeyError, OSError) as err:
        raise SubsetError(f"{path} cannot be read ({err}); rerun `raybench subsets` on the folder") from err
    return model, n, c


@dataclass(frozen=True)
class SubsetScores:
    """What ``--scores SUB`` hands a run: SUB's identity, per-sample memorisation and its datamodel."""

    uri: str
    run_id: str
    dataset: str
    fingerprint: str | None
    scores: np.ndarray  # (n_train,) float32; undefined memorisation (no IN or OUT model) as 0
    record: dict  # subsets.json
    datamodel: LinearDatamodel
    num_classes: int

    def effect(self, forget_idx: np.ndarray) -> np.ndarray:
        """(n_train, C) float32: the datamodel's summed effect of the forget set on every train sample's logits."""
        n = len(self.scores)
        return self.datamodel.effect(forget_idx).reshape(n, self.num_classes).astype(np.float32)

    @property
    def scores_sha256(self) -> str:
        return scores_digest(self.scores)

    def describe(self) -> dict:
        """What a run records of the SUB it used (``scores.json``)."""
        return {"subset_run": self.run_id, "uri": self.uri, "dataset": self.dataset,
                "n_models": self.record["n_models"], "fraction": self.record["fraction"],
                "scores_sha256": self.scores_sha256, "datamodel": self.record["datamodel"],
                "memorization": self.record["memorization"]}


def load_subset_scores(uri: str, *, dataset: str, fingerprint: str | None, n_train: int) -> SubsetScores:
    """Read a subset run for a run on ``dataset``: refuses a folder that is not a finished subset run, or is of
    another data set or other data (fingerprint, sizes)."""
    store = RunStore(uri)
    subset_info(store)
    data = store.read_record(store.path("dataset.json"), "dataset.json", {"name": str, "n_train": int})
    if data["name"] != dataset or data["n_train"] != n_train:
        raise SubsetError(f"--scores {uri} is a subset run of {data['name']} ({data['n_train']} train samples); "
                          f"this run is on {dataset} ({n_train})")
    if fingerprint is not None and data.get("fingerprint") not in (None, fingerprint):
        raise SubsetError(f"--scores {uri} was trained on other {dataset} data (fingerprint differs)")
    if not store.exists(store.path(SUBSETS_RECORD)):
        raise SubsetError(f"{uri} has no {SUBSETS_RECORD}: rerun `raybench subsets` on it to finish it")
    record = store.read_record(store.path(SUBSETS_RECORD), SUBSETS_RECORD,
                               {"run": str, "n_models": int, "fraction": float, "datamodel": dict,
                                "memorization": dict})
    table = read_memorization(store)
    ids = table.column("sample_id").to_numpy()
    if not np.array_equal(ids, np.arange(n_train)):
        raise SubsetError(f"{store.path(MEMORIZATION_FILE)} does not hold one row per train sample id")
    scores = np.nan_to_num(table.column("mem").to_numpy(zero_copy_only=False), nan=0.0).astype(np.float32)
    model, n, c = read_datamodel(store)
    if n != n_train:
        raise SubsetError(f"{store.path(DATAMODEL_FILE)} covers {n} train samples, not {n_train}")
    return SubsetScores(store.uri, record["run"], dataset, data.get("fingerprint"), scores, record, model, c)


# -- `raybench memorization` -------------------------------------------------------------------------------------
def memorization_report(uri: str) -> tuple[dict, str]:
    """Summary of a subset run's memorisation and datamodel quality, and the histogram written into its folder
    (``plots/memorization.png``)."""
    store = RunStore(uri)
    subset_info(store)
    table = read_memorization(store)
    mem = table.column("mem").to_numpy(zero_copy_only=False)
    summary = memorization_summary(mem, table.column("mem_se").to_numpy(zero_copy_only=False))
    summary["n_in_median"] = float(np.median(table.column("n_in").to_numpy()))
    summary["n_out_median"] = float(np.median(table.column("n_out").to_numpy()))
    record = store.read_json(store.path(SUBSETS_RECORD)) if store.exists(store.path(SUBSETS_RECORD)) else {}
    dm = record.get("datamodel", {})
    summary["datamodel_heldout_corr"] = dm.get("heldout_corr")
    summary["datamodel_lambda_scale"] = dm.get("lambda_scale")
    summary["n_models"] = record.get("n_models")
    summary["fraction"] = record.get("fraction")
    path = store.path(HISTOGRAM_FILE)
    store.write_bytes(path, _histogram_png(mem, summary))
    return summary, path


def _histogram_png(mem: np.ndarray, summary: dict) -> bytes:
    from matplotlib.figure import Figure

    values = mem[np.isfinite(mem)]
    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.subplots()
    ax.hist(values, bins=np.linspace(-1, 1, 41), color="#4c72b0")
    ax.set_yscale("log")
    ax.set_xlabel("memorisation  P(correct | in) − P(correct | out)")
    ax.set_ylabel("train samples (log)")
    ax.axvline(summary["high_threshold"], color="#c44e52", linestyle="--", linewidth=1)
    ax.set_title(f"{summary['n_high']} of {len(values)} samples above {summary['high_threshold']:g}"
                 f" · K = {summary.get('n_models')}, α = {summary.get('fraction')}", fontsize=10)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def summary_lines(summary: dict) -> list[str]:
    """The terminal lines of ``raybench memorization``."""
    q = " ".join(f"{k.removeprefix('mem_')}={summary[k]:.3f}" for k in summary if k.startswith("mem_q"))
    corr = summary.get("datamodel_heldout_corr")
    return [
        f"models K = {summary.get('n_models')}, fraction α = {summary.get('fraction')}; IN / OUT models per sample "
        f"(median) {summary['n_in_median']:.0f} / {summary['n_out_median']:.0f}",
        f"memorisation over {summary['n_samples'] - summary['n_undefined']} samples: mean {summary['mem_mean']:.3f}, "
        f"quantiles {q}, max {summary['mem_max']:.3f}; median s.e. {summary.get('mem_se_median', float('nan')):.3f}",
        f"high (> {summary['high_threshold']:g}): {summary['n_high']} samples ({100 * summary['share_high']:.1f}%); "
        f"negative: {summary['n_negative']}; undefined (no IN or OUT model): {summary['n_undefined']}",
        "datamodel held-out correlation (margins, mean per sample): "
        + ("-" if corr is None else f"{corr:.3f} at λ = {summary['datamodel_lambda_scale']:g} × mean diag(XXᵀ)"),
    ]
