"""The klom-models source: DUB's ``royrin/KLOM-models`` margins in, ``raybench reduce`` out, equal to DUB's KLOM
computed from the same files (tests/klom_models_hub.py), in both KL directions."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fake_hub import fake_snapshot_download
from klom_models_hub import (
    add_living17,
    build_klom_hub,
    dub_compute_binned_kl,
    dub_run_klom,
    import_klom_models,
    top1_accuracy,
)
from test_cifar10 import trust_folder, write_cifar_folder

from raybench.cli import main
from raybench.config import ConfigError, RunConfig
from raybench.data import Dataset
from raybench.data.cifar10 import load_cifar10
from raybench.metrics import KLOM_VERSION
from raybench.reduce import reduce_run, write_summary
from raybench.sources.base import Ensemble, SourceError
from raybench.sources.klom_models import KlomModelsSource
from raybench.store import FLOOR_METHOD, RunStore

PER_BATCH, N_TEST = 12, 20  # 60 train / 20 val images
N, N_HUB_ORIGINALS, N_HUB_ORACLES = 10, 11, 20  # KLOM at N = 10 lies well inside its range
FORGET = {"2": np.array([41, 7, 33, 12, 20, 58, 3], dtype=np.int64), "5": np.array([9, 1, 30], dtype=np.int64)}
CHUNK = 16  # several chunks per split


@pytest.fixture(scope="module")
def arrays_and_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar") / "data"
    arrays = write_cifar_folder(root, per_batch=PER_BATCH, n_test=N_TEST)
    with pytest.MonkeyPatch.context() as mp:
        trust_folder(mp, root)
        dataset = load_cifar10(root)
    return arrays, dataset


@pytest.fixture(scope="module")
def hub(tmp_path_factory, arrays_and_dataset) -> Path:
    return build_klom_hub(tmp_path_factory.mktemp("hub") / "KLOM-models", arrays_and_dataset[0], FORGET,
                          n_originals=N_HUB_ORIGINALS, n_oracles=N_HUB_ORACLES)


@pytest.fixture
def dataset(arrays_and_dataset):
    return arrays_and_dataset[1]


def fork(hub: Path, root: Path) -> Path:
    shutil.copytree(hub, root)
    return root


def rows_of(rows: list[dict], fs: str, method: str) -> dict[str, dict]:
    mine = {r["split"]: r for r in rows if r["forget_set"] == fs and r["method"] == method}
    assert set(mine) == {"retain", "forget", "val"}
    return mine


def assert_exact(rows: dict[str, dict], expected: dict[str, np.ndarray]) -> None:
    for split, values in expected.items():
        row = rows[split]
        assert row["n_samples"] == len(values) and row["n_models"] == row["n_oracles"] == N
        assert row["klom_mean"] == float(np.mean(values)), split
        for q in (5, 25, 50, 75, 95, 99):
            assert row[f"klom_p{q}"] == float(np.percentile(values, q)), (split, q)
        assert row["klom_p95"] > 0  # not a vacuous comparison


# -- (1) the numbers ---------------------------------------------------------------------------------------------------
def test_do_nothing_and_floor_rows_are_dubs_klom_in_both_directions(hub, dataset, tmp_path):
    out = str(tmp_path / "run")
    report = import_klom_models(str(hub), ["2"], N, out, chunk_size=CHUNK, block_size=2, dataset=dataset,
                                oracle_floor=True)
    assert (report.n_train, report.n_val) == (5 * PER_BATCH, N_TEST)
    assert report.forget_sets["2"].tolist() == FORGET["2"].tolist()  # file order kept
    store = RunStore(out)
    default = reduce_run(store)
    reverse = reduce_run(store, direction="oracle-unlearned")
    for method, unlearned in (("do_nothing", "originals"), (FLOOR_METHOD, "floor")):
        ours = dub_run_klom(hub, "2", N, reversed_args=False, unlearned=unlearned)
        theirs = dub_run_klom(hub, "2", N, reversed_args=True, unlearned=unlearned)
        assert_exact(rows_of(default, "2", method), ours)
        assert_exact(rows_of(reverse, "2", method), theirs)
        assert any(not np.array_equal(ours[s], theirs[s]) for s in ours)  # the two directions are not the same
        # DUB's own scipy path renormalises q': within log(1 + 20 eps) of the definition (docs/metrics.md#variants)
        scipy = dub_run_klom(hub, "2", N, reversed_args=True, unlearned=unlearned, per_sample=dub_compute_binned_kl)
        for split, values in theirs.items():
            assert np.max(np.abs(scipy[split] - values)) <= np.log1p(20e-5) + 1e-12
    assert {r["klom_version"] for r in default} == {KLOM_VERSION}
    assert {r["klom_version"] for r in reverse} == {f"{KLOM_VERSION}+oracle-unlearned"}

    # top-1 accuracy from the logits files, restated
    labels = {"train": dataset.y_train, "val": dataset.y_val}
    retain = np.setdiff1d(np.arange(dataset.n_train), FORGET["2"])
    views = {"retain": ("train", retain), "forget": ("train", FORGET["2"]), "val": ("val", np.arange(dataset.n_val))}
    originals = top1_accuracy(hub / "full_models/CIFAR10", range(N), labels, views)
    oracles = top1_accuracy(hub / "oracles/CIFAR10/forget_set_2", range(N), labels, views)
    floor = top1_accuracy(hub / "oracles/CIFAR10/forget_set_2", range(N, 2 * N), labels, views)
    for split in views:
        row, floor_row = rows_of(default, "2", "do_nothing")[split], rows_of(default, "2", FLOOR_METHOD)[split]
        assert row["accuracy"] == pytest.approx(originals[split], abs=1e-12)
        assert row["oracle_accuracy"] == pytest.approx(oracles[split], abs=1e-12)
        assert floor_row["accuracy"] == pytest.approx(floor[split], abs=1e-12)
    record = store.read_json(store.path("klom_models.json"))
    assert record["ensembles"]["original/none"]["top1"]
    assert record["ensembles"]["unlearned/2"]["model_ids"] == list(range(N, 2 * N))
    assert record["ensembles"]["oracle/2"]["logits_check"]["max_diff_over_tolerance"] < 0.01
    assert record["stored_epoch"] == 24 and record["hub_epoch"] == 23


def test_summary_files_mark_a_reversed_direction_and_the_default_stays_as_it_was(hub, tmp_path):
    out = str(tmp_path / "run")
    runner = CliRunner()  # the README's commands: raybench import klom-models, then raybench reduce
    imported = runner.invoke(main, ["import", "klom-models", "--from", str(hub), "--forget-sets", "2,5", "--n-models",
                                    str(N), "--no-floor", "--out", out, "--chunk-size", str(CHUNK)])
    assert imported.exit_code == 0 and "3 units written" in imported.output, imported.output
    store = RunStore(out)
    assert runner.invoke(main, ["reduce", out]).exit_code == 0
    default_csv = (tmp_path / "run" / "summary.csv").read_bytes()
    default_json = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "kl_direction" not in default_json and default_json["klom_version"] == KLOM_VERSION
    result = runner.invoke(main, ["reduce", out, "--kl-direction", "oracle-unlearned"])
    assert result.exit_code == 0, result.output
    reversed_rows = list(csv.DictReader(io.StringIO((tmp_path / "run" / "summary.csv").read_text())))
    assert {r["klom_version"] for r in reversed_rows} == {f"{KLOM_VERSION}+oracle-unlearned"}
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["kl_direction"] == "oracle-unlearned" and summary["klom_version"].endswith("+oracle-unlearned")
    for fs in FORGET:
        expected = dub_run_klom(hub, fs, N, reversed_args=True)
        got = {r["split"]: r for r in reversed_rows if r["forget_set"] == fs}
        for split, values in expected.items():
            assert float(got[split]["klom_p95"]) == float(np.percentile(values, 95))
    assert runner.invoke(main, ["reduce", out]).exit_code == 0
    assert (tmp_path / "run" / "summary.csv").read_bytes() == default_csv  # back to the default, byte for byte
    # without the data set, top-1 is unknown: accuracy is left empty, never guessed
    rows = list(csv.DictReader(io.StringIO(default_csv.decode())))
    assert {r["accuracy"] for r in rows} == {""} and {r["oracle_accuracy"] for r in rows} == {""}
    bad = runner.invoke(main, ["reduce", out, "--kl-direction", "symmetric"])
    assert bad.exit_code == 2 and bad.output.count("\n") == 1
    assert write_summary(store, reduce_run(store))["klom_version"] == KLOM_VERSION


def test_a_rerun_writes_nothing_and_adds_forget_sets(hub, tmp_path):
    out = str(tmp_path / "run")
    first = import_klom_models(str(hub), ["2"], N, out, chunk_size=CHUNK)
    again = import_klom_models(str(hub), ["2", "5"], N, out, chunk_size=CHUNK)
    record = RunStore(out).read_json(str(tmp_path / "run" / "klom_models.json"))
    assert record["last_import"] == {"units_written": 1, "units_already_there": len(first.units_written)}
    assert set(first.units_written) == set(again.units_skipped) and len(again.units_written) == 1
    assert {r["forget_set"] for r in reduce_run(RunStore(out))} == {"2", "5"}


# -- (2) bad input: one line, nothing written -------------------------------------------------------------------------
def _refused(tmp_path: Path, location: Path | str, *args, match: str, **kwargs) -> str:
    out = tmp_path / "refused"
    with pytest.raises(ConfigError, match=match) as info:
        import_klom_models(str(location), *args, str(out), chunk_size=CHUNK, **kwargs)
    assert "\n" not in str(info.value)
    assert not out.exists()  # a refusal leaves no folder behind
    return str(info.value)


def test_missing_files_and_unpublished_forget_sets_are_refused(hub, tmp_path):
    broken = fork(hub, tmp_path / "hub")
    (broken / "oracle_models/CIFAR10/only_margins/forget_set_2/val_margins_all.pt").unlink()
    _refused(tmp_path, broken, ["2"], N, match="missing from .*forget_set_2/val_margins_all.pt")
    _refused(tmp_path, hub, ["7"], N, match="forget set 7 is not published")
    _refused(tmp_path, hub, ["0"], N, match="positive integers")
    (broken / "full_models/CIFAR10/train_margins_all.pt").unlink()
    _refused(tmp_path, broken, ["5"], N, match="missing from .*full_models/CIFAR10/train_margins_all.pt")
    _refused(tmp_path, tmp_path / "nowhere", ["2"], N, match="neither a folder nor a hub repo id")


def test_too_many_models_name_the_largest_n_that_fits(hub, tmp_path):
    _refused(tmp_path, hub, ["2"], N_HUB_ORIGINALS + 1, match=f"holds {N_HUB_ORIGINALS} originals.*n_models <= "
             f"{N_HUB_ORIGINALS} fits")
    _refused(tmp_path, hub, ["2"], 11, oracle_floor=True, match="oracles 11..21 beside the 11 scoring ones.*holds "
             "20: n_models <= 10 fits")
    _refused(tmp_path, hub, ["2"], 1, match="n_models must be at least 2")


def test_nan_margins_bad_shapes_and_logits_that_disagree_are_refused(hub, dataset, tmp_path):
    broken = fork(hub, tmp_path / "hub")
    path = broken / "oracle_models/CIFAR10/only_margins/forget_set_2/train_margins_all.pt"
    margins = torch.load(path)
    margins[1, 17] = float("nan")
    torch.save(margins, path)
    _refused(tmp_path, broken, ["2"], N, match=r"train_margins_all.pt: NaN margins \(model 1, sample 17")
    torch.save(margins[:, :-1], path)
    _refused(tmp_path, broken, ["2"], N, match="margins of 59 samples, expected 60")
    torch.save({"margins": margins}, path)
    _refused(tmp_path, broken, ["2"], N, match="expected a tensor, got dict")

    swapped = fork(hub, tmp_path / "swapped")  # two models' logits exchanged: margins no longer match their rows
    folder = swapped / "full_models/CIFAR10"
    (folder / "train_logits_0.pt").rename(folder / "tmp.pt")
    (folder / "train_logits_1.pt").rename(folder / "train_logits_0.pt")
    (folder / "tmp.pt").rename(folder / "train_logits_1.pt")
    message = _refused(tmp_path, swapped, ["2"], N, dataset=dataset, match="logits do not give its margins")
    assert "full_models/CIFAR10/train_logits_0.pt vs row 0 of full_models/CIFAR10/train_margins_all.pt" in message
    import_klom_models(str(swapped), ["2"], N, str(tmp_path / "no-labels"), chunk_size=CHUNK)  # margins alone: fine


def test_a_data_set_of_other_sizes_is_refused(hub, dataset, tmp_path):
    smaller = Dataset(name="cifar10", x_train=dataset.x_train[:-1], y_train=dataset.y_train[:-1],
                      x_val=dataset.x_val, y_val=dataset.y_val, num_classes=10,
                      source_train=dataset.source_train[:-1], source_val=dataset.source_val)
    _refused(tmp_path, hub, ["2"], N, dataset=smaller, match="cover 60 train / 20 val samples, the data set cifar10 "
             "has 59 / 20")


def test_absent_logits_leave_accuracy_empty_with_a_note(hub, dataset, tmp_path):
    partial = fork(hub, tmp_path / "hub")
    (partial / "oracles/CIFAR10/forget_set_2/val_logits_1.pt").unlink()
    report = import_klom_models(str(partial), ["2"], N, str(tmp_path / "run"), chunk_size=CHUNK, dataset=dataset)
    assert any(f"oracle models 0..{N - 1} of forget set 2: 1 of {2 * N} logits files absent" in n for n in report.notes)
    rows = rows_of(reduce_run(RunStore(str(tmp_path / "run"))), "2", "do_nothing")
    assert all(r["accuracy"] is not None and r["oracle_accuracy"] is None for r in rows.values())


def test_living17_imports_originals_and_refuses_oracles(hub, tmp_path):
    folder = fork(hub, tmp_path / "hub")
    add_living17(folder, n_models=N)
    message = _refused(tmp_path, folder, ["1"], N, variant="LIVING17", match="KLOM needs oracles trained for it")
    assert "LIVING17" in message
    out = str(tmp_path / "run")
    report = import_klom_models(str(folder), [], N, out, variant="LIVING17", chunk_size=CHUNK)
    assert (report.n_train, report.n_val) == (44, 12) and len(report.units_written) == 1
    assert [u.meta["role"] for u in RunStore(out).completed_units().values()] == ["original"]
    info = RunStore(out).run_info()["identity"]
    assert (info["dataset"], info["arch"], info["variant"], info["hub_epoch"]) == ("living17", "resnet18",
                                                                                  "LIVING17", 24)
    source = KlomModelsSource(str(folder), variant="LIVING17")
    config = RunConfig(dataset="living17", arch="resnet18", n_models=N, forget_sets=())
    with pytest.raises(SourceError, match="KLOM needs oracles"):
        source.model_ids(config, [Ensemble("oracle", "1", N)])
    _refused(tmp_path, folder, ["2"], N, variant="CIFAR10_augmented", match="augmentation.*KLOM needs oracles")


def test_the_contract_refuses_what_is_not_published(hub):
    source = KlomModelsSource(str(hub))
    config = RunConfig(dataset="cifar10", n_models=N, forget_sets=("2",), methods=("do_nothing",))
    source.check(config)
    assert source.identity(config, None) == {"dataset": "cifar10", "arch": "resnet9", "source": "klom-models",
                                             "variant": "CIFAR10", "hub_epoch": 23, "n_models": N, "block_size": 50,
                                             "chunk_size": 8192}
    assert source.sizes(None) == (5 * PER_BATCH, N_TEST)
    floor = Ensemble("unlearned", "2", N, FLOOR_METHOD)
    ids = source.model_ids(config, [Ensemble("original", "none", N), Ensemble("oracle", "2", N), floor])
    assert list(ids.values()) == [range(N), range(N), range(N, 2 * N)]
    with pytest.raises(SourceError, match="no oracle checkpoints"):
        source.model_ids(config, [Ensemble("matching_oracle", "2", 2)])
    for bad, match in ((RunConfig(dataset="digits"), "holds cifar10 models"),
                       (RunConfig(dataset="cifar10", arch="mlp"), "holds resnet9 models")):
        with pytest.raises(SourceError, match=match):
            source.check(bad)
    with pytest.raises(SourceError, match="unknown KLOM-models variant"):
        KlomModelsSource(str(hub), variant="CIFAR100")


# -- (3) only the needed files are requested ---------------------------------------------------------------------------
def test_only_the_needed_files_are_downloaded(hub, dataset, tmp_path, monkeypatch):
    import huggingface_hub

    target = tmp_path / "hf-cache" / "snapshot"
    calls = fake_snapshot_download(monkeypatch, hub, target)
    n = 2
    out = str(tmp_path / "run")
    import_klom_models("", ["2"], n, out, chunk_size=CHUNK, dataset=dataset, oracle_floor=True)
    assert {c["repo_id"] for c in calls} == {"royrin/KLOM-models"} and {c["repo_type"] for c in calls} == {"dataset"}
    requested = [p for c in calls for p in c["patterns"]]
    expected = {"full_models/CIFAR10/train_margins_all.pt", "full_models/CIFAR10/val_margins_all.pt",
                "oracle_models/CIFAR10/only_margins/forget_set_2/train_margins_all.pt",
                "oracle_models/CIFAR10/only_margins/forget_set_2/val_margins_all.pt",
                "forget_set_indices/CIFAR10/forget_set_2.npy"}
    expected |= {f"full_models/CIFAR10/{s}_logits_{i}.pt" for s in ("train", "val") for i in range(n)}
    expected |= {f"oracles/CIFAR10/forget_set_2/{s}_logits_{i}.pt" for s in ("train", "val") for i in range(2 * n)}
    assert len(requested) == len(set(requested)) and set(requested) == expected  # exact names, each once
    copied = {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()}
    assert copied == expected  # no state dict, no per-model margins, no other forget set
    local = str(tmp_path / "local")
    import_klom_models(str(hub), ["2"], n, local, chunk_size=CHUNK, dataset=dataset, oracle_floor=True)
    assert reduce_run(RunStore(out)) == reduce_run(RunStore(local))

    def offline(**kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    _refused(tmp_path, "royrin/KLOM-models", ["2"], n, match="cannot download .* couldn't connect")


def test_a_run_with_methods_that_unlearn_is_refused(hub):
    # no state dicts are imported, so nothing could start from the originals: refused before any work
    source = KlomModelsSource(str(hub))
    source.check(RunConfig(dataset="cifar10", n_models=N, forget_sets=("2",), methods=("do_nothing",)))
    with pytest.raises(SourceError, match="margins only.*finetune"):
        source.check(RunConfig(dataset="cifar10", n_models=N, forget_sets=("2",), methods=("do_nothing", "finetune")))
