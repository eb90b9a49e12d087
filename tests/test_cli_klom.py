import json

import numpy as np
from click.testing import CliRunner
from klom_reference import reference_klom

from raybench.cli import main


def test_klom_command_prints_summary_and_writes_values(tmp_path):
    rng = np.random.default_rng(0)
    u, o = rng.normal(1, 1, (30, 50)).astype(np.float32), rng.normal(0, 1, (40, 50)).astype(np.float32)
    np.save(tmp_path / "u.npy", u)
    np.save(tmp_path / "o.npy", o)
    result = CliRunner().invoke(main, ["klom", str(tmp_path / "u.npy"), str(tmp_path / "o.npy"),
                                       "--out", str(tmp_path / "k.npy")])
    assert result.exit_code == 0, result.output
    row = json.loads(result.output)
    expected = reference_klom(u, o)
    assert row["n_samples"] == 50 and row["n_unlearned"] == 30 and row["n_oracle"] == 40
    assert row["klom_p95"] == np.percentile(expected, 95)
    np.testing.assert_array_equal(np.load(tmp_path / "k.npy"), expected)


def test_klom_command_rejects_bad_input_with_exit_code_2(tmp_path):
    np.save(tmp_path / "u.npy", np.zeros((3, 5)))
    np.save(tmp_path / "o.npy", np.array([[np.nan] * 5]))
    result = CliRunner().invoke(main, ["klom", str(tmp_path / "u.npy"), str(tmp_path / "o.npy")])
    assert result.exit_code == 2 and "NaN" in result.output
    (tmp_path / "junk.npy").write_text("not an array")
    result = CliRunner().invoke(main, ["klom", str(tmp_path / "junk.npy"), str(tmp_path / "o.npy")])
    assert result.exit_code == 2 and "cannot read" in result.output
