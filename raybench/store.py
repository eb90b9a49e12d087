"""The run folder: Parquet margins, manifests, checkpoints and run identity, on any ``pyarrow.fs`` URI.

Layout (``<out>`` is a local path, ``file://…``, ``s3://…`` or ``gs://…``)::

    <out>/run.json                                   identity: format version, run id, what defines the units
    <out>/margins/forget_set=<fs>/role=<role>/method=<method>/unit=<id>/part-*.parquet
    <out>/manifests/<unit id>.json                   written last: a unit is complete iff its manifest exists
    <out>/checkpoints/<unit id>.pt, .pt.json         original models, read by unlearning units; size and sha256
    <out>/subset_logits/<unit id>.npy, .npy.json     a subset unit's train logits (models x samples x classes)
    <out>/masks.npy, memorization.parquet, datamodel.npz, subsets.json   a subset run's analysis (raybench.subsets)
    <out>/datamodel/<fs>.npy, scores.json            what a run given --scores used (effects per forget set)
    <out>/staging/                                   Ray Data writes here; files are moved into margins/
    <out>/summary.csv, summary.json
    <out>/per_sample/forget_set=<fs>/part-0.parquet  every summary row's per-sample values (``write_per_sample``)
    <out>/run.lock                                   held by the run writing into the folder (``RunStore.lock``)

Why manifests: Ray Data's append mode duplicates rows on a rerun and its overwrite mode is not atomic. A unit's
files are first written under ``staging/``, then moved into place, and only then is its manifest written; readers
only read files that a manifest lists, so a half-written unit is never read and a rerun never double-counts.
What an interrupted run leaves (staging folders, ``*.tmp-*`` files, a unit folder without a manifest) is removed
by the next run (``clean_uncommitted``, ``commit_unit``).

Why digests: a flipped or truncated byte must never become a number. Each manifest records every file's size and
sha256 (taken at commit), and the digest of the forget set its unit was computed for; ``verify_units`` checks the
files before a reducer reads them, and Parquet pages carry CRCs that every read verifies. A unit that fails is
refused, naming the file and how to recompute it; it is never scored.

Margins rows are ordered (epoch, split, chunk, model) and written with one row group per block of models, so each
row group is one (epoch, split, chunk) of one unit: the reducer's filter on a chunk decodes only that chunk.

Margins rows (one per model × split × epoch × chunk): ``split`` is ``train`` or ``val`` and chunks are fixed-size
ranges of sample ids, so every model's row covers the same ids whatever its forget set. The retain and forget
splits of docs/design.md#splits-and-sample-ids are views the reducer takes with the forget set's indices: originals are
then stored once for all forget sets, and a new forget set can be scored against existing originals. Next to ``margins``
(``z_y - logsumexp_{j≠y} z_j``, what KLOM compares) each row holds ``top1_margins`` (``z_y - max_{j≠y} z_j``,
from the same forward pass: > 0 iff the model's top-1 prediction is right, a tie counting as wrong), what accuracy
is read from; it is null where only margins are known (imported models).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import hashlib
import io
import json
import logging
import os
import posixpath
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raybench.ids import digest

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
"""Bumped whenever the layout or the meaning of a column changes; a run folder of another version is refused.
Version 2 added ``top1_margins`` (version 1 had only the margins, and its accuracy was P(p_y > 1/2))."""

TOP1_TYPE = pa.list_(pa.float32())

MARGINS_SCHEMA = pa.schema(
    [
        ("run", pa.string()),
        ("unit", pa.string()),
        ("role", pa.string()),
        ("method", pa.string()),
        ("params", pa.string()),
        ("forget_set", pa.string()),
        ("model_id", pa.int32()),
        ("seed", pa.int64()),
        ("epoch", pa.int32()),
        ("split", pa.string()),
        ("chunk", pa.int32()),
        ("sample_start", pa.int32()),
        ("margins", pa.list_(pa.float32())),
        ("top1_margins", TOP1_TYPE),  # z_y - max_{j≠y} z_j: > 0 iff top-1 correct (a tie is wrong); null: unknown
    ]
)
PARTITION_COLUMNS = ("forget_set", "role", "method")
FLOOR_METHOD = "oracle_floor"
"""The method name of the noise-floor ensemble (oracles scored against oracles), whichever source made it."""
PARQUET_WRITE_OPTIONS = {"compression": "zstd", "use_dictionary": False, "write_page_checksum": True}
"""How every margins file is written (Ray Data forwards these to pyarrow): page CRCs, which reads verify."""
PER_SAMPLE_SCHEMA = pa.schema(
    [
        ("forget_set", pa.string()),
        ("method", pa.string()),
        ("params", pa.string()),
        ("epoch", pa.int32()),  # the summary row's epoch (0 for do_nothing); null where the row's is empty
        ("split", pa.string()),  # the scored view: retain, forget or val
        ("sample_id", pa.int64()),  # train index for retain / forget, val index for val
        ("klom", pa.float64()),
        ("degenerate", pa.bool_()),
        ("accuracy", pa.float64()),  # share of the ensemble's models top-1 right; null where not known
        ("oracle_accuracy", pa.float64()),
        ("dropped_unlearned", pa.int32()),  # values on the top edge, not binned (docs/metrics.md#degenerate-samples)
        ("dropped_oracle", pa.int32()),
    ]
)
"""One row per (forget set, method, params, epoch, split, sample): the values each summary row was computed from,
for joining with a user's own per-sample data (docs/design.md#per-sample-values)."""
PER_SAMPLE_KEYS = ("forget_set", "method", "params", "epoch", "split")
PER_SAMPLE_FILE = "part-0.parquet"
PER_SAMPLE_WRITE_OPTIONS = {"compression": "zstd", "write_page_checksum": True}
"""Dictionary encoding stays on here (unlike the margins): the key columns repeat one value per summary row."""
LOCK_FILE = "run.lock"
DYING_HOLDER_WAIT_S = 30.0
"""How long a run waits for the lock of a killed run on this host to be released (its process still exiting)."""
MANIFEST_FIELDS = {"unit": str, "role": str, "forget_set": str, "method": str, "params": str, "model_ids": list,
                   "epochs": list, "files": list, "file_sizes": list, "file_sha256": list, "format_version": int}
"""What a manifest must hold to be read (``completed_units``); anything less is a damaged file, refused."""
_HASH_BLOCK = 8 * 2**20


class StoreError(ValueError):
    """A run folder that cannot be used as asked (another run, another format version, corrupt files)."""


def check_record(record: dict, path: str, what: str, fields: dict[str, type | tuple[type, ...]]) -> dict:
    """``record`` (read from ``path``) if it has these fields of these types, else a one-line StoreError."""
    for name, kind in fields.items():
        if name not in record:
            raise StoreError(f"{path} is not a valid {what}: it has no {name!r}")
        value = record[name]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, (int, float))):
            raise StoreError(f"{path} is not a valid {what}: {name!r} is {type(value).__name__}")
    return record


class FolderInUse(StoreError):
    """Another run holds the run folder's lock (``RunStore.lock``)."""


@dataclass(frozen=True)
class Manifest:
    """What a unit's writer records about it (``commit_unit`` adds its files, their sizes and digests, the forget
    set's digest and the format version): the one definition of a manifest's fields, for trained, unlearned and
    imported units alike. Fields left None are not written (an import has no gradient work to report)."""

    unit: str
    kind: str  # "train" | "unlearn" | "import"
    role: str
    forget_set: str
    method: str
    params: str  # canonical JSON of the method's parameters
    epochs: list[int]  # one per stored snapshot
    model_ids: list[int]
    seeds: list[int]
    rows: int
    compute_s: float = 0.0  # inside the unit: training / unlearning
    wall_s: float = 0.0  # inside the unit: everything
    grad_samples: list[int] | None = None  # per snapshot: samples per model forwarded with gradients so far
    compute_s_by_epoch: list[float] | None = None
    code_versions: dict | None = None  # the versions hashed into the unit id
    versions: dict | None = None  # packages and device of the process that computed it
    training: dict | None = None  # how base training ran (training.train_stack's stats: path, compile, warm-up)
    extra: dict = field(default_factory=dict)  # what a source adds (e.g. "source", "hub_epoch")

    def to_dict(self) -> dict:
        record = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra" and v is not None}
        return {**record, **self.extra}


@dataclass(frozen=True)
class UnitOutput:
    """Where a committed unit's margins live, as recorded in its manifest."""

    unit_id: str
    files: tuple[str, ...]
    meta: dict


def margins_table(
    *,
    run: str,
    unit: str,
    role: str,
    method: str,
    params: str,
    forget_set: str,
    model_ids: Iterable[int],
    seeds: Iterable[int],
    epoch: int,
    margins: dict[str, np.ndarray],
    chunk_size: int,
    top1: dict[str, np.ndarray] | None = None,
) -> pa.Table:
    """Rows for one (unit, epoch): ``margins`` maps split -> (models, samples) float32, cut into chunks.

    ``top1`` holds the top-1 margins (``z_y - max_{j≠y} z_j``, what accuracy is read from) of the same splits
    and shapes, chunked alike; without it (imports that publish only margins) ``top1_margins`` is null, which
    the reducer reads as "accuracy unknown".
    Rows are ordered by split, chunk, model: written with ``row_group_size`` = the unit's number of models,
    every (epoch, split, chunk) is one row group, so a reader filtering one chunk decodes only that chunk.
    Built with whole-array numpy operations (one copy of each column, no per-row Python objects): a unit of
    200 models over 60,000 samples takes about 25 ms with its top-1 margins, 15 ms without, on a 2-core box.
    """
    ids = np.asarray(list(model_ids), dtype=np.int32)
    seed_arr = np.asarray(list(seeds), dtype=np.int64)
    if len(ids) != len(seed_arr):
        raise ValueError(f"{len(ids)} model ids for {len(seed_arr)} seeds")
    if top1 is not None and set(top1) != set(margins):
        raise ValueError(f"top-1 margins of splits {sorted(top1)} for margins of splits {sorted(margins)}")
    m = len(ids)
    columns: dict[str, dict[str, np.ndarray]] = {"margins": {}, "top1_margins": {}}
    for split, matrix in margins.items():
        matrix = columns["margins"][split] = finite_margins(matrix, ids, f"margins on {split} at epoch {epoch}")
        if matrix.ndim != 2 or matrix.shape[0] != m:
            raise ValueError(f"margins of split {split} have shape {matrix.shape}, expected ({m}, samples)")
        if top1 is not None:
            scores = columns["top1_margins"][split] = finite_margins(top1[split], ids,
                                                                     f"top-1 margins on {split} at epoch {epoch}")
            if scores.shape != matrix.shape:
                raise ValueError(f"top-1 margins of split {split} have shape {scores.shape}, margins "
                                 f"{matrix.shape}")
    splits, chunks, starts, widths = [], [], [], []
    for split, matrix in columns["margins"].items():
        for chunk, start in enumerate(range(0, matrix.shape[1], chunk_size)):
            splits.append(split)
            chunks.append(chunk)
            starts.append(start)
            widths.append(min(chunk_size, matrix.shape[1] - start))
    n = len(widths) * m
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.repeat(np.asarray(widths, dtype=np.int64), m), out=offsets[1:])
    if offsets[-1] > np.iinfo(np.int32).max:
        raise ValueError(f"unit {unit}: {offsets[-1]} margins in one table exceed list<float32> offsets; "
                         "use smaller blocks")
    list_offsets = pa.array(offsets.astype(np.int32))

    def lists(by_split: dict[str, np.ndarray]) -> pa.Array:
        """One list per (split, chunk, model) row: every block copied once, straight into the Arrow buffer."""
        flat = np.empty(int(offsets[-1]), dtype=np.float32)
        for k, (split, start, width) in enumerate(zip(splits, starts, widths, strict=True)):
            at = int(offsets[k * m])
            flat[at : at + m * width].reshape(m, width)[...] = by_split[split][:, start : start + width]
        return pa.ListArray.from_arrays(list_offsets, pa.array(flat, type=pa.float32()))

    per_row = {
        "model_id": np.tile(ids, len(widths)),
        "seed": np.tile(seed_arr, len(widths)),
        "split": np.repeat(np.asarray(splits, dtype=object), m),
        "chunk": np.repeat(np.asarray(chunks, dtype=np.int32), m),
        "sample_start": np.repeat(np.asarray(starts, dtype=np.int32), m),
    }
    lists_by_name = {"margins": lists(columns["margins"]),
                     "top1_margins": pa.nulls(n, type=TOP1_TYPE) if top1 is None else lists(columns["top1_margins"])}
    fixed = {"run": run, "unit": unit, "role": role, "method": method, "params": params,
             "forget_set": forget_set, "epoch": epoch}
    arrays = []
    for column in MARGINS_SCHEMA:
        if column.name in fixed:
            arrays.append(pa.array([fixed[column.name]] * n, type=column.type))
        elif column.name in lists_by_name:
            arrays.append(lists_by_name[column.name])
        else:
            arrays.append(pa.array(per_row[column.name], type=column.type))
    return pa.Table.from_arrays(arrays, schema=MARGINS_SCHEMA)


class NonFiniteMargins(ValueError):
    """Margins with NaN: no stored value means what a NaN would (``finite_margins``). ``models``: their ids."""

    def __init__(self, message: str, models: list[int]) -> None:
        super().__init__(message)
        self.models = models


def finite_margins(matrix: np.ndarray, model_ids: Iterable[int], what: str) -> np.ndarray:
    """The one NaN/inf policy of stored margins, as float32 (models x samples). ±inf (a saturated or diverged
    model) is stored as ±float32 max, which KLOM clips to ±100 exactly as it clips ±inf and whose sign is what
    accuracy reads; NaN has no such reading and is refused, naming the models (``NonFiniteMargins``)."""
    out = np.asarray(matrix, dtype=np.float32)
    if np.isfinite(out).all():
        return out
    if np.isnan(out).any():
        ids = [int(i) for i in model_ids]
        rows = np.flatnonzero(np.isnan(out).reshape(len(out), -1).any(axis=1)) if out.ndim else [0]
        bad = sorted({ids[i] if i < len(ids) else int(i) for i in rows})
        raise NonFiniteMargins(f"NaN {what} for model(s) {bad[:10]}", bad)
    return np.nan_to_num(out, posinf=np.finfo(np.float32).max, neginf=-np.finfo(np.float32).max)  # a copy


def csv_text(rows: Iterable[dict], columns: list[str]) -> str:
    """The text of a run folder's CSV tables (summary.csv, convergence.csv): these columns in order, floats as
    ``repr`` so the bits survive a round trip, ``\n`` line ends, other keys of a row ignored."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue()


def forget_set_digest(indices: Iterable[int]) -> str:
    """What a unit records of the forget set it was computed for: its indices, in their order."""
    return digest([int(i) for i in indices])


class RunStore:
    """A run folder on a ``pyarrow.fs`` filesystem.

    ``uri`` is what every process (driver, workers, reduce tasks) opens again, so it must name shared storage
    on a cluster. ``filesystem`` hands in an already open filesystem instead (then ``uri`` is a path in it):
    tests use it for in-memory filesystems, which cannot be reopened from a URI.
    """

    def __init__(self, uri: str, filesystem: pafs.FileSystem | None = None) -> None:
        """Opening a store creates nothing: commands that only read (``reduce``, ``report``) must not leave a
        folder behind for a mistyped path. Writers create what they write (``lock``, ``write_bytes``, commits)."""
        if filesystem is not None:
            self.uri, self.fs, self.root = uri, filesystem, uri
        else:
            if "://" not in uri:
                uri = str(Path(uri).expanduser().resolve())
            self.uri = uri
            try:
                self.fs, self.root = pafs.FileSystem.from_uri(uri)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as err:
                raise StoreError(f"cannot open output location {uri!r}: {err}") from err
        try:
            kind = self.fs.get_file_info(self.root).type
        except OSError as err:
            raise StoreError(f"cannot open output location {self.uri!r}: {err}") from err
        if kind == pafs.FileType.File:
            raise StoreError(f"{self.uri} is a file, not a run folder: give a folder (new or a run's) instead")
        self._verified: set[tuple[str, int, str]] = set()  # (file, size, sha256) checked by this store

    # -- paths ------------------------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def unit_dir(self, unit_id: str, forget_set: str, role: str, method: str) -> str:
        return self.path("margins", f"forget_set={forget_set}", f"role={role}", f"method={method}", f"unit={unit_id}")

    def staging_dir(self) -> str:
        return self.path("staging", uuid.uuid4().hex)

    # -- small atomic files -------------------------------------------------------------------------------------
    def write_bytes(self, path: str, data: bytes) -> None:
        """Write to a temporary name, then move: readers never see a partial file (rename is atomic locally)."""
        self.fs.create_dir(posixpath.dirname(path), recursive=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, path)

    def read_bytes(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def write_json(self, path: str, obj: dict) -> None:
        self.write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode())

    def read_json(self, path: str) -> dict:
        """A JSON object (every JSON file of a run folder is one); anything else is a StoreError naming the file."""
        try:
            obj = json.loads(self.read_bytes(path))
        except FileNotFoundError:
            raise StoreError(f"{path} is missing") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise StoreError(f"{path} is not valid JSON: {err}") from err
        except OSError as err:
            raise StoreError(f"cannot read {path}: {err}") from err
        if not isinstance(obj, dict):
            raise StoreError(f"{path} is not a JSON object")
        return obj

    def read_record(self, path: str, what: str, fields: dict[str, type | tuple[type, ...]]) -> dict:
        """A JSON object with these fields of these types: a run-folder file that is valid JSON but not what we
        wrote (``{}`` as a manifest) is refused here with one line, not a KeyError later."""
        return check_record(self.read_json(path), path, what, fields)

    def require_folder(self) -> None:
        """Refuse a path that is not an existing folder, before anything is read (or written) there."""
        if self.fs.get_file_info(self.root).type != pafs.FileType.Directory:
            raise StoreError(f"{self.uri} does not exist")

    # -- run identity -------------------------------------------------------------------------------------------
    def open_run(self, identity: dict, versions: dict | None = None) -> str:
        """Create the run folder, or check that an existing one was made by the same run; return the run id.

        ``identity`` holds everything that gives a unit's stored output its meaning (data, architecture, recipe,
        N, chunking, seeds). Methods and forget sets are not part of it: adding them to a run only adds units.
        ``versions`` (default: ``raybench.versions.collect_versions()`` of this process) is recorded, never
        hashed: run.json keeps the creating run's as ``versions`` and the latest run's as ``latest_versions``.
        """
        if versions is None:
            from raybench.versions import collect_versions

            versions = collect_versions()
        identity = {"format_version": FORMAT_VERSION, **identity}
        run_id = digest(identity)
        path = self.path("run.json")
        if self.exists(path):
            existing = self.read_json(path)
            self._check_format(existing.get("format_version"), "run.json")
            if existing.get("run") != run_id:
                diff = sorted(k for k in set(identity) | set(existing.get("identity", {}))
                              if identity.get(k) != existing.get("identity", {}).get(k))
                raise StoreError(
                    f"{self.uri} holds another run ({existing.get('run')}); it differs in: {', '.join(diff)}. "
                    "Use a new --out folder, or the same settings to resume"
                )
            if existing.get("latest_versions") != versions:
                self.write_json(path, {**existing, "latest_versions": versions})
            return run_id
        self.write_json(path, {"run": run_id, "format_version": FORMAT_VERSION, "identity": identity,
                               "versions": versions, "latest_versions": versions})
        return run_id

    def run_info(self) -> dict:
        self.require_folder()
        path = self.path("run.json")
        if not self.exists(path):
            raise StoreError(f"{self.uri} is not a raybench run folder (no run.json)")
        info = self.read_record(path, "run.json", {"run": str, "identity": dict})
        self._check_format(info.get("format_version"), "run.json")
        return info

    def _check_format(self, version: object, where: str) -> None:
        """Refuse a folder of another format version with what to do: its columns mean something else (version 1
        has no top-1 margins), so reading it on would give numbers that look right and are not."""
        if version == FORMAT_VERSION:
            return
        if isinstance(version, int) and version < FORMAT_VERSION:
            raise StoreError(
                f"{self.uri} was written by an older raybench (format version {version} in {where}; this raybench "
                f"reads and writes version {FORMAT_VERSION}, which stores top-1 margins for exact accuracy): rerun "
                "into a new --out folder, or run `raybench reduce` with the raybench version that wrote it"
            )
        raise StoreError(
            f"{self.uri} has format version {version!r} in {where}; this raybench reads and writes version "
            f"{FORMAT_VERSION}: use the raybench version that wrote it, or a new --out folder"
        )

    # -- the data set ------------------------------------------------------------------------------------------
    def record_dataset(self, record: dict) -> None:
        """``dataset.json``: the sizes (and, where known, the fingerprint and source ids) of the data the margins
        cover. A record that disagrees with the folder's is refused; a ``fingerprint`` of None (an import, whose
        hub files carry no images) is filled in by the first run that unlearns with images, and other images are
        refused from then on, since its margins were computed on the first ones."""
        path = self.path("dataset.json")
        if self.exists(path):
            existing = self.read_json(path)
            if {**existing, "fingerprint": None} != {**record, "fingerprint": None}:
                raise StoreError(f"{path} describes other data than this run's (sizes or sample ids differ); use a "
                                 "new --out folder")
            old, new = existing.get("fingerprint"), record.get("fingerprint")
            if new is None or old == new:
                return
            if old is not None:
                raise StoreError(f"{self.uri} was computed on other images (fingerprint {old}, these are {new}); "
                                 "use a new --out folder")
        self.write_json(path, record)

    # -- forget sets --------------------------------------------------------------------------------------------
    def forget_set_path(self, set_id: str) -> str:
        return self.path("forget_sets", f"{set_id}.json")

    def record_forget_set(self, set_id: str, description: str, indices: np.ndarray) -> bool:
        """Keep a forget set's indices with the run (written once). Returns False, writing nothing, when the run
        already holds other indices under this id: its stored results mean those, so the caller must refuse."""
        path = self.forget_set_path(set_id)
        if self.exists(path):
            return self.read_forget_set(set_id).tolist() == indices.tolist()
        self.write_json(path, {"id": set_id, "description": description, "indices": indices.tolist()})
        return True

    def forget_set_ids(self) -> list[str]:
        """Ids of the forget sets recorded with the run."""
        selector = pafs.FileSelector(self.path("forget_sets"), allow_not_found=True)
        return sorted(info.base_name[: -len(".json")] for info in self.fs.get_file_info(selector)
                      if info.type == pafs.FileType.File and info.base_name.endswith(".json"))

    def read_forget_set(self, set_id: str) -> np.ndarray:
        """The indices of a forget set recorded with the run, in its own order."""
        path = self.forget_set_path(set_id)
        indices = self.read_record(path, "forget-set record", {"indices": list})["indices"]
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices):
            raise StoreError(f"{path} is not a valid forget-set record: its indices are not all non-negative integers")
        return np.asarray(indices, dtype=np.int64)

    def check_forget_set(self, set_id: str, units: Iterable[UnitOutput]) -> np.ndarray:
        """The forget set's recorded indices, after checking that every unit was computed for them: a record
        replaced by other indices must not be scored as if the stored models had forgotten those."""
        indices = self.read_forget_set(set_id)
        expected = forget_set_digest(indices)
        wrong = sorted(u.unit_id for u in units if u.meta.get("forget_set_digest") != expected)
        if wrong:
            raise StoreError(
                f"{self.forget_set_path(set_id)} holds other indices than {len(wrong)} unit(s) of forget set "
                f"{set_id} were computed for (e.g. manifests/{wrong[0]}.json): restore the forget set's original "
                "record, or use a new folder for these indices")
        return indices

    # -- units --------------------------------------------------------------------------------------------------
    def manifest_path(self, unit_id: str) -> str:
        return self.path("manifests", f"{unit_id}.json")

    def is_complete(self, unit_id: str) -> bool:
        return self.exists(self.manifest_path(unit_id))

    def completed_units(self) -> dict[str, UnitOutput]:
        """Every committed unit, by id: one listing of the manifests folder, then the manifests read by a few
        threads (on S3/GCS each read is a round trip; a rerun of thousands of units must not pay them in a row).
        A damaged manifest is refused (``StoreError``), never skipped: its unit would silently drop out."""
        selector = pafs.FileSelector(self.path("manifests"), allow_not_found=True)
        paths = sorted(info.path for info in self.fs.get_file_info(selector)
                       if info.type == pafs.FileType.File and info.base_name.endswith(".json"))
        with ThreadPoolExecutor(max_workers=min(16, len(paths) or 1)) as pool:
            units = list(pool.map(self._read_manifest, paths))
        return {u.unit_id: u for u in units}

    def _read_manifest(self, path: str) -> UnitOutput:
        name = posixpath.basename(path)[: -len(".json")]
        remedy = f"; delete it so that the next `raybench run` (or import) recomputes unit {name}"
        meta = self.read_json(path)
        if "format_version" in meta:  # first: a manifest of an older raybench lacks fields, and says why
            self._check_format(meta["format_version"], posixpath.relpath(path, self.root))
        try:
            check_record(meta, path, "manifest", MANIFEST_FIELDS)
        except StoreError as err:
            raise StoreError(f"{err}{remedy}") from None
        files, sizes, sums = meta["files"], meta["file_sizes"], meta["file_sha256"]
        problem = (f"it names unit {meta['unit']}" if meta["unit"] != name
                   else "it lists no files" if not files
                   else "its file sizes and digests do not match its files" if not len(files) == len(sizes) == len(sums)
                   else "its files, sizes or digests have the wrong types"
                   if not (all(isinstance(f, str) for f in files) and all(isinstance(n, int) for n in sizes)
                           and all(isinstance(h, str) for h in sums))
                   else "its model ids are not integers" if not all(isinstance(i, int) for i in meta["model_ids"])
                   else "")
        if problem:
            raise StoreError(f"{path} is not a valid manifest: {problem}{remedy}")
        return UnitOutput(name, tuple(files), meta)

    def file_digest(self, path: str) -> tuple[int, str]:
        """(size in bytes, sha256 hex) of a file, read once in blocks (memory stays a few MiB)."""
        h, size = hashlib.sha256(), 0
        with self.fs.open_input_stream(path) as f:
            while block := f.read(_HASH_BLOCK):
                h.update(block)
                size += len(block)
        return size, h.hexdigest()

    def verify_units(self, units: Iterable[UnitOutput]) -> None:
        """Check every file of these units against the size and sha256 its manifest recorded at commit; raise
        ``StoreError`` naming the first bad file and how to recompute its unit. Each file is checked once per
        store object (a run's resume and its reduce read them once), by a few threads."""
        todo = [(u.unit_id, f, n, h) for u in units
                for f, n, h in zip(u.files, u.meta["file_sizes"], u.meta["file_sha256"], strict=True)
                if (f, n, h) not in self._verified]

        def check(item: tuple[str, str, int, str]) -> str:
            _, file, size, sha = item
            try:
                got_size, got_sha = self.file_digest(self.path(file))
            except FileNotFoundError:
                return "it is missing"
            except OSError as err:
                return f"it cannot be read ({err})"
            if got_size != size:
                return f"it has {got_size} bytes where its manifest records {size}"
            return "its content differs from the sha256 its manifest records" if got_sha != sha else ""

        with ThreadPoolExecutor(max_workers=min(8, len(todo) or 1)) as pool:
            problems = list(pool.map(check, todo))
        bad = []
        for item, problem in zip(todo, problems, strict=True):
            if problem:
                bad.append((item, problem))
            else:
                self._verified.add(item[1:])
        if bad:
            (unit_id, file, _, _), problem = bad[0]
            units_bad = list(dict.fromkeys(item[0] for item, _ in bad))
            more = f" ({len(bad) - 1} more file(s) of {len(units_bad)} unit(s) are bad too)" if len(bad) > 1 else ""
            manifests = ", ".join(f"manifests/{u}.json" for u in units_bad[:5]) + (" …" if len(units_bad) > 5 else "")
            raise StoreError(f"{self.path(file)} of unit {unit_id} is damaged: {problem}{more}; nothing is scored from "
                             f"it. Delete {manifests} in {self.uri} so that the next `raybench run` (or import) "
                             "recomputes them")

    def commit_unit(self, meta: dict, staged_files: list[str]) -> None:
        """Move a unit's staged files into its margins folder, then write its manifest (the commit point).

        Whatever the unit's folder already holds is removed first: with no manifest it can only be the files of
        a commit cut short (a driver killed between the moves and the manifest), which no reader used, but a
        plain Parquet reader of the hive layout would otherwise count twice. The manifest records each file's
        size and sha256, and (for a unit of a forget set) the digest of the forget-set record it was computed
        for, taken from ``forget_sets/<id>.json`` unless the writer gives ``forget_set_digest``, which must agree.
        """
        unit_id = meta["unit"]
        target = self.unit_dir(unit_id, meta["forget_set"], meta["role"], meta["method"])
        if self.is_complete(unit_id):
            raise StoreError(f"unit {unit_id} is already committed in {self.uri}")
        if meta["forget_set"] != "none":
            path = self.forget_set_path(meta["forget_set"])
            if not self.exists(path):
                raise StoreError(f"unit {unit_id}: forget set {meta['forget_set']} is not recorded in {self.uri} "
                                 "(record_forget_set comes before its units)")
            recorded = forget_set_digest(self.read_forget_set(meta["forget_set"]))
            if meta.get("forget_set_digest", recorded) != recorded:
                raise StoreError(f"unit {unit_id} was computed for other indices of forget set "
                                 f"{meta['forget_set']} than {path} holds")
            meta = {**meta, "forget_set_digest": recorded}
        checks = [self.file_digest(src) for src in staged_files]
        self.remove_dir(target)
        self.fs.create_dir(target, recursive=True)
        files = []
        for src in staged_files:
            dst = posixpath.join(target, posixpath.basename(src))
            self.fs.move(src, dst)
            files.append(posixpath.relpath(dst, self.root))
        self.write_json(self.manifest_path(unit_id), {
            **meta, "files": files, "file_sizes": [n for n, _ in checks], "file_sha256": [h for _, h in checks],
            "format_version": FORMAT_VERSION})
        self._verified.update((f, n, h) for f, (n, h) in zip(files, checks, strict=True))

    def write_unit(self, meta: dict, table: pa.Table, *, row_group_size: int | None = None) -> None:
        """Write one unit's margins with plain pyarrow and commit it (for writers outside the Ray engine:
        importers, benchmarks, tests). ``row_group_size`` should be the unit's number of models (one row group
        per epoch × split × chunk, see ``margins_table``)."""
        staging = self.staging_dir()
        self.fs.create_dir(staging, recursive=True)
        path = posixpath.join(staging, "part-0.parquet")
        pq.write_table(table.drop_columns(["unit"]) if "unit" in table.column_names else table, path,
                       filesystem=self.fs, row_group_size=row_group_size or len(meta.get("model_ids", [])) or None,
                       **PARQUET_WRITE_OPTIONS)
        self.commit_unit(meta, [path])
        self.remove_dir(staging)

    def clean_uncommitted(self) -> None:
        """Remove what an interrupted driver or a killed worker left behind: staging folders, which no manifest
        lists, and temporary files of unfinished atomic writes. Never touches committed files."""
        self.remove_dir(self.path("staging"))
        for folder in ("checkpoints", "manifests", "subset_logits", "datamodel"):
            selector = pafs.FileSelector(self.path(folder), allow_not_found=True)
            for info in self.fs.get_file_info(selector):
                if info.type == pafs.FileType.File and ".tmp-" in info.base_name:
                    self.fs.delete_file(info.path)

    def staged_unit_files(self, staging: str) -> dict[str, list[str]]:
        """Files Ray Data wrote under ``staging`` with ``partition_cols=["unit"]``, grouped by unit id."""
        selector = pafs.FileSelector(staging, recursive=True, allow_not_found=True)
        out: dict[str, list[str]] = {}
        for info in self.fs.get_file_info(selector):
            if info.type != pafs.FileType.File or not info.base_name.endswith(".parquet"):
                continue
            parent = posixpath.basename(posixpath.dirname(info.path))
            if parent.startswith("unit="):
                out.setdefault(parent[len("unit="):], []).append(info.path)
        return out

    def remove_dir(self, path: str) -> None:
        if self.exists(path):
            self.fs.delete_dir(path)

    # -- the writer's lock -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run folder for one writer at a time (creating the folder): a second run into it is refused
        at once with one line naming the holder, instead of redoing the same units and failing at commit.

        Local folders (plain paths, ``file://``): ``fcntl.flock`` on ``<out>/run.lock``, which the kernel releases
        however the holder ends, SIGKILL included, so a killed run never blocks its resume (on NFS, Linux maps
        flock to NFS byte-range locks). S3, GCS and other pyarrow filesystems have no lock primitive: there the
        lock is best effort, a ``run.lock`` file naming its owner (host, pid, time), written when absent and
        deleted on release. A file left by a dead run is taken over when it names this host and a pid no longer
        running here, and otherwise refused with the advice to delete it; two runs starting within the same
        moment can both pass.

        On an error, a folder this call created is removed again if it holds nothing but run metadata
        (``run.json``, ``dataset.json``, forget sets): a refused run leaves no empty folder behind.
        """
        local = isinstance(self.fs, pafs.LocalFileSystem)
        created = _missing_ancestor(self.root) if local else None if self.exists(self.root) else self.root
        try:
            try:
                self.fs.create_dir(self.root, recursive=True)
            except OSError as err:
                raise StoreError(f"cannot create the run folder {self.uri}: {err}") from err
            release = self._lock_local() if local else self._lock_remote()
        except FolderInUse:
            raise  # the folder is the holder's, whoever created it
        except BaseException:
            if created is not None:
                self._remove_if_unused(created)
            raise
        try:
            yield
        except BaseException:
            if created is not None:
                self._remove_if_unused(created)
            raise
        finally:
            release()

    def _lock_local(self) -> Callable[[], None]:
        import fcntl

        path = os.path.join(self.root, LOCK_FILE)
        deadline = time.monotonic() + DYING_HOLDER_WAIT_S
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise StoreError(f"cannot lock {self.uri} for writing ({path}: {err})") from err
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raw = os.pread(fd, 4096, 0)
                os.close(fd)
                if _dying(raw) and time.monotonic() < deadline:
                    time.sleep(0.05)  # a killed holder whose last threads are still exiting: released soon
                    continue
                raise FolderInUse(f"{self.uri} is in use by another raybench run ({_describe_holder(raw)}): wait "
                                 "for it to finish, or use another --out") from None
            try:  # the file may have been removed (an empty folder cleaned up) between open and flock
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_owner()).encode(), 0)
        return lambda: os.close(fd)  # closing the descriptor releases the lock

    def _lock_remote(self) -> Callable[[], None]:
        path = self.path(LOCK_FILE)
        if self.exists(path):
            try:
                other = self.read_json(path)
            except StoreError:
                other = {}
            stale = other.get("host") == socket.gethostname() and not _pid_alive(other.get("pid"))
            if not stale:
                raise FolderInUse(f"{self.uri} is in use by another raybench run ({_describe_holder(other)}): wait "
                                 f"for it to finish, or use another --out; if no run is writing there, delete {path}")
            log.warning("taking over %s, left by a run that is no longer running (%s)", path, _describe_holder(other))
        me = _owner()
        self.write_json(path, me)

        def release() -> None:
            try:
                if self.read_json(path).get("token") == me["token"]:
                    self.fs.delete_file(path)
            except (StoreError, OSError):
                pass  # removed with the folder it was in, or taken over

        return release

    def _remove_if_unused(self, top: str) -> None:
        """Delete ``top`` (the run folder or the first folder above it that the writer created) if every file
        under it is run metadata of the run folder: nothing computed is ever removed."""
        metadata = {"run.json", "dataset.json", LOCK_FILE}
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(top, recursive=True, allow_not_found=True))
            for info in infos:
                if info.type != pafs.FileType.File:
                    continue
                rel = posixpath.relpath(info.path, self.root)
                if rel not in metadata and not (rel.startswith("forget_sets/") and rel.count("/") == 1
                                                and ".tmp-" not in rel):
                    return
            self.fs.delete_dir(top)
        except OSError as err:  # cleaning up must not hide the error that stopped the run
            log.warning("could not remove %s after the run stopped: %s", top, err)

    # -- checkpoints --------------------------------------------------------------------------------------------
    def checkpoint_path(self, unit_id: str) -> str:
        return self.path("checkpoints", f"{unit_id}.pt")

    def write_checkpoint(self, unit_id: str, state: dict) -> None:
        """The checkpoint and, written first, its size and sha256 (``<id>.pt.json``): torch.load does not notice
        flipped bytes, and unlearning from a damaged checkpoint would give wrong numbers silently."""
        import torch

        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
        path = self.checkpoint_path(unit_id)
        self.write_json(f"{path}.json", {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        self.write_bytes(path, data)

    def read_checkpoint(self, unit_id: str) -> dict:
        import torch

        path = self.checkpoint_path(unit_id)
        if not self.exists(path):
            raise StoreError(f"checkpoint of unit {unit_id} is missing from {self.uri}")
        data = self.read_bytes(path)
        remedy = (f"; delete it and manifests/{unit_id}.json in {self.uri} so that the next `raybench run` (or "
                  "import) recomputes them")
        try:
            record = self.read_record(f"{path}.json", "checkpoint digest", {"size": int, "sha256": str})
        except StoreError as err:
            raise StoreError(f"checkpoint {path} cannot be verified: {err}{remedy}") from None
        if len(data) != record["size"] or hashlib.sha256(data).hexdigest() != record["sha256"]:
            raise StoreError(f"checkpoint {path} is damaged: it differs from the size and sha256 recorded when it "
                             f"was written{remedy}")
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)

    # -- arrays (subset logits, masks, datamodel effects) -------------------------------------------------------
    def write_array(self, path: str, array: np.ndarray) -> None:
        """A ``.npy`` array and, written first, its size and sha256 (``<path>.json``), as checkpoints are: an array
        read back is checked, so a damaged file is refused instead of becoming a number."""
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
        data = buffer.getvalue()
        self.write_json(f"{path}.json", {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                                         "shape": list(array.shape), "dtype": str(array.dtype)})
        self.write_bytes(path, data)

    def read_array(self, path: str) -> np.ndarray:
        """An array ``write_array`` wrote, after checking its size and sha256."""
        if not self.exists(path):
            raise StoreError(f"{path} is missing")
        data = self.read_bytes(path)
        record = self.read_record(f"{path}.json", "array digest", {"size": int, "sha256": str})
        if len(data) != record["size"] or hashlib.sha256(data).hexdigest() != record["sha256"]:
            raise StoreError(f"{path} is damaged: it differs from the size and sha256 recorded when it was written")
        return np.load(io.BytesIO(data), allow_pickle=False)

    def subset_logits_path(self, unit_id: str) -> str:
        return self.path("subset_logits", f"{unit_id}.npy")

    # -- per-sample values --------------------------------------------------------------------------------------
    def per_sample_path(self, forget_set: str) -> str:
        return self.path("per_sample", f"forget_set={forget_set}", PER_SAMPLE_FILE)

    def write_per_sample(self, entries: Iterable[tuple[dict, dict[str, np.ndarray]]], *,
                         metadata: dict[str, str] | None = None) -> list[str]:
        """``per_sample/forget_set=<fs>/part-0.parquet`` for every forget set of ``entries`` (summary row, its
        per-sample columns named as in ``PER_SAMPLE_SCHEMA``), rows in entry order; returns the paths written.

        Each file is written under a hidden temporary name and moved into place, so a reader sees a forget set's
        old file or its new one, never part of one; folders of forget sets no longer among the entries are
        removed, so the folder holds exactly the summary's rows. ``metadata`` (e.g. run id, KLOM version, the
        digest of the summary.csv written with them) goes into each file's schema under ``raybench``.
        """
        blocks: dict[str, list[pa.Table]] = {}
        for row, columns in entries:
            blocks.setdefault(str(row["forget_set"]), []).append(_per_sample_block(row, columns))
        schema = PER_SAMPLE_SCHEMA.with_metadata({"raybench": json.dumps(metadata or {}, sort_keys=True)})
        written = []
        for fs, tables in blocks.items():
            path = self.per_sample_path(fs)
            folder = posixpath.dirname(path)
            self.fs.create_dir(folder, recursive=True)
            tmp = posixpath.join(folder, f".{PER_SAMPLE_FILE}.tmp-{uuid.uuid4().hex}")  # readers skip dot files
            pq.write_table(pa.concat_tables(tables).cast(schema), tmp, filesystem=self.fs, **PER_SAMPLE_WRITE_OPTIONS)
            self.fs.move(tmp, path)
            written.append(path)
        selector = pafs.FileSelector(self.path("per_sample"), recursive=True, allow_not_found=True)
        for info in self.fs.get_file_info(selector):
            rel = posixpath.relpath(info.path, self.path("per_sample"))
            stale = rel.startswith("forget_set=") and rel.removeprefix("forget_set=") not in blocks
            if info.type == pafs.FileType.Directory and "/" not in rel and stale:
                self.fs.delete_dir(info.path)  # a forget set the summary no longer has
            elif info.type == pafs.FileType.File and ".tmp-" in info.base_name and self.exists(info.path):
                self.fs.delete_file(info.path)  # an earlier write cut short
        return written

    def read_per_sample(self, forget_set: str | None = None) -> pa.Table:
        """The per-sample rows of one forget set, or of every forget set in the folder (in forget-set order);
        ``StoreError`` naming the file if one is missing or damaged."""
        if forget_set is None:
            selector = pafs.FileSelector(self.path("per_sample"), allow_not_found=True)
            sets = sorted(info.base_name.removeprefix("forget_set=") for info in self.fs.get_file_info(selector)
                          if info.type == pafs.FileType.Directory and info.base_name.startswith("forget_set="))
        else:
            sets = [forget_set]
        tables = []
        for fs in sets:
            path = self.per_sample_path(fs)
            if not self.exists(path):
                raise StoreError(f"{path} is missing: run `raybench reduce {self.uri}` to write it")
            try:
                tables.append(pq.read_table(path, filesystem=self.fs, partitioning=None,
                                            page_checksum_verification=True))
            except (pa.ArrowInvalid, OSError) as err:
                raise StoreError(f"{path} cannot be read ({err}); rewrite it with `raybench reduce "
                                 f"{self.uri}`") from err
        return pa.concat_tables(tables) if tables else PER_SAMPLE_SCHEMA.empty_table()

    # -- reading margins ----------------------------------------------------------------------------------------
    def read_margins(self, units: Iterable[UnitOutput], *, split: str, chunk: int | None = None,
                     epoch: int | None = None) -> pa.Table:
        """The rows of these units for one split (and chunk / epoch), reading only what matches."""
        return self.read_margin_files([f for u in units for f in u.files], split=split, chunk=chunk, epoch=epoch)

    def read_margin_files(self, files: Iterable[str], *, split: str, chunk: int | None = None,
                          epoch: int | None = None) -> pa.Table:
        """Rows of these committed files (paths relative to the run folder, as manifests list them).

        The filters prune row groups by their statistics: with one row group per (epoch, split, chunk), reading
        one chunk of a 60,000-sample run decodes one ninth of each file, not all of it.
        """
        paths = [self.path(f) for f in files]
        if not paths:
            return MARGINS_SCHEMA.empty_table()
        filters = [("split", "=", split)]
        if chunk is not None:
            filters.append(("chunk", "=", chunk))
        if epoch is not None:
            filters.append(("epoch", "=", epoch))
        columns = ["model_id", "seed", "epoch", "chunk", "sample_start", "margins", "top1_margins"]
        try:
            return pq.read_table(paths, filesystem=self.fs, filters=filters, partitioning=None, columns=columns,
                                 page_checksum_verification=True)
        except (pa.ArrowInvalid, OSError) as err:
            if isinstance(err, OSError) and not _damaged(err):
                raise  # an I/O failure (a network hiccup), which Ray tasks retry: not the file's fault
            bad = next((p for p in paths if not _readable(self.fs, p)), paths[0])
            unit = posixpath.basename(posixpath.dirname(bad)).removeprefix("unit=")
            raise StoreError(f"{bad} cannot be read as margins ({err}); nothing is scored from it. Delete "
                             f"manifests/{unit}.json in {self.uri} so that the next `raybench run` (or import) "
                             "recomputes it") from err


def _damaged(err: OSError) -> bool:
    """Whether a pyarrow OSError says the bytes are wrong (a page CRC, a missing file), not that I/O failed."""
    return isinstance(err, FileNotFoundError) or "checksum" in str(err).lower() or "integrity" in str(err).lower()


def _readable(fs: pafs.FileSystem, path: str) -> bool:
    try:
        pq.read_table(path, filesystem=fs, partitioning=None, page_checksum_verification=True)
    except (pa.ArrowInvalid, OSError):
        return False
    return True


def _missing_ancestor(path: str) -> str | None:
    """The topmost folder of ``path`` (itself included) that does not exist yet, or None: what creating it adds."""
    top = None
    while not os.path.exists(path):
        top, parent = path, os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return top


def _owner() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "token": uuid.uuid4().hex,
            "since": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


def _describe_holder(raw: bytes | dict) -> str:
    try:
        owner = raw if isinstance(raw, dict) else json.loads(raw)
        return f"pid {owner['pid']} on host {owner['host']}, since {owner['since']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def _pid_alive(pid: object) -> bool:
    """Whether ``pid`` runs on this host; a zombie does not (SIGKILL makes the main thread one at once, while
    threads stuck in I/O still hold the process's files for a moment)."""
    if not isinstance(pid, int) or pid <= 0:
        return True  # unknown: assume it runs, and say how to remove the file
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True  # no /proc (not Linux): it answered the signal, so it exists


def _dying(raw: bytes) -> bool:
    """Whether a lock file names a process of this host that is no longer running (a killed run, exiting)."""
    try:
        owner = json.loads(raw)
        return owner["host"] == socket.gethostname() and not _pid_alive(owner["pid"])
    except (ValueError, KeyError, TypeError):
        return False


def _per_sample_block(row: dict, columns: dict[str, np.ndarray]) -> pa.Table:
    """One summary row's per-sample rows: its key repeated, its columns as given (NaN accuracy: null)."""
    fields = [f.name for f in PER_SAMPLE_SCHEMA if f.name not in PER_SAMPLE_KEYS]
    if set(columns) != set(fields):
        raise StoreError(f"per-sample columns {sorted(columns)} are not {sorted(fields)}")
    n = len(columns["sample_id"])
    if any(len(v) != n for v in columns.values()):
        raise StoreError(f"per-sample columns of {row['method']} {row['split']} have different lengths")
    arrays = {}
    for name in PER_SAMPLE_KEYS:
        kind = PER_SAMPLE_SCHEMA.field(name).type
        arrays[name] = pa.repeat(pa.scalar(row[name], kind), n)
    for name in fields:
        kind = PER_SAMPLE_SCHEMA.field(name).type
        values = np.asarray(columns[name])
        mask = np.isnan(values) if pa.types.is_floating(kind) and name != "klom" else None
        arrays[name] = pa.array(values, type=kind, mask=mask)
    return pa.table(arrays, schema=PER_SAMPLE_SCHEMA)


def margins_matrix(table: pa.Table, column: str = "margins") -> np.ndarray:
    """(models, width) float32 from rows of one chunk, ordered by model id: the ``margins`` column, or another
    list column of the same layout (``top1_margins``, see ``top1_matrix``).

    Each Arrow chunk's values are taken as they are (no Arrow-side sort or ``combine_chunks``, which would copy
    the margins twice more) and the rows are put in model order with one numpy gather, only if needed.
    """
    if table.num_rows == 0:
        raise StoreError("no margins rows to read")
    ids = table.column("model_id").to_numpy()
    order = np.argsort(ids, kind="stable")
    if np.any(np.diff(ids[order]) == 0):
        raise StoreError(f"duplicate model ids in margins rows: {ids[order].tolist()}")
    values = table.column(column)
    if values.null_count:
        raise StoreError(f"{values.null_count} of {table.num_rows} rows have no {column}")
    lengths = pc.list_value_length(values)
    width = pc.min_max(lengths)
    if width["min"].as_py() != width["max"].as_py():
        raise StoreError(f"{column} rows of one chunk have different widths ({width['min']}..{width['max']})")
    parts = [chunk.flatten().to_numpy(zero_copy_only=False) for chunk in values.chunks]
    matrix = (np.concatenate(parts) if len(parts) > 1 else parts[0]).reshape(table.num_rows, -1)
    if np.any(order != np.arange(len(order))):
        matrix = matrix[order]
    return matrix


def top1_matrix(table: pa.Table) -> np.ndarray | None:
    """The ``top1_margins`` of rows of one chunk as ``margins_matrix`` lays them out, or None when any row's are
    null (not known: models imported with their margins only), so that accuracy is left empty, never guessed."""
    if table.num_rows and table.column("top1_margins").null_count:
        return None
    return margins_matrix(table, "top1_margins")
