"""The run folder: Parquet margins, manifests, checkpoints and run identity, on any ``pyarrow.fs`` URI.

Layout (``<out>`` is a local path, ``file://…``, ``s3://…`` or ``gs://…``)::

    <out>/run.json                                   identity: format version, run id, what defines the units
    <out>/margins/forget_set=<fs>/role=<role>/method=<method>/unit=<id>/part-*.parquet
    <out>/manifests/<unit id>.json                   written last: a unit is complete iff its manifest exists
    <out>/checkpoints/<unit id>.pt                   original models, read by unlearning units
    <out>/staging/                                   Ray Data writes here; files are moved into margins/
    <out>/summary.csv, summary.json

Why manifests: Ray Data's append mode duplicates rows on a rerun and its overwrite mode is not atomic. A unit's
files are first written under ``staging/``, then moved into place, and only then is its manifest written; readers
only read files that a manifest lists, so a half-written unit is never read and a rerun never double-counts.
What an interrupted run leaves (staging folders, ``*.tmp-*`` files, a unit folder without a manifest) is removed
by the next run (``clean_uncommitted``, ``commit_unit``).

Margins rows are ordered (epoch, split, chunk, model) and written with one row group per block of models, so each
row group is one (epoch, split, chunk) of one unit: the reducer's filter on a chunk decodes only that chunk.

Margins rows (one per model × split × epoch × chunk): ``split`` is ``train`` or ``val`` and chunks are fixed-size
ranges of sample ids, so every model's row covers the same ids whatever its forget set. The retain and forget
splits of DESIGN.md are views the reducer takes with the forget set's indices: originals are then stored once for
all forget sets, and a new forget set can be scored against existing originals. Next to ``margins``
(``z_y - logsumexp_{j≠y} z_j``, what KLOM compares) each row holds ``top1_margins`` (``z_y - max_{j≠y} z_j``,
from the same forward pass: > 0 iff the model's top-1 prediction is right, a tie counting as wrong), what accuracy
is read from; it is null where only margins are known (imported models).
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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


class StoreError(ValueError):
    """A run folder that cannot be used as asked (another run, another format version, corrupt files)."""


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
        matrix = columns["margins"][split] = np.asarray(matrix, dtype=np.float32)
        if matrix.ndim != 2 or matrix.shape[0] != m:
            raise ValueError(f"margins of split {split} have shape {matrix.shape}, expected ({m}, samples)")
        if not np.isfinite(matrix).all():
            raise ValueError(f"non-finite margins in unit {unit} ({role}/{method}, split {split}, epoch {epoch})")
        if top1 is not None:
            scores = columns["top1_margins"][split] = np.asarray(top1[split], dtype=np.float32)
            if scores.shape != matrix.shape:
                raise ValueError(f"top-1 margins of split {split} have shape {scores.shape}, margins "
                                 f"{matrix.shape}")
            if not np.isfinite(scores).all():
                raise ValueError(f"non-finite top-1 margins in unit {unit} ({role}/{method}, split {split}, "
                                 f"epoch {epoch})")
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
    for field in MARGINS_SCHEMA:
        if field.name in fixed:
            arrays.append(pa.array([fixed[field.name]] * n, type=field.type))
        elif field.name in lists_by_name:
            arrays.append(lists_by_name[field.name])
        else:
            arrays.append(pa.array(per_row[field.name], type=field.type))
    return pa.Table.from_arrays(arrays, schema=MARGINS_SCHEMA)


class RunStore:
    """A run folder on a ``pyarrow.fs`` filesystem.

    ``uri`` is what every process (driver, workers, reduce tasks) opens again, so it must name shared storage
    on a cluster. ``filesystem`` hands in an already open filesystem instead (then ``uri`` is a path in it):
    tests use it for in-memory filesystems, which cannot be reopened from a URI.
    """

    def __init__(self, uri: str, filesystem: pafs.FileSystem | None = None) -> None:
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
        self.fs.create_dir(self.root, recursive=True)

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
        try:
            return json.loads(self.read_bytes(path))
        except json.JSONDecodeError as err:
            raise StoreError(f"{path} is not valid JSON: {err}") from err

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
        path = self.path("run.json")
        if not self.exists(path):
            raise StoreError(f"{self.uri} is not a raybench run folder (no run.json)")
        info = self.read_json(path)
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

    # -- forget sets --------------------------------------------------------------------------------------------
    def forget_set_path(self, set_id: str) -> str:
        return self.path("forget_sets", f"{set_id}.json")

    def record_forget_set(self, set_id: str, description: str, indices: np.ndarray) -> bool:
        """Keep a forget set's indices with the run (written once). Returns False, writing nothing, when the run
        already holds other indices under this id: its stored results mean those, so the caller must refuse."""
        path = self.forget_set_path(set_id)
        if self.exists(path):
            return self.read_json(path)["indices"] == indices.tolist()
        self.write_json(path, {"id": set_id, "description": description, "indices": indices.tolist()})
        return True

    def read_forget_set(self, set_id: str) -> np.ndarray:
        """The indices of a forget set recorded with the run, in its own order."""
        return np.asarray(self.read_json(self.forget_set_path(set_id))["indices"], dtype=np.int64)

    # -- units --------------------------------------------------------------------------------------------------
    def manifest_path(self, unit_id: str) -> str:
        return self.path("manifests", f"{unit_id}.json")

    def is_complete(self, unit_id: str) -> bool:
        return self.exists(self.manifest_path(unit_id))

    def completed_units(self) -> dict[str, UnitOutput]:
        """Every committed unit, by id: one listing of the manifests folder, then the manifests read by a few
        threads (on S3/GCS each read is a round trip; a rerun of thousands of units must not pay them in a row)."""
        selector = pafs.FileSelector(self.path("manifests"), allow_not_found=True)
        paths = sorted(info.path for info in self.fs.get_file_info(selector)
                       if info.type == pafs.FileType.File and info.base_name.endswith(".json"))
        with ThreadPoolExecutor(max_workers=min(16, len(paths) or 1)) as pool:
            metas = list(pool.map(self.read_json, paths))
        for path, meta in zip(paths, metas, strict=True):
            self._check_format(meta.get("format_version"), posixpath.relpath(path, self.root))
        return {meta["unit"]: UnitOutput(meta["unit"], tuple(meta["files"]), meta) for meta in metas}

    def commit_unit(self, meta: dict, staged_files: list[str]) -> None:
        """Move a unit's staged files into its margins folder, then write its manifest (the commit point).

        Whatever the unit's folder already holds is removed first: with no manifest it can only be the files of
        a commit cut short (a driver killed between the moves and the manifest), which no reader used, but a
        plain Parquet reader of the hive layout would otherwise count twice.
        """
        unit_id = meta["unit"]
        target = self.unit_dir(unit_id, meta["forget_set"], meta["role"], meta["method"])
        if self.is_complete(unit_id):
            raise StoreError(f"unit {unit_id} is already committed in {self.uri}")
        self.remove_dir(target)
        self.fs.create_dir(target, recursive=True)
        files = []
        for src in staged_files:
            dst = posixpath.join(target, posixpath.basename(src))
            self.fs.move(src, dst)
            files.append(posixpath.relpath(dst, self.root))
        self.write_json(self.manifest_path(unit_id), {**meta, "files": files, "format_version": FORMAT_VERSION})

    def write_unit(self, meta: dict, table: pa.Table, *, row_group_size: int | None = None) -> None:
        """Write one unit's margins with plain pyarrow and commit it (for writers outside the Ray engine:
        importers, benchmarks, tests). ``row_group_size`` should be the unit's number of models (one row group
        per epoch × split × chunk, see ``margins_table``)."""
        staging = self.staging_dir()
        self.fs.create_dir(staging, recursive=True)
        path = posixpath.join(staging, "part-0.parquet")
        pq.write_table(table.drop_columns(["unit"]) if "unit" in table.column_names else table, path,
                       filesystem=self.fs, row_group_size=row_group_size or len(meta.get("model_ids", [])) or None,
                       compression="zstd", use_dictionary=False)
        self.commit_unit(meta, [path])
        self.remove_dir(staging)

    def clean_uncommitted(self) -> None:
        """Remove what an interrupted driver or a killed worker left behind: staging folders, which no manifest
        lists, and temporary files of unfinished atomic writes. Never touches committed files."""
        self.remove_dir(self.path("staging"))
        for folder in ("checkpoints", "manifests"):
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

    # -- checkpoints --------------------------------------------------------------------------------------------
    def checkpoint_path(self, unit_id: str) -> str:
        return self.path("checkpoints", f"{unit_id}.pt")

    def write_checkpoint(self, unit_id: str, state: dict) -> None:
        import torch

        buffer = io.BytesIO()
        torch.save(state, buffer)
        self.write_bytes(self.checkpoint_path(unit_id), buffer.getvalue())

    def read_checkpoint(self, unit_id: str) -> dict:
        import torch

        path = self.checkpoint_path(unit_id)
        if not self.exists(path):
            raise StoreError(f"checkpoint of unit {unit_id} is missing from {self.uri}")
        return torch.load(io.BytesIO(self.read_bytes(path)), map_location="cpu", weights_only=True)

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
        return pq.read_table(paths, filesystem=self.fs, filters=filters, partitioning=None,
                             columns=["model_id", "seed", "epoch", "chunk", "sample_start", "margins",
                                      "top1_margins"])


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
