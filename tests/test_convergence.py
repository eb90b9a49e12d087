"""`raybench convergence RUN`: P95 KLOM per split at growing N, subsampling the models of both ensembles.

One small real digits run (4 models in blocks of 2, a forget set of 12 ids in shuffled order, finetune for one
epoch, the oracle floor, chunks of 500 so that the train split spans three chunks) is made once. The expected
numbers are restated from the documented draw rule, margins read with pyarrow alone, the published KLOM
(tests/klom_reference.py) and numpy's percentile, never from our reducer.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from raybench import pipeline
from raybench.cli import main
from raybench.config import build_config
from raybench.convergence import COLUMNS, default_grid
from raybench.pipeline import execute
from raybench.store import RunStore

N_TRAIN, N_VAL, N_FORGET, N = 1437, 360, 12, 4
FS = "shuffled"
RUN = {"n_models": N, "block_size": 2, "methods": "finetune", "params": {"finetune": {"epochs": [1]}},
       "recipe": {"epochs": 2}, "chunk_size": 500, "floor": True}
SEED, DRAWS = 7, 3


@pytest.fixture(scope="module")
def run(ray_session, tmp_path_factory) -> Path:
    out, sets = tmp_path_factory.mktemp("run"), tmp_path_factory.mktemp("forget_sets")
    np.save(sets / f"{FS}.npy", np.random.default_rng(11).choice(N_TRAIN, N_FORGET, replace=False))
    _, store, _ = execute(build_config(None, **RUN, forget_sets=str(sets / f"{FS}.npy"), out=str(out)))
    pipeline.summarize(store)
    return out


def _cli(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def converged(run) -> tuple[list[dict], dict]:
    result = _cli("convergence", run, "--n", "2,3", "--draws", DRAWS, "--seed", SEED)
    assert result.exit_code == 0, result.output
    text = (run / "convergence.csv").read_text()
    assert text.splitlines()[0] == ",".join(COLUMNS)
    return list(csv.DictReader(io.StringIO(text))), json.loads((run / "convergence.json").read_text())


def _stored(records: list[dict], split: str, **where: object) -> np.ndarray:
    """(models, samples) margins of the rows matching ``where``: rows in model order, chunks in sample order."""
    rows = [r for r in records if r["split"] == split and all(r[k] == v for k, v in where.items())]
    by_model: dict[int, list] = {}
    for r in sorted(rows, key=lambda r: (r["model_id"], r["sample_start"])):
        by_model.setdefault(r["model_id"], []).extend(r["margins"])
    return np.array([by_model[m] for m in sorted(by_model)], dtype=np.float32)


def _draw(n: int, d: int) -> tuple[list[int], list[int]]:
    """The documented rule: numpy's default_rng([seed, n, draw]) picks n models, then n·K/N oracles (K = N)."""
    rng = np.random.default_rng([SEED, n, d])
    models = sorted(rng.choice(N, n, replace=False).tolist())
    return models, sorted(rng.choice(N, n, replace=False).tolist())


def test_values_are_a_plain_restatement_for_the_recorded_draws(run, converged):
    from klom_reference import reference_klom

    rows, record = converged
    assert record["grid"] == [2, 3, N] and record["seed"] == SEED and record["draws"] == DRAWS
    subs = record["subsamples"]
    assert [(s["n_models"], s["draw"]) for s in subs] == [(2, 0), (2, 1), (2, 2), (3, 0), (3, 1), (3, 2), (N, 0)]
    for s in subs:
        expected = _draw(s["n_models"], s["draw"]) if s["n_models"] < N else (list(range(N)), list(range(N)))
        assert (s["models"], s["oracles"]) == expected
    assert len({tuple(s["models"]) for s in subs if s["n_models"] == 2}) > 1  # the draws differ

    margins = pq.read_table(run / "margins", partitioning=None).to_pylist()
    forget = np.asarray(json.loads((run / "forget_sets" / f"{FS}.json").read_text())["indices"])
    views = {"retain": ("train", np.setdiff1d(np.arange(N_TRAIN), forget)), "forget": ("train", forget),
             "val": ("val", np.arange(N_VAL))}
    summary = list(csv.DictReader(io.StringIO((run / "summary.csv").read_text())))
    assert len(rows) == len(summary) * 3  # every summary row at every size
    for row in summary:
        fs, method, epoch, split = row["forget_set"], row["method"], int(row["epoch"]), row["split"]
        source, idx = views[split]
        where = {"role": "original"} if method == "do_nothing" else {
            "role": "unlearned", "method": method, "forget_set": fs, "epoch": epoch}
        models, oracles = _stored(margins, source, **where)[:, idx], _stored(margins, source, role="oracle",
                                                                            forget_set=fs)[:, idx]
        mine = {int(r["n_models"]): r for r in rows if (r["forget_set"], r["method"], r["params"], r["epoch"],
                                                        r["split"]) == (fs, method, row["params"], row["epoch"], split)}
        assert sorted(mine) == [2, 3, N]
        for n in (2, 3):
            p95 = [float(np.percentile(reference_klom(models[s["models"]], oracles[s["oracles"]]), 95))
                   for s in subs if s["n_models"] == n]
            assert int(mine[n]["draws"]) == DRAWS
            assert float(mine[n]["klom_p95"]) == pytest.approx(float(np.mean(p95)), rel=1e-12, abs=1e-15)
            assert float(mine[n]["klom_p95_sd"]) == pytest.approx(float(np.std(p95, ddof=1)), rel=1e-9, abs=1e-15)


def test_the_runs_n_is_on_the_grid_and_is_the_summarys_p95_exactly(run, converged):
    rows, _ = converged
    summary = {(r["forget_set"], r["method"], r["params"], r["epoch"], r["split"]): r
               for r in csv.DictReader(io.StringIO((run / "summary.csv").read_text()))}
    full = [r for r in rows if r["n_models"] == str(N)]
    assert len(full) == len(summary) and {r["method"] for r in full} == {"do_nothing", "oracle_floor", "finetune"}
    for r in full:
        assert r["klom_p95"] == summary[(r["forget_set"], r["method"], r["params"], r["epoch"], r["split"])][
            "klom_p95"]  # the same text: the same float, bit for bit
        assert (r["draws"], r["klom_p95_sd"]) == ("1", "0.0")  # one possible draw: every model
    assert default_grid(N) == [N] and default_grid(100) == [10, 25, 50, 100]
    assert default_grid(200) == [10, 25, 50, 100, 200] and default_grid(1000) == [10, 25, 50, 100, 250, 500, 1000]


def test_reads_one_chunk_at_a_time_and_draws_are_seeded(run, tmp_path, monkeypatch):
    out = tmp_path / "copy"
    shutil.copytree(run, out)
    reads = []
    real = RunStore.read_margin_files

    def spy(self, files, *, split, chunk=None, epoch=None):
        reads.append(chunk)
        return real(self, files, split=split, chunk=chunk, epoch=epoch)

    monkeypatch.setattr(RunStore, "read_margin_files", spy)
    assert _cli("convergence", out, "--n", "2", "--seed", 1).exit_code == 0
    assert reads and None not in reads and set(reads) == {0, 1, 2}  # train: chunks 0..2; val: chunk 0
    first = [(out / name).read_bytes() for name in ("convergence.csv", "convergence.json")]
    assert _cli("convergence", out, "--n", "2", "--seed", 1).exit_code == 0
    assert [(out / name).read_bytes() for name in ("convergence.csv", "convergence.json")] == first
    assert _cli("convergence", out, "--n", "2", "--seed", 2).exit_code == 0
    other = json.loads((out / "convergence.json").read_text())["subsamples"]
    assert [s["models"] for s in other] != [s["models"] for s in json.loads(first[1])["subsamples"]]
    png = (out / "plots" / "convergence.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    result = _cli("convergence", out)  # the default grid of a 4-model run is the run's N alone
    assert result.exit_code == 0, result.output
    assert {r["n_models"] for r in csv.DictReader(io.StringIO((out / "convergence.csv").read_text()))} == {str(N)}


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


@pytest.mark.parametrize("args, message", [
    (("--n", "0"), "1..4"), (("--n", "5"), "1..4"), (("--n", "2,x"), "comma-separated integers"),
    (("--draws", "0"), "--draws"), (("--seed", "-1"), "--seed"),
])
def test_bad_settings_exit_2_with_one_line(run, args, message):
    assert message in _one_error_line(_cli("convergence", run, *args))


def test_bad_folders_exit_2_with_one_line(run, tmp_path):
    assert "does not exist" in _one_error_line(_cli("convergence", tmp_path / "nowhere"))
    assert not (tmp_path / "nowhere").exists()
    (tmp_path / "empty").mkdir()
    assert "summary.json" in _one_error_line(_cli("convergence", tmp_path / "empty"))
    out = tmp_path / "stale"
    shutil.copytree(run, out)
    manifest = next(p for p in (out / "manifests").glob("*.json") if json.loads(p.read_text())["method"] == "finetune")
    manifest.unlink()  # an ensemble the summary scored is gone
    (out / "convergence.csv").write_text("an earlier result\n")
    assert "raybench reduce" in _one_error_line(_cli("convergence", out))
    assert (out / "convergence.csv").read_text() == "an earlier result\n"  # left as it was
