"""``raybench run`` with ``source = "easydub:…"``: methods run on EasyDUB's published originals (their checkpoints) and
are scored against its published oracles; nothing is trained here.

The hub folder (``easydub_hub``: real ResNet-9 state dicts under the published key names, and margin files that
are those models' margins on the images) and a tiny CIFAR-10 folder in torchvision's format (50 train / 16 test
images, the ones the hub's margins were computed on) are built by the tests, so nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from easydub_hub import (
    assert_rows_match,
    build_hub,
    easydub_eval,
    fork_hub,
    hub_images,
    import_easydub,
    model_margins,
    oracle_floor_eval,
    oracle_seed,
    replace,
)
from test_cifar10 import trust_folder, write_cifar_folder
from torchvision.datasets import CIFAR10

from raybench.cli import main
from raybench.data import load_dataset
from raybench.reduce import reduce_run
from raybench.sources.easydub import NOT_CHECKED, checkpoint_file, load_easydub_checkpoints
from raybench.store import RunStore
from raybench.training import default_recipe
from raybench.units import UnitContext

PER_BATCH, N_TEST = 10, 16  # as test_easydub.py: the same images, so the hubs share their models' margins
N, N_HUB = 2, 6
FORGET = {"2": np.array([41, 7, 33, 12, 20], dtype=np.int64)}  # unsorted, like the real set 10


@pytest.fixture(scope="module")
def arrays(tmp_path_factory) -> dict:
    return write_cifar_folder(tmp_path_factory.mktemp("cifar") / "data", per_batch=PER_BATCH, n_test=N_TEST)


@pytest.fixture(scope="module")
def hub(tmp_path_factory, arrays) -> Path:
    return build_hub(tmp_path_factory.mktemp("hub") / "EasyDUB-dataset", arrays, FORGET, n_hub=N_HUB,
                     checkpoints=True)


@pytest.fixture
def cifar_root(tmp_path, monkeypatch, arrays) -> Path:
    root = tmp_path / "data"
    assert all(np.array_equal(a, b) for name, pair in write_cifar_folder(
        root, per_batch=PER_BATCH, n_test=N_TEST).items() for a, b in zip(pair, arrays[name], strict=True))
    trust_folder(monkeypatch, root)
    return root


def write_job(path: Path, hub: Path, cifar_root: Path, **extra: str) -> Path:
    """A job file like jobs/cifar10-easydub.toml, scaled to the tiny data: blocks of one model."""
    lines = ['dataset = "cifar10"', f'data_root = "{cifar_root}"', f'source = "easydub:{hub}"',
             f"n_models = {N}", 'forget_sets = ["2"]',
             'methods = ["do_nothing", "gradient_ascent", "oracle_matching"]', "block_size = 1", "chunk_size = 64",
             *(f"{k} = {v}" for k, v in {"floor": "false", **extra}.items()),
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
    # hub oracles beyond the scoring ones (0, 1): disjoint, as docs/methods.md#oracle_matching demands
    assert matching == [2, 3]

    summary = json.loads((out / "summary.json").read_text())
    rows = summary["rows"]
    assert {(r["method"], r["epoch"]) for r in rows} == {("do_nothing", 0), ("gradient_ascent", 1),
                                                         ("oracle_matching", 1)}
    assert all(r["n_models"] == N and r["n_oracles"] == N for r in rows)
    work = {r["method"]: r["grad_samples"] for r in rows}
    assert work == {"do_nothing": 0, "gradient_ascent": 5, "oracle_matching": 5 + 2 * 5}  # |F|; |F| + 2·|F|
    assert_rows_match(rows, "2", "do_nothing", easydub_eval(hub, "2", N), N)  # EasyDUB's own numbers, unchanged

    # before any unlearning, the published state dicts reproduced the hub's margins on these images
    check = store.read_json(store.path("easydub.json"))["margin_check"]
    assert check["checkpoints"] == sorted([checkpoint_file(0), checkpoint_file(1), checkpoint_file(0, "2"),
                                           checkpoint_file(1, "2")])
    assert check["fingerprint"] == load_dataset("cifar10", str(cifar_root)).fingerprint()
    compared = {rel: c["n_compared"] for rel, c in check["files"].items()}
    assert compared == {**{f"margins/cifar10/pretrain/{folder}/resnet9/id_{x}_epoch_23.npy": n for x in (0, 1)
                           for folder, n in (("retain", 50), ("val", 16), ("forget_2", 5))},
                        **{f"margins/cifar10/oracle/forget_2/{split}/resnet9/id_{x}_epoch_23.npy": n for x in (0, 1)
                           for split, n in (("retain", 45), ("forget", 5), ("val", 16))}}
    assert max(c["max_diff_over_tolerance"] for c in check["files"].values()) < 0.01  # float32 both sides

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


def test_import_checkpoints_are_the_published_models_stacked_per_block(hub, cifar_root, tmp_path):
    out = str(tmp_path / "run")
    first = import_easydub(hub, ["2"], 3, out, n_oracles=2, block_size=2, chunk_size=64)
    store = RunStore(out)
    assert not list(Path(out).glob("checkpoints/*"))
    second = import_easydub(hub, ["2"], 3, out, n_oracles=2, block_size=2, chunk_size=64, checkpoints=True)
    assert not second.units_written and sorted(second.units_skipped) == sorted(first.units_written)
    assert second.notes == [NOT_CHECKED]  # no images: the margins of the checkpoints were not compared
    originals = sorted((u for u in store.completed_units().values() if u.meta["role"] == "original"),
                       key=lambda u: u.meta["model_ids"])
    assert [u.meta["model_ids"] for u in originals] == [[0, 1], [2]]
    for unit in originals:
        state = store.read_checkpoint(unit.meta["unit"])
        assert state["seeds"] == unit.meta["model_ids"]
        published = load_easydub_checkpoints([hub / checkpoint_file(i) for i in unit.meta["model_ids"]])
        assert state["state"].keys() == published.state_dict().keys()
        assert all(torch.equal(state["state"][k], v) for k, v in published.state_dict().items())

    # with images (--data-root), a rerun does the check, though every unit is there, and drops the note
    args = ["import-easydub", "--source", str(hub), "--forget-sets", "2", "--n-models", "3", "--n-oracles", "2",
            "--block-size", "2", "--chunk-size", "64", "--checkpoints", "--out", out]
    checked = CliRunner().invoke(main, [*args, "--data-root", str(cifar_root)])
    assert checked.exit_code == 0 and "0 units written" in checked.output, checked.output
    record = store.read_json(store.path("easydub.json"))
    assert record["notes"] == [] and len(record["margin_check"]["files"]) == 12
    again = CliRunner().invoke(main, [*args, "--source", str(tmp_path / "hub-gone")])  # checked: the store suffices
    assert again.exit_code == 0 and "note:" not in again.output, again.output


@pytest.mark.parametrize("broken", ["forget-file order", "another model's checkpoint"])
def test_checkpoints_that_do_not_reproduce_the_hub_margins_stop_the_import(hub, arrays, cifar_root, tmp_path,
                                                                            broken):
    """A hub whose files break one assumption of the reader: an oracle forget file in ascending sample order
    instead of the forget file's, or a pretrain state dict that is another model's. Exit 2 naming the files,
    nothing written; the unbroken hub passes the same check in the tests above."""
    fork = fork_hub(hub, tmp_path / "hub")
    if broken == "forget-file order":
        bad = "margins/cifar10/oracle/forget_2/forget/resnet9/id_0_epoch_23.npy"
        margins = model_margins(oracle_seed(0), hub_images(arrays))["train"][np.sort(FORGET["2"])]
        replace(fork / bad, lambda path: np.save(path, margins))
        named, spared = [bad], ["retain/resnet9", "val/resnet9", "pretrain/"]
    else:
        bad = "models/cifar10/pretrain/resnet9/id_1_epoch_23.pt"
        replace(fork / bad, lambda path: shutil.copy(fork / checkpoint_file(0), path))
        named = [f"margins/cifar10/pretrain/{f}/resnet9/id_1_epoch_23.npy vs {bad}" for f in ("retain", "val")]
        spared = ["id_0_epoch_23.npy", "oracle/"]
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["import-easydub", "--source", str(fork), "--forget-sets", "2", "--n-models",
                                       str(N), "--checkpoints", "--data-root", str(cifar_root), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "do not reproduce the hub's margins" in result.output and "nothing was imported" in result.output
    message = " ".join(result.output.split())  # click wraps the line
    assert all(name in message for name in named), result.output
    assert not any(name in message for name in spared), result.output
    assert not out.exists() or not any(out.iterdir())  # stopped before anything was written


def test_floor_and_matching_oracles_never_share_hub_models(hub, cifar_root, tmp_path):
    runner = CliRunner()
    base = ["import-easydub", "--source", str(hub), "--forget-sets", "2", "--n-models", str(N), "--block-size", "1",
            "--chunk-size", "64"]
    out = tmp_path / "run"
    both = runner.invoke(main, [*base, "--matching-oracles", "2", "--oracle-floor", "--out", str(out)])
    assert both.exit_code == 0, both.output
    store = RunStore(str(out))
    held = {}
    for unit in store.completed_units().values():
        held.setdefault((unit.meta["role"], unit.meta["method"]), []).extend(unit.meta["model_ids"])
    assert {k: sorted(v) for k, v in held.items()} == {
        ("original", "none"): [0, 1], ("oracle", "none"): [0, 1], ("matching_oracle", "none"): [2, 3],
        ("unlearned", "oracle_floor"): [4, 5]}  # scoring, then matching, then the floor
    assert_rows_match(reduce_run(store), "2", "oracle_floor", oracle_floor_eval(hub, "2", N, first=4), N)
    # the folder's floor is on 4..5: a floor after no matching oracles would be another one, pooled with it
    again = runner.invoke(main, [*base, "--oracle-floor", "--out", str(out)])
    assert again.exit_code == 2 and "has its oracle floor on hub oracles 4..5" in again.output, again.output

    # a floor imported first (on 2..3), then a run whose oracle matching would fine-tune against those oracles
    other = tmp_path / "other"
    floor = runner.invoke(main, [*base, "--oracle-floor", "--out", str(other)])
    assert floor.exit_code == 0, floor.output
    job = write_job(tmp_path / "job.toml", hub, cifar_root)
    result = runner.invoke(main, ["run", "--config", str(job), "--out", str(other)])
    assert result.exit_code == 2, result.output
    assert "would share hub oracles 2..3" in " ".join(result.output.split()), result.output
    assert not [u for u in RunStore(str(other)).completed_units().values() if u.meta["role"] == "matching_oracle"]


@pytest.mark.parametrize(("extra", "message"), [
    ({"dataset": '"digits"'}, "needs dataset"),
    ({"forget_sets": '["x"]'}, "EasyDUB's ids"),
    ({"n_models": "201"}, "publishes 200"),
    ({"n_models": "4"}, "missing"),  # the hub folder has 6 oracles: 4 scoring + 4 matching do not fit
    ({"n_models": "101"}, "n_models <= 100 fits"),  # per_model pairing: 101 scoring + 101 matching > 200
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
