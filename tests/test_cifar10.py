"""CIFAR-10 through torchvision, on a tiny folder in torchvision's own on-disk format (no network here)."""

from __future__ import annotations

import hashlib
import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import transforms
from torchvision.datasets import CIFAR10

from raybench.config import build_config
from raybench.data import DATASETS, builtin_forget_sets, load_dataset, resolve_forget_set
from raybench.data.cifar10 import BASE_FOLDER, MEAN, STD, Cifar10Dataset, load_cifar10
from raybench.pipeline import plan_run

ROOT = Path(__file__).resolve().parents[1]
PER_BATCH, N_TEST = 20, 30


def write_cifar_folder(root: Path, seed: int = 0, *, per_batch: int = PER_BATCH,
                       n_test: int = N_TEST) -> dict[str, np.ndarray]:
    """``cifar-10-batches-py/`` as the real archive unpacks it: five train batches, a test batch and the label
    names, each a pickled dict with uint8 rows of 3072 = 3×32×32 (channel-major) and a label list."""
    folder = root / BASE_FOLDER
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, n in [*((f"data_batch_{i}", per_batch) for i in range(1, 6)), ("test_batch", n_test)]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "labels": labels, "data": data,
                         "filenames": [f"{name}_{i}.png" for i in range(n)]}, f)
        arrays[name] = (data, np.array(labels))
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                     "ship", "truck"], "num_cases_per_batch": per_batch, "num_vis": 3072}, f)
    return arrays


def trust_folder(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Point torchvision's checksum table at the tiny files, so its real integrity checks run and pass."""
    def md5(name: str) -> str:
        return hashlib.md5((root / BASE_FOLDER / name).read_bytes()).hexdigest()

    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", md5(f"data_batch_{i}")] for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5("test_batch")]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5("batches.meta")})


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    root = tmp_path / "data"
    arrays = write_cifar_folder(root)
    trust_folder(monkeypatch, root)
    return root, arrays


def test_loads_torchvision_files_with_ids_labels_and_the_published_normalisation(cifar_root):
    root, arrays = cifar_root
    assert "cifar10" in DATASETS
    ds = load_dataset("cifar10", str(root))
    assert isinstance(ds, Cifar10Dataset) and ds.root == str(root) and ds.name == "cifar10"
    assert ds.x_train.shape == (5 * PER_BATCH, 3, 32, 32) and ds.x_val.shape == (N_TEST, 3, 32, 32)
    assert ds.input_shape == (3, 32, 32) and ds.num_classes == 10
    assert np.array_equal(ds.source_train, np.arange(100)) and np.array_equal(ds.source_val, np.arange(N_TEST))
    train_labels = np.concatenate([arrays[f"data_batch_{i}"][1] for i in range(1, 6)])
    assert np.array_equal(ds.y_train, train_labels) and np.array_equal(ds.y_val, arrays["test_batch"][1])
    # Bit for bit what torchvision's own per-image transform gives, in torchvision's sample order.
    tv = CIFAR10(str(root), train=True, transform=transforms.Compose([transforms.ToTensor(),
                                                                      transforms.Normalize(MEAN, STD)]))
    for i in (0, 21, 99):
        assert torch.equal(torch.tensor(ds.x_train[i]), tv[i][0]), i
    tv_val = CIFAR10(str(root), train=False, transform=transforms.Compose([transforms.ToTensor(),
                                                                           transforms.Normalize(MEAN, STD)]))
    assert torch.equal(torch.tensor(ds.x_val[N_TEST - 1]), tv_val[N_TEST - 1][0])
    # the raw pixels of sample 21 are row 1 of data_batch_2, channel-major
    raw = arrays["data_batch_2"][0][1].reshape(3, 32, 32).astype(np.float64) / 255
    expected = (raw - np.array(MEAN)[:, None, None]) / np.array(STD)[:, None, None]
    np.testing.assert_allclose(ds.x_train[21], expected, atol=1e-5)
    assert not ds.x_train.flags.writeable
    assert load_dataset("cifar10", str(root)) is ds  # cached per (name, root)
    assert len(ds.fingerprint()) == 16


def test_present_files_are_never_downloaded(cifar_root, monkeypatch):
    root, _ = cifar_root
    calls = []
    monkeypatch.setattr(CIFAR10, "download", lambda self: calls.append(self.root))
    load_cifar10(root)
    assert calls == []


def test_missing_files_are_downloaded_into_the_root(tmp_path, monkeypatch):
    root = tmp_path / "fresh"
    calls = []

    def fake_download(self):  # stands in for torchvision's fetch + extract of the archive
        calls.append(Path(self.root))
        write_cifar_folder(Path(self.root), seed=1)
        trust_folder(monkeypatch, Path(self.root))

    monkeypatch.setattr(CIFAR10, "download", fake_download)
    ds = load_cifar10(root)
    assert calls == [root] and ds.n_train == 100 and ds.n_val == N_TEST


def test_missing_and_offline_is_a_clear_error_naming_the_root(tmp_path, monkeypatch):
    def offline(self):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(CIFAR10, "download", offline)
    with pytest.raises(ValueError, match=r"CIFAR-10 is not in .*nowhere.*could not be downloaded.*URLError"):
        load_cifar10(tmp_path / "nowhere")
    monkeypatch.setenv("RAYBENCH_DATA", str(tmp_path / "env-root"))
    with pytest.raises(ValueError, match="env-root"):  # the default root follows $RAYBENCH_DATA
        load_cifar10(None)


def test_corrupted_files_are_an_error_not_a_silent_redownload(tmp_path):
    root = tmp_path / "data"
    write_cifar_folder(root)  # checksums do not match torchvision's table
    with pytest.raises(ValueError, match="corrupted"):
        load_cifar10(root)


def write_forget_sets(root: Path, sets: dict[str, list[int]]) -> None:
    folder = root / "forget_sets" / "cifar10"
    folder.mkdir(parents=True, exist_ok=True)
    for set_id, indices in sets.items():
        np.save(folder / f"forget_set_{set_id}.npy", np.array(indices, dtype=np.int64))


def test_builtin_forget_sets_are_easydubs_files_in_file_order(cifar_root):
    root, _ = cifar_root
    assert list(builtin_forget_sets("cifar10")) == [str(i) for i in range(1, 11)]
    assert "1,000" in builtin_forget_sets("cifar10")["3"]
    ds = load_dataset("cifar10", str(root))
    with pytest.raises(ValueError, match=r"forget_set_2\.npy.*missing.*download_forget_sets"):
        resolve_forget_set("2", ds)
    write_forget_sets(root, {"2": [3, 17, 40], "10": [24, 6, 77, 5]})
    assert resolve_forget_set("2", ds).indices.tolist() == [3, 17, 40]
    fs = resolve_forget_set("10", ds)
    assert fs.id == "10" and fs.indices.tolist() == [24, 6, 77, 5]  # unsorted, as published
    write_forget_sets(root, {"3": [1, 1, 2]})
    with pytest.raises(ValueError, match="duplicated"):
        resolve_forget_set("3", ds)
    write_forget_sets(root, {"4": [5, 100]})  # the tiny train set has 100 samples
    with pytest.raises(ValueError, match="out of range"):
        resolve_forget_set("4", ds)


def test_job_config_plans_on_a_data_root(cifar_root):
    root, _ = cifar_root
    config = build_config(str(ROOT / "jobs" / "cifar10.toml"), data_root=str(root))
    assert (config.dataset, config.resolved_arch) == ("cifar10", "resnet9")
    assert config.resolved_recipe().lr == 0.4 and config.resolved_recipe().epochs == 24
    rng = np.random.default_rng(0)
    write_forget_sets(root, {fs: sorted(rng.choice(100, 5, replace=False).tolist()) for fs in config.forget_sets})
    plan = plan_run(config, load_dataset("cifar10", str(root)))
    originals = [u for u in plan.units if u.role == "original"]
    assert sum(u.n_models for u in originals) == config.n_models
    assert set(plan.forget_sets) == set(config.forget_sets)
