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

Margins rows (one per model × split × epoch × chunk): ``split`` is ``train`` or ``val`` and chunks are fixed-size
ranges of sample ids, so every model's row covers the same ids whatever its forget set. The retain and forget
splits of DESIGN.md are views the reducer takes with the forget set's indices: originals are then stored once for
all forget sets, and a new forget set can be scored against existing originals.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raybench.ids import digest

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Bumped whenever the layout or the meaning of a column changes; a run folder of another version is refused."""

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
) -> pa.Table:
    """Rows for one (unit, epoch): ``margins`` maps split -> (models, samples) float32, cut into chunks.

    Rows are ordered by split, chunk, model so that a reader filtering one chunk touches one row group.
    """
    model_ids, seeds = list(model_ids), list(seeds)
    columns: dict[str, list] = {name: [] for name in MARGINS_SCHEMA.names}
    for split, matrix in margins.items():
        matrix = np.asarray(matrix, dtype=np.float32)
        if matrix.shape[0] != len(model_ids):
            raise ValueError(f"{matrix.shape[0]} margin rows for {len(model_ids)} models")
        if not np.isfinite(matrix).all():
            raise ValueError(f"non-finite margins in unit {unit} ({role}/{method}, split {split}, epoch {epoch})")
        for chunk, start in enumerate(range(0, matrix.shape[1], chunk_size)):
            block = matrix[:, start : start + chunk_size]
            for row, (model_id, seed) in enumerate(zip(model_ids, seeds, strict=True)):
                columns["model_id"].append(model_id)
                columns["seed"].append(seed)
                columns["split"].append(split)
                columns["chunk"].append(chunk)
                columns["sample_start"].append(start)
                columns["margins"].append(block[row])
    n = len(columns["model_id"])
    fixed = {"run": run, "unit": unit, "role": role, "method": method, "params": params,
             "forget_set": forget_set, "epoch": epoch}
    arrays = []
    for field in MARGINS_SCHEMA:
        if field.name in fixed:
            arrays.append(pa.array([fixed[field.name]] * n, type=field.type))
        elif field.name == "margins":
            offsets = np.zeros(n + 1, dtype=np.int32)
            np.cumsum([len(m) for m in columns["margins"]], out=offsets[1:])
            values = np.concatenate(columns["margins"]) if n else np.zeros(0, np.float32)
            arrays.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.float32())))
        else:
            arrays.append(pa.array(columns[field.name], type=field.type))
    return pa.Table.from_arrays(arrays, schema=MARGINS_SCHEMA)


class RunStore:
    """A run folder on a ``pyarrow.fs`` filesystem."""

    def __init__(self, uri: str) -> None:
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
    def open_run(self, identity: dict) -> str:
        """Create the run folder, or check that an existing one was made by the same run; return the run id.

        ``identity`` holds everything that gives a unit's stored output its meaning (data, architecture, recipe,
        N, chunking, seeds). Methods and forget sets are not part of it: adding them to a run only adds units.
        """
        identity = {"format_version": FORMAT_VERSION, **identity}
        run_id = digest(identity)
        path = self.path("run.json")
        if self.exists(path):
            existing = self.read_json(path)
            if existing.get("format_version") != FORMAT_VERSION:
                raise StoreError(
                    f"{self.uri} holds a run of format version {existing.get('format_version')}, this raybench "
                    f"writes version {FORMAT_VERSION}; use a new --out folder"
                )
            if existing.get("run") != run_id:
                diff = sorted(k for k in set(identity) | set(existing.get("identity", {}))
                              if identity.get(k) != existing.get("identity", {}).get(k))
                raise StoreError(
                    f"{self.uri} holds another run ({existing.get('run')}); it differs in: {', '.join(diff)}. "
                    "Use a new --out folder, or the same settings to resume"
                )
            return run_id
        self.write_json(path, {"run": run_id, "format_version": FORMAT_VERSION, "identity": identity})
        return run_id

    def run_info(self) -> dict:
        path = self.path("run.json")
        if not self.exists(path):
            raise StoreError(f"{self.uri} is not a raybench run folder (no run.json)")
        info = self.read_json(path)
        if info.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{self.uri} has format version {info.get('format_version')}, expected {FORMAT_VERSION}")
        return info

    # -- units --------------------------------------------------------------------------------------------------
    def manifest_path(self, unit_id: str) -> str:
        return self.path("manifests", f"{unit_id}.json")

    def is_complete(self, unit_id: str) -> bool:
        return self.exists(self.manifest_path(unit_id))

    def completed_units(self) -> dict[str, UnitOutput]:
        """Every committed unit, by id (one listing of the manifests folder)."""
        selector = pafs.FileSelector(self.path("manifests"), allow_not_found=True)
        out = {}
        for info in self.fs.get_file_info(selector):
            if info.type == pafs.FileType.File and info.base_name.endswith(".json"):
                meta = self.read_json(info.path)
                out[meta["unit"]] = UnitOutput(meta["unit"], tuple(meta["files"]), meta)
        return out

    def commit_unit(self, meta: dict, staged_files: list[str]) -> None:
        """Move a unit's staged files into its margins folder, then write its manifest (the commit point)."""
        unit_id = meta["unit"]
        target = self.unit_dir(unit_id, meta["forget_set"], meta["role"], meta["method"])
        self.fs.create_dir(target, recursive=True)
        files = []
        for src in staged_files:
            dst = posixpath.join(target, posixpath.basename(src))
            self.fs.move(src, dst)
            files.append(posixpath.relpath(dst, self.root))
        self.write_json(self.manifest_path(unit_id), {**meta, "files": files, "format_version": FORMAT_VERSION})

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
        files = [self.path(f) for u in units for f in u.files]
        if not files:
            return MARGINS_SCHEMA.empty_table()
        filters = [("split", "=", split)]
        if chunk is not None:
            filters.append(("chunk", "=", chunk))
        if epoch is not None:
            filters.append(("epoch", "=", epoch))
        table = pq.read_table(files, filesystem=self.fs, filters=filters, partitioning=None,
                              columns=["model_id", "seed", "epoch", "chunk", "sample_start", "margins"])
        return table


def margins_matrix(table: pa.Table) -> np.ndarray:
    """(models, width) float32 from rows of one chunk, ordered by model id; zero-copy where Arrow allows."""
    if table.num_rows == 0:
        raise StoreError("no margins rows to read")
    table = table.sort_by([("model_id", "ascending")])
    ids = table.column("model_id").to_numpy()
    if len(np.unique(ids)) != len(ids):
        raise StoreError(f"duplicate model ids in margins rows: {ids.tolist()}")
    column = table.column("margins").combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(table.num_rows, -1)


