"""``raybench compare``: two rows of a run, paired by sample. The pure function against a restatement (a plain
loop over bootstrap replicates and scipy's Wilcoxon), then the command on a small real run, its per-sample
values read back with pyarrow alone."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from scipy.stats import wilcoxon

from raybench import pipeline
from raybench.cli import main
from raybench.config import build_config
from raybench.metrics.paired import paired_comparison
from raybench.pipeline import execute


def test_paired_comparison_equals_a_restatement():
    rng = np.random.default_rng(3)
    a, b = rng.gamma(2.0, 0.3, 57), rng.gamma(2.0, 0.4, 57)
    got = paired_comparison(a, b, n_boot=300, seed=9)
    d = a - b
    picks = np.random.default_rng(9).integers(0, 57, size=(300, 57))
    means = np.array([d[row].mean() for row in picks])  # one replicate at a time
    assert got["mean_diff"] == pytest.approx(d.mean(), abs=1e-15) and got["mean_a"] == pytest.approx(a.mean())
    assert got["diff_ci_low"] == np.quantile(means, 0.025) and got["diff_ci_high"] == np.quantile(means, 0.975)
    assert got["share_a_lower"] == (d < 0).mean()
    ref = wilcoxon(d)
    assert got["wilcoxon_p"] == ref.pvalue and got["wilcoxon_statistic"] == ref.statistic
    assert paired_comparison(a, a)["wilcoxon_p"] is None  # no difference: the test is undefined, left empty
    for bad in ((a, b[:3]), (a, np.r_[b[:-1], np.nan]), (np.array([]), np.array([]))):
        with pytest.raises(ValueError):
            paired_comparison(*bad)


@pytest.fixture(scope="module")
def run(ray_session, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    config = build_config(None, n_models=4, block_size=2, methods="finetune,gradient_ascent", forget_sets="1,3",
                          params={"finetune": {"epochs": [1]}, "gradient_ascent": {"epochs": [1]}},
                          recipe={"epochs": 2}, out=str(out))
    _, store, _ = execute(config)
    pipeline.summarize(store)
    return out


def test_compare_pairs_the_stored_per_sample_values(run, tmp_path):
    result = CliRunner().invoke(main, ["compare", str(run), "gradient_ascent@1", "do_nothing", "--n-boot", "200",
                                       "--csv", str(tmp_path / "c.csv")])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((tmp_path / "c.csv").open()))
    splits = ("retain", "forget", "val")
    assert [(r["forget_set"], r["split"]) for r in rows] == [(fs, s) for fs in "13" for s in splits]
    table = pq.read_table(run / "per_sample", partitioning=None).to_pylist()

    def klom(row: dict, method: str) -> np.ndarray:
        picked = [x for x in table if (x["forget_set"], x["split"], x["method"]) == (row["forget_set"], row["split"],
                                                                                    method)]
        return np.array([x["klom"] for x in sorted(picked, key=lambda x: x["sample_id"])])

    for r in rows:
        expected = paired_comparison(klom(r, "gradient_ascent"), klom(r, "do_nothing"), n_boot=200)
        assert float(r["mean_diff"]) == pytest.approx(expected["mean_diff"], abs=1e-12)
        assert float(r["share_a_lower"]) == expected["share_a_lower"]
    assert "Wilcoxon p" in result.output


def test_bad_rows_exit_2_with_one_line(run):
    runner = CliRunner()
    for args, message in ((["nope", "do_nothing"], "not in"), (["finetune@7", "do_nothing"], "not in"),
                          (["finetune@x", "do_nothing"], "integer"),
                          (["finetune", "do_nothing", "--params-a", "[1]"], "JSON object")):
        result = runner.invoke(main, ["compare", str(run), *args])
        assert result.exit_code == 2 and message in result.output and result.output.count("\n") == 1, result.output


def test_reduce_without_intervals_leaves_their_columns_blank(run):
    runner = CliRunner()
    assert runner.invoke(main, ["reduce", str(run), "--n-boot", "0"]).exit_code == 0
    rows = list(csv.DictReader((run / "summary.csv").open()))
    assert {r["klom_p95_ci_low"] for r in rows} == {""} and all(r["klom_p95"] for r in rows)
    assert runner.invoke(main, ["reduce", str(run)]).exit_code == 0  # the default: 200 replicates
    assert all(r["klom_p95_ci_low"] for r in csv.DictReader((run / "summary.csv").open()))
