"""EasyDUB import: published margins in, ``raybench reduce`` out, equal to what EasyDUB's own evaluation prints.

The hub folder is built here in the exact layout of ``easydub/EasyDUB-dataset`` (METHODS.md §5.2), with random
margins on a tiny "CIFAR" (300 train / 50 val), so nothing is downloaded. The expected numbers are computed by
restating EasyDUB's ``eval_pretrain.py`` directly on those files with the reference KLOM loop.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from klom_reference import reference_klom

from raybench.cli import main
from raybench.easydub import EasyDubError, checkpoint_paths, import_easydub, load_easydub_checkpoints
from raybench.models.resnet9 import resnet9
from raybench.reduce import reduce_run
from raybench.store import RunStore

N_TRAIN, N_VAL, N_HUB, N = 300, 50, 8, 4
FORGET = {"2": np.sort(np.random.default_rng(2).choice(N_TRAIN, 20, replace=False)),
          "10": np.random.default_rng(10).choice(N_TRAIN, 15, replace=False)}  # unsorted, like the real set 10
CHUNK = 128  # train spans 3 chunks, the last one partial


def save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, arr)


def margins(rng: np.random.Generator, center: np.ndarray, n: int) -> np.ndarray:
    """Ensemble-like margins: per-sample centre plus noise, some saturated beyond ±100 and some exact ties."""
    out = (center + rng.normal(0, 1.5, (n, len(center)))).astype(np.float32)
    out[:, :3] = 120.0  # clipped to 100 and tied: the top-edge drop of the reference
    out[:, 3] = np.float32(2.5)  # all equal: lo == hi
    return out


def build_hub(root: Path, seed: int = 0, *, n_train: int = N_TRAIN, n_val: int = N_VAL, n_hub: int = N_HUB,
              forget: dict[str, np.ndarray] | None = None, checkpoints: bool = False) -> Path:
    """``models/``, ``margins/`` and ``forget_sets/`` exactly as the hub lays them out, for ``n_hub`` models.

    ``checkpoints``: real ResNet-9 state dicts under the published key names (else placeholder bytes, which the
    margin import must never open)."""
    rng = np.random.default_rng(seed)
    forget = {**FORGET, "3": np.arange(40)} if forget is None else forget
    center_train, center_val = rng.normal(4, 3, n_train), rng.normal(2, 3, n_val)
    pre_train, pre_val = margins(rng, center_train, n_hub), margins(rng, center_val, n_hub)
    m = root / "margins" / "cifar10"
    for x in range(n_hub):
        name = f"id_{x}_epoch_23.npy"
        save(m / "pretrain" / "retain" / "resnet9" / name, pre_train[x])
        save(m / "pretrain" / "val" / "resnet9" / name, pre_val[x])
        save_checkpoint(root / "models" / "cifar10" / "pretrain" / "resnet9" / f"id_{x}_epoch_23.pt", x, checkpoints)
        save(root / "logits" / "cifar10" / "pretrain" / "val" / "resnet9" / name, rng.normal(size=(n_val, 10)))
    for fs, idx in forget.items():
        save(root / "forget_sets" / "cifar10" / f"forget_set_{fs}.npy", idx.astype(np.int64))
        retain = np.setdiff1d(np.arange(n_train), idx)  # ascending, as the hub's retain files are ordered
        shifted = center_train.copy()
        shifted[idx] -= 6.0  # oracles never saw F: lower margins there
        oracle_train, oracle_val = margins(rng, shifted, n_hub), margins(rng, center_val, n_hub)
        for x in range(n_hub):
            name = f"id_{x}_epoch_23.npy"
            save(m / "pretrain" / f"forget_{fs}" / "resnet9" / name, pre_train[x, idx])
            save(m / "oracle" / f"forget_{fs}" / "retain" / "resnet9" / name, oracle_train[x, retain])
            save(m / "oracle" / f"forget_{fs}" / "forget" / "resnet9" / name, oracle_train[x, idx])
            save(m / "oracle" / f"forget_{fs}" / "val" / "resnet9" / name, oracle_val[x])
            save_checkpoint(root / "models" / "cifar10" / "oracle" / f"forget_{fs}" / "resnet9" /
                            f"id_{x}_epoch_23.pt", 1000 * int(fs) + x, checkpoints)
    return root


def published_model(seed: int) -> torch.nn.Module:
    """A ResNet-9 with trained-looking BatchNorm state (so a dropped buffer would show)."""
    torch.manual_seed(seed)
    model = resnet9().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(4704)
    return model


def save_checkpoint(path: Path, seed: int, real: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not real:
        path.write_bytes(b"not needed")
        return
    torch.save({"model." + k: v for k, v in published_model(seed).state_dict().items()}, path)


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    return build_hub(tmp_path_factory.mktemp("hub") / "EasyDUB-dataset")


def load(hub: Path, rel: str, ids: range) -> np.ndarray:
    return np.stack([np.load(hub / rel.format(x=x)) for x in ids])


def easydub_eval(hub: Path, fs: str, n: int) -> dict[str, np.ndarray]:
    """EasyDUB's eval_pretrain.py restated: per split, pretrain margins vs oracle margins of models 0..n-1."""
    forget_idx = np.load(hub / f"forget_sets/cifar10/forget_set_{fs}.npy").astype(np.int64)
    out = {}
    for split in ("retain", "forget", "val"):
        oracle = load(hub, f"margins/cifar10/oracle/forget_{fs}/{split}/resnet9/id_{{x}}_epoch_23.npy", range(n))
        folder = f"forget_{fs}" if split == "forget" else split
        pretrain = load(hub, f"margins/cifar10/pretrain/{folder}/resnet9/id_{{x}}_epoch_23.npy", range(n))
        if split == "retain" and pretrain.shape[1] > oracle.shape[1]:
            mask = np.ones(pretrain.shape[1], dtype=bool)
            mask[forget_idx] = False
            pretrain = pretrain[:, mask]
        out[split] = reference_klom(pretrain, oracle)  # klom_from_margins(oracle, pretrain): KL(pretrain ‖ oracle)
    return out


def oracle_floor_eval(hub: Path, fs: str, n: int) -> dict[str, np.ndarray]:
    """Oracles n..2n-1 scored as if they were unlearned models, against oracles 0..n-1."""
    out = {}
    for split in ("retain", "forget", "val"):
        rel = f"margins/cifar10/oracle/forget_{fs}/{split}/resnet9/id_{{x}}_epoch_23.npy"
        out[split] = reference_klom(load(hub, rel, range(n, 2 * n)), load(hub, rel, range(n)))
    return out


def assert_rows_match(rows: list[dict], fs: str, method: str, expected: dict[str, np.ndarray], n: int = N) -> None:
    mine = {r["split"]: r for r in rows if r["forget_set"] == fs and r["method"] == method}
    assert set(mine) == {"retain", "forget", "val"}
    for split, values in expected.items():
        row = mine[split]
        assert row["n_samples"] == len(values) and row["n_models"] == row["n_oracles"] == n
        assert row["klom_mean"] == pytest.approx(float(np.mean(values)), abs=1e-9)
        for q in (5, 25, 50, 75, 95, 99):
            assert row[f"klom_p{q}"] == pytest.approx(float(np.percentile(values, q)), abs=1e-9), (split, q)
        assert row["klom_p95"] > 0  # not a vacuous comparison


def test_import_then_reduce_reproduces_easydubs_evaluation(hub, tmp_path):
    out = str(tmp_path / "run")
    report = import_easydub(hub, ["2", "10"], N, out, oracle_floor=True, chunk_size=CHUNK)
    assert (report.n_train, report.n_val) == (N_TRAIN, N_VAL)
    assert report.forget_set_sizes == {"2": 20, "10": 15} and len(report.units_written) == 5 and not report.notes
    store = RunStore(out)
    rows = reduce_run(store)
    for fs in ("2", "10"):
        assert_rows_match(rows, fs, "do_nothing", easydub_eval(hub, fs, N))
        assert_rows_match(rows, fs, "oracle_floor", oracle_floor_eval(hub, fs, N))
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
    np.testing.assert_array_equal(  # hub model 3, train ids 256..299
        table.sort_by("model_id").column("margins")[3].values.to_numpy(),
        np.load(hub / "margins/cifar10/pretrain/retain/resnet9/id_3_epoch_23.npy")[256:])
    assert sorted(p.name for p in Path(out).iterdir()) == [
        "dataset.json", "easydub.json", "forget_sets", "manifests", "margins", "run.json"]  # no staging left
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
    assert_rows_match(rows, "10", "do_nothing", easydub_eval(hub, "10", N))
    with pytest.raises(ValueError, match="another run"):  # another N is another run: never mixed in one folder
        import_easydub(hub, ["2"], N - 1, out, chunk_size=CHUNK)


def test_hub_repo_source_downloads_only_the_needed_files(hub, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(*, repo_id, repo_type, allow_patterns, cache_dir=None, **kwargs):
        calls.append({"repo_id": repo_id, "repo_type": repo_type, "patterns": list(allow_patterns), **kwargs})
        target = tmp_path / "hf-cache" / "snapshot"
        for path in hub.rglob("*"):
            rel = path.relative_to(hub).as_posix()
            if path.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                (target / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, target / rel)
        return str(target)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    out = str(tmp_path / "run")
    import_easydub("easydub/EasyDUB-dataset", ["10"], N, out, chunk_size=CHUNK)
    assert len(calls) == 1 and calls[0]["repo_id"] == "easydub/EasyDUB-dataset"
    assert calls[0]["repo_type"] == "dataset"
    expected = {"forget_sets/cifar10/forget_set_10.npy"}
    for x in range(N):
        name = f"id_{x}_epoch_23.npy"
        expected |= {f"margins/cifar10/pretrain/retain/resnet9/{name}", f"margins/cifar10/pretrain/val/resnet9/{name}",
                     f"margins/cifar10/pretrain/forget_10/resnet9/{name}"}
        expected |= {f"margins/cifar10/oracle/forget_10/{s}/resnet9/{name}" for s in ("retain", "forget", "val")}
    assert sorted(calls[0]["patterns"]) == sorted(expected)  # exact paths: no wildcard, no checkpoint, no logits
    copied = {p.relative_to(tmp_path / "hf-cache" / "snapshot").as_posix()
              for p in (tmp_path / "hf-cache" / "snapshot").rglob("*") if p.is_file()}
    assert copied == expected
    assert_rows_match(reduce_run(RunStore(out)), "10", "do_nothing", easydub_eval(hub, "10", N))

    def offline(**kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(EasyDubError, match="cannot download .* couldn't connect"):
        import_easydub("easydub/EasyDUB-dataset", ["2"], N, str(tmp_path / "other"))


def test_a_pretrain_forget_file_that_disagrees_is_recorded(tmp_path, caplog):
    hub = build_hub(tmp_path / "hub", seed=1)
    path = hub / "margins/cifar10/pretrain/forget_2/resnet9/id_1_epoch_23.npy"
    np.save(path, np.load(path) + np.float32(0.25))
    report = import_easydub(hub, ["2"], N, str(tmp_path / "run"), chunk_size=CHUNK)
    assert len(report.notes) == 1 and "differ" in report.notes[0] and "differ" in caplog.text
    check = RunStore(str(tmp_path / "run")).read_json(str(tmp_path / "run" / "easydub.json"))
    assert check["forget_sets"]["2"]["pretrain_forget_vs_train"]["n_different"] == 20


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
    assert_rows_match(summary["rows"], "2", "do_nothing", easydub_eval(hub, "2", N))

    cases = [
        (["--source", str(tmp_path / "nope"), "--forget-sets", "2"], "neither a folder nor a hub repo id"),
        (["--source", str(hub), "--forget-sets", "2", "--n-models", "9"], "has models 0..7 (8 usable)"),
        (["--source", str(hub), "--forget-sets", "7"], "forget_set_7.npy"),
        (["--source", str(hub), "--forget-sets", "two"], "positive integers"),
        (["--source", str(hub), "--forget-sets", "2", "--n-models", "1"], ">= 2"),
        (["--source", str(hub), "--forget-sets", "2", "--n-models", "4", "--oracle-floor", "--out",
          str(tmp_path / "floor"), "--n-models", "5"], "usable"),  # a floor of 5 needs oracles 5..9
        (["--source", str(hub), "--forget-sets", "2", "--n-models", "3", "--out", out], "another run"),
    ]
    for args, message in cases:
        if "--out" not in args:
            args = [*args, "--out", str(tmp_path / "bad")]
        result = runner.invoke(main, ["import-easydub", *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)


def test_more_oracles_than_models_and_blocks_reduce_to_the_same_numbers(hub, tmp_path):
    """N originals against K > N oracles, stored in blocks of 3: the reference with K oracles, and one unit
    per block (units are what a run resumes by, so blocks must not change a number)."""
    out = str(tmp_path / "run")
    report = import_easydub(hub, ["2"], N, out, n_oracles=2 * N, block_size=3, chunk_size=CHUNK)
    assert len(report.units_written) == 2 + 3  # originals 0-2, 3; oracles 0-2, 3-5, 6-7
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
    """State dicts saved with the published key names (``resnet9()``'s, under the wrappers' prefixes)."""
    singles = []
    for x, prefix in [(3, "model."), (7, "module."), (11, "")]:
        model = published_model(x)
        singles.append(model)
        path = tmp_path / "models/cifar10/pretrain/resnet9" / f"id_{x}_epoch_23.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({prefix + k: v for k, v in model.state_dict().items()}, path)
    assert "9.weight" in torch.load(path, weights_only=True)  # the published names, e.g. 2.module.0.0.weight
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


def test_a_run_downloads_its_checkpoints_and_matching_oracles_and_nothing_more():
    from raybench.easydub import checkpoint_file, needed_files, oracle_margins_path

    files = needed_files(["2"], 2, matching_oracles=2, checkpoints=True)
    assert len(files) == len(set(files))
    checkpoints = sorted(f for f in files if f.endswith(".pt"))
    assert checkpoints == sorted([checkpoint_file(0), checkpoint_file(1), checkpoint_file(2, "2"),
                                  checkpoint_file(3, "2")])  # originals 0-1; matching oracles 2-3, not scoring 0-1
    assert oracle_margins_path("2", "val", 3) in files and oracle_margins_path("2", "val", 4) not in files
    assert not [f for f in needed_files(["2"], 2) if f.endswith(".pt")]  # a margins-only import reads none
