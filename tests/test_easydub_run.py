"""``raybench run`` with ``easydub_source``: methods run on EasyDUB's published originals (their checkpoints) and
are scored against its published oracles; nothing is trained here.

The hub folder (margins, forget set, real ResNet-9 state dicts under the published key names) and a tiny CIFAR-10
folder in torchvision's format (100 train / 30 test images) are built by the tests, so nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_cifar10 import trust_folder, write_cifar_folder
from test_easydub import assert_rows_match, build_hub, easydub_eval
from torchvision.datasets import CIFAR10

from raybench.cli import main
from raybench.data import load_dataset
from raybench.easydub import checkpoint_file, import_easydub, load_easydub_checkpoints
from raybench.store import RunStore
from raybench.training import default_recipe
from raybench.units import UnitContext

N_TRAIN, N_VAL, N = 100, 30, 2
FORGET = {"2": np.array([41, 7, 93, 12, 60], dtype=np.int64)}  # unsorted, like the real set 10


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    return build_hub(tmp_path_factory.mktemp("hub") / "EasyDUB-dataset", n_train=N_TRAIN, n_val=N_VAL, n_hub=4,
                     forget=FORGET, checkpoints=True)


@pytest.fixture
def cifar_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "data"
    write_cifar_folder(root)
    trust_folder(monkeypatch, root)
    return root


def write_job(path: Path, hub: Path, cifar_root: Path, **extra: str) -> Path:
    """A job file like jobs/cifar10-easydub.toml, scaled to the tiny data: blocks of one model."""
    lines = ['dataset = "cifar10"', f'data_root = "{cifar_root}"', f'easydub_source = "{hub}"',
             f"n_models = {N}", 'forget_sets = ["2"]',
             'methods = ["do_nothing", "gradient_ascent", "oracle_matching"]', "block_size = 1", "chunk_size = 64",
             *(f"{k} = {v}" for k, v in extra.items()),
             "[params.gradient_ascent]", "lr = 0.01", "epochs = [1]",
             "[params.oracle_matching]", "epochs = [1]", "retain_multiplier = 2.0"]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_methods_run_on_published_originals_against_published_oracles(hub, cifar_root, tmp_path):
    out = tmp_path / "run"
    runner = CliRunner()
    # a margins-only import first (as a researcher scoring do_nothing would have done): the run reuses its units
    # and adds the checkpoints it needs
    imported = runner.invoke(main, ["import-easydub", "--source", str(hub), "--forget-sets", "2", "--n-models",
                                    str(N), "--block-size", "1", "--chunk-size", "64", "--out", str(out)])
    assert imported.exit_code == 0, imported.output
    job = write_job(tmp_path / "job.toml", hub, cifar_root)
    result = runner.invoke(main, ["run", "--config", str(job), "--out", str(out)])
    assert result.exit_code == 0, result.output

    store = RunStore(str(out))
    units = store.completed_units()
    kinds = sorted({(u.meta["kind"], u.meta["role"]) for u in units.values()})
    assert kinds == [("import", "matching_oracle"), ("import", "oracle"), ("import", "original"),
                     ("unlearn", "unlearned")]  # not a single model trained
    matching = sorted(i for u in units.values() if u.meta["role"] == "matching_oracle" for i in u.meta["model_ids"])
    assert matching == [2, 3]  # hub oracles beyond the scoring ones (0, 1): disjoint, as METHODS.md §3.3 demands

    summary = json.loads((out / "summary.json").read_text())
    rows = summary["rows"]
    assert {(r["method"], r["epoch"]) for r in rows} == {("do_nothing", 0), ("gradient_ascent", 1),
                                                         ("oracle_matching", 1)}
    assert all(r["n_models"] == N and r["n_oracles"] == N for r in rows)
    work = {r["method"]: r["grad_samples"] for r in rows}
    assert work == {"do_nothing": 0, "gradient_ascent": 5, "oracle_matching": 5 + 2 * 5}  # |F|; |F| + 2·|F|
    assert_rows_match(rows, "2", "do_nothing", easydub_eval(hub, "2", N), N)  # EasyDUB's own numbers, unchanged

    # unlearning started from the published state dicts: the stored checkpoint of each block is theirs, exactly
    ctx = UnitContext.create(run_id=summary["run"], dataset=load_dataset("cifar10", str(cifar_root)),
                             arch="resnet9", recipe=default_recipe("cifar10", "resnet9").to_dict(), chunk_size=64,
                             store_uri=str(out), forget_indices=FORGET)
    for unit in units.values():
        if unit.meta["role"] not in ("original", "matching_oracle"):
            continue
        fs = None if unit.meta["role"] == "original" else "2"
        published = load_easydub_checkpoints([hub / checkpoint_file(i, fs) for i in unit.meta["model_ids"]])
        loaded = ctx.load_stack(unit.meta["unit"])
        for key, value in published.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), (unit.meta["role"], key)

    # resuming needs neither the hub folder nor the network: every imported unit is committed
    offline = write_job(tmp_path / "offline.toml", tmp_path / "hub-gone", cifar_root)
    again = runner.invoke(main, ["run", "--config", str(offline), "--out", str(out)])
    assert again.exit_code == 0 and "0 units run" in again.output, again.output
    assert json.loads((out / "summary.json").read_text())["rows"] == rows
    dataset = store.read_json(store.path("dataset.json"))
    assert dataset["fingerprint"] == load_dataset("cifar10", str(cifar_root)).fingerprint()


def test_import_checkpoints_are_the_published_models_stacked_per_block(hub, tmp_path):
    out = str(tmp_path / "run")
    first = import_easydub(hub, ["2"], 3, out, n_oracles=2, block_size=2, chunk_size=64)
    store = RunStore(out)
    assert not list(Path(out).glob("checkpoints/*"))
    second = import_easydub(hub, ["2"], 3, out, n_oracles=2, block_size=2, chunk_size=64, checkpoints=True)
    assert not second.units_written and sorted(second.units_skipped) == sorted(first.units_written)
    originals = sorted((u for u in store.completed_units().values() if u.meta["role"] == "original"),
                       key=lambda u: u.meta["model_ids"])
    assert [u.meta["model_ids"] for u in originals] == [[0, 1], [2]]
    for unit in originals:
        state = store.read_checkpoint(unit.meta["unit"])
        assert state["seeds"] == unit.meta["model_ids"]
        published = load_easydub_checkpoints([hub / checkpoint_file(i) for i in unit.meta["model_ids"]])
        assert state["state"].keys() == published.state_dict().keys()
        assert all(torch.equal(state["state"][k], v) for k, v in published.state_dict().items())


@pytest.mark.parametrize(("extra", "message"), [
    ({"dataset": '"digits"'}, "needs dataset"),
    ({"forget_sets": '["x"]'}, "EasyDUB's ids"),
    ({"n_models": "201"}, "publishes 200"),
    ({"n_models": "3"}, "missing"),  # the hub folder has 4 oracles: 3 scoring + 3 matching do not fit
])
def test_bad_easydub_runs_exit_2(hub, cifar_root, tmp_path, extra, message):
    job = write_job(tmp_path / "job.toml", hub, cifar_root)
    text = job.read_text()
    for key, value in extra.items():
        text = "\n".join(f"{key} = {value}" if line.startswith(f"{key} =") else line for line in text.splitlines())
    job.write_text(text + "\n")
    result = CliRunner().invoke(main, ["run", "--config", str(job), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert message in result.output, result.output


def test_missing_cifar10_is_exit_2_naming_the_data_root(tmp_path, monkeypatch):
    def offline(self) -> None:
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(CIFAR10, "download", offline)
    root = tmp_path / "nowhere"
    result = CliRunner().invoke(main, ["run", "--dataset", "cifar10", "--data-root", str(root), "--methods",
                                       "do_nothing", "--n-models", "2", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert str(root) in result.output and "could not be downloaded" in result.output
