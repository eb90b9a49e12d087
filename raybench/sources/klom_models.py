"""The ``klom-models`` source: the models of DUB's hub data set ``royrin/KLOM-models`` as a run's ensembles.

Layout (docs/methods.md#hub-layouts: which of it DUB's own code reads, which only its README names). ``V`` is the
variant folder (``CIFAR10``, ``CIFAR10_augmented``, ``LIVING17``), ``k`` a forget set, ``i`` a model id
(``0..n-1``, unpadded)::

    full_models/V/{train,val}_margins_all.pt                          originals: float [n, n_train] / [n, n_val]
    oracle_models/CIFAR10/only_margins/forget_set_k/{train,val}_margins_all.pt          oracles, likewise
    forget_set_indices/CIFAR10/forget_set_k.npy                                          F
    full_models/V/{train,val}_logits_i.pt, oracles/CIFAR10/forget_set_k/{train,val}_logits_i.pt   [n_split, C]
    full_models/V/sd_i____epoch_23.pt, i__val_margins_23.npy, i__{train,val}_logits…    never read here

Margins come from the aggregate files, one per ensemble and split, and only those are downloaded (plus, when the
data set is given, the per-model logits files of the models imported). "train" covers all train samples in
data-set order, forget samples included, for originals and oracles alike (DUB's ``run.py`` concatenates the two
splits and compares them column for column with margins over the full train loader), so no sample is moved.
Row ``i`` of an aggregate is model ``i``: the scoring oracles are rows ``0..N-1``, the ``oracle_floor`` ensemble
rows ``N..2N-1`` of the same files, which must hold them.

Top-1 margins (what accuracy is read from) need the labels: with the data set, ``provide`` reads the logits files
of every model it imports, recomputes each model's margins from them (``z_y - logsumexp_{j≠y} z_j``, DUB's
``get_margins``) and refuses, naming the files, unless they match the aggregate's row within
``MARGIN_ATOL + MARGIN_RTOL·|m|`` (a wrong model, order or label moves margins by units); then it stores
``z_y - max_{j≠y} z_j``. An ensemble some of whose logits files are absent keeps top-1 unknown (accuracy empty),
with a note in ``klom_models.json``, the run folder's record of what was read and checked.

Epochs: files name 0-based epoch 23 of 24 (CIFAR-10); raybench stores 24, the epochs trained, as for its own
units. Seeds are -1, ``model_id`` the hub id. Only CIFAR-10 (not its augmented variant) has oracles; the other
variants' originals can be imported, but a run that needs oracles for them is refused.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from raybench.data.forget_sets import ForgetSet, validate_indices
from raybench.plan import plan_method_runs
from raybench.sources.base import Ensemble, Source, SourceError, write_import_unit
from raybench.store import FLOOR_METHOD, RunStore

if TYPE_CHECKING:
    from raybench.config import RunConfig
    from raybench.data import Dataset
    from raybench.plan import Unit

log = logging.getLogger(__name__)

HUB_REPO = "royrin/KLOM-models"
DEFAULT_BLOCK_SIZE, DEFAULT_CHUNK_SIZE = 50, 8192  # RunConfig's defaults
MARGIN_ATOL, MARGIN_RTOL = 0.01, 0.002
"""|margin from the logits file - aggregate margin| <= ATOL + RTOL·|m|: both come from one model's logits, so they
differ by float rounding only (float32 logsumexp on another device: ~1e-6·|z|; float16 logits: ~1e-3·|z|), while a
wrong model, sample order or label moves a margin by the spread between models or samples, units."""
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_FORGET_ID = re.compile(r"[1-9]\d*")
ROW_RECORD = "klom_models.json"


@dataclass(frozen=True)
class Variant:
    """One ``full_models`` folder: the data set and architecture of its models, the 0-based epoch in its file
    names, and whether oracles trained with the same recipe are published for it."""

    folder: str
    dataset: str
    arch: str
    hub_epoch: int
    oracles: bool
    why_no_oracles: str = ""


VARIANTS = {
    "CIFAR10": Variant("CIFAR10", "cifar10", "resnet9", 23, True),
    "CIFAR10_augmented": Variant(
        "CIFAR10_augmented", "cifar10", "resnet9", 23, False,
        "its originals were trained with data augmentation and the published CIFAR-10 oracles without"),
    "LIVING17": Variant("LIVING17", "living17", "resnet18", 24, False,
                        "the hub publishes no oracles for LIVING17"),
}


# -- hub paths -------------------------------------------------------------------------------------------------------
def originals_margins_file(variant: str, split: str) -> str:
    return f"full_models/{variant}/{split}_margins_all.pt"


def oracle_margins_file(forget_set: str, split: str) -> str:
    return f"oracle_models/CIFAR10/only_margins/forget_set_{forget_set}/{split}_margins_all.pt"


def forget_set_file(forget_set: str, dataset_folder: str = "CIFAR10") -> str:
    return f"forget_set_indices/{dataset_folder}/forget_set_{forget_set}.npy"


def logits_file(variant: str, forget_set: str | None, split: str, model_id: int) -> str:
    """An original's (``forget_set`` None) or an oracle's logits of its final model on ``split``."""
    folder = f"full_models/{variant}" if forget_set is None else f"oracles/CIFAR10/forget_set_{forget_set}"
    return f"{folder}/{split}_logits_{model_id}.pt"


def ensemble_files(variant: str, role: str, forget_set: str) -> dict[str, str]:
    """The aggregate margin file of each split that holds an ensemble of ``role`` (its rows are model ids)."""
    if role == "original":
        return {split: originals_margins_file(variant, split) for split in ("train", "val")}
    return {split: oracle_margins_file(forget_set, split) for split in ("train", "val")}


# -- the source ------------------------------------------------------------------------------------------------------
class KlomModelsSource(Source):
    """Originals and oracles of ``royrin/KLOM-models`` (module docstring). ``location``: a local folder in the hub
    layout, or a hub repo id (default ``royrin/KLOM-models``), of which only the files read are downloaded."""

    name: ClassVar[str] = "klom-models"
    trains: ClassVar[bool] = False

    def __init__(self, location: str = "", *, variant: str = "CIFAR10", cache_dir: str | None = None) -> None:
        if variant not in VARIANTS:
            raise SourceError(f"unknown KLOM-models variant {variant!r}; known: {', '.join(VARIANTS)}")
        self.location = str(location or HUB_REPO)
        self.variant = VARIANTS[variant]
        self.cache_dir = cache_dir
        self.requested: list[str] = []  # every file asked of the location, in order (a download's allow_patterns)
        self._root: Path | None = None
        self._shapes: dict[str, tuple[int, ...]] = {}

    # -- files -----------------------------------------------------------------------------------------------------
    def fetch(self, files: Sequence[str], *, required: bool = True) -> Path:
        """The local folder holding ``files``: the location itself, or the hub snapshot into which exactly these
        files were downloaded. ``required``: a missing file is a ``SourceError`` (else the caller checks)."""
        files = list(dict.fromkeys(files))
        path = Path(self.location).expanduser()
        new = [f for f in files if f not in self.requested]
        if path.is_dir():
            root = path
        elif _REPO_ID.fullmatch(self.location):
            if new:  # never an empty pattern list: the hub client reads that as "every file"
                import huggingface_hub

                try:
                    root = Path(huggingface_hub.snapshot_download(
                        repo_id=self.location, repo_type="dataset", allow_patterns=new, cache_dir=self.cache_dir))
                except Exception as err:  # the hub client raises many types (HTTP, offline, auth): all "not here"
                    raise SourceError(f"cannot download {len(new)} files from the hub data set {self.location!r}: "
                                      f"{type(err).__name__}: {err}") from err
            else:
                assert self._root is not None, "files already requested, so a snapshot folder is known"
                root = self._root
        else:
            raise SourceError(f"klom-models location {self.location!r} is neither a folder nor a hub repo id like "
                              f"{HUB_REPO!r}")
        self.requested.extend(new)
        self._root = root
        if required:
            missing = [f for f in files if not (root / f).is_file()]
            if missing:
                raise SourceError(f"{len(missing)} of {len(files)} needed files are missing from {root}, e.g. "
                                  f"{', '.join(missing[:3])}")
        return root

    def _matrix(self, rel: str) -> np.ndarray:
        """An aggregate margin file as a 2-D array (memory-mapped where torch can), refusing anything else."""
        root = self.fetch([rel])
        arr = _load_tensor(root / rel, rel)
        if arr.ndim != 2 or arr.dtype.kind != "f":
            raise SourceError(f"{rel}: expected a 2-D float tensor of margins [models, samples], got {arr.dtype} "
                              f"{tuple(arr.shape)}")
        self._shapes[rel] = tuple(arr.shape)
        return arr

    def _shape(self, rel: str) -> tuple[int, ...]:
        if rel not in self._shapes:
            self._matrix(rel)
        return self._shapes[rel]

    # -- the contract ----------------------------------------------------------------------------------------------
    def check(self, config: RunConfig) -> None:
        """Refuse a run this variant's published models cannot give, before anything is read."""
        v = self.variant
        if config.dataset != v.dataset:
            raise SourceError(f"source klom-models (variant {v.folder}) holds {v.dataset} models; the run asks for "
                              f"dataset {config.dataset!r}")
        if config.resolved_arch != v.arch:
            raise SourceError(f"source klom-models (variant {v.folder}) holds {v.arch} models; the run asks for "
                              f"arch {config.resolved_arch!r}")
        if not isinstance(config.n_models, int) or isinstance(config.n_models, bool) or config.n_models < 2:
            raise SourceError(f"n_models must be an integer >= 2 (KLOM compares distributions), got "
                              f"{config.n_models!r}")
        bad = [fs for fs in config.forget_sets if not _FORGET_ID.fullmatch(str(fs))]
        if bad or len(set(config.forget_sets)) != len(config.forget_sets):
            raise SourceError(f"klom-models forget sets are distinct positive integers (the hub publishes 1..10), "
                              f"got {', '.join(map(str, config.forget_sets)) or 'none'}")
        if config.forget_sets and not v.oracles:
            self._refuse_oracles()
        unlearning = sorted({r.method.name for r in plan_method_runs(config) if r.method.fn is not None})
        if unlearning:
            raise SourceError(f"source klom-models imports margins only, not the originals' state dicts, so methods "
                              f"cannot unlearn from them ({', '.join(unlearning)}); run do_nothing, or use source "
                              "easydub or trained")

    def _refuse_oracles(self) -> None:
        v = self.variant
        raise SourceError(f"klom-models variant {v.folder} has no oracles ({v.why_no_oracles}): KLOM needs oracles "
                          f"trained for it with the same recipe; only its originals can be imported")

    def config_defaults(self) -> dict:
        return {"dataset": self.variant.dataset, "arch": self.variant.arch}

    def identity(self, config: RunConfig, dataset: Dataset | None) -> dict:
        v = self.variant
        return {"dataset": v.dataset, "arch": v.arch, "source": self.name, "variant": v.folder,
                "hub_epoch": v.hub_epoch, "n_models": config.n_models, "block_size": config.block_size,
                "chunk_size": config.chunk_size}

    def sizes(self, dataset: Dataset | None) -> tuple[int, int]:
        """(train, val) samples, from the originals' aggregate files; the data set, if given, must have as many."""
        n_train, n_val = (self._shape(originals_margins_file(self.variant.folder, s))[1] for s in ("train", "val"))
        if dataset is not None and (dataset.n_train, dataset.n_val) != (n_train, n_val):
            raise SourceError(f"the hub's margins cover {n_train} train / {n_val} val samples, the data set "
                              f"{dataset.name} has {dataset.n_train} / {dataset.n_val}")
        return n_train, n_val

    def forget_sets(self, config: RunConfig, dataset: Dataset | None,
                    store: RunStore | None = None) -> dict[str, ForgetSet]:
        """The hub's forget-set files (file order kept); ``store``: a run folder that already recorded them."""
        ids = [str(fs) for fs in config.forget_sets]
        if ids and not self.variant.oracles:
            self._refuse_oracles()
        out = {}
        recorded = set(store.forget_set_ids()) if store is not None and store.exists(store.path("run.json")) else set()
        for fs in ids:
            rel = forget_set_file(fs)
            if fs in recorded:
                idx = store.read_forget_set(fs)
                out[fs] = ForgetSet(fs, _read_only(idx), _describe(fs, len(idx), rel))
                continue
            root = self.fetch([rel], required=False)
            if not (root / rel).is_file():
                raise SourceError(f"{root} has no {rel}: forget set {fs} is not published by KLOM-models "
                                  "(the hub has forget sets 1..10 of CIFAR-10)")
            try:
                raw = np.load(root / rel, allow_pickle=False)
            except (OSError, ValueError) as err:
                raise SourceError(f"forget-set file {rel}: not a plain .npy array ({err})") from err
            try:
                idx = validate_indices(raw, self.sizes(dataset)[0], source=f"forget-set file {rel}")
            except ValueError as err:
                raise SourceError(str(err)) from err
            out[fs] = ForgetSet(fs, _read_only(idx), _describe(fs, len(idx), rel))
        return out

    def model_ids(self, config: RunConfig, requests: Sequence[Ensemble]) -> dict[Ensemble, range]:
        """Originals and scoring oracles are models ``0..N-1``; the ``oracle_floor`` ensemble is oracles
        ``N..2N-1`` of the same files (checked here: the files must hold them). Nothing else is published."""
        out = {}
        n = config.n_models
        for r in requests:
            if r.role == "original":
                out[r] = range(r.count)
            elif r.role == "oracle":
                if not self.variant.oracles:
                    self._refuse_oracles()
                out[r] = range(r.count)
            elif r.role == "unlearned" and r.method == FLOOR_METHOD:
                if not self.variant.oracles:
                    self._refuse_oracles()
                rel = oracle_margins_file(r.forget_set, "train")
                held = self._shape(rel)[0]
                if n + r.count > held:
                    raise SourceError(f"the oracle_floor ensemble of forget set {r.forget_set} needs oracles "
                                      f"{n}..{n + r.count - 1} beside the {n} scoring ones, and {rel} holds {held}: "
                                      f"n_models <= {held // 2} fits, or drop the floor")
                out[r] = range(n, n + r.count)
            elif r.role == "matching_oracle":
                raise SourceError("klom-models publishes no oracle checkpoints to fine-tune against (only oracle "
                                  "margins): oracle-matching methods cannot run on this source")
            else:
                raise SourceError(f"klom-models publishes no {r.role} models of method {r.method}")
        return out

    def provide(self, units: Sequence[Unit], store: RunStore, run_id: str, dataset: Dataset | None) -> list[Unit]:
        """Read every not yet complete unit's margins (and, with the data set, its top-1 margins, after the
        logits cross-check), refusing bad files before anything is written; then write them. Returns []."""
        todo = [u for u in units if not store.is_complete(u.id)]
        n_train, n_val = self.sizes(dataset)
        store.record_dataset({"name": self.variant.dataset, "fingerprint": None, "n_train": n_train, "n_val": n_val,
                              "source_train": list(range(n_train)), "source_val": list(range(n_val))})
        chunk_size = int(store.run_info()["identity"]["chunk_size"])
        ensembles: dict[tuple[str, str], list[int]] = {}
        for u in todo:
            if u.kind != "import":
                raise SourceError(f"unit {u.id} is a {u.kind} unit; klom-models only imports")
            if u.role in ("oracle", "unlearned") and not self.variant.oracles:
                self._refuse_oracles()
            if u.role not in ("original", "oracle") and not (u.role == "unlearned" and u.method == FLOOR_METHOD):
                raise SourceError(f"klom-models publishes no {u.role} models of method {u.method}")
            ensembles.setdefault((u.role, u.forget_set), []).extend(u.model_ids)
        loaded = {key: self._load(key[0], key[1], sorted(ids), dataset, (n_train, n_val))
                  for key, ids in ensembles.items()}  # everything checked before the first unit is written
        for u in todo:
            got = loaded[(u.role, u.forget_set)]
            rows = [got.position[i] for i in u.model_ids]
            margins = {s: m[rows] for s, m in got.margins.items()}
            top1 = None if got.top1 is None else {s: m[rows] for s, m in got.top1.items()}
            write_import_unit(store, run_id, u, source=self.name, epoch=self.variant.hub_epoch + 1,
                              chunk_size=chunk_size, margins=margins, top1=top1,
                              extra={"hub_epoch": self.variant.hub_epoch, "variant": self.variant.folder,
                                     "hub_files": sorted(got.files.values())})
        _update_record(store, self, loaded, len(todo), len(units) - len(todo))
        return []

    def notes(self, store: RunStore) -> list[str]:
        """What the imports into ``store`` noticed (``klom_models.json``)."""
        path = store.path(ROW_RECORD)
        return list(store.read_json(path).get("notes", [])) if store.exists(path) else []

    # -- reading one ensemble --------------------------------------------------------------------------------------
    def _load(self, role: str, forget_set: str, ids: list[int], dataset: Dataset | None,
              sizes: tuple[int, int]) -> _Loaded:
        files = ensemble_files(self.variant.folder, role, forget_set)
        self.fetch(list(files.values()))
        margins, notes = {}, []
        for (split, rel), width in zip(files.items(), sizes, strict=True):
            arr = self._matrix(rel)
            if arr.shape[1] != width:
                raise SourceError(f"{rel}: margins of {arr.shape[1]} samples, expected {width} (the originals' "
                                  f"{split} file)")
            if ids[-1] >= arr.shape[0]:
                what = "oracles" if role != "original" else "originals"
                raise SourceError(f"{rel} holds {arr.shape[0]} {what}; models {ids[0]}..{ids[-1]} were asked for: "
                                  f"n_models <= {arr.shape[0] if role != 'unlearned' else arr.shape[0] // 2} fits")
            block = arr[ids]
            out = np.asarray(block, dtype=np.float32)
            nan = np.argwhere(np.isnan(out))
            if len(nan):
                raise SourceError(f"{rel}: NaN margins (model {ids[nan[0][0]]}, sample {nan[0][1]}, "
                                  f"{len(nan)} in all)")
            if out.dtype != block.dtype and not np.array_equal(out, block):
                notes.append(f"{rel}: {block.dtype} margins rounded to float32")
            if np.isinf(out).any():  # stored as ±float32 max, which KLOM clips to ±100 as it would clip ±inf
                notes.append(f"{rel}: infinite margins stored as ±float32 max")
                np.nan_to_num(out, copy=False, posinf=np.finfo(np.float32).max, neginf=-np.finfo(np.float32).max)
            margins[split] = out
        top1, check = None, None
        if dataset is None:
            notes.append("no data set given: top-1 margins not computed from the logits files, accuracy left empty")
        else:
            top1, check, note = self._top1(role, forget_set, ids, dataset, margins, files)
            if note:
                notes.append(note)
        return _Loaded({i: k for k, i in enumerate(ids)}, margins, top1, files, check, notes)

    def _top1(self, role: str, forget_set: str, ids: list[int], dataset: Dataset, margins: dict[str, np.ndarray],
              files: dict[str, str]) -> tuple[dict[str, np.ndarray] | None, dict | None, str | None]:
        """Top-1 margins from the models' logits files, after checking that those logits give the aggregate's
        margins; (None, None, note) when some logits file is absent."""
        fs = None if role == "original" else forget_set
        wanted = {(split, i): logits_file(self.variant.folder, fs, split, i) for split in ("train", "val")
                  for i in ids}
        root = self.fetch(list(wanted.values()), required=False)
        absent = [rel for rel in wanted.values() if not (root / rel).is_file()]
        what = f"{role} models {ids[0]}..{ids[-1]}" + ("" if fs is None else f" of forget set {fs}")
        if absent:
            return None, None, (f"{what}: {len(absent)} of {len(wanted)} logits files absent (e.g. {absent[0]}): "
                                "top-1 accuracy left empty")
        labels = {"train": np.asarray(dataset.y_train), "val": np.asarray(dataset.y_val)}
        top1 = {split: np.empty_like(m) for split, m in margins.items()}
        worst, bad = 0.0, []
        for (split, i), rel in wanted.items():
            z = _load_tensor(root / rel, rel)
            y = labels[split]
            if z.ndim != 2 or z.shape[0] != len(y) or z.dtype.kind != "f":
                raise SourceError(f"{rel}: expected float logits [{len(y)}, classes], got {z.dtype} {tuple(z.shape)}")
            if z.shape[1] != dataset.num_classes:
                raise SourceError(f"{rel}: logits of {z.shape[1]} classes, the data set has {dataset.num_classes}")
            if not np.isfinite(z).all():
                raise SourceError(f"{rel}: NaN or infinite logits")
            z = np.asarray(z, dtype=np.float32)
            rows = np.arange(len(y))
            true = z[rows, y]
            others = z.copy()
            others[rows, y] = -np.inf
            row = ids.index(i)
            top1[split][row] = true - others.max(axis=1)
            z64, others64 = z.astype(np.float64), others.astype(np.float64)
            peak = others64.max(axis=1)
            recomputed = z64[rows, y] - (peak + np.log(np.exp(others64 - peak[:, None]).sum(axis=1)))
            hub = margins[split][row].astype(np.float64)
            ratio = np.abs(recomputed - hub) / (MARGIN_ATOL + MARGIN_RTOL * np.abs(hub))
            worst = max(worst, float(ratio.max()))
            if ratio.max() > 1:
                bad.append(f"{rel} vs row {i} of {files[split]}: {int((ratio > 1).sum())} of {len(y)} margins "
                           f"differ (max |diff| {np.abs(recomputed - hub).max():.3g})")
        if bad:
            raise SourceError(f"the hub's logits do not give its margins (|diff| <= {MARGIN_ATOL} + "
                              f"{MARGIN_RTOL}·|margin|): {'; '.join(bad[:3])}{'; …' if len(bad) > 3 else ''}. "
                              "Wrong labels, model order or sample order; nothing was imported")
        return top1, {"models": len(ids), "max_diff_over_tolerance": worst}, None


@dataclass
class _Loaded:
    """One ensemble's checked margins (and top-1 margins) of the models asked for, rows in ``position`` order."""

    position: dict[int, int]
    margins: dict[str, np.ndarray]
    top1: dict[str, np.ndarray] | None
    files: dict[str, str]
    check: dict | None
    notes: list[str]


def _load_tensor(path: Path, rel: str) -> np.ndarray:
    """A saved tensor (or array) as a numpy array: memory-mapped when the file allows it, so reading 100 rows of
    an aggregate reads 100 rows."""
    import torch

    obj = None
    for mmap in (True, False):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            break
        except Exception as err:  # pickle, zip and runtime errors all mean "not a file torch can read"
            if not mmap:
                raise SourceError(f"{rel}: cannot read it as a saved tensor ({type(err).__name__}: {err})") from err
    if isinstance(obj, torch.Tensor):
        return obj.float().numpy() if obj.dtype == torch.bfloat16 else obj.numpy()
    if isinstance(obj, np.ndarray):
        return obj
    raise SourceError(f"{rel}: expected a tensor, got {type(obj).__name__}")


def _read_only(idx: np.ndarray) -> np.ndarray:
    idx = np.array(idx, dtype=np.int64)
    idx.flags.writeable = False
    return idx


def _describe(fs: str, size: int, rel: str) -> str:
    return f"KLOM-models forget set {fs} ({size} train samples, hub file {rel})"


def _update_record(store: RunStore, source: KlomModelsSource, loaded: dict, written: int, skipped: int) -> None:
    """``klom_models.json``: where the margins came from, which files were read and checked (merged over reruns)."""
    path = store.path(ROW_RECORD)
    record = store.read_json(path) if store.exists(path) else {"ensembles": {}, "notes": []}
    record.update({"location": source.location, "variant": source.variant.folder,
                   "hub_epoch": source.variant.hub_epoch, "stored_epoch": source.variant.hub_epoch + 1,
                   "margin_check_tolerance": {"atol": MARGIN_ATOL, "rtol": MARGIN_RTOL},
                   "files_requested": sorted(set(record.get("files_requested", [])) | set(source.requested)),
                   "last_import": {"units_written": written, "units_already_there": skipped}})
    for (role, fs), got in loaded.items():
        key = f"{role}/{fs}"
        previous = record["ensembles"].get(key, {})
        ids = sorted(set(previous.get("model_ids", [])) | set(got.position))
        record["ensembles"][key] = {
            "model_ids": ids, "files": got.files, "top1": got.top1 is not None,
            "logits_check": got.check if got.check is not None else previous.get("logits_check")}
    record["notes"] = sorted(set(record["notes"]) | {n for got in loaded.values() for n in got.notes})
    store.write_json(path, record)
