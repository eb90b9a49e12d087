"""The backbone end to end through a real local Ray: plan -> actors -> Ray Data -> Parquet -> reduce."""

import csv
import json

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from raybench.config import ConfigError, build_config
from raybench.pipeline import execute
from raybench.reduce import reduce_run, write_summary
from raybench.store import MARGINS_SCHEMA, RunStore, StoreError

SMALL = {"n_models": 6, "block_size": 3, "forget_sets": "1,3", "methods": "do_nothing,finetune",
         "params": {"finetune": {"epochs": [1, 2]}}, "recipe": {"epochs": 6}, "chunk_size": 500}


def _run(out, **overrides):
    config = build_config(None, **{**SMALL, "out": str(out), **overrides})
    plan, store, report = execute(config)
    rows = reduce_run(store)
    write_summary(store, rows)
    return plan, store, report, rows


@pytest.fixture(scope="module")
def small_run(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return out, *_run(out)


def test_summary_has_a_row_per_forget_set_method_epoch_split(small_run):
    out, plan, store, report, rows = small_run
    keys = {(r["forget_set"], r["method"], r["epoch"], r["split"]) for r in rows}
    expected = {(fs, m, e, s) for fs in ("1", "3")
                for m, e in (("do_nothing", 0), ("oracle_floor", 6), ("finetune", 1), ("finetune", 2))
                for s in ("retain", "forget", "val")}
    assert keys == expected and len(rows) == len(expected)
    by = {(r["forget_set"], r["split"]): r for r in rows if r["method"] == "do_nothing"}
    assert by[("1", "forget")]["n_samples"] == 10 and by[("1", "retain")]["n_samples"] == 1437 - 10
    assert by[("3", "val")]["n_samples"] == 360
    for r in rows:
        assert r["n_models"] == 6 and r["n_oracles"] == 6 and r["run"] == report.run_id
        assert r["klom_version"] and 0 <= r["klom_p5"] <= r["klom_p50"] <= r["klom_p95"] <= r["klom_p99"] <= 11.6
        assert 0.5 < r["accuracy"] <= 1.0
    # originals, then per forget set oracles, floor oracles and finetune blocks
    assert report.units_run == len(plan.units) == 2 + 2 * 2 + 2 * 2 + 2 * 2
    for r in rows:  # work: samples per model forwarded with gradients (finetune and the floor pass over the
        n_retain = {"1": 1437 - 10, "3": 1437 - 40}[r["forget_set"]]  # retain set, the floor for 6 epochs)
        assert r["grad_samples"] == r["epoch"] * n_retain
        assert (r["compute_s"] > 0) == (r["method"] != "do_nothing")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == rows and summary["identity"]["n_models"] == 6
    header = (out / "summary.csv").read_text().splitlines()[0].split(",")
    assert "grad_samples" in header and "compute_s" not in header  # wall seconds would break bit-identity


def test_parquet_layout_is_hive_partitioned_one_row_per_model_split_epoch_chunk(small_run):
    out, plan, store, report, rows = small_run
    files = sorted((out / "margins").rglob("*.parquet"))
    assert len(files) == len(plan.units)  # one file per unit: few, reasonably sized files
    for f in files:
        parts = dict(p.split("=", 1) for p in f.relative_to(out / "margins").parts[:-1])
        assert set(parts) == {"forget_set", "role", "method", "unit"}
        table = pq.read_table(f, partitioning=None)
        assert set(table.column_names) == set(MARGINS_SCHEMA.names) - {"unit"}
        assert set(table.column("role").to_pylist()) == {parts["role"]}
        assert set(table.column("forget_set").to_pylist()) == {parts["forget_set"]}
    finetune = [f for f in files if "method=finetune" in str(f)][0]
    table = pq.read_table(finetune, partitioning=None)
    # 3 models x (3 train chunks of <=500 + 1 val chunk) x 2 epochs
    assert table.num_rows == 3 * 4 * 2
    widths = {(c, s): len(m) for c, s, m in zip(table.column("chunk").to_pylist(), table.column("split").to_pylist(),
                                                 table.column("margins").to_pylist(), strict=True)}
    assert widths == {(0, "train"): 500, (1, "train"): 500, (2, "train"): 437, (0, "val"): 360}
    # the hive layout is readable by any Parquet tool
    dataset = pads.dataset(out / "margins", format="parquet", partitioning="hive")
    assert dataset.to_table(filter=pads.field("role") == "oracle").num_rows == 2 * 6 * 4


def _stored(table, column: str, split: str, **where) -> np.ndarray:
    """(models, samples) of one column over the stored rows matching ``where``, chunks put back in sample order."""
    rows = [r for r in table if r["split"] == split and all(r[k] == v for k, v in where.items())]
    by_model: dict[int, list] = {}
    for r in sorted(rows, key=lambda r: (r["model_id"], r["sample_start"])):
        by_model.setdefault(r["model_id"], []).extend(r[column])
    return np.array([by_model[i] for i in sorted(by_model)], dtype=np.float64)


def test_accuracy_is_top1_of_the_stored_rows_and_top1_bounds_the_margins(small_run):
    """Read with pyarrow alone: every stored row's top-1 margins are >= its margins (max <= logsumexp), and each
    summary accuracy is the share of its ensemble's stored top-1 margins above 0 over the split's samples."""
    out, plan, store, report, rows = small_run
    table = pq.read_table(out / "margins", partitioning=None)
    assert table.column("top1_margins").null_count == 0
    margins = np.concatenate([c.flatten().to_numpy() for c in table.column("margins").chunks])
    top1 = np.concatenate([c.flatten().to_numpy() for c in table.column("top1_margins").chunks])
    assert margins.shape == top1.shape and np.all(top1 >= margins)
    assert np.any((top1 > 0) & (margins <= 0))  # right, though p_y <= 1/2
    records = table.to_pylist()
    proxy_differs = False
    for r in rows:
        forget = np.asarray(json.loads((out / "forget_sets" / f"{r['forget_set']}.json").read_text())["indices"])
        source, idx = {"retain": ("train", np.setdiff1d(np.arange(1437), forget)), "forget": ("train", forget),
                       "val": ("val", np.arange(360))}[r["split"]]
        where = (dict(role="original") if r["method"] == "do_nothing" else
                 dict(role="unlearned", method=r["method"], forget_set=r["forget_set"], epoch=r["epoch"]))
        ensemble = _stored(records, "top1_margins", source, **where)[:, idx]
        oracles = _stored(records, "top1_margins", source, role="oracle", forget_set=r["forget_set"])[:, idx]
        assert ensemble.shape == (6, len(idx)) and oracles.shape == (6, len(idx))
        assert r["accuracy"] == pytest.approx(float(np.mean(ensemble > 0)), abs=1e-12), r
        assert r["oracle_accuracy"] == pytest.approx(float(np.mean(oracles > 0)), abs=1e-12), r
        proxy = float(np.mean(_stored(records, "margins", source, **where)[:, idx] > 0))
        proxy_differs |= proxy != r["accuracy"]
    assert proxy_differs  # the old number, the share of positive margins, is not what the summary reports


def test_the_floor_rows_are_the_reference_klom_of_the_floor_oracles_against_the_oracles(small_run):
    """The oracle_floor ensemble is stored like EasyDUB's (role unlearned, method oracle_floor) and scored as any
    method: each of its rows equals the reference KLOM of its stored margins against the oracles'."""
    from klom_reference import reference_klom

    out, plan, store, report, rows = small_run
    records = pq.read_table(out / "margins", partitioning=None).to_pylist()
    floor_rows = [r for r in rows if r["method"] == "oracle_floor"]
    assert len(floor_rows) == 2 * 3
    for r in floor_rows:
        forget = np.asarray(json.loads((out / "forget_sets" / f"{r['forget_set']}.json").read_text())["indices"])
        source, idx = {"retain": ("train", np.setdiff1d(np.arange(1437), forget)), "forget": ("train", forget),
                       "val": ("val", np.arange(360))}[r["split"]]
        floor = _stored(records, "margins", source, role="unlearned", method="oracle_floor",
                        forget_set=r["forget_set"])[:, idx]
        oracles = _stored(records, "margins", source, role="oracle", forget_set=r["forget_set"])[:, idx]
        assert floor.shape == oracles.shape == (6, len(idx)) and not np.array_equal(floor, oracles)
        expected = reference_klom(floor.astype(np.float32), oracles.astype(np.float32))
        assert r["klom_mean"] == pytest.approx(float(expected.mean()), rel=1e-12), r
        assert r["klom_p95"] == pytest.approx(float(np.percentile(expected, 95)), rel=1e-12), r
        assert r["n_models"] == r["n_oracles"] == 6


def test_no_floor_trains_no_floor(ray_session, tmp_path):
    plan, store, report, rows = _run(tmp_path, floor=False, forget_sets="1", methods="do_nothing", params={},
                                     recipe={"epochs": 1})
    assert report.units_run == len(plan.units) == 4 and {r["method"] for r in rows} == {"do_nothing"}


def test_rerun_resumes_without_recomputing_and_gives_the_same_summary(small_run):
    out, plan, store, report, rows = small_run
    before = (out / "summary.csv").read_bytes()
    _, _, again, rows_again = _run(out)
    assert again.units_run == 0 and again.units_skipped == len(plan.units)
    assert any(u.method == "oracle_floor" for u in plan.units)  # the floor is resumed like every unit
    assert rows_again == rows
    assert (out / "summary.csv").read_bytes() == before


def test_reduce_alone_reproduces_the_summary(small_run):
    out, *_ = small_run
    before = (out / "summary.csv").read_bytes()
    (out / "summary.csv").unlink()
    store = RunStore(str(out))
    write_summary(store, reduce_run(store))
    assert (out / "summary.csv").read_bytes() == before


def test_a_run_folder_of_another_config_is_refused(small_run):
    out, *_ = small_run
    with pytest.raises(StoreError, match="differs in: n_models"):
        execute(build_config(None, **{**SMALL, "out": str(out), "n_models": 8}))


def test_half_written_unit_is_never_read(small_run, tmp_path):
    out, plan, store, report, rows = small_run
    unit = plan.units_of("unlearn")[0]
    meta = store.completed_units()[unit.id].meta
    (out / "manifests" / f"{unit.id}.json").unlink()  # as if the driver died before the commit point
    try:
        reduced = reduce_run(RunStore(str(out)))
        assert not any(r["method"] == "finetune" and r["forget_set"] == unit.forget_set for r in reduced)
    finally:
        store.write_json(store.manifest_path(unit.id), meta)


def test_forgetting_a_structured_set_is_visible_in_klom(small_run):
    """Oracles never saw the atypical eights of set 3: they classify them worse than the originals do, and
    do_nothing's forget-split KLOM exceeds its retain-split KLOM (at N=6 both sit high above the noise floor)."""
    *_, rows = small_run
    by = {r["split"]: r for r in rows if r["method"] == "do_nothing" and r["forget_set"] == "3"}
    assert by["forget"]["accuracy"] > by["forget"]["oracle_accuracy"] + 0.15
    assert abs(by["retain"]["accuracy"] - by["retain"]["oracle_accuracy"]) < 0.02
    assert by["forget"]["klom_mean"] > by["retain"]["klom_mean"] + 1.0


def test_same_config_gives_bit_identical_summary(ray_session, small_run, tmp_path):
    out, *_ = small_run
    _run(tmp_path / "again")
    assert (tmp_path / "again" / "summary.csv").read_bytes() == (out / "summary.csv").read_bytes()


def test_small_waves_on_one_node_are_written_by_the_driver_and_large_ones_by_ray_data(ray_session, small_run,
                                                                                     tmp_path, monkeypatch):
    """The fixture's run wrote its waves directly (one node, small); forcing every wave through Ray Data gives the
    same committed files' content and a byte-identical summary."""
    from raybench.engine import writer

    out, plan, *_ = small_run
    ways = []
    direct, through_ray_data = RunStore.write_unit, writer._write_ray_data
    monkeypatch.setattr(RunStore, "write_unit", lambda *a, **k: (ways.append("direct"), direct(*a, **k))[1])
    monkeypatch.setattr(writer, "_write_ray_data",
                        lambda *a, **k: (ways.append("ray data"), through_ray_data(*a, **k))[1])
    _run(tmp_path / "direct", methods="do_nothing", forget_sets="1", params={})
    assert ways and set(ways) == {"direct"}
    ways.clear()
    monkeypatch.setattr(writer, "DIRECT_WRITE_MAX_BYTES", -1)
    _run(tmp_path / "ray_data")
    assert ways and set(ways) == {"ray data"}
    assert (tmp_path / "ray_data" / "summary.csv").read_bytes() == (out / "summary.csv").read_bytes()
    order = [(c, "ascending") for c in ("epoch", "split", "chunk", "model_id")]
    for unit in plan.units:
        tables = []
        for folder in (out, tmp_path / "ray_data"):
            files = json.loads((folder / "manifests" / f"{unit.id}.json").read_text())["files"]
            tables.append(pa.concat_tables(pq.read_table(folder / f, partitioning=None) for f in files).sort_by(order))
        assert tables[0].equals(tables[1])


def test_changing_a_forget_set_under_the_same_id_is_refused(small_run, tmp_path):
    out, *_ = small_run
    path = tmp_path / "1.npy"
    np.save(path, np.arange(5))
    with pytest.raises(ConfigError, match="other indices"):  # a file 1.npy has id "1", like built-in set 1
        execute(build_config(None, **{**SMALL, "out": str(out), "forget_sets": str(path)}))


def test_train_then_unlearn_equals_run_and_report_prints_it(ray_session, tmp_path):
    from click.testing import CliRunner

    from raybench.cli import main

    runner = CliRunner()
    args = ["--n-models", "4", "--block-size", "2", "--forget-sets", "1", "--methods", "do_nothing,finetune",
            "--param", "finetune.epochs=1"]
    split = str(tmp_path / "split")
    early = runner.invoke(main, ["unlearn", *args, "--out", split])
    assert early.exit_code == 2 and "raybench train" in early.output, early.output

    trained = runner.invoke(main, ["train", *args, "--out", split])
    assert trained.exit_code == 0, trained.output
    assert "6 units run" in trained.output  # 2 blocks of originals, 2 of oracles, 2 of the floor
    store = RunStore(split)
    assert {u.meta["kind"] for u in store.completed_units().values()} == {"train"}
    assert {r["method"] for r in reduce_run(store)} == {"do_nothing", "oracle_floor"}

    unlearned = runner.invoke(main, ["unlearn", *args, "--out", split])
    assert unlearned.exit_code == 0 and "2 units run" in unlearned.output, unlearned.output
    whole = runner.invoke(main, ["run", *args, "--out", str(tmp_path / "whole")])
    assert whole.exit_code == 0, whole.output
    assert (tmp_path / "split" / "summary.csv").read_bytes() == (tmp_path / "whole" / "summary.csv").read_bytes()

    (tmp_path / "split" / "report.html").unlink()
    report = runner.invoke(main, ["report", split])
    assert report.exit_code == 0 and all(m in report.output for m in ("finetune", "do_nothing", "oracle_floor"))
    page = (tmp_path / "split" / "report.html").read_text()
    plots = sorted(p.name for p in (tmp_path / "split" / "plots").iterdir())
    # P95 with intervals, compute against KLOM, and from per_sample/ the CDFs and the worst samples
    assert plots == ["cdf_forget_set_1.png", "compute_forget_set_1.png", "p95_forget_set_1.png",
                     "worst_forget_set_1.png"]
    assert all((tmp_path / "split" / "plots" / name).read_bytes().startswith(b"\x89PNG") for name in plots)
    assert all(f'src="plots/{name}"' in page for name in plots)
    rows = list(csv.DictReader((tmp_path / "split" / "summary.csv").open()))
    assert len(rows) == 9 and all(f"{float(r['klom_p95']):.3f}" in page for r in rows)  # every row is on the page
    assert runner.invoke(main, ["report", str(tmp_path)]).exit_code == 2


# (5, 8): rows of one (epoch, split, chunk) straddle row groups of 8 differently per epoch, so one matrix comes back
# from Arrow as a single read-only buffer while the other is a writable concatenation (the mix that crashed reduce)
@pytest.mark.parametrize("n_models,block_size", [(5, 8), (4, 4)], ids=["smaller-than-a-block", "one-full-block"])
def test_an_ensemble_in_one_block_is_reduced_as_the_reference_scores_it(ray_session, tmp_path, n_models, block_size):
    """Every ensemble fits in one unit: its chunk comes back from Arrow as one read-only buffer, unlike a
    concatenation of blocks. The summary must still be computed, and equal the reference on the stored rows."""
    from klom_reference import reference_klom

    out = tmp_path / "run"
    _, store, _, rows = _run(out, n_models=n_models, block_size=block_size, forget_sets="1",
                             methods="do_nothing,finetune", params={"finetune": {"epochs": [1, 2]}}, floor=False)
    assert {(r["method"], r["epoch"], r["split"]) for r in rows} == {
        (m, e, s) for m, e in (("do_nothing", 0), ("finetune", 1), ("finetune", 2))
        for s in ("retain", "forget", "val")}

    def stored(role: str) -> np.ndarray:
        """The role's val margins as (models, samples), straight from its Parquet files."""
        files = [str(out / f) for u in store.completed_units().values() if u.meta["role"] == role for f in u.files]
        table = pq.read_table(files, partitioning=None, filters=[("split", "=", "val")])
        rows = sorted(table.select(["model_id", "chunk", "margins"]).to_pylist(),
                      key=lambda r: (r["model_id"], r["chunk"]))
        by_model: dict = {}
        for r in rows:
            by_model.setdefault(r["model_id"], []).extend(r["margins"])
        return np.array([by_model[m] for m in sorted(by_model)], dtype=np.float32)

    val = next(r for r in rows if r["method"] == "do_nothing" and r["split"] == "val")
    expected = reference_klom(stored("original"), stored("oracle"))
    assert val["klom_mean"] == pytest.approx(float(expected.mean()), rel=1e-12)
    assert val["klom_p95"] == pytest.approx(float(np.percentile(expected, 95)), rel=1e-12)


def test_a_bumped_method_version_reruns_only_that_methods_units(ray_session, tmp_path, monkeypatch):
    """A method fixed (its version bumped) after a run: the rerun into the same folder recomputes its units and
    nothing else, and the summary scores one ensemble per method, not the old and the new ones together."""
    import dataclasses

    import raybench.methods as methods_module

    small = {"n_models": 4, "block_size": 2, "forget_sets": "1", "methods": "do_nothing,finetune,gradient_ascent",
             "params": {"finetune": {"epochs": [1]}, "gradient_ascent": {"epochs": [1]}}, "recipe": {"epochs": 2},
             "chunk_size": 1000, "floor": False}
    plan, store, report, rows = _run(tmp_path, **small)
    assert report.units_run == len(plan.units) == 8  # 2 blocks each: originals, oracles, finetune, ascent
    first_manifests = set(store.completed_units())
    summary_before = (tmp_path / "summary.csv").read_bytes()

    bumped = [dataclasses.replace(m, version=2) if m.name == "finetune" else m for m in methods_module._BUILTIN]
    monkeypatch.setattr(methods_module, "_BUILTIN", bumped)
    plan2, store2, report2, rows2 = _run(tmp_path, **small)
    assert (report2.units_run, report2.units_skipped) == (2, 6)
    new = set(store2.completed_units()) - first_manifests
    assert new == {u.id for u in plan2.units_of("unlearn") if u.method == "finetune"}
    metas = store2.completed_units()
    assert {metas[uid].meta["method"] for uid in new} == {"finetune"}
    assert {metas[uid].meta["code_versions"]["method"] for uid in new} == {2}
    assert len(first_manifests) == 8 and first_manifests <= set(metas)  # the old version's units are kept...
    # ...but scored once: the same code computed the same margins, so the summary is unchanged, bit for bit
    def timeless(rs: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "compute_s"} for r in rs]  # wall-clock seconds differ

    assert timeless(rows2) == timeless(rows) and (tmp_path / "summary.csv").read_bytes() == summary_before
    again = execute(build_config(None, **{**small, "out": str(tmp_path)}))[2]
    assert again.units_run == 0  # and the bump is computed once


def test_versions_are_recorded_in_run_json_manifests_and_summary(small_run):
    from raybench.versions import VERSION_KEYS

    out, plan, store, report, rows = small_run
    run = json.loads((out / "run.json").read_text())
    assert set(run["versions"]) == set(VERSION_KEYS) and run["latest_versions"]["device"] == "cpu"
    assert "versions" not in run["identity"]  # recorded, never part of the run id
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["versions"]) == set(VERSION_KEYS) and summary["versions"]["device"] == "cpu"
    import numpy
    import pyarrow
    import ray
    import torch

    import raybench

    assert summary["versions"]["torch"] == torch.__version__.split("+")[0]  # the package's, without the build tag
    assert (summary["versions"]["numpy"], summary["versions"]["pyarrow"], summary["versions"]["ray"]) == (
        numpy.__version__, pyarrow.__version__, ray.__version__)
    assert run["versions"]["raybench"] == raybench.__version__


def test_train_manifests_record_how_training_ran(small_run):
    out, plan, store, report, rows = small_run
    metas = [u.meta for u in store.completed_units().values()]
    trained = [m["training"] for m in metas if m["kind"] == "train"]
    assert trained and all(t["path"] == "stacked" and t["compiled"] is False and t["compile_s"] == 0 for t in trained)
    assert all("training" not in m for m in metas if m["kind"] == "unlearn")
    for unit in store.completed_units().values():
        assert unit.meta["versions"]["device"] == "cpu" and unit.meta["code_versions"]["margins"] >= 1
