"""The run folder on any pyarrow filesystem, its Parquet layout, and the reducer on synthetic margins.

Synthetic runs are written straight through the store (no training), so the reducer is checked on shapes that
training would make slow: several chunks per split, several forget sets and epochs.
"""

import csv
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from raybench.config import build_config
from raybench.ids import digest
from raybench.pipeline import execute
from raybench.reduce import reduce_run, write_summary
from raybench.store import MARGINS_SCHEMA, RunStore, StoreError, margins_matrix, margins_table, top1_matrix

N_MODELS, BLOCK, CHUNK, N_TRAIN, N_VAL = 6, 4, 64, 150, 70
FORGET = {"a": [0, 3, 64, 65, 149], "b": list(range(10, 40))}


def _unit(store: RunStore, rng, *, role: str, forget_set: str, method: str, epochs: list[int], ids: range,
          shift: float, top1: bool = True) -> None:
    """One unit of random margins; its top-1 margins lie above them (as they must), at a random distance, so that
    top-1 accuracy and the share of positive margins differ (or, ``top1=False``, are not stored)."""
    unit = digest([role, forget_set, method, ids.start])
    tables = []
    for e in epochs:
        margins = {"train": rng.normal(shift, 2, (len(ids), N_TRAIN)).astype(np.float32),
                   "val": rng.normal(shift, 2, (len(ids), N_VAL)).astype(np.float32)}
        scores = {k: v + rng.exponential(1.5, v.shape).astype(np.float32) for k, v in margins.items()}
        tables.append(margins_table(run="synthetic", unit=unit, role=role, method=method, params="{}",
                                    forget_set=forget_set, model_ids=ids, seeds=ids, epoch=e, chunk_size=CHUNK,
                                    margins=margins, top1=scores if top1 else None))
    meta = {"unit": unit, "kind": "synthetic", "role": role, "forget_set": forget_set, "method": method,
            "params": "{}", "epochs": epochs, "model_ids": list(ids), "seeds": list(ids)}
    store.write_unit(meta, pa.concat_tables(tables))


def synthetic_run(store: RunStore, seed: int = 0, *, original_top1: tuple[bool, ...] = (True, True)) -> None:
    """Originals, oracles of two forget sets, and a method scored at two epochs, in blocks of BLOCK models;
    ``original_top1``: per block of originals, whether its top-1 margins are stored."""
    rng = np.random.default_rng(seed)
    store.open_run({"n_models": N_MODELS, "chunk_size": CHUNK, "synthetic": True})
    store.write_json(store.path("dataset.json"), {"n_train": N_TRAIN, "n_val": N_VAL})
    blocks = [range(s, min(N_MODELS, s + BLOCK)) for s in range(0, N_MODELS, BLOCK)]
    for ids, top1 in zip(blocks, original_top1, strict=True):
        _unit(store, rng, role="original", forget_set="none", method="none", epochs=[20], ids=ids, shift=3, top1=top1)
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
    # the store's one NaN/inf policy: NaN refused naming the model, ±inf stored as ±float32 max
    with pytest.raises(ValueError, match=r"NaN margins on train at epoch 0 for model\(s\) \[5\]"):
        margins_table(run="r", unit="u", role="oracle", method="none", params="{}", forget_set="1", model_ids=[4, 5],
                      seeds=[0, 0], epoch=0, margins={"train": np.array([[1.0], [np.nan]])}, chunk_size=2)
    saturated = margins_table(run="r", unit="u", role="oracle", method="none", params="{}", forget_set="1",
                              model_ids=[0], seeds=[0], epoch=0, margins={"train": np.array([[np.inf, -np.inf]])},
                              chunk_size=2)
    big = float(np.finfo(np.float32).max)
    assert saturated.column("margins").to_pylist() == [[big, -big]]


def test_top1_margins_are_chunked_like_the_margins_and_null_when_not_given():
    m = np.arange(3 * 5, dtype=np.float32).reshape(3, 5)
    kw = dict(run="r", unit="u", role="oracle", method="none", params="{}", forget_set="1", model_ids=[7, 8, 9],
              seeds=[1, 2, 3], epoch=4, chunk_size=2)
    assert MARGINS_SCHEMA.names[MARGINS_SCHEMA.get_field_index("margins") + 1] == "top1_margins"
    table = margins_table(**kw, margins={"train": m, "val": m[:, :2]}, top1={"train": m + 100, "val": m[:, :2] - 1})
    assert table.column("top1_margins").to_pylist()[3:7] == [[102, 103], [107, 108], [112, 113], [104]]
    assert table.column("top1_margins").to_pylist()[9:] == [[-1, 0], [4, 5], [9, 10]]
    without = margins_table(**kw, margins={"train": m, "val": m[:, :2]})
    assert without.column("top1_margins").null_count == without.num_rows == 12
    assert without.schema == table.schema == MARGINS_SCHEMA
    assert without.column("margins").to_pylist() == table.column("margins").to_pylist()
    with pytest.raises(ValueError, match="splits"):
        margins_table(**kw, margins={"train": m, "val": m}, top1={"train": m})
    with pytest.raises(ValueError, match="shape"):
        margins_table(**kw, margins={"train": m}, top1={"train": m[:, :4]})
    with pytest.raises(ValueError, match="NaN top-1 margins"):
        margins_table(**kw, margins={"train": m}, top1={"train": np.where(m > 3, np.nan, m)})
    clamped = margins_table(**kw, margins={"train": m}, top1={"train": np.where(m > 3, -np.inf, m)})
    assert min(min(v) for v in clamped.column("top1_margins").to_pylist()) == -float(np.finfo(np.float32).max)


def test_top1_matrix_reads_stored_top1_and_none_where_unknown(tmp_path):
    store = RunStore(str(tmp_path))
    store.open_run({"n_models": N_MODELS, "chunk_size": CHUNK})
    store.record_forget_set("a", "test", np.asarray(FORGET["a"]))  # units are committed for a recorded set
    rng = np.random.default_rng(3)
    _unit(store, rng, role="oracle", forget_set="a", method="none", epochs=[1], ids=range(3), shift=0)
    _unit(store, rng, role="original", forget_set="none", method="none", epochs=[1], ids=range(3), shift=0,
          top1=False)
    units = {u.meta["role"]: u for u in store.completed_units().values()}
    stored = store.read_margin_files(units["oracle"].files, split="train", chunk=1)
    top1 = top1_matrix(stored.take([2, 0, 1]))  # model order, as margins_matrix
    expected = np.array(stored.column("top1_margins").to_pylist(), dtype=np.float32)
    np.testing.assert_array_equal(top1, expected[np.argsort(stored.column("model_id").to_numpy())])
    assert np.all(top1 >= margins_matrix(stored))
    unknown = store.read_margin_files(units["original"].files, split="train", chunk=1)
    assert top1_matrix(unknown) is None and margins_matrix(unknown).shape == (3, CHUNK)
    with pytest.raises(StoreError, match="no top1_margins"):
        margins_matrix(unknown, "top1_margins")


def _stored_matrix(store: RunStore, column: str, *, split: str, **where: object) -> np.ndarray:
    """(models, samples) of one column of every stored row matching ``where``, read with pyarrow alone."""
    table = pq.read_table(store.path("margins"), filesystem=store.fs, partitioning=None)
    rows = [r for r in table.to_pylist() if r["split"] == split and all(r[k] == v for k, v in where.items())]
    by_model: dict[int, list] = {}
    for r in sorted(rows, key=lambda r: (r["model_id"], r["sample_start"])):
        by_model.setdefault(r["model_id"], []).extend(r[column])
    return np.array([by_model[i] for i in sorted(by_model)], dtype=np.float64)


def test_summary_accuracy_is_the_share_of_positive_stored_top1_margins(local_run):
    rows = reduce_run(local_run)
    forget = {fs: np.asarray(idx) for fs, idx in FORGET.items()}
    differs = 0
    for r in rows:
        source = "val" if r["split"] == "val" else "train"
        n = N_VAL if source == "val" else N_TRAIN
        idx = {"val": np.arange(N_VAL), "forget": forget[r["forget_set"]],
               "retain": np.setdiff1d(np.arange(n), forget[r["forget_set"]])}[r["split"]]
        if r["method"] == "do_nothing":
            models = dict(role="original")
        else:
            models = dict(role="unlearned", method=r["method"], forget_set=r["forget_set"], epoch=r["epoch"])
        top1 = _stored_matrix(local_run, "top1_margins", split=source, **models)[:, idx]
        oracles = _stored_matrix(local_run, "top1_margins", split=source, role="oracle", forget_set=r["forget_set"])
        assert top1.shape == (N_MODELS, len(idx))
        assert r["accuracy"] == pytest.approx(float(np.mean(top1 > 0)), abs=1e-12), r
        assert r["oracle_accuracy"] == pytest.approx(float(np.mean(oracles[:, idx] > 0)), abs=1e-12), r
        margins = _stored_matrix(local_run, "margins", split=source, **models)[:, idx]
        differs += float(np.mean(margins > 0)) != r["accuracy"]
    assert differs == len(rows)  # the share of positive margins is another number


def test_unknown_top1_leaves_accuracy_empty_never_approximated(tmp_path):
    from raybench.report import summary_table, write_report

    store = RunStore(str(tmp_path))
    synthetic_run(store, original_top1=(True, False))  # one block of originals imported with margins only
    rows = reduce_run(store)
    for r in rows:
        assert (r["accuracy"] is None) == (r["method"] == "do_nothing"), r
        assert isinstance(r["oracle_accuracy"], float)
    summary = write_summary(store, rows)
    assert summary["rows"] == rows
    saved = json.loads(store.read_bytes(store.path("summary.json")))["rows"]
    assert [r["accuracy"] for r in saved] == [r["accuracy"] for r in rows]  # null in JSON
    table = list(csv.DictReader(io.StringIO(store.read_bytes(store.path("summary.csv")).decode())))
    assert len(table) == len(rows)
    for line in table:
        assert (line["accuracy"] == "") == (line["method"] == "do_nothing") and line["oracle_accuracy"] != ""
    text = summary_table(rows)
    line = next(t for t in text.splitlines() if " do_nothing " in t)
    assert line.split()[-4:-1] == ["-", "-", "-"]  # acc retain / forget / val
    assert "<td></td>" in store.read_bytes(write_report(store, summary)).decode()


def test_a_folder_of_an_older_format_is_refused(tmp_path):
    store = RunStore(str(tmp_path / "old"))
    store.write_json(store.path("run.json"), {"run": "0123", "format_version": 1, "identity": {"n_models": 6}})
    for call in (store.run_info, lambda: store.open_run({"n_models": 6})):
        with pytest.raises(StoreError, match="older raybench .*format version 1.* new --out folder"):
            call()
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["run.json"]  # nothing written

    current = RunStore(str(tmp_path / "current"))
    synthetic_run(current)
    manifest = sorted((tmp_path / "current" / "manifests").iterdir())[0]
    meta = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**meta, "format_version": 1}))  # one unit committed by an older raybench
    with pytest.raises(StoreError, match=f"older raybench .*in manifests/{manifest.name}"):
        reduce_run(current)
    store.write_json(store.path("run.json"), {"run": "0123", "format_version": 99, "identity": {}})
    with pytest.raises(StoreError, match="format version 99"):
        store.run_info()


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
    rows = reduce_run(memory)
    assert rows == reduce_run(local_run)
    keys = {(r["forget_set"], r["method"], r["epoch"], r["split"]) for r in rows}
    assert keys == {(fs, m, e, s) for fs in FORGET for m, e in (("do_nothing", 0), ("m", 1), ("m", 2))
                    for s in ("retain", "forget", "val")}
    forget = {r["forget_set"]: r["n_samples"] for r in rows if r["split"] == "forget"}
    assert forget == {fs: len(idx) for fs, idx in FORGET.items()}
    write_summary(memory, rows)
    assert memory.read_bytes(memory.path("summary.csv")).startswith(b"forget_set,method,params,epoch")


def test_reduce_as_ray_tasks_equals_reduce_in_process(ray_session, local_run):
    in_process = reduce_run(local_run)
    from raybench.engine import map_tasks

    assert reduce_run(local_run, mapper=map_tasks) == in_process


def test_reduce_goes_to_ray_tasks_on_a_multi_node_cluster(ray_session, local_run, monkeypatch):
    import raybench.pipeline as pipeline

    calls = []
    real = pipeline.map_tasks
    monkeypatch.setattr(pipeline, "map_tasks", lambda fn, items, **kw: calls.append(len(items)) or real(fn, items))
    in_process = [{k: v for k, v in r.items() if k != "compute_s"} for r in reduce_run(local_run)]
    monkeypatch.setattr(ray_session, "nodes", lambda: [{"Alive": True}])  # one node: in process, no task
    pipeline.summarize(local_run)
    assert calls == []
    monkeypatch.setattr(ray_session, "nodes", lambda: [{"Alive": True}, {"Alive": True}])  # as if two nodes
    summary, _ = pipeline.summarize(local_run)
    assert [{k: v for k, v in r.items() if k != "compute_s"} for r in summary["rows"]] == in_process
    chunks = -(-N_TRAIN // CHUNK) + -(-N_VAL // CHUNK)
    # one task per (ensemble, split, chunk): do_nothing and m; then one per ensemble for the field's metrics
    assert calls == [len(FORGET) * 2 * chunks, len(FORGET) * 2]


def test_a_run_writes_to_a_file_uri(ray_session, tmp_path):
    uri = (tmp_path / "out").as_uri()
    assert uri.startswith("file:///")
    config = build_config(None, n_models=2, block_size=2, forget_sets="1", methods="do_nothing",
                          recipe={"epochs": 1}, floor=False, out=uri)
    plan, store, report = execute(config)
    assert store.uri == uri and report.units_run == len(plan.units) == 2
    write_summary(store, reduce_run(RunStore(uri)))
    assert (tmp_path / "out" / "summary.csv").read_text().count("\n") == 1 + 3
    assert len(list((tmp_path / "out" / "manifests").glob("*.json"))) == 2
    for path in (tmp_path / "out" / "margins").rglob("*.parquet"):  # written by Ray Data: one row group per chunk
        meta = pq.ParquetFile(path).metadata
        assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [2, 2]  # train, val
