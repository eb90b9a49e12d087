"""`raybench score` / `raybench.score`: margins computed elsewhere, scored against a run's oracles.

One small real digits run (4 models in blocks of 2, a forget set of 12 ids in shuffled order, finetune for one
epoch, chunks of 500 so that the train split spans three chunks) is made once. Its stored margins of an ensemble
are exported with pyarrow alone into a folder in the documented layout, as another code base would hand them over;
scoring that folder must give the run's own summary rows of that ensemble, bit for bit (the work column aside,
which is unknown for margins computed elsewhere), and the reference KLOM of the exported matrices.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import raybench
from raybench.cli import main
from raybench.config import build_config
from raybench.field_metrics import FIELD_COLUMNS
from raybench.pipeline import execute
from raybench.reduce import SUMMARY_COLUMNS, reduce_run, write_summary
from raybench.sources.base import SourceError
from raybench.sources.files import read_unlearned_dir
from raybench.store import RunStore, StoreError

N_TRAIN, N_VAL, N_FORGET = 1437, 360, 12
FS = "shuffled"  # a forget set read from shuffled.npy: its own order is not ascending, and the forget split keeps it
RUN = {"n_models": 4, "block_size": 2, "methods": "finetune", "params": {"finetune": {"epochs": [1]}},
       "recipe": {"epochs": 2}, "chunk_size": 500, "floor": False}


@pytest.fixture(scope="module")
def run(ray_session, tmp_path_factory) -> Path:
    out, sets = tmp_path_factory.mktemp("run"), tmp_path_factory.mktemp("forget_sets")
    indices = np.random.default_rng(3).choice(N_TRAIN, N_FORGET, replace=False)
    assert np.any(np.diff(indices) < 0)
    np.save(sets / f"{FS}.npy", indices)
    _, store, _ = execute(build_config(None, **RUN, forget_sets=str(sets / f"{FS}.npy"), out=str(out)))
    write_summary(store, reduce_run(store))
    return out


def _stored(out: Path, split: str, column: str, **where: object) -> np.ndarray:
    """(models, samples) of one stored column of the rows matching ``where``, read with pyarrow alone: rows put
    in model order, each model's chunks in sample order."""
    records = pq.read_table(out / "margins", partitioning=None).to_pylist()
    rows = [r for r in records if r["split"] == split and all(r[k] == v for k, v in where.items())]
    by_model: dict[int, list] = {}
    for r in sorted(rows, key=lambda r: (r["model_id"], r["sample_start"])):
        by_model.setdefault(r["model_id"], []).extend(r[column])
    return np.array([by_model[m] for m in sorted(by_model)], dtype=np.float32)


def _forget(out: Path) -> np.ndarray:
    return np.asarray(json.loads((out / "forget_sets" / f"{FS}.json").read_text())["indices"])


def _views(out: Path, column: str, **where: object) -> dict[str, np.ndarray]:
    """EasyDUB's layout of one ensemble: retain = train ids outside F ascending, forget in F's file order, val."""
    train, forget = _stored(out, "train", column, **where), _forget(out)
    return {"retain": train[:, np.setdiff1d(np.arange(N_TRAIN), forget)], "forget": train[:, forget],
            "val": _stored(out, "val", column, **where)}


FINETUNE = {"role": "unlearned", "method": "finetune", "forget_set": FS, "epoch": 1}
ORIGINALS = {"role": "original"}


def _export(out: Path, folder: Path, where: dict, *, top1: bool = True) -> Path:
    folder.mkdir()
    for split, matrix in _views(out, "margins", **where).items():
        np.save(folder / f"{split}.npy", matrix)
    if top1:
        for split, matrix in _views(out, "top1_margins", **where).items():
            np.save(folder / f"{split}_top1.npy", matrix)
    return folder


def _summary(out: Path, method: str) -> list[dict]:
    """The run's own summary.csv rows of one method, as text."""
    return [r for r in csv.DictReader(io.StringIO((out / "summary.csv").read_text())) if r["method"] == method]


def _cli(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_score_of_exported_margins_gives_the_runs_own_rows_bit_for_bit(run, tmp_path):
    folder = _export(run, tmp_path / "finetune", FINETUNE)
    expected = _summary(run, "finetune")
    assert len(expected) == 3 and {r["epoch"] for r in expected} == {"1"}
    out = tmp_path / "scored.csv"
    result = _cli("score", "--unlearned", folder, "--against", run, "--forget-set", FS, "--out", out,
                  "--method", "finetune", "--params", expected[0]["params"], "--epoch", 1)
    assert result.exit_code == 0, result.output
    assert "finetune" in result.output and "P95 forget" in result.output  # the summary table
    text = out.read_text()
    assert text.splitlines()[0] == (run / "summary.csv").read_text().splitlines()[0] == ",".join(SUMMARY_COLUMNS)
    got = list(csv.DictReader(io.StringIO(text)))
    assert [r["split"] for r in got] == ["retain", "forget", "val"]
    unknown = ("grad_samples", *FIELD_COLUMNS)  # the work and the id-paired field metrics: blank here
    for mine, theirs in zip(got, expected, strict=True):
        assert mine["grad_samples"] == "" and theirs["grad_samples"] == str(N_TRAIN - N_FORGET)  # work: unknown here
        assert all(mine[c] == "" for c in FIELD_COLUMNS) and theirs["mia_auc"]
        assert {k: v for k, v in mine.items() if k not in unknown} == \
               {k: v for k, v in theirs.items() if k not in unknown}  # every other column, as text: bit for bit
        assert mine["accuracy"] and mine["oracle_accuracy"]

    # the default labels
    result = _cli("score", "--unlearned", folder, "--against", run, "--forget-set", FS, "--out", out)
    assert result.exit_code == 0, result.output
    got = list(csv.DictReader(io.StringIO(out.read_text())))
    assert {(r["method"], r["params"], r["epoch"]) for r in got} == {("external", "{}", "")}
    assert [r["klom_p95"] for r in got] == [r["klom_p95"] for r in expected]


def test_python_score_gives_the_runs_rows_for_a_method_and_for_the_originals(run):
    store_rows = reduce_run(RunStore(str(run)))
    for method, where, params, epoch in (("finetune", FINETUNE, None, 1), ("do_nothing", ORIGINALS, "{}", 0)):
        expected = [r for r in store_rows if r["method"] == method]
        params = expected[0]["params"] if params is None else params
        margins, top1 = _views(run, "margins", **where), _views(run, "top1_margins", **where)
        rows = raybench.score(unlearned=margins, against=str(run), forget_set=FS, top1=top1, method=method,
                              params=json.loads(params), epoch=epoch)
        assert [list(r) for r in rows] == [SUMMARY_COLUMNS] * 3
        for mine, theirs in zip(rows, expected, strict=True):
            assert mine["grad_samples"] is None
            assert mine == {**{k: theirs[k] for k in SUMMARY_COLUMNS}, "grad_samples": None,
                            **dict.fromkeys(FIELD_COLUMNS)}, method
        # float64 margins are the same float32 values: scored as the stored float32 ones
        wide = raybench.score({k: v.astype(np.float64) for k, v in margins.items()}, run, FS, method=method,
                              params=params, epoch=epoch, top1={k: v.astype(np.float64) for k, v in top1.items()})
        assert wide == rows


def test_scores_are_the_reference_klom_of_the_exported_matrices(run):
    """Against a literal restatement of the published KLOM and of top-1 accuracy, on matrices read by pyarrow."""
    from klom_reference import reference_klom

    margins, top1 = _views(run, "margins", **FINETUNE), _views(run, "top1_margins", **FINETUNE)
    oracles = _views(run, "margins", role="oracle", forget_set=FS)
    oracle_top1 = _views(run, "top1_margins", role="oracle", forget_set=FS)
    rows = raybench.score(margins, run, FS, top1=top1)
    for row in rows:
        split = row["split"]
        expected = reference_klom(margins[split], oracles[split])
        sizes = {"retain": N_TRAIN - N_FORGET, "forget": N_FORGET, "val": N_VAL}
        assert row["n_samples"] == expected.size == sizes[split]
        assert row["klom_mean"] == pytest.approx(float(expected.mean()), rel=1e-12)
        assert row["klom_p95"] == pytest.approx(float(np.percentile(expected, 95)), rel=1e-12)
        assert row["accuracy"] == pytest.approx(float(np.mean(top1[split] > 0)), abs=1e-12)
        assert row["oracle_accuracy"] == pytest.approx(float(np.mean(oracle_top1[split] > 0)), abs=1e-12)
        assert row["n_models"] == row["n_oracles"] == 4


def test_without_top1_margins_accuracy_is_empty_never_a_proxy(run, tmp_path):
    folder = _export(run, tmp_path / "margins_only", FINETUNE, top1=False)
    out = tmp_path / "scored.csv"
    result = _cli("score", "--unlearned", folder, "--against", run, "--forget-set", FS, "--out", out)
    assert result.exit_code == 0, result.output
    got = list(csv.DictReader(io.StringIO(out.read_text())))
    expected = _summary(run, "finetune")
    assert [r["accuracy"] for r in got] == ["", "", ""]
    assert [r["oracle_accuracy"] for r in got] == [r["oracle_accuracy"] for r in expected]  # the run's are known
    assert [r["klom_mean"] for r in got] == [r["klom_mean"] for r in expected]
    assert set(read_unlearned_dir(folder, n_retain=N_TRAIN - N_FORGET, n_forget=N_FORGET, n_val=N_VAL)) == {
        "retain", "forget", "val"}


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def _break(folder: Path, how: str) -> None:
    """Damage a good export in one way."""
    load = {p.stem: np.load(p) for p in folder.glob("*.npy")}
    if how == "missing":
        (folder / "forget.npy").unlink()
    elif how == "logits":
        (folder / "val.npy").unlink()
        np.save(folder / "val_logits.npy", np.zeros((4, N_VAL, 10), dtype=np.float32))
    elif how == "samples":
        np.save(folder / "retain.npy", load["retain"][:, :-1])
    elif how == "forget_samples":  # the forget set of another size
        np.save(folder / "forget.npy", np.concatenate([load["forget"], load["forget"][:, :1]], axis=1))
    elif how == "one_model":
        for split in ("retain", "forget", "val"):
            np.save(folder / f"{split}.npy", load[split][:1])
    elif how == "models_differ":
        np.save(folder / "val.npy", load["val"][:3])
    elif how == "1d":
        np.save(folder / "val.npy", load["val"][0])
    elif how in ("nan", "inf"):
        bad = load["forget"].copy()
        bad[2, 3] = np.nan if how == "nan" else -np.inf
        np.save(folder / "forget.npy", bad)
    elif how == "top1_inf":
        bad = load["val_top1"].copy()
        bad[0, 0] = np.inf
        np.save(folder / "val_top1.npy", bad)
    elif how == "top1_shape":
        np.save(folder / "val_top1.npy", load["val_top1"][:2])
    elif how == "top1_partial":
        (folder / "forget_top1.npy").unlink()
    elif how == "integers":
        np.save(folder / "val.npy", load["val"].astype(np.int64))
    elif how == "not_npy":
        (folder / "retain.npy").write_bytes(b"not a numpy file")
    elif how == "pickle":
        np.save(folder / "val.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how,needle", [
    ("missing", "forget.npy is missing"),
    ("logits", "val_logits.npy found: logits are not read"),
    ("samples", "retain.npy has shape (4, 1424), expected (models, 1425)"),
    ("forget_samples", "forget.npy has shape (4, 13), expected (4, 12)"),
    ("one_model", "1 model(s)"),
    ("models_differ", "val.npy has shape (3, 360), expected (4, 360)"),
    ("1d", "val.npy has shape (360,)"),
    ("nan", "forget.npy has NaN/inf values (first at model 2, sample 3)"),
    ("inf", "forget.npy has NaN/inf values (first at model 2, sample 3)"),
    ("top1_inf", "val_top1.npy has NaN/inf values"),
    ("top1_shape", "val_top1.npy has shape (2, 360), expected (4, 360)"),
    ("top1_partial", "top-1 margins for retain, val but not forget_top1.npy"),
    ("integers", "expected float margins, got dtype int64"),
    ("not_npy", "cannot read"),
    ("pickle", "cannot read"),
])
def test_bad_margins_are_refused_in_one_line(run, tmp_path, how, needle):
    folder = _export(run, tmp_path / "dir", FINETUNE)
    _break(folder, how)
    out = tmp_path / "scored.csv"
    line = _one_error_line(_cli("score", "--unlearned", folder, "--against", run, "--forget-set", FS, "--out", out))
    assert needle in line, line
    assert not out.exists()  # nothing written


def test_bad_runs_forget_sets_and_labels_are_refused_in_one_line(run, tmp_path):
    folder = _export(run, tmp_path / "dir", FINETUNE)
    out = tmp_path / "scored.csv"

    def refused(against: Path, *extra: object, forget_set: str = FS) -> str:
        return _one_error_line(_cli("score", "--unlearned", folder, "--against", against, "--forget-set",
                                    forget_set, "--out", out, *extra))

    assert f"has no forget set '3' (it has: {FS})" in refused(run, forget_set="3")
    assert "no run.json" in refused(tmp_path / "dir")  # a folder, but not a run
    assert "nowhere does not exist" in refused(tmp_path / "nowhere") and not (tmp_path / "nowhere").exists()
    older = tmp_path / "older"
    older.mkdir()
    (older / "run.json").write_text(json.dumps({"run": "0123", "format_version": 1, "identity": {"n_models": 4}}))
    assert "older raybench (format version 1" in refused(older)

    partial = tmp_path / "partial"
    shutil.copytree(run, partial)
    oracle_units = sorted(p for p in (partial / "manifests").iterdir()
                          if json.loads(p.read_text())["role"] == "oracle")
    assert len(oracle_units) == 2  # two blocks of 2
    oracle_units[0].unlink()
    assert f"oracles of forget set {FS}" in (line := refused(partial)) and "2 of 4 models stored" in line
    for unit in oracle_units[1:]:
        unit.unlink()
    assert f"oracles of forget set {FS}" in (line := refused(partial)) and "none stored" in line

    assert "not JSON" in refused(run, "--params", "{lr: 1}")
    assert "JSON object" in refused(run, "--params", "[1, 2]")
    assert "--epoch" in refused(run, "--epoch", "-1")
    assert "cannot write" in refused(run, "--out", tmp_path / "no" / "such" / "dir.csv")
    not_a_folder = _cli("score", "--unlearned", folder / "val.npy", "--against", run, "--forget-set", FS, "--out", out)
    assert "val.npy is not a folder of margins" in _one_error_line(not_a_folder)
    assert not out.exists()


def test_python_score_refuses_bad_input_with_value_errors(run):
    margins = _views(run, "margins", **FINETUNE)
    with pytest.raises(SourceError, match="dict of the splits"):
        raybench.score({"retain": margins["retain"]}, run, FS)
    with pytest.raises(SourceError, match="all of retain, forget, val or none"):
        raybench.score(margins, run, FS, top1={"val": margins["val"]})
    with pytest.raises(SourceError, match="forget margins has shape"):
        raybench.score({**margins, "forget": margins["forget"][:, :5]}, run, FS)
    with pytest.raises(SourceError, match="numpy array"):
        raybench.score({**margins, "val": margins["val"].tolist()}, run, FS)
    with pytest.raises(SourceError, match="method"):
        raybench.score(margins, run, FS, method="")
    with pytest.raises(StoreError, match="no forget set"):
        raybench.score(margins, run, "2")
    assert issubclass(SourceError, ValueError) and issubclass(StoreError, ValueError)


def test_import_raybench_stays_cheap_and_score_stays_the_function():
    code = ("import sys, raybench; heavy = [m for m in ('numpy', 'pyarrow', 'raybench.reduce', 'torch') "
            "if m in sys.modules]; assert not heavy, heavy; f = raybench.score; import raybench.score; "
            "from raybench.score import score; import raybench.cli; assert raybench.score is f is score and "
            "callable(f), raybench.score")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
