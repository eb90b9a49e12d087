"""EasyDUB's published CIFAR-10 / ResNet-9 data: margins into a raybench run folder, checkpoints into a stack.

The hub data set ``easydub/EasyDUB-dataset`` (METHODS.md §5.2) holds 200 pretrain ResNet-9s (trained on all 50,000
train images) and 200 oracles per forget set (retrained without it), all after 24 epochs ("epoch_23", 0-based),
with their margins. ``import_easydub`` turns them into the run-folder layout of ``raybench.store``, so that
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
* ``oracle_floor=True`` also imports oracles ``n_oracles .. n_oracles+n_models-1`` as the "unlearned" models of a
  method ``oracle_floor``: its summary rows are the oracle-vs-oracle noise floor (METHODS.md §1.6, §6.1).
* ``matching_oracles=k`` imports oracles ``n_oracles .. n_oracles+k-1`` of every forget set as ``matching_oracle``
  units (margins and checkpoints): the oracles oracle matching fine-tunes against, disjoint from the scoring ones.
* ``checkpoints=True`` also stores each block of originals as a stacked checkpoint, which is what a run's unlearn
  units start from (``UnitContext.load_stack``): ``raybench run`` with ``easydub_source`` set imports this way,
  then runs every method on the published originals (``raybench.engine.import_published``).

Units come in blocks of ``block_size`` models, with ids derived from what they hold (``import_unit_id``), so a
run's plan names exactly the units an import wrote, and an import rerun skips them.

Epochs: hub files are 0-based epoch 23; raybench stores the number of epochs trained, 24 (``STORED_EPOCH``), as
its own train units do. Seeds: hub models were not seeded by raybench; their ``seed`` column is -1 and
``model_id`` is the hub id. The import reads no images, so ``dataset.json`` has ``fingerprint: null``.
"""

from __future__ import annotations

import logging
import posixpath
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raybench.data.forget_sets import validate_indices
from raybench.ids import digest
from raybench.models import StackedModel
from raybench.store import RunStore, margins_table

log = logging.getLogger(__name__)

HUB_REPO = "easydub/EasyDUB-dataset"
HUB_EPOCH = 23  # the 0-based epoch in every published file name
HUB_N_MODELS = 200  # pretrain models, and oracles per forget set, on the hub (ids 0..199)
STORED_EPOCH = 24  # epochs trained: what raybench's own train units store
NO_SEED = -1  # the seed column of a hub model: not seeded by raybench
FLOOR_METHOD = "oracle_floor"
DEFAULT_CHUNK_SIZE = 8192  # RunConfig's defaults, so an import and a raybench run chunk and block alike
DEFAULT_BLOCK_SIZE = 50
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
FORGET_ID = re.compile(r"[1-9]\d*")  # EasyDUB names its forget sets 1, 2, …
_MODEL_ID = re.compile(r"id_(\d+)_epoch_\d+")


class EasyDubError(ValueError):
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


def needed_files(forget_sets: Sequence[str], n_models: int, *, n_oracles: int | None = None,
                 oracle_floor: bool = False, matching_oracles: int = 0, checkpoints: bool = False) -> list[str]:
    """Every hub file ``import_easydub`` reads, and nothing else (the ``allow_patterns`` of a download)."""
    n_oracles = n_models if n_oracles is None else n_oracles
    n_extra = max(n_models if oracle_floor else 0, matching_oracles)  # oracles beyond the scoring ones
    files = [pretrain_margins_path(split, i) for split in ("retain", "val") for i in range(n_models)]
    if checkpoints:
        files += [checkpoint_file(i) for i in range(n_models)]
    for fs in forget_sets:
        files.append(forget_set_file(fs))
        files += [pretrain_margins_path("forget", i, fs) for i in range(n_models)]
        files += [oracle_margins_path(fs, split, i) for split in ("retain", "forget", "val")
                  for i in range(n_oracles + n_extra)]
        files += [checkpoint_file(i, fs) for i in range(n_oracles, n_oracles + matching_oracles)]
    return files


def run_identity(n_models: int, block_size: int, chunk_size: int, n_oracles: int | None = None) -> dict:
    """The run identity of a folder of imported EasyDUB models (``RunStore.open_run``): an import and a
    ``raybench run`` with ``easydub_source`` compute it alike, so they share one folder."""
    identity = {"dataset": "cifar10", "arch": "resnet9", "source": "easydub", "hub_epoch": HUB_EPOCH,
                "n_models": n_models, "block_size": block_size, "chunk_size": chunk_size}
    if n_oracles is not None and n_oracles != n_models:
        identity["n_oracles"] = n_oracles
    return identity


def import_unit_id(identity: dict, role: str, forget_set: str, method: str, model_ids: Sequence[int]) -> str:
    """Stable id of an imported unit: what it holds (role, forget set, hub model ids) in which run."""
    return digest({"kind": "import", "source": "easydub", "role": role, "forget_set": forget_set,
                   "method": method, "model_ids": list(model_ids), "identity": identity})


def id_blocks(first: int, count: int, size: int) -> list[tuple[int, ...]]:
    """Model ids ``first .. first+count-1`` in blocks of ``size``: the units of one ensemble, trained or imported."""
    return [tuple(range(start, min(first + count, start + size))) for start in range(first, first + count, size)]


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
        # ±inf is stored as ±float32 max, which KLOM clips to ±100 exactly as it clips ±inf (as units.py does)
        np.nan_to_num(out, copy=False, posinf=np.finfo(np.float32).max, neginf=-np.finfo(np.float32).max)
        return out


# -- the import ------------------------------------------------------------------------------------------------------
@dataclass
class ImportReport:
    """What an import did: the run, the data sizes it found, the units it wrote or found already committed, and
    notes on anything that can make reduce's numbers differ from EasyDUB's (also kept in ``easydub.json``)."""

    run_id: str
    out: str
    source: str
    n_train: int
    n_val: int
    units_written: list[str]
    units_skipped: list[str]
    forget_sets: dict[str, np.ndarray]  # id -> indices, in file order
    notes: list[str]

    @property
    def forget_set_sizes(self) -> dict[str, int]:
        return {fs: len(idx) for fs, idx in self.forget_sets.items()}


def import_easydub(source: str | Path, forget_sets: Sequence[str], n_models: int, out: str, *,
                   n_oracles: int | None = None, block_size: int = DEFAULT_BLOCK_SIZE, oracle_floor: bool = False,
                   matching_oracles: int = 0, checkpoints: bool = False, chunk_size: int = DEFAULT_CHUNK_SIZE,
                   expect_sizes: tuple[int, int] | None = None, cache_dir: str | Path | None = None
                   ) -> ImportReport:
    """Write EasyDUB's margins of pretrain models ``0..n_models-1`` (originals) and oracles ``0..n_oracles-1``
    of each forget set into the run folder ``out`` (a path or pyarrow URI); see the module docstring for the
    mapping and for ``oracle_floor``, ``matching_oracles`` and ``checkpoints``. Needs no Ray.

    ``source`` is a local folder in the hub layout or a hub repo id (only the needed files are downloaded, into
    ``cache_dir`` or the Hugging Face cache). ``n_oracles`` defaults to ``n_models``. ``expect_sizes`` =
    (train, val) samples the margins must cover (the images a run unlearns with). Rerunning with more forget
    sets adds them; finished units are kept. A rerun that finds every unit committed reads nothing from
    ``source``, so a resumed run needs neither the hub folder nor the network.
    """
    forget_sets = [str(fs).strip() for fs in forget_sets]
    bad = [fs for fs in forget_sets if not FORGET_ID.fullmatch(fs)]
    if not forget_sets or bad or len(set(forget_sets)) != len(forget_sets):
        raise EasyDubError(f"forget sets must be distinct positive integers like 2,5 (EasyDUB ids), got {forget_sets}")
    n_oracles = n_models if n_oracles is None else n_oracles
    for name, value, low in (("n_models", n_models, 2), ("n_oracles", n_oracles, 2), ("block_size", block_size, 1),
                             ("chunk_size", chunk_size, 1), ("matching_oracles", matching_oracles, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            why = " (KLOM compares distributions)" if low == 2 else ""
            raise EasyDubError(f"{name} must be an integer >= {low}{why}, got {value!r}")

    store = RunStore(out)
    identity = run_identity(n_models, block_size, chunk_size, n_oracles)
    units = _import_units(forget_sets, n_models, n_oracles, block_size, matching_oracles, oracle_floor, checkpoints)
    finished = _already_imported(store, identity, units, forget_sets, source, expect_sizes)
    if finished is not None:  # a resumed run: needs neither the source nor the network
        return finished

    files = needed_files(forget_sets, n_models, n_oracles=n_oracles, oracle_floor=oracle_floor,
                         matching_oracles=matching_oracles, checkpoints=checkpoints)
    root = hub_folder(source, files, cache_dir=cache_dir)
    reader = _Reader(root)
    n_train = len(reader.vector(pretrain_margins_path("retain", 0)))
    n_val = len(reader.vector(pretrain_margins_path("val", 0)))
    _check_sizes(n_train, n_val, expect_sizes)
    indices = {}
    for fs in forget_sets:
        what = f"forget-set file {forget_set_file(fs)} in {root}"
        try:
            raw = np.load(root / forget_set_file(fs), allow_pickle=False)
        except (OSError, ValueError) as err:
            raise EasyDubError(f"{what}: not a plain .npy array ({err})") from err
        indices[fs] = validate_indices(raw, n_train, source=what)

    run_id = store.open_run(identity)
    _record_dataset(store, n_train, n_val)
    for fs, idx in indices.items():
        _record_forget_set(store, fs, idx)

    writer = _UnitWriter(store, run_id, identity, chunk_size)
    # read even when the originals are already stored: every forget set's consistency check needs it
    pretrain_train = reader.matrix([pretrain_margins_path("retain", i) for i in range(n_models)], n_train)
    retain = {fs: np.flatnonzero(~np.isin(np.arange(n_train), idx)) for fs, idx in indices.items()}
    for role, fs, method, ids, with_checkpoint in units:
        if role == "original":
            def load(ids: tuple[int, ...] = ids) -> dict[str, np.ndarray]:
                return {"train": pretrain_train[ids[0]:ids[-1] + 1],
                        "val": reader.matrix([pretrain_margins_path("val", i) for i in ids], n_val)}
        else:
            def load(ids: tuple[int, ...] = ids, fs: str = fs) -> dict[str, np.ndarray]:
                return _oracle_margins(reader, fs, list(ids), indices[fs], retain[fs], n_train, n_val)
        hub_role = None if role == "original" else fs
        writer.write(role, fs, method, ids, load,
                     checkpoint=[root / checkpoint_file(i, hub_role) for i in ids] if with_checkpoint else None)
    checks = {fs: _check_pretrain_forget(reader, fs, list(range(n_models)), idx, pretrain_train)
              for fs, idx in indices.items()}

    staging = store.path("staging")  # each unit removed its own folder; drop the parent it leaves if empty
    if not [i for i in store.fs.get_file_info(pafs.FileSelector(staging, recursive=True, allow_not_found=True))
            if i.type == pafs.FileType.File]:
        store.remove_dir(staging)
    record = _update_record(store, source, root, checks, reader, indices)
    return ImportReport(run_id, store.uri, str(source), n_train, n_val, writer.written, writer.skipped, indices,
                        record["notes"])


ImportUnit = tuple[str, str, str, tuple[int, ...], bool]
"""(role, forget set, method, hub model ids, with a checkpoint) of one unit an import writes."""


def _import_units(forget_sets: Sequence[str], n_models: int, n_oracles: int, block_size: int, matching_oracles: int,
                  oracle_floor: bool, checkpoints: bool) -> list[ImportUnit]:
    """Every unit an import writes, in writing order (the module docstring says which hub models each holds)."""
    units = [("original", "none", "none", ids, checkpoints) for ids in id_blocks(0, n_models, block_size)]
    for fs in forget_sets:
        units += [("oracle", fs, "none", ids, False) for ids in id_blocks(0, n_oracles, block_size)]
        units += [("matching_oracle", fs, "none", ids, True)
                  for ids in id_blocks(n_oracles, matching_oracles, block_size)]
        if oracle_floor:
            units += [("unlearned", fs, FLOOR_METHOD, ids, False)
                      for ids in id_blocks(n_oracles, n_models, block_size)]
    return units


def _already_imported(store: RunStore, identity: dict, units: list[ImportUnit], forget_sets: Sequence[str],
                      source: str | Path, expect_sizes: tuple[int, int] | None) -> ImportReport | None:
    """The report of an import whose every unit (and checkpoint) is already committed in ``store``, read from the
    store alone; None if anything is missing."""
    if not store.exists(store.path("run.json")):
        return None
    run_id = store.open_run(identity)  # refuses a folder of another run
    ids = [import_unit_id(identity, role, fs, method, models) for role, fs, method, models, _ in units]
    for uid, (*_, with_checkpoint) in zip(ids, units, strict=True):
        if not store.is_complete(uid) or (with_checkpoint and not store.exists(store.checkpoint_path(uid))):
            return None
    if not all(store.exists(store.forget_set_path(fs)) for fs in forget_sets):
        return None
    dataset = store.read_json(store.path("dataset.json"))
    _check_sizes(dataset["n_train"], dataset["n_val"], expect_sizes)
    indices = {fs: store.read_forget_set(fs) for fs in forget_sets}
    notes = store.read_json(store.path("easydub.json")).get("notes", [])
    return ImportReport(run_id, store.uri, str(source), dataset["n_train"], dataset["n_val"], [], ids, indices, notes)


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


class _UnitWriter:
    """Commits one unit per block of models: Parquet written with pyarrow, checkpoint, then ``commit_unit``."""

    def __init__(self, store: RunStore, run_id: str, identity: dict, chunk_size: int) -> None:
        self.store, self.run_id, self.identity, self.chunk_size = store, run_id, identity, chunk_size
        self.written: list[str] = []
        self.skipped: list[str] = []

    def write(self, role: str, forget_set: str, method: str, model_ids: Sequence[int],
              load: Callable[[], dict[str, np.ndarray]], checkpoint: list[Path] | None = None) -> None:
        """Commit the unit unless it is already complete; ``load`` reads its margins only when needed.

        ``checkpoint``: the models' state-dict files, stacked into the unit's checkpoint before the manifest is
        written (a committed unit's checkpoint is always readable); added to a unit an earlier import committed
        without one."""
        model_ids = [int(i) for i in model_ids]
        unit = import_unit_id(self.identity, role, forget_set, method, model_ids)
        has_checkpoint = checkpoint is None or self.store.exists(self.store.checkpoint_path(unit))
        if not has_checkpoint:
            stack = load_easydub_checkpoints(checkpoint, seeds=model_ids)
            self.store.write_checkpoint(unit, {"seeds": model_ids, "state": stack.state_dict()})
        if self.store.is_complete(unit):
            self.skipped.append(unit)
            return
        t0 = time.perf_counter()
        seeds = [NO_SEED] * len(model_ids)
        table = margins_table(run=self.run_id, unit=unit, role=role, method=method, params="{}",
                              forget_set=forget_set, model_ids=model_ids, seeds=seeds, epoch=STORED_EPOCH,
                              margins=load(), chunk_size=self.chunk_size)
        staging = self.store.staging_dir()
        self.store.fs.create_dir(staging, recursive=True)
        part = posixpath.join(staging, "part-0.parquet")
        # the "unit" column is dropped as Ray Data drops its partition column; one row group per (split, chunk)
        pq.write_table(table.drop_columns(["unit"]), part, filesystem=self.store.fs, compression="zstd",
                       row_group_size=len(model_ids), use_dictionary=False)
        meta = {"unit": unit, "kind": "import", "role": role, "forget_set": forget_set, "method": method,
                "params": "{}", "epochs": [STORED_EPOCH], "model_ids": model_ids, "seeds": seeds,
                "rows": table.num_rows, "compute_s": 0.0, "wall_s": time.perf_counter() - t0,
                "source": "easydub", "hub_epoch": HUB_EPOCH}
        self.store.commit_unit(meta, [part])
        self.store.remove_dir(staging)
        self.written.append(unit)


def _record_dataset(store: RunStore, n_train: int, n_val: int) -> None:
    """``dataset.json``: the sizes the hub margins cover. Its fingerprint stays null until a run that unlearns
    with images records theirs (``record_images``)."""
    record = {"name": "cifar10", "fingerprint": None, "n_train": n_train, "n_val": n_val,
              "source_train": list(range(n_train)), "source_val": list(range(n_val))}
    path = store.path("dataset.json")
    if store.exists(path):
        existing = store.read_json(path)
        if {**existing, "fingerprint": None} != record:
            raise EasyDubError(f"{store.uri}/dataset.json differs from what this import would write; use a new --out")
        return
    store.write_json(path, record)


def record_images(store: RunStore, fingerprint: str) -> None:
    """Note in ``dataset.json`` which images the run's methods unlearn with; refuse other images later on, since
    the stored unlearned margins were computed on the first ones."""
    path = store.path("dataset.json")
    record = store.read_json(path)
    if record.get("fingerprint") not in (None, fingerprint):
        raise EasyDubError(f"{store.uri} was unlearned with other CIFAR-10 images (fingerprint "
                           f"{record['fingerprint']}, these are {fingerprint}); use a new --out folder")
    if record.get("fingerprint") is None:
        store.write_json(path, {**record, "fingerprint": fingerprint})


def _record_forget_set(store: RunStore, fs: str, idx: np.ndarray) -> None:
    description = f"EasyDUB forget set {fs} ({len(idx)} train samples, hub file {forget_set_file(fs)})"
    if not store.record_forget_set(fs, description, idx):
        raise EasyDubError(f"forget set {fs!r} in {store.uri} has other indices than the hub file; "
                           "use a new --out folder")


def _update_record(store: RunStore, source: str | Path, root: Path, checks: dict, reader: _Reader,
                   indices: dict[str, np.ndarray]) -> dict:
    """``easydub.json``: where the margins came from and what the import noticed (merged over reruns)."""
    path = store.path("easydub.json")
    record = store.read_json(path) if store.exists(path) else {"forget_sets": {}, "notes": []}
    record.update({"source": str(source), "folder": str(root), "hub_repo": HUB_REPO, "hub_epoch": HUB_EPOCH,
                   "stored_epoch": STORED_EPOCH, "file_dtypes": sorted(reader.dtypes)})
    for fs, check in checks.items():
        record["forget_sets"][fs] = {"size": len(indices[fs]), "pretrain_forget_vs_train": check}
    record["notes"] = sorted(set(record["notes"]) | set(reader.notes))
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
