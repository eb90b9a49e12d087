"""Finished units → Parquet → committed units: one write wave.

Its own module because it is the one place where Ray results become files, and the only engine code that must
tell "the storage failed" (raise) from "the node holding a result died" (recompute). A wave goes one of two ways:

* **Ray Data**: the finished units' tables go into a Ray Dataset (``from_arrow_refs``, no copy through the
  driver) written to Parquet (``partition_cols=["unit"]``) under ``staging/`` by tasks where the blocks live,
  so a cluster's writes run in parallel and no table crosses the network to the driver.
* **direct**: on a one-node Ray a small wave is fetched (shared memory, no network) and written by the driver
  with plain pyarrow, which skips the Dataset's planning and task round-trip (bench/write_wave.py measures both).

Either way each unit is then committed (moved into its hive folder, manifest written last,
docs/design.md#manifests-and-commit). The pool calls it in waves while the actors keep training.
"""

from __future__ import annotations

import logging

from raybench.plan import Unit
from raybench.store import PARQUET_WRITE_OPTIONS, RunStore, StoreError

log = logging.getLogger(__name__)

DIRECT_WRITE_MAX_BYTES = 64 << 20
"""The largest wave (its tables' bytes) the driver writes itself on a one-node Ray; larger ones gain from Ray
Data's parallel writers."""


def write_wave(store: RunStore, finished: list[tuple[Unit, object, dict]], block_size: int) -> list[Unit]:
    """Write the finished units' tables, then commit each unit.

    On a one-node Ray the tables are fetched first (shared memory: no copy over a network) and, when they hold at
    most ``DIRECT_WRITE_MAX_BYTES``, written by the driver with plain pyarrow; otherwise through Ray Data.
    Returns the units whose results were lost (the node holding them died before the write); the others are
    committed. A write that fails with every result still readable is a storage error and is raised.
    Ray Data writes one row group per ``block_size`` rows, the direct way one per unit's models: either way a full
    block's rows for one (epoch, split, chunk), so the reducer's chunk filter decodes one row group per file.
    """
    import ray
    from ray.exceptions import ObjectLostError, RayError

    if sum(1 for node in ray.nodes() if node.get("Alive")) == 1:
        tables, lost = [], []
        for unit, table_ref, _ in finished:
            try:
                tables.append(ray.get(table_ref, timeout=60))
            except (ObjectLostError, RayError):
                lost.append(unit)
        if lost:
            log.warning("%d unit result(s) lost before they were written; recomputing them", len(lost))
            kept = [entry for entry in finished if entry[0] not in lost]
            return lost + (write_wave(store, kept, block_size) if kept else [])
        if sum(t.nbytes for t in tables) <= DIRECT_WRITE_MAX_BYTES:
            for (_, _, meta), table in zip(finished, tables, strict=True):
                store.write_unit(meta, table)  # one row group per (epoch, split, chunk): the unit's models
            return []
        del tables
    return _write_ray_data(store, finished, block_size)


def _write_ray_data(store: RunStore, finished: list[tuple[Unit, object, dict]], block_size: int) -> list[Unit]:
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
