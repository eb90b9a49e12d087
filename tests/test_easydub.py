"""EasyDUB import: published margins in, ``raybench reduce`` out, equal to what EasyDUB's own evaluation prints.

The hub folder is built in the layout of ``easydub/EasyDUB-dataset`` by ``easydub_hub`` (its margins are real
ResNet-9s' on a tiny CIFAR-10 of 50 train / 16 test images, computed there without raybench), so nothing is
downloaded. The expected numbers are computed by restating EasyDUB's ``eval_pretrain.py`` directly on those
files with the reference KLOM loop.
"""

from __future__ import annotations

import json
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
    hub_model,
    import_easydub,
    load,
    oracle_floor_eval,
    replace,
    save_checkpoint,
)
from fake_hub import fake_snapshot_download
from klom_reference import reference_klom
from test_cifar10 import write_cifar_folder

from raybench.cli import main
from raybench.config import ConfigError
from raybench.reduce import reduce_run
from raybench.sources.easydub import (
    EasyDubError,
    OracleAllocation,
    allocate_oracles,
    checkpoint_paths,
    load_easydub_checkpoints,
)
from raybench.store import RunStore

PER_BATCH, N_TEST = 10, 16  # the tiny CIFAR-10 of the hub's margins (shared with test_easydub_run.py)
N_TRAIN, N_VAL, N_HUB, N = 5 * PER_BATCH, N_TEST, 6, 3
FORGET = {"2": np.sort(np.random.default_rng(2).choice(N_TRAIN, 10, replace=False)),
          "10": np.random.default_rng(10).choice(N_TRAIN, 8, replace=False)}  # unsorted, like the real set 10
CHUNK = 16  # train spans 4 chunks, the last one partial


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    arrays = write_cifar_folder(tmp_path_factory.mktemp("cifar") / "data", per_batch=PER_BATCH, n_test=N_TEST)
    return build_hub(tmp_path_factory.mktemp("hub") / "EasyDUB-dataset", arrays, FORGET, n_hub=N_HUB)


def test_import_then_reduce_reproduces_easydubs_evaluation(hub, tmp_path):
    out = str(tmp_path / "run")
    report = import_easydub(hub, ["2", "10"], N, out, oracle_floor=True, chunk_size=CHUNK)
    assert (report.n_train, report.n_val) == (N_TRAIN, N_VAL)
    assert report.forget_set_sizes == {"2": 10, "10": 8} and len(report.units_written) == 5 and not report.notes
    store = RunStore(out)
    rows = reduce_run(store)
    for fs in ("2", "10"):
        assert_rows_match(rows, fs, "do_nothing", easydub_eval(hub, fs, N), N)
        # no matching oracles: the floor is oracles N..2N-1, right after the scoring ones
        assert_rows_match(rows, fs, "oracle_floor", oracle_floor_eval(hub, fs, N, first=N), N)
    # EasyDUB publishes margins only: top-1 accuracy is not known, so it is left empty (never P(p_y > 1/2))
    assert all(r["accuracy"] is None and r["oracle_accuracy"] is None for r in rows)

    # the run folder is what engine.execute writes, so the rest of raybench reads it unchanged
    identity = store.run_info()["identity"]
    assert identity["n_models"] == N and identity["chunk_size"] == CHUNK and identity["source"] == "easydub"
    dataset = store.read_json(store.path("dataset.json"))
    assert set(dataset) == {"name", "fingerprint", "n_train", "n_val", "source_train", "source_val"}
    assert dataset["source_train"] == list(range(N_TRAIN)) and dataset["name"] == "cifar10"
    record = store.read_json(store.path("forget_sets", "10.json"))
    assert set(record) == {"id", "description", "indices"} and record["indices"] == FORGET["10"].tolist()
    roles = sorted((u.meta["role"], u.meta["forget_set"], u.meta["method"]) for u in store.completed_units().values())
    assert roles == [("oracle", "10", "none"), ("oracle", "2", "none"), ("original", "none", "none"),
                     ("unlearned", "10", "oracle_floor"), ("unlearned", "2", "oracle_floor")]
    original = next(u for u in store.completed_units().values() if u.meta["role"] == "original")
    table = store.read_margins([original], split="train", chunk=2)
    assert table.num_rows == N and set(table.column("epoch").to_pylist()) == {24}
    assert set(table.column("seed").to_pylist()) == {-1}
    np.testing.assert_array_equal(  # hub model 2, train ids 32..47
        table.sort_by("model_id").column("margins")[2].values.to_numpy(),
        np.load(hub / "margins/cifar10/pretrain/retain/resnet9/id_2_epoch_23.npy")[32:48])
    assert sorted(p.name for p in Path(out).iterdir()) == [
        "dataset.json", "easydub.json", "forget_sets", "manifests", "margins", "run.json", "run.lock"]  # no staging
    checks = store.read_json(store.path("easydub.json"))["forget_sets"]
    assert checks["2"]["pretrain_forget_vs_train"]["n_different"] == 0


def test_rerun_adds_forget_sets_and_keeps_finished_units(hub, tmp_path):
    out = str(tmp_path / "run")
    first = import_easydub(hub, ["2"], N, out, chunk_size=CHUNK)
    second = import_easydub(hub, ["2", "10"], N, out, chunk_size=CHUNK)
    assert len(first.units_written) == 2 and sorted(second.units_skipped) == sorted(first.units_written)
    assert len(second.units_written) == 1
    rows = reduce_run(RunStore(out))
    assert {(r["forget_set"], r["method"]) for r in rows} == {("2", "do_nothing"), ("10", "do_nothing")}
    assert_rows_match(rows, "10", "do_nothing", easydub_eval(hub, "10", N), N)
    with pytest.raises(ValueError, match="another run"):  # another N is another run: never mixed in one folder
        import_easydub(hub, ["2"], N - 1, out, chunk_size=CHUNK)


def test_hub_repo_source_downloads_only_the_needed_files(hub, tmp_path, monkeypatch):
    import huggingface_hub

    calls = fake_snapshot_download(monkeypatch, hub, tmp_path / "hf-cache" / "snapshot")
    out = str(tmp_path / "run")
    import_easydub("easydub/EasyDUB-dataset", ["10"], N, out, chunk_size=CHUNK)
    # the forget set first (it is needed to plan), then everything else in one download
    assert len(calls) == 2 and {c["repo_id"] for c in calls} == {"easydub/EasyDUB-dataset"}
    assert {c["repo_type"] for c in calls} == {"dataset"}
    expected = {"forget_sets/cifar10/forget_set_10.npy"}
    for x in range(N):
        name = f"id_{x}_epoch_23.npy"
        expected |= {f"margins/cifar10/pretrain/retain/resnet9/{name}", f"margins/cifar10/pretrain/val/resnet9/{name}",
                     f"margins/cifar10/pretrain/forget_10/resnet9/{name}"}
        expected |= {f"margins/cifar10/oracle/forget_10/{s}/resnet9/{name}" for s in ("retain", "forget", "val")}
    assert set(calls[0]["patterns"]) < expected  # the forget set and one margin file for the sample count
    assert sorted(calls[1]["patterns"]) == sorted(expected)  # exact paths: no wildcard, no checkpoint, no logits
    copied = {p.relative_to(tmp_path / "hf-cache" / "snapshot").as_posix()
              for p in (tmp_path / "hf-cache" / "snapshot").rglob("*") if p.is_file()}
    assert copied == expected
    assert_rows_match(reduce_run(RunStore(out)), "10", "do_nothing", easydub_eval(hub, "10", N), N)

    def offline(**kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ConfigError, match="cannot download .* couldn't connect"):
        import_easydub("easydub/EasyDUB-dataset", ["2"], N, str(tmp_path / "other"))


def test_a_pretrain_forget_file_that_disagrees_is_recorded(hub, tmp_path, caplog):
    fork = fork_hub(hub, tmp_path / "hub")
    path = fork / "margins/cifar10/pretrain/forget_2/resnet9/id_1_epoch_23.npy"
    shifted = np.load(path) + np.float32(0.25)
    replace(path, lambda p: np.save(p, shifted))
    report = import_easydub(fork, ["2"], N, str(tmp_path / "run"), chunk_size=CHUNK)
    assert len(report.notes) == 1 and "differ" in report.notes[0] and "differ" in caplog.text
    check = RunStore(str(tmp_path / "run")).read_json(str(tmp_path / "run" / "easydub.json"))
    assert check["forget_sets"]["2"]["pretrain_forget_vs_train"]["n_different"] == 10
    assert import_easydub(hub, ["2"], N, str(tmp_path / "clean"), chunk_size=CHUNK).notes == []  # the hub it forks


def test_cli_imports_and_rejects_bad_input_with_exit_2(hub, tmp_path):
    runner = CliRunner()
    out = str(tmp_path / "run")
    ok = runner.invoke(main, ["import-easydub", "--source", str(hub), "--forget-sets", "2", "--n-models", str(N),
                              "--out", out, "--chunk-size", str(CHUNK)])
    assert ok.exit_code == 0, ok.output
    assert "2 units written" in ok.output and f"raybench reduce {out}" in ok.output
    reduced = runner.invoke(main, ["reduce", out])
    assert reduced.exit_code == 0 and "do_nothing" in reduced.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert_rows_match(summary["rows"], "2", "do_nothing", easydub_eval(hub, "2", N), N)

    cases = [
        (["--source", str(tmp_path / "nope"), "--forget-sets", "2"], "neither a folder nor a hub repo id"),
        (["--source", str(hub), "--forget-sets", "2", "--n-models", "7"], "has models 0..5 (6 usable)"),
        (["--source", str(hub), "--forget-sets", "7"], "forget_set_7.npy"),
        (["--source", str(hub), "--forget-sets", "two"], "positive integers"),
        (["--source", str(hub), "--forget-sets", "2", "--n-models", "1"], "at least 2"),
        (["--source", str(hub), "--forget-sets", "2", "--n-models", "4", "--oracle-floor"],
         "usable"),  # a floor of 4 needs oracles 4..7
        # 200 published oracles: scoring + matching + floor must fit, and the message says which N does
        (["--source", str(hub), "--forget-sets", "2", "--n-models", "101", "--oracle-floor"], "n_models <= 100 fits"),
        (["--source", str(hub), "--forget-sets", "2", "--n-models", "100", "--matching-oracles", "1",
          "--oracle-floor"], "n_models <= 99 fits"),
        (["--source", str(hub), "--forget-sets", "2", "--n-models", "60", "--n-oracles", "150", "--oracle-floor"],
         "n_models <= 50 fits"),
        (["--source", str(hub), "--forget-sets", "2", "--n-models", "3", "--matching-oracles", "199"],
         "no n_models fits"),
        (["--source", str(hub), "--forget-sets", "2", "--n-models", "201"], "publishes 200 pretrain models"),
        (["--source", str(hub), "--forget-sets", "2", "--n-models", "3", "--out", out], "another run"),
    ]
    for args, message in cases:
        if "--out" not in args:
            args = [*args, "--out", str(tmp_path / "bad")]
        result = runner.invoke(main, ["import-easydub", *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)


def test_more_oracles_than_models_and_blocks_reduce_to_the_same_numbers(hub, tmp_path):
    """N originals against K > N oracles, stored in blocks of 2: the reference with K oracles, and one unit
    per block (units are what a run resumes by, so blocks must not change a number)."""
    out = str(tmp_path / "run")
    report = import_easydub(hub, ["2"], N, out, n_oracles=2 * N, block_size=2, chunk_size=CHUNK)
    assert len(report.units_written) == 2 + 3  # originals 0-1, 2; oracles 0-1, 2-3, 4-5
    rows = reduce_run(RunStore(out))
    assert {r["n_oracles"] for r in rows} == {2 * N} and {r["n_models"] for r in rows} == {N}
    forget_idx = FORGET["2"]
    for split in ("retain", "forget", "val"):
        rel = f"margins/cifar10/oracle/forget_2/{split}/resnet9/id_{{x}}_epoch_23.npy"
        folder = "forget_2" if split == "forget" else split
        pretrain = load(hub, f"margins/cifar10/pretrain/{folder}/resnet9/id_{{x}}_epoch_23.npy", range(N))
        if split == "retain":
            pretrain = np.delete(pretrain, forget_idx, axis=1)
        expected = reference_klom(pretrain, load(hub, rel, range(2 * N)))
        row = next(r for r in rows if r["split"] == split)
        assert row["klom_p95"] == pytest.approx(float(np.percentile(expected, 95)), abs=1e-9)
        assert row["klom_mean"] == pytest.approx(float(np.mean(expected)), abs=1e-9)


def test_published_checkpoints_load_into_the_stack(tmp_path):
    """State dicts of EasyDUB's own module tree (restated in ``easydub_hub``), under the wrappers' prefixes."""
    singles = []
    for x in (3, 7, 11):  # prefixes "model.", "module.", none
        model = hub_model(x)
        singles.append(model)
        save_checkpoint(tmp_path / "models/cifar10/pretrain/resnet9" / f"id_{x}_epoch_23.pt", model, x)
    bare = torch.load(tmp_path / "models/cifar10/pretrain/resnet9/id_11_epoch_23.pt", weights_only=True)
    assert "9.weight" in bare and "2.module.0.0.weight" in bare  # the published names
    paths = checkpoint_paths(tmp_path, [3, 7, 11])
    stack = load_easydub_checkpoints(paths).eval()
    assert stack.arch == "resnet9" and stack.seeds == (3, 7, 11) and stack.input_shape == (3, 32, 32)
    for i, model in enumerate(singles):
        got = stack.unstack(i).state_dict()
        for k, v in model.state_dict().items():
            assert torch.equal(got[k], v), (i, k)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = stack(x)
        torch.testing.assert_close(out[1], singles[1](x), atol=1e-4, rtol=1e-4)

    broken = tmp_path / "broken.pt"
    state = singles[0].state_dict()
    del state["5.module.1.1.running_var"]
    torch.save(state, broken)
    with pytest.raises(EasyDubError, match=r"(?s)broken\.pt.*Missing key.*5\.module\.1\.1\.running_var"):
        load_easydub_checkpoints([broken])
    with pytest.raises(EasyDubError, match="missing"):
        checkpoint_paths(tmp_path, [3, 4])


def test_oracle_ids_are_allocated_scoring_then_matching_then_floor():
    assert allocate_oracles(2, matching_oracles=2, oracle_floor=True) == OracleAllocation(
        range(0, 2), range(2, 4), range(4, 6))
    assert allocate_oracles(2, n_oracles=3, oracle_floor=True) == OracleAllocation(
        range(0, 3), range(3, 3), range(3, 5))
    assert allocate_oracles(100, oracle_floor=True).floor == range(100, 200)  # exactly the 200 published
    assert allocate_oracles(100, matching_oracles=lambda n: n).matching == range(100, 200)  # per_model pairing
    with pytest.raises(EasyDubError, match="n_models <= 100 fits"):
        allocate_oracles(101, matching_oracles=lambda n: n)
    with pytest.raises(EasyDubError, match="n_models <= 196 fits"):
        allocate_oracles(197, matching_oracles=4)  # pairing "mean" with 4 oracles: their count stays 4
    with pytest.raises(EasyDubError, match=r"100 scoring oracles \(hub ids 0..99\) \+ 1 matching oracles "
                                           r"\(100..100\) \+ 100 oracle-floor oracles \(101..200\) need 201"):
        allocate_oracles(100, matching_oracles=1, oracle_floor=True)


def test_a_run_downloads_its_checkpoints_and_matching_oracles_and_nothing_more():
    from raybench.sources.easydub import checkpoint_file, needed_files, oracle_margins_path

    files = needed_files(["2"], 2, matching_oracles=2, checkpoints=True)
    assert len(files) == len(set(files))
    checkpoints = sorted(f for f in files if f.endswith(".pt"))
    assert checkpoints == sorted([checkpoint_file(0), checkpoint_file(1), checkpoint_file(2, "2"),
                                  checkpoint_file(3, "2")])  # originals 0-1; matching oracles 2-3, not scoring 0-1
    assert oracle_margins_path("2", "val", 3) in files and oracle_margins_path("2", "val", 4) not in files
    assert not [f for f in needed_files(["2"], 2) if f.endswith(".pt")]  # a margins-only import reads none
    # the margin cross-check also reads scoring oracles 0-1's state dicts, and no other
    checked = needed_files(["2"], 2, matching_oracles=2, checkpoints=True, margin_check=True)
    assert sorted(set(checked) - set(files)) == sorted([checkpoint_file(0, "2"), checkpoint_file(1, "2")])
    floor = needed_files(["2"], 2, matching_oracles=2, oracle_floor=True)
    assert oracle_margins_path("2", "val", 5) in floor and oracle_margins_path("2", "val", 6) not in floor
