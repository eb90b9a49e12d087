"""The field's other metrics as summary columns: each equals the published metric's function applied to matrices
read straight from the run's Parquet with pyarrow (not through the store or the reducer), blank where it should be.

The expected values are built here the plain way: every stored row of an ensemble read whole, laid out per model
id, cut into the retain / forget / val views, models paired by id, and handed to ``raybench.metrics``' functions
(each tested against its published definition in tests/test_metrics_*.py).
"""

import csv
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import raybench.field_metrics as fm
import raybench.reduce as reduce_mod
from raybench.config import build_config
from raybench.ids import digest
from raybench.metrics import (
    challenge_score,
    forget_score,
    iam_scores,
    svc_mia_efficacy,
    top1_accuracy,
    tug_of_war,
    ulira_auc,
)
from raybench.metrics.epsilon import max_epsilon
from raybench.metrics.iam import iam_split
from raybench.metrics.mia import ulira_split
from raybench.pipeline import execute
from raybench.reduce import SUMMARY_COLUMNS, read_summary, reduce_run, write_summary
from raybench.store import RunStore, margins_table

SMALL = {"n_models": 6, "block_size": 3, "forget_sets": "1,3", "methods": "do_nothing,finetune",
         "params": {"finetune": {"epochs": [1, 2]}}, "recipe": {"epochs": 6}, "chunk_size": 500}
EXTRA = fm.FIELD_COLUMNS + fm.JSON_ONLY


@pytest.fixture(scope="module")
def real_run(ray_session, tmp_path_factory):
    """A tiny trained digits run (6 models, two forget sets, finetune at two epochs, the floor), reduced."""
    out = tmp_path_factory.mktemp("run")
    _, store, _ = execute(build_config(None, **{**SMALL, "out": str(out)}))
    rows = reduce_run(store)
    write_summary(store, rows)
    return out, store, rows


# -- the restatement: straight from the Parquet ------------------------------------------------------------------
def _parquet_rows(folder) -> list[dict]:
    return pq.read_table(folder / "margins", partitioning=None).to_pylist()


def _ensemble(stored: list[dict], **where) -> tuple[list[int], dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """Model ids, and per stored split the (models, samples) margins and top-1 margins (None: not all stored)."""
    margins, top1, ids = {}, {}, None
    for split in ("train", "val"):
        rows = sorted((r for r in stored if r["split"] == split and all(r[k] == v for k, v in where.items())),
                      key=lambda r: (r["model_id"], r["sample_start"]))
        by_model: dict[int, tuple[list, list]] = {}
        for r in rows:
            m, t = by_model.setdefault(r["model_id"], ([], []))
            m.extend(r["margins"])
            t.append(r["top1_margins"])
        ids = sorted(by_model)
        margins[split] = np.array([by_model[i][0] for i in ids], dtype=np.float64)
        if all(t is not None for i in ids for t in by_model[i][1]):
            top1[split] = np.array([[x for t in by_model[i][1] for x in t] for i in ids], dtype=np.float64)
    return ids, margins, (top1 if len(top1) == 2 else None)


def _views(by_split: dict[str, np.ndarray], forget: list[int]) -> dict[str, np.ndarray]:
    n_train = by_split["train"].shape[1]
    retain = [i for i in range(n_train) if i not in set(forget)]
    return {"retain": by_split["train"][:, retain], "forget": by_split["train"][:, forget], "val": by_split["val"]}


def _expected(folder, stored, forget_set: str, unlearned: dict, *, svc_models: int = 10) -> dict[str, dict]:
    """Per view, the field metrics of the ensemble ``unlearned`` (a ``where`` filter) of ``forget_set``."""
    forget = json.loads((folder / "forget_sets" / f"{forget_set}.json").read_text())["indices"]
    u_ids, u, u_top1 = _ensemble(stored, **unlearned)
    o_ids, o, o_top1 = _ensemble(stored, role="oracle", forget_set=forget_set)
    g_ids, g, _ = _ensemble(stored, role="original")
    u, o, g = _views(u, forget), _views(o, forget), _views(g, forget)
    out = {view: dict.fromkeys(EXTRA) for view in u}
    for view in u:
        out[view]["mia_auc"] = ulira_auc(u[view], o[view], seed=0).mean()
    f = out["forget"]
    paired = all(i in o_ids for i in u_ids)
    pairs = [o_ids.index(i) for i in u_ids] if paired else None
    eps = forget_score(u["forget"], o["forget"])
    f["epsilon_score"] = None if np.isnan(eps) else eps
    if u_top1 is not None and o_top1 is not None:
        acc_u = {v: top1_accuracy(m) for v, m in _views(u_top1, forget).items()}
        acc_o = {v: top1_accuracy(m) for v, m in _views(o_top1, forget).items()}
        if f["epsilon_score"] is not None:
            f["challenge_score"] = challenge_score(eps, acc_u["retain"], acc_o["retain"], acc_u["val"], acc_o["val"])
        if paired:
            tow = tug_of_war(acc_u, {v: a[pairs] for v, a in acc_o.items()})
            f.update(tow=tow.mean, tow_ci_low=tow.ci_low, tow_ci_high=tow.ci_high)
    first = slice(0, svc_models)
    f["svc_mia"] = svc_mia_efficacy(u["retain"][first], u["val"][first], u["forget"][first]).mean
    if paired and all(i in g_ids for i in u_ids):
        iam = iam_scores(g["forget"][[g_ids.index(i) for i in u_ids]], u["forget"], o["forget"][pairs])
        f.update(iam_mean=iam.iam_mean, iam_reference=iam.reference_mean)
    return out


def _check(rows: list[dict], folder, ensembles: dict[tuple[str, str, int], dict], **kw) -> None:
    stored = _parquet_rows(folder)
    for (fs, method, epoch), where in ensembles.items():
        expected = _expected(folder, stored, fs, where, **kw)
        got = {r["split"]: r for r in rows if (r["forget_set"], r["method"], r["epoch"]) == (fs, method, epoch)}
        assert set(got) == {"retain", "forget", "val"}, (fs, method, epoch)
        for view, values in expected.items():
            assert {k: got[view][k] for k in EXTRA} == values, (fs, method, epoch, view)


# -- a real run ----------------------------------------------------------------------------------------------------
def test_every_column_is_the_metric_of_the_stored_matrices(real_run):
    out, store, rows = real_run
    ensembles = {}
    for fs in ("1", "3"):
        ensembles[(fs, "do_nothing", 0)] = {"role": "original"}
        ensembles[(fs, "oracle_floor", 6)] = {"role": "unlearned", "method": "oracle_floor", "forget_set": fs}
        for epoch in (1, 2):
            ensembles[(fs, "finetune", epoch)] = {"role": "unlearned", "method": "finetune", "forget_set": fs,
                                                 "epoch": epoch}
    _check(rows, out, ensembles)
    forget = [r for r in rows if r["split"] == "forget"]
    assert all(r[c] is not None for r in forget for c in fm.FIELD_COLUMNS)  # a trained run: every metric applies
    for r in rows:
        assert 0 <= r["mia_auc"] <= 1
        if r["split"] == "forget":
            assert 0 <= r["tow"] <= 1 and 0 <= r["epsilon_score"] <= 1 and 0 <= r["svc_mia"] <= 1
            assert 0 <= r["iam_mean"] <= 1 and r["tow_ci_low"] <= r["tow"] <= r["tow_ci_high"]
        else:
            assert all(r[c] is None for c in EXTRA if c != "mia_auc")  # on the forget row only


def test_the_existing_columns_are_unchanged_and_the_new_ones_come_last(real_run, monkeypatch):
    out, store, rows = real_run
    monkeypatch.setattr(reduce_mod, "fill_field_metrics", lambda *a, **k: None)
    without = reduce_run(store)
    strip = [{k: v for k, v in r.items() if k not in EXTRA + ("compute_s",)} for r in rows]
    assert strip == [{k: v for k, v in r.items() if k != "compute_s"} for r in without]
    start = SUMMARY_COLUMNS.index("klom_mean_ci_high") + 1  # one block after the intervals; later columns after it
    assert SUMMARY_COLUMNS[start:start + len(fm.FIELD_COLUMNS)] == list(fm.FIELD_COLUMNS)
    header = (out / "summary.csv").read_text().splitlines()[0].split(",")
    assert header == SUMMARY_COLUMNS and not set(fm.JSON_ONLY) & set(header)
    csv_rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["tow"] for r in csv_rows] == ["" if r["tow"] is None else repr(r["tow"]) for r in rows]


def test_summary_json_records_the_settings_and_halves(real_run):
    out, store, rows = real_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == rows
    m = summary["metrics"]
    assert m["columns"] == list(fm.FIELD_COLUMNS) and m["rows"]["per_split"] == ["mia_auc"]
    halves = ulira_split(6, 6, seed=0)
    assert m["ulira"]["halves"] == [{"n_models": 6, "n_oracles": 6, "fit_models": halves.fit_unlearned.tolist(),
                                     "fit_oracles": halves.fit_oracle.tolist()}]
    assert m["iam"]["shadow_rows_by_n_paired_oracles"] == {"6": iam_split(6, seed=0).shadows.tolist()}
    assert m["epsilon"]["bucket_cap_by_n_models"] == {"6": 2.0} == {"6": max_epsilon(6)}  # ceil(ln 5)
    assert m["svc_mia"]["n_shadow_by_forget_set"] == {"1": 360, "3": 360}  # min(retain, val = 360, 10,000)


def test_a_summary_without_the_columns_is_still_read(real_run, tmp_path):
    out, store, rows = real_run
    old = RunStore(str(tmp_path / "old"))
    old.write_bytes(old.path("run.json"), (out / "run.json").read_bytes())
    summary = json.loads((out / "summary.json").read_text())
    summary["rows"] = [{k: v for k, v in r.items() if k not in EXTRA} for r in rows]
    del summary["metrics"]
    old.write_bytes(old.path("summary.json"), json.dumps(summary).encode())
    assert read_summary(old)["rows"] == summary["rows"]


# -- blanks, on margins written through the store (no training) ----------------------------------------------------
N, CHUNK, N_TRAIN, N_VAL = 6, 64, 150, 70
FORGET = [0, 3, 64, 65, 149]


def _unit(store, rng, *, role, forget_set, method, epochs, ids, shift, top1=True, flat=None):
    """Random margins of one unit; top-1 margins above them (or not stored); ``flat``: train sample 0 set to it."""
    unit = digest([role, forget_set, method, ids.start])
    tables = []
    for e in epochs:
        margins = {"train": rng.normal(shift, 2, (len(ids), N_TRAIN)).astype(np.float32),
                   "val": rng.normal(shift, 2, (len(ids), N_VAL)).astype(np.float32)}
        if flat is not None:
            margins["train"][:, 0] = flat
        scores = {k: v + rng.exponential(1.5, v.shape).astype(np.float32) - 1 for k, v in margins.items()}
        tables.append(margins_table(run="synthetic", unit=unit, role=role, method=method, params="{}",
                                    forget_set=forget_set, model_ids=ids, seeds=ids, epoch=e, chunk_size=CHUNK,
                                    margins=margins, top1=scores if top1 else None))
    meta = {"unit": unit, "kind": "synthetic", "role": role, "forget_set": forget_set, "method": method,
            "params": "{}", "epochs": epochs, "model_ids": list(ids), "seeds": list(ids)}
    store.write_unit(meta, pa.concat_tables(tables))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Originals (one block without top-1 margins), oracles, a method "m" at two epochs, "flat" (sample 0 of F
    constant and equal to the oracles': ε undefined there), and a floor of other ids (6..11, as imports have)."""
    folder = tmp_path_factory.mktemp("synthetic")
    store = RunStore(str(folder))
    rng = np.random.default_rng(5)
    store.open_run({"n_models": N, "chunk_size": CHUNK, "synthetic": True})
    store.write_json(store.path("dataset.json"), {"n_train": N_TRAIN, "n_val": N_VAL})
    store.write_json(store.path("forget_sets", "a.json"), {"id": "a", "indices": FORGET})
    _unit(store, rng, role="original", forget_set="none", method="none", epochs=[20], ids=range(0, 4), shift=3)
    _unit(store, rng, role="original", forget_set="none", method="none", epochs=[20], ids=range(4, 6), shift=3,
          top1=False)
    _unit(store, rng, role="oracle", forget_set="a", method="none", epochs=[20], ids=range(N), shift=2.5, flat=1.0)
    _unit(store, rng, role="unlearned", forget_set="a", method="m", epochs=[1, 2], ids=range(N), shift=2)
    _unit(store, rng, role="unlearned", forget_set="a", method="flat", epochs=[1], ids=range(N), shift=2, flat=1.0)
    _unit(store, rng, role="unlearned", forget_set="a", method="oracle_floor", epochs=[20], ids=range(N, 2 * N),
          shift=2.5)
    return folder, store


def test_blanks_where_an_input_or_the_metric_does_not_apply(synthetic, monkeypatch):
    folder, store = synthetic
    monkeypatch.setattr(fm, "SVC_MAX_MODELS", 4)  # fewer models than the ensemble: the first 4 ids
    monkeypatch.setattr(fm, "_cores", lambda: 3)  # and their fits in row blocks on threads
    rows = reduce_run(store)
    _check(rows, folder, {("a", "do_nothing", 0): {"role": "original"},
                          ("a", "m", 1): {"role": "unlearned", "method": "m", "epoch": 1},
                          ("a", "m", 2): {"role": "unlearned", "method": "m", "epoch": 2},
                          ("a", "flat", 1): {"role": "unlearned", "method": "flat"},
                          ("a", "oracle_floor", 20): {"role": "unlearned", "method": "oracle_floor"}},
           svc_models=4)
    forget = {(r["method"], r["epoch"]): r for r in rows if r["split"] == "forget"}
    filled = {k: {c for c in fm.FIELD_COLUMNS if r[c] is not None} for k, r in forget.items()}
    everything = set(fm.FIELD_COLUMNS)
    assert filled[("m", 1)] == filled[("m", 2)] == everything
    assert filled[("do_nothing", 0)] == everything - {"tow", "challenge_score"}  # top-1 not stored for models 4, 5
    assert filled[("flat", 1)] == everything - {"epsilon_score", "challenge_score"}  # ε undefined on sample 0
    assert filled[("oracle_floor", 20)] == everything - {"tow", "iam_mean"}  # no oracle or original of ids 6..11
    assert forget[("oracle_floor", 20)]["iam_reference"] is None and forget[("m", 1)]["iam_reference"] is not None
    summary = write_summary(store, rows)
    assert summary["metrics"]["iam"]["shadow_rows_by_n_paired_oracles"] == {"6": iam_split(6, seed=0).shadows.tolist()}
    cells = [c for line in (folder / "summary.csv").read_text().splitlines() for c in line.split(",")]
    assert "nan" not in cells and "NaN" not in json.dumps(summary)  # undefined values are blank, not NaN
