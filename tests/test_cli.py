"""CLI contract: bad input exits with code 2 and a clear message, before any Ray or training starts."""

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from raybench.cli import main
from raybench.methods import available_methods


def _run(*args):
    return CliRunner().invoke(main, list(args))


def _one_error_line(result) -> str:
    """The output of a refused command: exit code 2 and exactly one non-empty line, ``Error: ...``."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_methods_lists_one_method_per_line_with_a_description():
    result = _run("methods")
    assert result.exit_code == 0
    lines = result.output.strip().splitlines()
    names = [line.split()[0] for line in lines]
    assert "do_nothing" in names and "finetune" in names
    methods = available_methods()
    assert all(len(line.split(maxsplit=2)) == 3 and line.split()[1] == f"v{methods[line.split()[0]].version}"
               for line in lines)
    assert dict(line.split()[:2] for line in lines)["influence"] == "v2"  # the forward-mode recursion


def test_methods_json_gives_name_version_defaults_description_and_checks():
    from raybench.methods import available_methods

    result = _run("methods", "--json")
    assert result.exit_code == 0, result.output
    listed = {m["name"]: m for m in json.loads(result.output)}
    registry = available_methods()
    assert list(listed) == list(registry)
    for name, method in registry.items():
        entry = listed[name]
        assert entry["version"] == method.version and isinstance(entry["version"], int)
        assert entry["defaults"] == method.defaults and entry["description"] == method.description
        assert "\n" not in entry["description"] and set(entry["params"]) == set(method.defaults)
    assert listed["finetune"]["params"]["lr"] == {"type": "float", "range": "> 0"}
    assert listed["finetune"]["params"]["batch_size"] == {"type": "int", "range": "in [1, 2147483647]"}
    assert listed["oracle_matching"]["params"]["pairing"] == {"type": "choice", "choices": ["mean", "per_model"]}


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
        (["--train-path", "fast"], "unknown training path 'fast'"),
    ],
)
def test_bad_run_input_exits_2(args, message, tmp_path):
    result = _run("run", "--out", str(tmp_path / "out"), *args)
    assert message in _one_error_line(result)
    assert not (tmp_path / "out").exists()  # refused before the run folder is made


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


# -- refused before anything starts, and an existing run folder is left exactly as it was -------------------------

JOB = 'n_models = 2\nblock_size = 2\nforget_sets = ["1"]\nmethods = ["do_nothing"]\n[recipe]\nepochs = 1\n'


@pytest.fixture(scope="module")
def run_folder(ray_session, tmp_path_factory):
    """A finished (tiny) run, and the config that made it."""
    root = tmp_path_factory.mktemp("cli-run")
    (root / "job.toml").write_text(JOB)
    result = _run("run", "--config", str(root / "job.toml"), "--out", str(root / "out"))
    assert result.exit_code == 0, result.output
    assert (root / "out" / "summary.csv").exists()
    return root


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file's bytes, but the lock's: each run that takes the lock names itself in it, refused or not."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "run.lock"}


@pytest.mark.parametrize("args,message", [
    (["--param", "finetune.batch_size=-1"], "finetune.batch_size must be in [1, 2147483647], got -1"),
    (["--param", "finetune.lr=abc"], "finetune.lr must be a number, got 'abc'"),
    (["--param", "finetune.lr=NaN"], "finetune.lr must be a finite number, got nan"),
    (["--param", "finetune.lr=Infinity"], "finetune.lr must be a finite number, got inf"),
    (["--param", "finetune.lr=-1"], "finetune.lr must be > 0, got -1"),
    (["--param", "finetune.lr=0.02,0.02"], "finetune.lr lists the value 0.02 twice"),
    (["--param", "finetune.epochs=0"], "epochs must be positive integers"),
    (["--n-models", "1000000000"], "n_models = 1000000000 is more than raybench plans (at most 100,000)"),
    (["--block-size", "1000000"], "block_size = 1000000 is more than raybench plans (at most 10,000)"),
    (["--num-cpus", "0"], "num_cpus must be an integer >= 1, got 0"),
    (["--n-models", "abc"], "'abc' is not a valid integer"),
    (["--no-such-option"], "No such option"),
    (["--forget-sets", "{big}"], "indices out of range, first 12345678901234567890123456"),
])
def test_bad_input_exits_2_with_one_line_and_leaves_the_run_alone(run_folder, args, message):
    big = run_folder / "big.txt"
    big.write_text("3 12345678901234567890123456\n")
    out = run_folder / "out"
    before = _tree(out)
    args = [a.format(big=big) for a in args]
    result = _run("run", "--config", str(run_folder / "job.toml"), "--out", str(out),
                  "--methods", "do_nothing,finetune", *args)
    assert message in _one_error_line(result)
    assert _tree(out) == before


@pytest.mark.parametrize("toml,message", [
    (b"\xff\xfe\x00n_models = 2\n", "is not UTF-8 text"),
    ("recipe = 5\n", "recipe must be a table"),
    ("methods = 5\n", "methods must be a list"),
    ("seed = \"abc\"\n", "seed must be an integer, got 'abc'"),
    ("chunk_size = 100000000\n", "chunk_size = 100000000 is more than raybench plans"),
    ("[recipe]\nlr = nan\n", "bad recipe: lr must be a finite number, got nan"),
    ("[recipe]\nepochs = 2.5\n", "bad recipe: epochs must be an integer, got 2.5"),
    ("[params.finetune]\nlr = [0.01, 0.01]\n", "finetune.lr lists the value 0.01 twice"),
])
def test_bad_toml_exits_2_with_one_line_and_leaves_the_run_alone(run_folder, toml, message):
    out = run_folder / "out"
    before = _tree(out)
    job = run_folder / "bad.toml"
    if isinstance(toml, str):  # the folder's config with one bad value
        methods = "" if toml.startswith("methods") else 'methods = ["do_nothing", "finetune"]\n'
        toml = ('n_models = 2\nblock_size = 2\nforget_sets = ["1"]\n' + methods + toml).encode()
    job.write_bytes(toml)
    result = _run("run", "--config", str(job), "--out", str(out))
    assert message in _one_error_line(result)
    assert _tree(out) == before


def test_a_toml_out_that_is_not_a_string_exits_2(tmp_path):
    (tmp_path / "job.toml").write_text("out = 5\n")
    assert "out must be a string, got 5" in _one_error_line(_run("run", "--config", str(tmp_path / "job.toml")))


@pytest.mark.parametrize("bins,message", [("1000000000", "--bins must be in 1..10000"), ("0", "--bins must be")])
def test_klom_bins_are_bounded(tmp_path, bins, message):
    np.save(tmp_path / "u.npy", np.zeros((3, 5), dtype=np.float32))
    result = _run("klom", str(tmp_path / "u.npy"), str(tmp_path / "u.npy"), "--bins", bins)
    assert message in _one_error_line(result)


def test_klom_non_finite_margins_exit_2_with_one_line(tmp_path):
    np.save(tmp_path / "u.npy", np.zeros((3, 5), dtype=np.float32))
    np.save(tmp_path / "o.npy", np.array([[np.inf] * 5, [0.0] * 5]))
    assert "NaN/inf" in _one_error_line(_run("klom", str(tmp_path / "u.npy"), str(tmp_path / "o.npy")))
