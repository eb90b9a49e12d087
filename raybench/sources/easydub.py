"""The ``easydub`` source: EasyDUB's published CIFAR-10 / ResNet-9 models as a run's ensembles.

The hub data set ``easydub/EasyDUB-dataset`` (docs/methods.md#hub-layouts) holds 200 pretrain ResNet-9s (trained on all
50,000 train images) and 200 oracles per forget set (retrained without it), all after 24 epochs ("epoch_23", 0-based),
with their margins. ``EasydubSource.provide`` writes them in the run-folder layout of ``raybench.store``, so that
``raybench reduce`` scores the do-nothing baseline, and later any method, against published oracles without
training one. Hub paths (``X`` = model id 0..199, ``Z`` = forget set)::

    margins/cifar10/pretrain/retain/resnet9/id_X_epoch_23.npy        all n_train train samples (despite the name)
    margins/cifar10/pretrain/val/resnet9/id_X_epoch_23.npy           n_val
    margins/cifar10/pretrain/forget_Z/resnet9/id_X_epoch_23.npy      |F|, forget-file order
    margins/cifar10/oracle/forget_Z/{retain,forget,val}/resnet9/…    R ascending / F in file order / val
    forget_sets/cifar10/forget_set_Z.npy                             F
    models/cifar10/pretrain/resnet9/id_X_epoch_23.pt                 state dicts (``load_easydub_checkpoints``)

How the files map to raybench's splits, so that reduce computes what EasyDUB's ``eval_pretrain.py`` computes:

* originals (``role=original``, forget set ``none``): ``train`` = the pretrain "retain" file, ``val`` = the val
  file. Reduce's retain view (train minus F, ascending) is exactly eval_pretrain's ``pretrain[:, retain_mask]``.
  Its forget view is ``train[:, F]`` in forget-file order, where eval_pretrain reads the pretrain ``forget_Z``
  file: the import compares the two and records any difference in ``easydub.json`` (with a warning), because
  only when they agree is the forget row EasyDUB's number.
* oracles (``role=oracle``, one unit per forget set): their retain and forget margins are scattered back to
  train-id order (retain → R ascending, forget → F in file order), so the stored ``train`` split covers every id
  and reduce's retain / forget views give back the two files column for column; ``val`` as is.
* hub oracle ids (``allocate_oracles``, behind ``EasydubSource.model_ids``, which the plan asks): scoring
  oracles ``0 .. K-1`` (``K = n_oracles``, default ``n_models``), then ``k`` matching oracles
  ``K .. K+k-1`` imported as ``matching_oracle`` units (margins and checkpoints: the oracles oracle matching
  fine-tunes against), then with the floor on, oracles ``K+k .. K+k+n_models-1`` as the "unlearned"
  models of a method ``oracle_floor``, whose summary rows are the oracle-vs-oracle noise floor. The three never
  share a model, also across imports into one folder (``_check_against_store``); when the 200 published oracles
  cannot hold them the import refuses and says which ``n_models`` fits.
* originals whose units the plan marks ``checkpoint`` (a run with methods that unlearn, or ``raybench import
  --checkpoints``) are also stored as stacked checkpoints, which is what unlearn units start from
  (``UnitContext.load_stack``).

Margin cross-check (``check_margins``): method rows are margins raybench computes from the published state dicts,
while the do-nothing row and the oracles are the hub's margin files, so a wrong checkpoint format, key layout,
normalisation or sample order would shift every method row against its baseline. With checkpoints and the
images (a run passes its data set, ``raybench import`` takes ``--data-root``), the import first
recomputes pretrain models 0, 1 and scoring oracles 0, 1 of every forget set (downloading just those oracle state
dicts) on up to 128 evenly spaced positions of each of their margin files, and refuses, writing nothing, unless
every margin satisfies ``|ours - hub| <= 0.25 + 0.05·|hub|``. The size of that bound: the hub's margins come from
bf16 autocast inference on GPU (logits cast to float32 before the margin), ours from float32 on the CPU. bf16 keeps
8 significant bits (a relative rounding error of at most 2^-8 ≈ 0.4%), a ResNet-9 forward rounds about 20 times
(8 convolutions and their BatchNorms, 2 residual sums, the head and its ×0.2), so its logits are off by about 1%
rms and a few % in the tail; a margin moves by at most twice the largest logit change, and logits are at most
about |margin| plus a few in size: ≈ 0.05·|m|, with 0.25 for margins near 0. A layout error moves margins by the
spread between samples or between models: several units for trained CIFAR-10 ResNet-9s, at most of the compared
positions, far past the bound. The bound is derived, not measured on the published files: ``easydub.json``
records each file's largest ``|diff| / bound`` (``margin_check``), the headroom. Without images the check is not
done and a note says so; a rerun with images (or a run) does it before reusing the units.

The plan makes the units (blocks of ``block_size`` models, ids from what they hold: ``plan.import_unit_id``), so a
run and an import into one folder name the same units, and a rerun skips them.

Epochs: hub files are 0-based epoch 23; raybench stores the number of epochs trained, 24 (``STORED_EPOCH``), as
its own train units do. Seeds: hub models were not seeded by raybench; their ``seed`` column is -1 and
``model_id`` is the hub id. The import stores no images, so ``dataset.json`` has ``fingerprint: null`` until a run
that unlearns records its own.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from raybench.data import Dataset, ForgetSet
from raybench.data.forget_sets import validate_indices
from raybench.models import StackedModel
from raybench.plan import Ensemble, Unit, matching_oracle_count, plan_method_runs
from raybench.sources.base import Source, SourceError, write_import_unit
from raybench.store import FLOOR_METHOD, RunStore

if TYPE_CHECKING:
    from raybench.config import RunConfig

log = logging.getLogger(__name__)

HUB_REPO = "easydub/EasyDUB-dataset"
HUB_EPOCH = 23  # the 0-based epoch in every published file name
HUB_N_MODELS = 200  # pretrain models, and oracles per forget set, on the hub (ids 0..199)
STORED_EPOCH = 24  # epochs trained: what raybench's own train units store
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
FORGET_ID = re.compile(r"[1-9]\d*")  # EasyDUB names its forget sets 1, 2, …
_MODEL_ID = re.compile(r"id_(\d+)_epoch_\d+")
MARGIN_CHECK_MODELS = 2  # pretrain models and scoring oracles (per forget set) whose margins are recomputed
MARGIN_CHECK_SAMPLES = 128  # margins compared per hub file, at evenly spaced positions
MARGIN_ATOL, MARGIN_RTOL = 0.25, 0.05  # |ours - hub| <= ATOL + RTOL·|hub|: bf16 rounding (module docstring)
NOT_CHECKED = ("margin cross-check not done: no images to recompute the published checkpoints' margins on "
               "(raybench import easydub --data-root); method rows start from checkpoints not compared with the "
               "hub's margins")


class EasyDubError(SourceError):
    """The source cannot give what was asked (missing files, too few models, bad shapes): exit code 2 in the CLI."""


# -- hub paths -------------------------------------------------------------------------------------------------------
def _file(model_id: int, suffix: str = "npy") -> str:
    return f"id_{model_id}_epoch_{HUB_EPOCH}.{suffix}"


def pretrain_margins_path(split: str, model_id: int, forget_set: str | None = None) -> str:
    """Hub path of a pretrain model's margins: split ``retain`` (all train ids), ``val`` or ``forget``."""
    folder = f"forget_{forget_set}" if split == "forget" else split
    return f"margins/cifar10/pretrain/{folder}/resnet9/{_file(model_id)}"


def oracle_margins_path(forget_set: str, split: str, model_id: int) -> str:
    """Hub path of an oracle's margins on ``retain`` (R ascending), ``forget`` (file order) or ``val``."""
    return f"margins/cifar10/oracle/forget_{forget_set}/{split}/resnet9/{_file(model_id)}"


def forget_set_file(forget_set: str) -> str:
    return f"forget_sets/cifar10/forget_set_{forget_set}.npy"


def checkpoint_file(model_id: int, forget_set: str | None = None) -> str:
    """Hub path of a state dict: a pretrain model, or an oracle of ``forget_set``."""
    role = "pretrain" if forget_set is None else f"oracle/forget_{forget_set}"
    return f"models/cifar10/{role}/resnet9/{_file(model_id, 'pt')}"


@dataclass(frozen=True)
class OracleAllocation:
    """Which hub oracle ids of every forget set an import uses for what. The three ranges never overlap: a
    model that scores KLOM, one that oracle matching fine-tunes against and one that stands in for an unlearned
    model in the noise floor must be different models, or a row is judged by its own models."""

    scoring: range  # 0..K-1: the oracles every row is scored against
    matching: range  # K..K+k-1: oracle matching's targets
    floor: range  # K+k..K+k+N-1: the "unlearned" models of ``oracle_floor``

    @property
    def stop(self) -> int:
        """One past the highest hub id used: oracles ``0..stop-1`` are read."""
        return self.floor.stop


def allocate_oracles(n_models: int, *, n_oracles: int | None = None,
                     matching_oracles: int | Callable[[int], int] = 0,
                     oracle_floor: bool = False) -> OracleAllocation:
    """The hub oracle ids of a run or an import (``EasydubSource.model_ids``):
    scoring oracles first, then the matching oracles, then the floor, each range after the last.

    ``matching_oracles`` may be a function of the number of originals (oracle matching with ``per_model``
    pairing needs one per original). When the 200 published oracles cannot hold all three ranges, an
    ``EasyDubError`` says the largest ``n_models`` that fits (``n_oracles``, when given, held fixed)."""
    def sizes(n: int) -> tuple[int, int, int]:
        k = matching_oracles(n) if callable(matching_oracles) else matching_oracles
        return (n if n_oracles is None else n_oracles), k, (n if oracle_floor else 0)

    scoring, matching, floor = sizes(n_models)
    if n_models > HUB_N_MODELS:
        raise EasyDubError(f"n_models = {n_models}: EasyDUB publishes {HUB_N_MODELS} pretrain models "
                           f"(hub ids 0..{HUB_N_MODELS - 1})")
    if scoring + matching + floor > HUB_N_MODELS:
        parts = [f"{scoring} scoring oracles (hub ids 0..{scoring - 1})"]
        if matching:
            parts.append(f"{matching} matching oracles ({scoring}..{scoring + matching - 1})")
        if floor:
            parts.append(f"{floor} oracle-floor oracles ({scoring + matching}..{scoring + matching + floor - 1})")
        fits = next((n for n in range(n_models - 1, 1, -1) if sum(sizes(n)) <= HUB_N_MODELS), None)
        hint = f"n_models <= {fits} fits" if fits else "no n_models fits; lower n_oracles or the matching oracles"
        raise EasyDubError(f"{' + '.join(parts)} need {scoring + matching + floor} oracles per forget set, and "
                           f"EasyDUB publishes {HUB_N_MODELS} oracles per forget set: {hint}")
    return OracleAllocation(range(0, scoring), range(scoring, scoring + matching),
                            range(scoring + matching, scoring + matching + floor))


def check_checkpoints(forget_sets: Sequence[str], allocation: OracleAllocation) -> list[str]:
    """Hub state dicts whose margins the margin cross-check recomputes (``check_margins``): pretrain models
    ``0, 1`` and scoring oracles ``0, 1`` of every forget set."""
    files = [checkpoint_file(i) for i in range(MARGIN_CHECK_MODELS)]
    return files + [checkpoint_file(i, fs) for fs in forget_sets for i in allocation.scoring[:MARGIN_CHECK_MODELS]]


def needed_files(forget_sets: Sequence[str], n_models: int, *, n_oracles: int | None = None,
                 oracle_floor: bool = False, matching_oracles: int = 0, checkpoints: bool = False,
                 margin_check: bool = False) -> list[str]:
    """Every hub file ``EasydubSource.provide`` reads, and nothing else (the ``allow_patterns`` of a download);
    ``margin_check`` adds the oracle state dicts the margin cross-check needs."""
    allocation = allocate_oracles(n_models, n_oracles=n_oracles, matching_oracles=matching_oracles,
                                  oracle_floor=oracle_floor)
    files = [pretrain_margins_path(split, i) for split in ("retain", "val") for i in range(n_models)]
    if checkpoints:
        files += [checkpoint_file(i) for i in range(n_models)]
    for fs in forget_sets:
        files.append(forget_set_file(fs))
        files += [pretrain_margins_path("forget", i, fs) for i in range(n_models)]
        files += [oracle_margins_path(fs, split, i) for split in ("retain", "forget", "val")
                  for i in range(allocation.stop)]
        files += [checkpoint_file(i, fs) for i in allocation.matching]
    if margin_check:
        files += [f for f in check_checkpoints(forget_sets, allocation) if f not in files]
    return files


def run_identity(n_models: int, block_size: int, chunk_size: int, n_oracles: int | None = None) -> dict:
    """The run identity of a folder of imported EasyDUB models (``RunStore.open_run``): an import and a
    ``raybench run`` with ``source = "easydub"`` compute it alike, so they share one folder."""
    identity = {"dataset": "cifar10", "arch": "resnet9", "source": "easydub", "hub_epoch": HUB_EPOCH,
                "n_models": n_models, "block_size": block_size, "chunk_size": chunk_size}
    if n_oracles is not None and n_oracles != n_models:
        identity["n_oracles"] = n_oracles
    return identity


# -- getting the files -----------------------------------------------------------------------------------------------
def hub_folder(source: str | Path, files: Sequence[str], *, cache_dir: str | Path | None = None) -> Path:
    """A local folder in the hub layout holding ``files``: ``source`` itself if it is a folder, else a hub
    repo id whose ``files`` alone are downloaded (``snapshot_download`` with ``allow_patterns`` = these exact
    paths: the full data set is hundreds of GB of checkpoints and logits). Missing files are an error."""
    path = Path(source).expanduser()
    if path.is_dir():
        root = path
    elif _REPO_ID.fullmatch(str(source)):
        import huggingface_hub

        try:
            root = Path(huggingface_hub.snapshot_download(repo_id=str(source), repo_type="dataset",
                                                          allow_patterns=list(files), cache_dir=cache_dir))
        except Exception as err:  # the hub client raises many types (HTTP, offline, auth); all mean "not here"
            raise EasyDubError(f"cannot download {len(files)} files from the hub data set {source!r}: "
                               f"{type(err).__name__}: {err}") from err
    else:
        raise EasyDubError(f"source {str(source)!r} is neither a folder nor a hub repo id like {HUB_REPO!r}")
    missing = [f for f in files if not (root / f).is_file()]
    sets = [f for f in missing if f.startswith("forget_sets/")]
    if sets:  # the likelier mistake: name it before the hundreds of margin files that go with it
        raise EasyDubError(f"{root} has no {', '.join(sets)}: not a forget set of this source")
    if missing:
        raise EasyDubError(f"{len(missing)} of {len(files)} needed files are missing from {root}, e.g. "
                           f"{', '.join(missing[:3])}{_available_hint(root, missing)}")
    return root


def _available_hint(root: Path, missing: list[str]) -> str:
    """When model files are missing, say how many models the folder has, the usual cause (n_models too big)."""
    folder = (root / missing[0]).parent
    if not _MODEL_ID.search(missing[0]) or not folder.is_dir():
        return ""
    ids = {int(m.group(1)) for p in folder.iterdir() if (m := _MODEL_ID.fullmatch(p.stem))}
    count = next(i for i in range(len(ids) + 1) if i not in ids)
    return f"; {folder.relative_to(root)} has models 0..{count - 1} ({count} usable)" if count else ""


def download_forget_sets(root: str | Path, *, repo: str = HUB_REPO,
                         ids: Iterable[str] = tuple(str(i) for i in range(1, 11))) -> list[Path]:
    """Fetch EasyDUB's CIFAR-10 forget-set files into ``<root>/forget_sets/cifar10/`` (the place the ``cifar10``
    built-in forget sets are read from). Needs internet access."""
    import huggingface_hub

    files = [forget_set_file(i) for i in ids]
    huggingface_hub.snapshot_download(repo_id=repo, repo_type="dataset", allow_patterns=files, local_dir=str(root))
    return [Path(root) / f for f in files]


def checkpoint_paths(source: str | Path, model_ids: Iterable[int], *, forget_set: str | None = None,
                     cache_dir: str | Path | None = None) -> list[Path]:
    """Local paths of published state dicts (pretrain, or oracles of ``forget_set``), downloading only those."""
    files = [checkpoint_file(int(i), forget_set) for i in model_ids]
    root = hub_folder(source, files, cache_dir=cache_dir)
    return [root / f for f in files]


# -- reading margins -------------------------------------------------------------------------------------------------
@dataclass
class _Reader:
    """Loads hub margin files into (models, samples) float32, checking shapes and noting lossy conversions."""

    root: Path
    notes: list[str] = field(default_factory=list)
    dtypes: set[str] = field(default_factory=set)

    def vector(self, rel: str) -> np.ndarray:
        try:
            arr = np.load(self.root / rel, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise EasyDubError(f"{rel}: not a plain .npy array ({err})") from err
        if arr.ndim != 1 or arr.dtype.kind != "f":
            raise EasyDubError(f"{rel}: expected a 1-D float array of margins, got {arr.dtype} {arr.shape}")
        return arr

    def matrix(self, files: list[str], width: int) -> np.ndarray:
        out = np.empty((len(files), width), dtype=np.float32)
        for row, rel in enumerate(files):
            arr = self.vector(rel)
            if len(arr) != width:
                raise EasyDubError(f"{rel}: {len(arr)} margins, expected {width}")
            if np.isnan(arr).any():
                raise EasyDubError(f"{rel}: NaN margins")
            self.dtypes.add(arr.dtype.name)
            out[row] = arr
            if arr.dtype != np.float32 and not np.array_equal(out[row], arr):
                self.notes.append(f"{rel}: {arr.dtype} margins rounded to float32 (max change "
                                  f"{np.max(np.abs(out[row] - arr)):.3g}); KLOM can differ from EasyDUB's there")
        return out  # ±inf is stored under the store's policy (``store.finite_margins``)


# -- the source ------------------------------------------------------------------------------------------------------
class EasydubSource(Source):
    """EasyDUB's published models as a run's originals, oracles, matching oracles and oracle floor (module doc).

    ``location``: a local folder in the hub layout, or a hub repo id (default ``easydub/EasyDUB-dataset``), of which
    only the needed files are downloaded into ``cache_dir`` (or the Hugging Face cache)."""

    name: ClassVar[str] = "easydub"

    def __init__(self, location: str | Path = "", *, cache_dir: str | Path | None = None) -> None:
        self.location = str(location) or HUB_REPO
        self.cache_dir = cache_dir

    def check(self, config: RunConfig) -> None:
        if (config.dataset, config.resolved_arch) != ("cifar10", "resnet9"):
            raise EasyDubError("source easydub needs dataset = \"cifar10\" and arch = \"resnet9\": EasyDUB "
                               f"publishes CIFAR-10 ResNet-9s (got {config.dataset} / {config.resolved_arch})")
        bad = [fs for fs in config.forget_sets if not FORGET_ID.fullmatch(fs)]
        if bad:
            raise EasyDubError(f"forget sets of EasyDUB are positive integers (EasyDUB's ids 1..10), got "
                               f"{', '.join(bad)}")
        method_runs = plan_method_runs(config)
        # the n_models that fits is reported with oracle matching's count growing with n_models (per_model)
        allocate_oracles(config.n_models, n_oracles=config.n_oracles, oracle_floor=config.floor,
                         matching_oracles=lambda n: matching_oracle_count(dataclasses.replace(config, n_models=n),
                                                                          method_runs))

    def config_defaults(self) -> dict:
        return {"dataset": "cifar10", "arch": "resnet9"}

    def identity(self, config: RunConfig, dataset: Dataset | None) -> dict:
        """Nothing here trained the models, so no recipe or seed gives them their meaning (the recipe still goes
        into unlearn unit ids)."""
        return run_identity(config.n_models, config.block_size, config.chunk_size, config.n_oracles)

    def forget_sets(self, config: RunConfig, dataset: Dataset | None,
                    store: RunStore | None = None) -> dict[str, ForgetSet]:
        """The hub's forget-set files (only those are downloaded), or the sets an earlier import recorded in
        ``store`` (so a resumed run reads nothing from the hub)."""
        recorded = {fs for fs in config.forget_sets if store is not None and store.exists(store.forget_set_path(fs))}
        wanted = [forget_set_file(fs) for fs in config.forget_sets if fs not in recorded]
        root = None
        if wanted:  # one download: the files and, without the images, one margin file that gives the train size
            size_file = pretrain_margins_path("retain", 0)
            root = hub_folder(self.location, wanted + ([size_file] if dataset is None else []),
                              cache_dir=self.cache_dir)
            n_train = dataset.n_train if dataset is not None else len(_Reader(root).vector(size_file))
        out = {}
        for fs in config.forget_sets:
            if fs in recorded:
                idx = store.read_forget_set(fs)
            else:
                what = f"forget-set file {forget_set_file(fs)} in {root}"
                try:
                    raw = np.load(root / forget_set_file(fs), allow_pickle=False)
                except (OSError, ValueError) as err:
                    raise EasyDubError(f"{what}: not a plain .npy array ({err})") from err
                idx = validate_indices(raw, n_train, source=what)
            out[fs] = ForgetSet(fs, idx, f"EasyDUB forget set {fs} ({len(idx)} train samples, hub file "
                                         f"{forget_set_file(fs)})")
        return out

    def model_ids(self, config: RunConfig, requests: Sequence[Ensemble]) -> dict[Ensemble, range]:
        """Pretrain models 0..N-1; per forget set the oracles of ``allocate_oracles`` (scoring, then matching,
        then floor)."""
        count = {r.role: r.count for r in requests}
        allocation = allocate_oracles(count["original"], n_oracles=count.get("oracle"),
                                      matching_oracles=count.get("matching_oracle", 0),
                                      oracle_floor="unlearned" in count)
        by_role = {"original": range(count["original"]), "oracle": allocation.scoring,
                   "matching_oracle": allocation.matching, "unlearned": allocation.floor}
        return {r: by_role[r.role] for r in requests}

    def notes(self, store: RunStore) -> list[str]:
        """What the imports into ``store`` noticed that can make numbers differ from EasyDUB's (``easydub.json``)."""
        path = store.path("easydub.json")
        return list(store.read_json(path).get("notes", [])) if store.exists(path) else []

    def provide(self, units: Sequence[Unit], store: RunStore, run_id: str, dataset: Dataset | None) -> list[Unit]:
        """Write the import units that are not complete yet (with their checkpoints), after the margin
        cross-check when checkpoints are wanted and ``dataset`` gives the images; read nothing from the hub when
        every unit is already there and checked. Returns no unit for the engine."""
        units = [u for u in units if u.kind == "import"]
        originals = [u for u in units if u.role == "original"]
        forget_sets = sorted({u.forget_set for u in units if u.role != "original"}, key=int)
        allocation = _allocation_of(units)
        _check_against_store(store, allocation, forget_sets)
        with_checkpoints = any(u.checkpoint for u in originals)
        check = dataset if with_checkpoints else None  # unlearning starts from checkpoints: check their margins
        indices = {fs: store.read_forget_set(fs) for fs in forget_sets}
        missing = [u for u in units if not store.is_complete(u.id)
                   or (u.checkpoint and not store.exists(store.checkpoint_path(u.id)))]
        checked = check is None or _recorded_check_covers(store, forget_sets, allocation, check.fingerprint())
        if not missing and checked:
            if dataset is not None and with_checkpoints:
                self._record_images(store, dataset)
            return []

        n_models = sum(u.n_models for u in originals)
        files = needed_files(forget_sets, n_models, n_oracles=len(allocation.scoring),
                             oracle_floor=bool(len(allocation.floor)), matching_oracles=len(allocation.matching),
                             checkpoints=with_checkpoints, margin_check=check is not None)
        root = hub_folder(self.location, files, cache_dir=self.cache_dir)
        reader = _Reader(root)
        n_train = len(reader.vector(pretrain_margins_path("retain", 0)))
        n_val = len(reader.vector(pretrain_margins_path("val", 0)))
        if dataset is not None:
            _check_sizes(n_train, n_val, (dataset.n_train, dataset.n_val))
        # before anything is written: a checkpoint that does not reproduce its margins must not be unlearned from
        margin_check = check_margins(root, check, indices, allocation) if check is not None else None
        if with_checkpoints and check is None and not _recorded_check_covers(store, forget_sets, allocation):
            reader.notes.append(NOT_CHECKED)
        store.record_dataset({"name": "cifar10", "fingerprint": None, "n_train": n_train, "n_val": n_val,
                              "source_train": list(range(n_train)), "source_val": list(range(n_val))})
        chunk_size = store.run_info()["identity"]["chunk_size"]
        # read even when the originals are already stored: every forget set's consistency check needs it
        pretrain_train = reader.matrix([pretrain_margins_path("retain", i) for i in range(n_models)], n_train)
        retain = {fs: np.flatnonzero(~np.isin(np.arange(n_train), idx)) for fs, idx in indices.items()}
        for unit in units:
            ids = list(unit.model_ids)
            hub_role = None if unit.role == "original" else unit.forget_set
            checkpoint = None
            if unit.checkpoint and not store.exists(store.checkpoint_path(unit.id)):
                stack = load_easydub_checkpoints([root / checkpoint_file(i, hub_role) for i in ids], seeds=ids)
                checkpoint = {"seeds": ids, "state": stack.state_dict()}
                if store.is_complete(unit.id):  # an earlier import committed it without its checkpoint
                    store.write_checkpoint(unit.id, checkpoint)
            if store.is_complete(unit.id):
                continue
            if unit.role == "original":
                margins = {"train": pretrain_train[ids[0]:ids[-1] + 1],
                           "val": reader.matrix([pretrain_margins_path("val", i) for i in ids], n_val)}
            else:
                margins = _oracle_margins(reader, unit.forget_set, ids, indices[unit.forget_set],
                                          retain[unit.forget_set], n_train, n_val)
            write_import_unit(store, run_id, unit, source=self.name, epoch=STORED_EPOCH, chunk_size=chunk_size,
                              margins=margins, checkpoint=checkpoint, extra={"hub_epoch": HUB_EPOCH})
        checks = {fs: _check_pretrain_forget(reader, fs, list(range(n_models)), idx, pretrain_train)
                  for fs, idx in indices.items()}
        _update_record(store, self.location, root, checks, reader, indices, margin_check)
        if dataset is not None and with_checkpoints:
            self._record_images(store, dataset)
        return []

    @staticmethod
    def _record_images(store: RunStore, dataset: Dataset) -> None:
        """Note in ``dataset.json`` which images the run's methods unlearn with (other images are refused later)."""
        store.record_dataset({**store.read_json(store.path("dataset.json")), "fingerprint": dataset.fingerprint()})


def _allocation_of(units: Sequence[Unit]) -> OracleAllocation:
    """The hub oracle ids the plan's units hold, per role (the same for every forget set)."""
    def ids(role: str) -> range:
        found = sorted({i for u in units if u.role == role for i in u.model_ids})
        return range(found[0], found[-1] + 1) if found else range(0)

    return OracleAllocation(ids("oracle"), ids("matching_oracle"), ids("unlearned"))


def _span(ids: Iterable[int]) -> str:
    ids = sorted(ids)
    return f"{ids[0]}..{ids[-1]}" if len(ids) > 1 and ids[-1] - ids[0] == len(ids) - 1 else ", ".join(map(str, ids))


def _check_against_store(store: RunStore, allocation: OracleAllocation, forget_sets: Sequence[str]) -> None:
    """Refuse an import whose matching oracles and oracle floor would share hub oracles with those an earlier
    import committed to this folder, or whose floor would sit on other oracles than the folder's floor (reduce
    would pool the two): ``allocate_oracles`` keeps them apart within one import only."""
    held: dict[tuple[str, str], set[int]] = {}
    for unit in store.completed_units().values():
        meta = unit.meta
        if meta.get("kind") != "import" or meta.get("forget_set") not in forget_sets:
            continue
        kind = "matching" if meta["role"] == "matching_oracle" else "floor" if meta["method"] == FLOOR_METHOD else None
        if kind:
            held.setdefault((meta["forget_set"], kind), set()).update(int(i) for i in meta["model_ids"])
    for fs in forget_sets:
        old_floor, new_floor = held.get((fs, "floor"), set()), set(allocation.floor)
        if old_floor and new_floor and old_floor != new_floor:
            raise EasyDubError(f"forget set {fs} in {store.uri} has its oracle floor on hub oracles {_span(old_floor)};"
                               f" this import's floor would be {_span(new_floor)} (another number of matching "
                               "oracles); use a new --out folder")
        matching = held.get((fs, "matching"), set()) | set(allocation.matching)
        shared = matching & (old_floor | new_floor)
        if shared:
            raise EasyDubError(
                f"forget set {fs} in {store.uri}: oracle matching's matching oracles and the oracle floor would share "
                f"hub oracles {_span(shared)}, so the floor would be judged by the models oracle matching copies; "
                f"import the floor after every matching oracle (raybench import easydub --matching-oracles "
                f"{max(matching) + 1 - allocation.scoring.stop}, the floor on) into a new --out folder")


def _recorded_check_covers(store: RunStore, forget_sets: Sequence[str], allocation: OracleAllocation,
                           fingerprint: str | None = None) -> bool:
    """Whether an earlier import into ``store`` passed the margin cross-check for these forget sets (on the images
    of ``fingerprint``, when given)."""
    path = store.path("easydub.json")
    done = store.read_json(path).get("margin_check", {}) if store.exists(path) else {}
    if fingerprint is not None and done.get("fingerprint") != fingerprint:
        return False
    return set(check_checkpoints(forget_sets, allocation)) <= set(done.get("checkpoints", []))


def _check_sizes(n_train: int, n_val: int, expect_sizes: tuple[int, int] | None) -> None:
    if expect_sizes is not None and (n_train, n_val) != tuple(expect_sizes):
        raise EasyDubError(f"the hub margins cover {n_train} train / {n_val} val samples, the data set here has "
                           f"{expect_sizes[0]} / {expect_sizes[1]}: they were not computed on these images")


def _oracle_margins(reader: _Reader, fs: str, ids: list[int], idx: np.ndarray, retain: np.ndarray, n_train: int,
                    n_val: int) -> dict[str, np.ndarray]:
    """An oracle ensemble's margins in train-id order: retain file → R ascending, forget file → F in file order."""
    train = np.empty((len(ids), n_train), dtype=np.float32)
    train[:, retain] = reader.matrix([oracle_margins_path(fs, "retain", i) for i in ids], len(retain))
    train[:, idx] = reader.matrix([oracle_margins_path(fs, "forget", i) for i in ids], len(idx))
    return {"train": train, "val": reader.matrix([oracle_margins_path(fs, "val", i) for i in ids], n_val)}


def _check_pretrain_forget(reader: _Reader, fs: str, ids: list[int], idx: np.ndarray,
                           pretrain_train: np.ndarray) -> dict:
    """Compare the pretrain ``forget_Z`` files (what eval_pretrain scores) with the train file at F (what reduce
    scores); they come from the same models and must agree for the forget row to be EasyDUB's number."""
    forget = reader.matrix([pretrain_margins_path("forget", i, fs) for i in ids], len(idx))
    diff = np.abs(forget.astype(np.float64) - pretrain_train[:, idx])
    result = {"n_values": int(diff.size), "n_different": int((diff > 0).sum()), "max_abs_diff": float(diff.max())}
    if result["n_different"]:
        message = (f"forget set {fs}: {result['n_different']} of {diff.size} pretrain forget-file margins differ from "
                   f"the pretrain train-file margins at F (max |diff| {result['max_abs_diff']:.3g}); reduce scores "
                   "the train file, EasyDUB's eval_pretrain the forget file, so their forget rows can differ")
        log.warning(message)
        reader.notes.append(message)
    return result


def _positions(n: int) -> np.ndarray:
    """``MARGIN_CHECK_SAMPLES`` evenly spaced positions of a file of ``n`` margins (all of a shorter one): a
    wrong sample order or a file of another model shows anywhere, and the ends are where an offset shows."""
    return np.unique(np.linspace(0, n - 1, min(n, MARGIN_CHECK_SAMPLES)).round().astype(np.int64))


def check_margins(root: Path, images: Dataset, indices: dict[str, np.ndarray],
                  allocation: OracleAllocation) -> dict:
    """Recompute the margins of pretrain models 0, 1 and scoring oracles 0, 1 of every forget set from their
    published state dicts on ``images`` and compare them with the hub's margin files, at up to
    ``MARGIN_CHECK_SAMPLES`` positions per file.

    Method rows use margins raybench computes from the published checkpoints, the do-nothing row and the oracles
    use the hub's files: a wrong checkpoint format, key layout, normalisation or sample order would shift every
    method row against its baseline, and this is where it shows. Margins are recomputed as a run does
    (``load_easydub_checkpoints``, ``training.compute_margins``); each must be within
    ``MARGIN_ATOL + MARGIN_RTOL·|hub margin|`` of the hub's, which the hub's bf16 inference stays within (module
    docstring). Raises ``EasyDubError`` naming the files that are not; returns what was compared."""
    import torch

    from raybench.training import compute_margins

    everything = {"train": np.arange(images.n_train), "val": np.arange(images.n_val)}
    arrays = {"train": (images.x_train, images.y_train), "val": (images.x_val, images.y_val)}
    models: dict[str, list[tuple[str, str, np.ndarray]]] = {}  # checkpoint -> (margin file, split, ids in file order)
    for i in range(MARGIN_CHECK_MODELS):
        models[checkpoint_file(i)] = [(pretrain_margins_path("retain", i), "train", everything["train"]),
                                      (pretrain_margins_path("val", i), "val", everything["val"]),
                                      *((pretrain_margins_path("forget", i, fs), "train", idx)
                                        for fs, idx in indices.items())]
    for fs, idx in indices.items():
        retain = np.setdiff1d(everything["train"], idx)  # ascending, as the hub's oracle retain files
        for i in allocation.scoring[:MARGIN_CHECK_MODELS]:
            models[checkpoint_file(i, fs)] = [(oracle_margins_path(fs, "retain", i), "train", retain),
                                              (oracle_margins_path(fs, "forget", i), "train", idx),
                                              (oracle_margins_path(fs, "val", i), "val", everything["val"])]
    compared, bad = {}, []
    for ckpt, files in models.items():
        stack = load_easydub_checkpoints([root / ckpt])
        wanted = {split: np.unique(np.concatenate([ids[_positions(len(ids))] for _, s, ids in files if s == split]))
                  for split in ("train", "val")}
        ours = {}
        for split, sample_ids in wanted.items():
            x, y = arrays[split]
            row = compute_margins(stack, torch.from_numpy(x[sample_ids]), torch.from_numpy(y[sample_ids]))[0]
            ours[split] = dict(zip(sample_ids.tolist(), row.astype(np.float64), strict=True))
        for rel, split, ids in files:
            hub = np.load(root / rel, allow_pickle=False)
            if hub.shape != ids.shape:
                raise EasyDubError(f"{rel}: {hub.shape} margins, expected ({len(ids)},)")
            pos = _positions(len(ids))
            mine = np.array([ours[split][i] for i in ids[pos].tolist()])
            theirs = hub[pos].astype(np.float64)
            diff = np.abs(mine - theirs)
            over = diff / (MARGIN_ATOL + MARGIN_RTOL * np.abs(theirs))
            over[np.isnan(over)] = np.inf
            compared[rel] = {"checkpoint": ckpt, "n_compared": len(pos), "max_abs_diff": float(np.nanmax(diff)),
                             "max_diff_over_tolerance": float(over.max())}
            if over.max() > 1:
                bad.append(f"{rel} vs {ckpt}: {int((over > 1).sum())} of {len(pos)} margins differ (max |diff| "
                           f"{np.nanmax(diff):.3g})")
    if bad:
        raise EasyDubError(
            f"the published checkpoints do not reproduce the hub's margins on these images beyond |diff| <= "
            f"{MARGIN_ATOL} + {MARGIN_RTOL}·|margin| (bf16 rounding): {'; '.join(bad[:3])}"
            f"{f'; and {len(bad) - 3} more files' if len(bad) > 3 else ''}. Method rows would be computed from "
            "other models, or other samples, than their do-nothing baseline and the oracles (wrong checkpoint "
            "format, key layout, images or sample order): nothing was imported")
    worst = max(compared.values(), key=lambda c: c["max_diff_over_tolerance"])
    log.info("margin cross-check: %d checkpoints reproduce %d hub files (worst %.2f of the tolerance)", len(models),
             len(compared), worst["max_diff_over_tolerance"])
    return {"fingerprint": images.fingerprint(), "tolerance": {"atol": MARGIN_ATOL, "rtol": MARGIN_RTOL},
            "samples_per_file": MARGIN_CHECK_SAMPLES, "checkpoints": sorted(models), "files": compared}


def _update_record(store: RunStore, source: str | Path, root: Path, checks: dict, reader: _Reader,
                   indices: dict[str, np.ndarray], margin_check: dict | None) -> dict:
    """``easydub.json``: where the margins came from and what the import noticed (merged over reruns)."""
    path = store.path("easydub.json")
    record = store.read_json(path) if store.exists(path) else {"forget_sets": {}, "notes": []}
    record.update({"source": str(source), "folder": str(root), "hub_repo": HUB_REPO, "hub_epoch": HUB_EPOCH,
                   "stored_epoch": STORED_EPOCH, "file_dtypes": sorted(reader.dtypes)})
    for fs, check in checks.items():
        record["forget_sets"][fs] = {"size": len(indices[fs]), "pretrain_forget_vs_train": check}
    notes = set(record["notes"]) | set(reader.notes)
    if margin_check is not None:
        previous = record.get("margin_check", {})
        if previous.get("fingerprint") == margin_check["fingerprint"]:  # same images: add the new forget sets
            margin_check = {**margin_check, "checkpoints": sorted(set(previous["checkpoints"]) |
                                                                  set(margin_check["checkpoints"])),
                            "files": {**previous["files"], **margin_check["files"]}}
        record["margin_check"] = margin_check
        notes.discard(NOT_CHECKED)
    record["notes"] = sorted(notes)
    store.write_json(path, record)
    return record


# -- checkpoints -----------------------------------------------------------------------------------------------------
_PREFIXES = ("module.", "model.", "_orig_mod.")


def load_state_dict_file(path: str | Path) -> dict:
    """A published ResNet-9 state dict with the keys of ``raybench.models.resnet9.resnet9()``.

    Accepts a bare state dict or one wrapped as ``{"state_dict": …}`` / ``{"model": …}``, and strips the
    ``model.`` / ``module.`` (wrapper, DataParallel) and ``_orig_mod.`` (torch.compile) prefixes, in any nesting.
    """
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises pickle, zip and runtime errors for a file that is not a checkpoint
        raise EasyDubError(f"{path}: cannot read a PyTorch checkpoint ({type(err).__name__}: {err})") from err
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise EasyDubError(f"{path}: expected a state dict (str -> tensor), got {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        out[key] = value
    return out


def load_easydub_checkpoints(paths: Sequence[str | Path], *, seeds: Sequence[int] | None = None,
                             image_size: int = 32) -> StackedModel:
    """Stack published ResNet-9 state dicts (e.g. ``models/cifar10/pretrain/resnet9/id_X_epoch_23.pt``).

    Each file is loaded strictly into a plain ``resnet9()`` (so a missing or unexpected key is an error naming the
    file), then the models are stacked (``raybench.models.stack_models``) on the CPU in float32. ``seeds`` label
    the models (the stack's ``seeds``); by default the hub id in each file name, else the position.
    """
    from raybench.models import stack_models
    from raybench.models.resnet9 import resnet9

    if not paths:
        raise EasyDubError("load_easydub_checkpoints needs at least one checkpoint")
    singles, shapes = [], set()
    for path in paths:
        state = load_state_dict_file(path)
        head, stem = state.get("9.weight"), state.get("0.0.weight")
        if head is None or stem is None or head.dim() != 2 or stem.dim() != 4:
            raise EasyDubError(f"{path}: no ResNet-9 keys '0.0.weight' / '9.weight' (keys start {list(state)[:4]})")
        model = resnet9(num_classes=head.shape[0], in_channels=stem.shape[1])
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise EasyDubError(f"{path}: not an EasyDUB ResNet-9 state dict: {err}") from err
        singles.append(model.float())
        shapes.add((stem.shape[1], head.shape[0]))
    if len(shapes) > 1:
        raise EasyDubError(f"checkpoints disagree in input channels / classes: {sorted(shapes)}")
    if seeds is None:
        found = [_MODEL_ID.search(Path(p).name) for p in paths]
        seeds = [int(m.group(1)) for m in found] if all(found) else list(range(len(paths)))
    (channels, classes), = shapes
    return stack_models(singles, "resnet9", list(seeds), (channels, image_size, image_size), classes)
