"""The run folder on any pyarrow filesystem, its Parquet layout, and the reducer on synthetic margins.

Synthetic runs are written straight through the store (no training), so the reducer is checked on shapes that
training would make slow: several chunks per split, several forget sets and epochs.
"""

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from raybench.config import build_config
from raybench.engine import execute
from raybench.ids import digest
from raybench.reduce import reduce_run, write_summary
from raybench.store import RunStore, StoreError, margins_matrix, margins_table

N_MODELS, BLOCK, CHUNK, N_TRAIN, N_VAL = 6, 4, 64, 150, 70
FORGET = {"a": [0, 3, 64, 65, 149], "b": list(range(10, 40))}


def _unit(store: RunStore, rng, *, role: str, forget_set: str, method: str, epochs: list[int], ids: range,
          shift: float) -> None:
    unit = digest([role, forget_set, method, ids.start])
    tables = [margins_table(run="synthetic", unit=unit, role=role, method=method, params="{}", forget_set=forget_set,
                            model_ids=ids, seeds=ids, epoch=e, chunk_size=CHUNK,
                            margins={"train": rng.normal(shift, 2, (len(ids), N_TRAIN)).astype(np.float32),
                                     "val": rng.normal(shift, 2, (len(ids), N_VAL)).astype(np.float32)})
              for e in epochs]
    meta = {"unit": unit, "kind": "synthetic", "role": role, "forget_set": forget_set, "method": method,
            "params": "{}", "epochs": epochs, "model_ids": list(ids), "seeds": list(ids)}
    store.write_unit(meta, pa.concat_tables(tables))


def synthetic_run(store: RunStore, seed: int = 0) -> None:
    """Originals, oracles of two forget sets, and a method scored at two epochs, in blocks of BLOCK models."""
    rng = np.random.default_rng(seed)
    store.open_run({"n_models": N_MODELS, "chunk_size": CHUNK, "synthetic": True})
    store.write_json(store.path("dataset.json"), {"n_train": N_TRAIN, "n_val": N_VAL})
    blocks = [range(s, min(N_MODELS, s + BLOCK)) for s in range(0, N_MODELS, BLOCK)]
    for ids in blocks:
        _unit(store, rng, role="original", forget_set="none", method="none", epochs=[20], ids=ids, shift=3)
    for fs, indices in FORGET.items():
        store.write_json(store.path("forget_sets", f"{fs}.json"), {"id": fs, "indices": indices})
        for ids in blocks:
            _unit(store, rng, role="oracle", forget_set=fs, method="none", epochs=[20], ids=ids, shift=2.5)
            _unit(store, rng, role="unlearned", forget_set=fs, method="m", epochs=[1, 2], ids=ids, shift=2)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> RunStore:
    store = RunStore(str(tmp_path_factory.mktemp("synthetic")))
    synthetic_run(store)
    return store


def test_margins_table_rows_are_ordered_by_split_chunk_model():
    m = np.arange(3 * 5, dtype=np.float32).reshape(3, 5)
    table = margins_table(run="r", unit="u", role="oracle", method="none", params="{}", forget_set="1",
                          model_ids=[7, 8, 9], seeds=[1, 2, 3], epoch=4, margins={"train": m, "val": m[:, :2]},
                          chunk_size=2)
    assert table.column("split").to_pylist() == ["train"] * 9 + ["val"] * 3
    assert table.column("chunk").to_pylist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 0, 0, 0]
    assert table.column("sample_start").to_pylist()[:9] == [0, 0, 0, 2, 2, 2, 4, 4, 4]
    assert table.column("model_id").to_pylist() == [7, 8, 9] * 4
    assert table.column("margins").to_pylist()[3:6] == [[2, 3], [7, 8], [12, 13]]
    assert table.column("margins").to_pylist()[6] == [4]
    assert set(table.column("epoch").to_pylist()) == {4}
    with pytest.raises(ValueError, match="non-finite"):
        margins_table(run="r", unit="u", role="oracle", method="none", params="{}", forget_set="1", model_ids=[0],
                      seeds=[0], epoch=0, margins={"train": np.array([[np.nan]])}, chunk_size=2)


def test_each_chunk_is_one_row_group_and_reads_back_in_model_order(local_run):
    unit = next(u for u in local_run.completed_units().values()
                if u.meta["role"] == "unlearned" and len(u.meta["model_ids"]) == BLOCK)
    meta = pq.ParquetFile(local_run.path(unit.files[0]), filesystem=local_run.fs).metadata
    chunks_per_epoch = -(-N_TRAIN // CHUNK) + -(-N_VAL // CHUNK)
    assert meta.num_row_groups == 2 * chunks_per_epoch  # two epochs
    assert {meta.row_group(i).num_rows for i in range(meta.num_row_groups)} == {BLOCK}
    table = local_run.read_margin_files(unit.files, split="train", chunk=2, epoch=2)
    assert table.num_rows == BLOCK and set(table.column("sample_start").to_pylist()) == {2 * CHUNK}
    matrix = margins_matrix(table.take([3, 1, 0, 2]))  # rows in any order come back sorted by model id
    assert matrix.shape == (BLOCK, N_TRAIN - 2 * CHUNK)
    assert np.array_equal(matrix, margins_matrix(table))


def test_a_half_committed_unit_is_overwritten_not_duplicated(tmp_path):
    store = RunStore(str(tmp_path))
    rng = np.random.default_rng(1)
    store.open_run({"n_models": N_MODELS, "chunk_size": CHUNK})
    store.record_forget_set("a", "test", np.asarray(FORGET["a"]))
    _unit(store, rng, role="oracle", forget_set="a", method="none", epochs=[1], ids=range(2), shift=0)
    [unit] = store.completed_units().values()
    folder = tmp_path / unit.files[0].rpartition("/")[0]
    (tmp_path / "manifests" / f"{unit.unit_id}.json").unlink()  # a commit cut short: files moved, no manifest
    _unit(store, rng, role="oracle", forget_set="a", method="none", epochs=[1], ids=range(2), shift=0)
    assert len(list(folder.glob("*.parquet"))) == 1
    with pytest.raises(StoreError, match="already committed"):
        _unit(store, rng, role="oracle", forget_set="a", method="none", epochs=[1], ids=range(2), shift=0)


def test_the_store_works_on_an_in_memory_filesystem_and_reduces_identically(local_run):
    memory = RunStore("runs/synthetic", filesystem=pafs._MockFileSystem())
    synthetic_run(memory)
    rows = reduce_run(memory, parallel=False)
    assert rows == reduce_run(local_run, parallel=False)
    keys = {(r["forget_set"], r["method"], r["epoch"], r["split"]) for r in rows}
    assert keys == {(fs, m, e, s) for fs in FORGET for m, e in (("do_nothing", 0), ("m", 1), ("m", 2))
                    for s in ("retain", "forget", "val")}
    forget = {r["forget_set"]: r["n_samples"] for r in rows if r["split"] == "forget"}
    assert forget == {fs: len(idx) for fs, idx in FORGET.items()}
    write_summary(memory, rows)
    assert memory.read_bytes(memory.path("summary.csv")).startswith(b"forget_set,method,params,epoch")


def test_reduce_as_ray_tasks_equals_reduce_in_process(ray_session, local_run):
    in_process = reduce_run(local_run, parallel=False)
    assert reduce_run(local_run, parallel=True) == in_process
    assert reduce_run(local_run, parallel=None) == in_process  # one node: decides for in-process


def test_reduce_goes_to_ray_tasks_on_a_multi_node_cluster(ray_session, local_run, monkeypatch):
    import raybench.engine as engine

    calls = []
    real = engine.map_tasks
    monkeypatch.setattr(engine, "map_tasks", lambda fn, items, **kw: calls.append(len(items)) or real(fn, items, **kw))
    monkeypatch.setattr(ray_session, "nodes", lambda: [{"Alive": True}, {"Alive": True}])  # as if two nodes
    assert reduce_run(local_run) == reduce_run(local_run, parallel=False)
    chunks = -(-N_TRAIN // CHUNK) + -(-N_VAL // CHUNK)
    assert calls == [len(FORGET) * 2 * chunks]  # one task per (ensemble, split, chunk): do_nothing and m


def test_a_run_writes_to_a_file_uri(ray_session, tmp_path):
    uri = (tmp_path / "out").as_uri()
    assert uri.startswith("file:///")
    config = build_config(None, n_models=2, block_size=2, forget_sets="1", methods="do_nothing",
                          recipe={"epochs": 1}, out=uri)
    plan, store, report = execute(config)
    assert store.uri == uri and report.units_run == len(plan.units) == 2
    write_summary(store, reduce_run(RunStore(uri)))
    assert (tmp_path / "out" / "summary.csv").read_text().count("\n") == 1 + 3
    assert len(list((tmp_path / "out" / "manifests").glob("*.json"))) == 2
    for path in (tmp_path / "out" / "margins").rglob("*.parquet"):  # written by Ray Data: one row group per chunk
        meta = pq.ParquetFile(path).metadata
        assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [2, 2]  # train, val
