"""CLI contract: bad input exits with code 2 and a clear message, before any Ray or training starts."""

import numpy as np
import pytest
from click.testing import CliRunner

from raybench.cli import main


def _run(*args):
    return CliRunner().invoke(main, list(args))


def test_methods_lists_one_method_per_line_with_a_description():
    result = _run("methods")
    assert result.exit_code == 0
    lines = result.output.strip().splitlines()
    names = [line.split()[0] for line in lines]
    assert "do_nothing" in names and "finetune" in names
    assert all(len(line.split(maxsplit=1)) == 2 for line in lines)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--methods", "nosuch"], "unknown method 'nosuch'"),
        (["--dataset", "mnist"], "unknown dataset 'mnist'"),
        (["--forget-sets", "99"], "99"),
        (["--n-models", "1"], "at least 2"),
        (["--param", "finetune.nosuch=1"], "has no parameter nosuch"),
        (["--param", "finetune-lr"], "METHOD.NAME=VALUE"),
        (["--methods", "do_nothing", "--param", "finetune.lr=0.1"], "not in this run"),
        (["--config", "does-not-exist.toml"], "does not exist"),
    ],
)
def test_bad_run_input_exits_2(args, message, tmp_path):
    result = _run("run", "--out", str(tmp_path / "out"), *args)
    assert result.exit_code == 2, result.output
    assert message in result.output


@pytest.mark.parametrize(
    "indices,message", [([0, 5, 5000], "out of range"), ([3, 4, 3], "duplicate"), ([], "empty")],
)
def test_bad_forget_set_file_exits_2(indices, message, tmp_path):
    path = tmp_path / "mine.npy"
    np.save(path, np.array(indices, dtype=np.int64))
    result = _run("run", "--out", str(tmp_path / "out"), "--forget-sets", str(path))
    assert result.exit_code == 2, result.output
    assert message in result.output.lower()


def test_unknown_config_key_exits_2(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('dataset = "digits"\nn_modles = 10\n')
    result = _run("run", "--config", str(path), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and "n_modles" in result.output


def test_reduce_of_a_folder_that_is_not_a_run_exits_2(tmp_path):
    result = _run("reduce", str(tmp_path))
    assert result.exit_code == 2 and "not a raybench run folder" in result.output


def test_relative_out_is_refused_when_joining_a_cluster(monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    result = _run("run", "--out", "relative/dir")
    assert result.exit_code == 2 and "relative" in result.output


def test_reduce_of_a_folder_of_an_older_format_exits_2(tmp_path):
    (tmp_path / "run.json").write_text('{"run": "0123", "format_version": 1, "identity": {"n_models": 6}}')
    result = _run("reduce", str(tmp_path))
    assert result.exit_code == 2, result.output
    assert "older raybench" in result.output and "new --out" in result.output
    assert "raybench reduce" in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]  # nothing written over it
