"""Finished units → Parquet through Ray Data → committed units: one write wave.

Its own module because it is the one place where Ray results become files, and the only engine code that must
tell "the storage failed" (raise) from "the node holding a result died" (recompute). The finished units' tables go
into a Ray Dataset (``from_arrow_refs``, no copy through the driver) written to Parquet
(``partition_cols=["unit"]``) under ``staging/``; each unit is then committed (moved into its hive folder,
manifest written last, docs/design.md#manifests-and-commit). The pool calls it in waves while the actors keep
training.
"""

from __future__ import annotations

import logging

from raybench.plan import Unit
from raybench.store import PARQUET_WRITE_OPTIONS, RunStore, StoreError

log = logging.getLogger(__name__)


def write_wave(store: RunStore, finished: list[tuple[Unit, object, dict]], block_size: int) -> list[Unit]:
    """Ray Data writes the finished units' tables under staging/, then each unit is committed.

    Returns the units whose results were lost (the node holding them died before the write); the others are
    committed. A write that fails with every result still readable is a storage error and is raised.
    One row group per ``block_size`` rows: a full block's rows for one (epoch, split, chunk), so the reducer's
    chunk filter decodes one row group per file.
    """
    import ray
    from ray.exceptions import ObjectLostError, RayError

    staging = store.staging_dir()
    try:
        dataset = ray.data.from_arrow_refs([table_ref for _, table_ref, _ in finished])
        dataset.write_parquet(staging, filesystem=store.fs, partition_cols=["unit"], row_group_size=block_size,
                              **PARQUET_WRITE_OPTIONS)
    except RayError as err:
        lost: list[Unit] = []
        for unit, table_ref, _ in finished:
            try:
                ray.get(table_ref, timeout=60)
            except (ObjectLostError, RayError):
                lost.append(unit)
        if not lost:
            raise
        log.warning("%d unit result(s) lost before they were written (%s); recomputing them", len(lost),
                    type(err).__name__)
        store.remove_dir(staging)
        kept = [entry for entry in finished if entry[0] not in lost]
        return lost + (write_wave(store, kept, block_size) if kept else [])
    staged = store.staged_unit_files(staging)
    for unit, _, meta in finished:
        if unit.id not in staged:
            raise StoreError(f"Ray Data wrote no file for unit {unit.id}")
        store.commit_unit(meta, staged[unit.id])
    store.remove_dir(staging)
    return []
