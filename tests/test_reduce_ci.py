"""The intervals of P95 and mean KLOM in reduce's rows (docs/metrics.md#uncertainty).

Synthetic runs are written straight through the store (no training): two forget sets (one in shuffled order),
originals, oracles and a method at two epochs, in blocks of models, the train split over several chunks. The
margins are kept by the test, so every row's interval can be restated from them with the reference KLOM, and
the same margins can be stored again with another chunk size.
"""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pyarrow as pa
import pytest
from klom_reference import reference_klom

from raybench.ids import digest
from raybench.metrics.bootstrap import METHOD
from raybench.reduce import (
    BASE_COLUMNS,
    INTERVAL_COLUMNS,
    SUMMARY_COLUMNS,
    interval_draws,
    read_summary,
    reduce_run,
    write_summary,
)
from raybench.store import RunStore, StoreError, margins_table

N_MODELS, BLOCK, N_TRAIN, N_VAL = 8, 4, 150, 70
FORGET = {"a": [149, 0, 65, 3, 64, 20, 101, 30, 77, 12], "b": list(range(10, 40))}  # "a" not ascending
B = 24  # replicates in the restatement tests: the reference KLOM is a slow loop
ENSEMBLES = [("original", "none", "none", 20, 3.0)] + [
    (role, fs, method, epoch, shift) for fs in FORGET
    for role, method, epoch, shift in (("oracle", "none", 20, 2.5), ("unlearned", "m", 1, 1.5),
                                       ("unlearned", "m", 2, 2.2))]


def _margins(n_models: int = N_MODELS, seed: int = 0) -> dict:
    """(role, forget set, method, epoch) -> {"train", "val"}: (models, samples) float32, models in id order."""
    rng = np.random.default_rng(seed)
    return {(role, fs, method, epoch): {"train": rng.normal(shift, 2, (n_models, N_TRAIN)).astype(np.float32),
                                        "val": rng.normal(shift, 2, (n_models, N_VAL)).astype(np.float32)}
            for role, fs, method, epoch, shift in ENSEMBLES}


def _write(store: RunStore, margins: dict, *, chunk: int, n_models: int = N_MODELS, block: int = BLOCK) -> None:
    store.open_run({"n_models": n_models, "chunk_size": chunk, "synthetic": True})
    store.write_json(store.path("dataset.json"), {"n_train": N_TRAIN, "n_val": N_VAL})
    for fs, indices in FORGET.items():
        store.write_json(store.path("forget_sets", f"{fs}.json"), {"id": fs, "indices": indices})
    units: dict[tuple, list] = {}
    for (role, fs, method, epoch), m in margins.items():
        units.setdefault((role, fs, method), []).append((epoch, m))
    for (role, fs, method), epochs in units.items():
        for start in range(0, n_models, block):
            ids = range(start, min(n_models, start + block))
            unit = digest([role, fs, method, start])
            tables = [margins_table(run="synthetic", unit=unit, role=role, method=method, params="{}",
                                    forget_set=fs, model_ids=ids, seeds=ids, epoch=e, chunk_size=chunk,
                                    margins={k: v[ids.start : ids.stop] for k, v in m.items()})
                      for e, m in epochs]
            meta = {"unit": unit, "kind": "synthetic", "role": role, "forget_set": fs, "method": method,
                    "params": "{}", "epochs": [e for e, _ in epochs], "model_ids": list(ids), "seeds": list(ids)}
            store.write_unit(meta, pa.concat_tables(tables))


@pytest.fixture(scope="module")
def margins() -> dict:
    return _margins()


@pytest.fixture(scope="module")
def run(tmp_path_factory, margins) -> RunStore:
    store = RunStore(str(tmp_path_factory.mktemp("ci")))
    _write(store, margins, chunk=64)  # train: 3 chunks, the last one partial
    return store


@pytest.fixture(scope="module")
def rows(run) -> list[dict]:
    return reduce_run(run, n_boot=B)


def _views(matrix: dict, forget: list[int]) -> dict[str, np.ndarray]:
    train = matrix["train"]
    return {"retain": train[:, np.setdiff1d(np.arange(N_TRAIN), forget)], "forget": train[:, forget],
            "val": matrix["val"]}


def _restated(u: np.ndarray, o: np.ndarray, rows_u: np.ndarray, rows_o: np.ndarray, reverse: bool) -> dict:
    """docs/metrics.md#uncertainty in plain NumPy over the reference KLOM of each replicate's drawn models."""
    kl = (lambda a, b: reference_klom(b, a)) if reverse else reference_klom
    reps = [kl(u[rows_u[b]], o[rows_o[b]]) for b in range(len(rows_u))]
    full = kl(u, o)
    out = {}
    for name, f in (("p95", lambda v: np.percentile(v, 95)), ("mean", np.mean)):
        stats = np.array([f(v) for v in reps])
        lo, hi = np.percentile(stats - stats.mean(), [2.5, 97.5])
        out[f"klom_{name}_ci_low"], out[f"klom_{name}_ci_high"] = max(0.0, f(full) + lo), f(full) + hi
    return out


@pytest.mark.parametrize("direction", ["unlearned-oracle", "oracle-unlearned"])
def test_every_rows_interval_is_the_plain_restatement_over_its_ensembles_models(run, margins, rows, direction):
    got = rows if direction == "unlearned-oracle" else reduce_run(run, n_boot=B, direction=direction)
    checked = 0
    for fs, forget in FORGET.items():
        oracle = _views(margins[("oracle", fs, "none", 20)], forget)
        for method, key in (("do_nothing", ("original", "none", "none", 20)), ("m", ("unlearned", fs, "m", 2))):
            draws = interval_draws(N_MODELS, N_MODELS, fs, method, "{}", n_boot=B, seed=0)
            unlearned = _views(margins[key], forget)
            for view in ("retain", "forget", "val"):
                row = next(r for r in got if (r["forget_set"], r["method"], r["split"]) == (fs, method, view)
                           and r["epoch"] in (0, 2))
                expected = _restated(unlearned[view], oracle[view], draws.unlearned, draws.oracle,
                                     direction == "oracle-unlearned")
                assert {k: row[k] for k in INTERVAL_COLUMNS} == pytest.approx(expected, rel=1e-12, abs=1e-15)
                assert row["klom_p95_ci_low"] <= row["klom_p95"] <= row["klom_p95_ci_high"]
                assert row["bootstrap"] == {"n_boot": B, "seed": 0, "method": METHOD, "level": 0.95}
                checked += 1
    assert checked == 12


def test_the_existing_columns_are_identical_with_and_without_the_interval(run, rows):
    without = reduce_run(run, n_boot=0)
    assert len(without) == len(rows) == 2 * 3 * 3  # per forget set: do_nothing and m at two epochs, 3 splits
    for a, b in zip(without, rows, strict=True):
        assert {k: a[k] for k in BASE_COLUMNS + ["compute_s"]} == {k: b[k] for k in BASE_COLUMNS + ["compute_s"]}
        assert all(a[k] is None for k in INTERVAL_COLUMNS) and "bootstrap" not in a
        assert all(isinstance(b[k], float) for k in INTERVAL_COLUMNS)


def test_rows_do_not_depend_on_chunking_scheduling_or_the_other_ensembles(tmp_path, run, margins, rows):
    other = RunStore(str(tmp_path / "chunk27"))
    _write(other, margins, chunk=27)  # other chunk boundaries: 6 train chunks, 3 val chunks
    again = reduce_run(other, n_boot=B)
    drop = ("run", "bootstrap")
    assert [{k: v for k, v in r.items() if k not in drop} for r in again] == \
           [{k: v for k, v in r.items() if k not in drop} for r in rows]

    def backwards(fn, items):  # the jobs computed last to first, results handed back in item order
        return iter([fn(*item) for item in reversed(items)][::-1])

    assert reduce_run(run, n_boot=B, mapper=backwards) == rows
    only_m = reduce_run(run, n_boot=B, methods=[("m", "{}")], forget_sets=["b"])
    assert only_m == [r for r in rows if r["method"] == "m" and r["forget_set"] == "b"]


def test_the_seed_moves_the_interval_and_nothing_else(run, rows):
    other = reduce_run(run, n_boot=B, boot_seed=1)
    for a, b in zip(rows, other, strict=True):
        assert {k: a[k] for k in BASE_COLUMNS} == {k: b[k] for k in BASE_COLUMNS}
        assert b["bootstrap"]["seed"] == 1
    assert [r["klom_p95_ci_low"] for r in rows] != [r["klom_p95_ci_low"] for r in other]


def test_summary_files_carry_the_columns_at_the_end_and_the_settings_once(tmp_path, margins):
    store = RunStore(str(tmp_path / "run"))
    _write(store, margins, chunk=64)
    summary = write_summary(store, reduce_run(store, n_boot=B, boot_seed=3))
    start = len(BASE_COLUMNS)  # the interval right after the base columns, then the field's other metrics
    assert SUMMARY_COLUMNS[start:start + 4] == INTERVAL_COLUMNS == ["klom_p95_ci_low", "klom_p95_ci_high",
                                                                    "klom_mean_ci_low", "klom_mean_ci_high"]
    assert SUMMARY_COLUMNS[: len(BASE_COLUMNS)] == BASE_COLUMNS and BASE_COLUMNS[-1] == "run"
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["bootstrap"] == summary["bootstrap"] == {"n_boot": B, "seed": 3, "method": METHOD, "level": 0.95}
    table = list(csv.DictReader(io.StringIO((tmp_path / "run" / "summary.csv").read_text())))
    assert list(table[0]) == SUMMARY_COLUMNS
    for line, row in zip(table, saved["rows"], strict=True):
        assert float(line["klom_p95_ci_high"]) == row["klom_p95_ci_high"]  # repr: the bits survive

    # without intervals: blank cells, no settings
    plain = write_summary(store, reduce_run(store, n_boot=0))
    assert "bootstrap" not in plain and "bootstrap" not in json.loads((tmp_path / "run" / "summary.json").read_text())
    table = list(csv.DictReader(io.StringIO((tmp_path / "run" / "summary.csv").read_text())))
    assert {line[k] for line in table for k in INTERVAL_COLUMNS} == {""}

    mixed = reduce_run(store, n_boot=B)[:3] + reduce_run(store, n_boot=B + 1)[3:]
    before = (tmp_path / "run" / "summary.csv").read_bytes()
    with pytest.raises(StoreError, match="several interval settings"):
        write_summary(store, mixed)
    assert (tmp_path / "run" / "summary.csv").read_bytes() == before  # refused before anything was written


def test_an_older_summary_without_the_interval_columns_is_still_read(tmp_path, margins):
    store = RunStore(str(tmp_path / "run"))
    _write(store, margins, chunk=64)
    write_summary(store, reduce_run(store, n_boot=0))
    path = tmp_path / "run" / "summary.json"
    old = json.loads(path.read_text())
    old["rows"] = [{k: v for k, v in r.items() if k not in INTERVAL_COLUMNS} for r in old["rows"]]
    path.write_text(json.dumps(old))
    assert read_summary(store)["rows"] == old["rows"]
    old["rows"][0].pop("klom_p95")  # a column every summary has is still required
    path.write_text(json.dumps(old))
    with pytest.raises(StoreError, match="klom_p95"):
        read_summary(store)


def test_ensembles_too_small_to_halve_get_no_interval(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    _write(store, _margins(n_models=3), chunk=64, n_models=3, block=3)
    got = reduce_run(store)
    assert got and all(r[k] is None for r in got for k in INTERVAL_COLUMNS)
    assert "bootstrap" not in write_summary(store, got)


@pytest.mark.parametrize(("kwargs", "match"), [({"n_boot": 1}, "n_boot"), ({"n_boot": -5}, "n_boot"),
                                               ({"n_boot": True}, "n_boot"), ({"n_boot": 2.5}, "n_boot"),
                                               ({"boot_seed": -1}, "seed"), ({"boot_seed": "x"}, "seed")])
def test_bad_interval_settings_are_refused_in_one_line(run, kwargs, match):
    with pytest.raises(StoreError, match=match):
        reduce_run(run, **kwargs)
