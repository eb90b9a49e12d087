"""Per-sample values: ``per_sample/forget_set=<fs>/part-0.parquet`` holds, for every summary row, the per-sample
KLOM (and what went into it) that the row summarises, keyed by sample id.

One small real digits run (4 models in blocks of 2, a forget set of 12 ids in shuffled order read from a .npy file,
finetune at epochs 1 and 2, the oracle floor, chunks of 500 so that the train split spans three chunks) is made
once and published by ``pipeline.summarize``. Everything expected is restated from the stored margins read with
pyarrow alone, the published KLOM (tests/klom_reference.py) and numpy's percentile: never from our reduce.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from raybench import pipeline
from raybench.config import build_config
from raybench.pipeline import execute
from raybench.store import PER_SAMPLE_SCHEMA, RunStore

N_TRAIN, N_VAL, N_FORGET, N = 1437, 360, 12, 4
FS = "shuffled"
KEYS = ("forget_set", "method", "params", "epoch", "split")
RUN = {"n_models": N, "block_size": 2, "methods": "finetune", "params": {"finetune": {"epochs": [1, 2]}},
       "recipe": {"epochs": 2}, "chunk_size": 500, "floor": True}


@pytest.fixture(scope="module")
def run(ray_session, tmp_path_factory) -> Path:
    out, sets = tmp_path_factory.mktemp("run"), tmp_path_factory.mktemp("forget_sets")
    indices = np.random.default_rng(5).choice(N_TRAIN, N_FORGET, replace=False)
    assert np.any(np.diff(indices) < 0)
    np.save(sets / f"{FS}.npy", indices)
    _, store, _ = execute(build_config(None, **RUN, forget_sets=str(sets / f"{FS}.npy"), out=str(out)))
    pipeline.summarize(store)
    (out / "user_forget_set.npy").write_bytes((sets / f"{FS}.npy").read_bytes())  # the user's own file
    return out


def _summary_rows(out: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO((out / "summary.csv").read_text())))


def _per_sample(out: Path) -> list[dict]:
    return pq.read_table(out / "per_sample", partitioning=None).to_pylist()


def _by_row(records: list[dict]) -> dict[tuple, list[dict]]:
    """Per-sample records grouped by their summary row's key (as summary.csv writes it), in file order."""
    grouped: dict[tuple, list[dict]] = {}
    for r in records:
        key = tuple("" if r[k] is None else str(r[k]) for k in KEYS)
        grouped.setdefault(key, []).append(r)
    return grouped


def _stored(records: list[dict], split: str, column: str, **where: object) -> np.ndarray:
    """(models, samples) of one stored column of the margins rows matching ``where``: rows in model order, each
    model's chunks in sample order."""
    rows = [r for r in records if r["split"] == split and all(r[k] == v for k, v in where.items())]
    by_model: dict[int, list] = {}
    for r in sorted(rows, key=lambda r: (r["model_id"], r["sample_start"])):
        by_model.setdefault(r["model_id"], []).extend(r[column])
    return np.array([by_model[m] for m in sorted(by_model)], dtype=np.float32)


def _view(out: Path, split: str) -> tuple[str, np.ndarray]:
    forget = np.load(out / "user_forget_set.npy")
    return {"retain": ("train", np.setdiff1d(np.arange(N_TRAIN), forget)), "forget": ("train", forget),
            "val": ("val", np.arange(N_VAL))}[split]


def _dropped(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Per sample, the values of ``p`` on the top edge of the joint range (clipped to ±100), which the published
    algorithm does not bin; none when the range is empty (the top edge is then the value + 1)."""
    p, q = np.clip(p, -100, 100), np.clip(q, -100, 100)
    top = np.maximum(p.max(axis=0), q.max(axis=0))
    spread = top > np.minimum(p.min(axis=0), q.min(axis=0))
    return np.where(spread, (p == top).sum(axis=0), 0)


def test_every_summary_row_has_its_samples_in_order_with_the_contract_columns(run):
    records = _per_sample(run)
    table = pq.read_table(run / "per_sample" / f"forget_set={FS}" / "part-0.parquet")
    assert table.schema.remove_metadata() == PER_SAMPLE_SCHEMA
    assert [f.name for f in table.schema][-2:] == ["dropped_unlearned", "dropped_oracle"]
    grouped = _by_row(records)
    summary = _summary_rows(run)
    assert list(grouped) == [tuple(r[k] for k in KEYS) for r in summary]  # the same rows, in the same order
    assert {r["method"] for r in summary} == {"do_nothing", "oracle_floor", "finetune"}
    assert len(summary) == 3 * 4  # do_nothing, the floor, finetune at epochs 1 and 2
    for row in summary:
        assert len(grouped[tuple(row[k] for k in KEYS)]) == int(row["n_samples"])
    assert {r["epoch"] for r in records if r["method"] == "do_nothing"} == {0}  # as in summary.csv


def test_per_sample_klom_is_the_reference_klom_of_the_stored_margins(run):
    from klom_reference import reference_klom

    margins = pq.read_table(run / "margins", partitioning=None).to_pylist()
    grouped = _by_row(_per_sample(run))
    checked = 0
    for (fs, method, _, epoch, split), samples in grouped.items():
        source, idx = _view(run, split)
        where = {"role": "original"} if method == "do_nothing" else {
            "role": "unlearned", "method": method, "forget_set": fs, "epoch": int(epoch)}
        models = _stored(margins, source, "margins", **where)[:, idx]
        top1 = _stored(margins, source, "top1_margins", **where)[:, idx]
        oracles = _stored(margins, source, "margins", role="oracle", forget_set=fs)[:, idx]
        oracle_top1 = _stored(margins, source, "top1_margins", role="oracle", forget_set=fs)[:, idx]
        assert models.shape == oracles.shape == (N, len(idx))
        column = {k: np.array([s[k] for s in samples]) for k in samples[0]}
        np.testing.assert_array_equal(column["sample_id"], idx)
        np.testing.assert_array_equal(column["klom"], reference_klom(models, oracles))  # bit for bit
        np.testing.assert_array_equal(column["dropped_unlearned"], _dropped(models, oracles))
        np.testing.assert_array_equal(column["dropped_oracle"], _dropped(oracles, models))
        np.testing.assert_array_equal(column["degenerate"], column["dropped_unlearned"] == N)
        np.testing.assert_array_equal(column["accuracy"], (top1 > 0).mean(axis=0))
        np.testing.assert_array_equal(column["oracle_accuracy"], (oracle_top1 > 0).mean(axis=0))
        assert column["dropped_oracle"].sum() + column["dropped_unlearned"].sum() >= len(idx)  # one per sample
        checked += 1
    assert checked == 12


def test_summary_percentiles_are_those_of_the_stored_values(run):
    grouped = _by_row(_per_sample(run))
    for row in _summary_rows(run):
        values = np.array([s["klom"] for s in grouped[tuple(row[k] for k in KEYS)]])
        assert float(row["klom_p95"]) == float(np.percentile(values, 95))  # exactly: repr survives the CSV
        assert float(row["klom_p50"]) == float(np.percentile(values, 50))
        assert float(row["klom_mean"]) == float(values.mean())
        assert int(row["klom_degenerate"]) == sum(s["degenerate"] for s in grouped[tuple(row[k] for k in KEYS)])


def test_sample_ids_join_with_the_forget_set_file(run):
    """A user joins the forget split with their own file: row k of the forget split is the k-th id of the file."""
    user = np.load(run / "user_forget_set.npy")
    recorded = json.loads((run / "forget_sets" / f"{FS}.json").read_text())["indices"]
    assert recorded == user.tolist()
    table = RunStore(str(run)).read_per_sample(FS)
    assert table.num_rows == len(_per_sample(run))
    for method in ("do_nothing", "oracle_floor", "finetune"):
        rows = [r for r in table.to_pylist() if r["method"] == method and r["split"] == "forget"]
        epochs = sorted({r["epoch"] for r in rows})
        for epoch in epochs:
            ids = [r["sample_id"] for r in rows if r["epoch"] == epoch]
            assert ids == user.tolist()  # the file's order, not ascending
        position = {int(i): k for k, i in enumerate(user)}  # the join: a user's per-sample data by forget id
        assert sorted(position[r["sample_id"]] for r in rows if r["epoch"] == epochs[-1]) == list(range(N_FORGET))
    retain = [r["sample_id"] for r in table.to_pylist() if r["method"] == "do_nothing" and r["split"] == "retain"]
    assert retain == sorted(set(range(N_TRAIN)) - set(user.tolist()))
    val = [r["sample_id"] for r in table.to_pylist() if r["method"] == "do_nothing" and r["split"] == "val"]
    assert val == list(range(N_VAL))


def test_a_rewrite_replaces_the_files_with_the_summarys_rows_and_a_failed_one_leaves_them(run, tmp_path,
                                                                                        monkeypatch):
    out = tmp_path / "copy"
    shutil.copytree(run, out)
    path = out / "per_sample" / f"forget_set={FS}" / "part-0.parquet"
    stale = out / "per_sample" / "forget_set=gone"
    stale.mkdir()
    shutil.copy(path, stale / "part-0.parquet")  # a forget set the summary does not have
    leftover = path.parent / ".part-0.parquet.tmp-0123"
    leftover.write_bytes(b"half a file")
    pipeline.summarize(RunStore(str(out)))
    assert not stale.exists() and not leftover.exists()
    assert sorted(p.name for p in (out / "per_sample").iterdir()) == [f"forget_set={FS}"]
    assert pq.read_table(path).to_pylist() == pq.read_table(run / path.relative_to(out)).to_pylist()
    meta = json.loads(pq.read_schema(path).metadata[b"raybench"])
    summary = json.loads((out / "summary.json").read_text())
    assert meta == {"run": summary["run"], "klom_version": summary["klom_version"],
                    "summary_csv_sha256": hashlib.sha256((out / "summary.csv").read_bytes()).hexdigest()}

    real = pq.write_table

    def broken(table, where, **kwargs):  # writes half the rows, then the disk fills up
        real(table.slice(0, table.num_rows // 2), where, **kwargs)
        raise OSError("No space left on device")

    monkeypatch.setattr(pq, "write_table", broken)
    good = path.read_bytes()
    with pytest.raises(OSError, match="No space"):
        pipeline.summarize(RunStore(str(out)))
    assert path.read_bytes() == good  # the complete old file, never the half one
    assert any(p.name.startswith(".part-0.parquet.tmp-") for p in path.parent.iterdir())  # the half one, hidden
    assert pq.read_table(out / "per_sample", partitioning=None).to_pylist() == _per_sample(run)  # readers skip it
