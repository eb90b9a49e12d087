"""A fake ``easydub/EasyDUB-dataset`` folder whose margins come from real ResNet-9s on a tiny real CIFAR-10.

Built independently of raybench's reader, so that the state dicts and the margin files agree exactly when
raybench's reading of the published layout is right: the models are this file's restatement of EasyDUB's
published ``resnet9`` (``easydub/models.py``: its module tree gives the state-dict keys), the images are
normalised here with EasyDUB's constants, margins are ``z_y - logsumexp_{j != y} z_j`` in float32 written here,
and every file holds its samples in the order the hub publishes them: pretrain "retain" = every train image in
train order, oracle retain = R ascending, forget = forget-file order, val = test order. Nothing here calls
raybench. Forward passes of a ResNet-9 are slow on the CPU, so each model's margins are computed once per
session and shared by every hub built from the same images.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from klom_reference import reference_klom
from torch import nn

EASYDUB_MEAN = (0.4914, 0.4822, 0.4465)  # easydub/data.py
EASYDUB_STD = (0.2023, 0.1994, 0.2010)
HEAD_GAIN = 20.0  # random ResNet-9 logits are ~0.05: scaled up, margins differ by units between samples and models
PREFIXES = ("model.", "module.", "")  # checkpoint key prefixes, by model id (the loader must strip any of them)


# -- EasyDUB's ResNet-9, restated ----------------------------------------------------------------------------------
class Mul(nn.Module):
    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), -1)


class Residual(nn.Module):
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.module(x)


def _conv_bn(c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1, padding: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def hub_resnet9(num_classes: int = 10) -> nn.Sequential:
    return nn.Sequential(
        _conv_bn(3, 64, kernel_size=3, stride=1, padding=1),
        _conv_bn(64, 128, kernel_size=5, stride=2, padding=2),
        Residual(nn.Sequential(_conv_bn(128, 128), _conv_bn(128, 128))),
        _conv_bn(128, 256, kernel_size=3, stride=1, padding=1),
        nn.MaxPool2d(2),
        Residual(nn.Sequential(_conv_bn(256, 256), _conv_bn(256, 256))),
        _conv_bn(256, 128, kernel_size=3, stride=1, padding=0),
        nn.AdaptiveMaxPool2d((1, 1)),
        Flatten(),
        nn.Linear(128, num_classes, bias=False),
        Mul(0.2),
    )


def hub_model(seed: int) -> nn.Sequential:
    """A published-looking model: random weights, BatchNorm statistics of real activations (so every sample gets
    its own features and a dropped buffer would show), the head scaled so margins spread over units."""
    torch.manual_seed(seed)
    model = hub_resnet9()
    noise = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 4 - 2
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None  # running statistics = the statistics of this one batch
        model.train()(noise)
        model[9].weight.mul_(HEAD_GAIN)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.1
                m.num_batches_tracked.fill_(4704)
    return model.eval()


# -- images and margins ----------------------------------------------------------------------------------------------
def hub_images(arrays: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``write_cifar_folder``'s arrays as EasyDUB feeds them: rows of 3072 channel-major uint8 pixels ÷ 255, then
    (x - mean) / std per channel; train = the five batches in order, val = the test batch."""
    mean = np.asarray(EASYDUB_MEAN, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(EASYDUB_STD, dtype=np.float32).reshape(1, 3, 1, 1)

    def images(rows: np.ndarray) -> np.ndarray:
        return (rows.reshape(-1, 3, 32, 32).astype(np.float32) / np.float32(255) - mean) / std

    train = [arrays[f"data_batch_{i}"] for i in range(1, 6)]
    return {"train": (images(np.concatenate([d for d, _ in train])), np.concatenate([y for _, y in train])),
            "val": (images(arrays["test_batch"][0]), np.asarray(arrays["test_batch"][1]))}


def margins_of(model: nn.Module, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The margin as published: the true class's logit minus the logsumexp of the others, float32."""
    with torch.no_grad():
        z = model(torch.from_numpy(x)).float()
    rows = torch.arange(len(y))
    labels = torch.from_numpy(np.asarray(y, dtype=np.int64))
    others = z.clone()
    others[rows, labels] = -torch.inf
    return (z[rows, labels] - torch.logsumexp(others, dim=1)).numpy()


_MARGINS: dict[tuple[int, str], dict[str, np.ndarray]] = {}


def model_margins(seed: int, images: dict[str, tuple[np.ndarray, np.ndarray]],
                  model: nn.Module | None = None) -> dict[str, np.ndarray]:
    """Margins of ``hub_model(seed)`` (``model``, if already built) on every train and val image, in train /
    test order; cached."""
    key = (seed, hashlib.sha256(b"".join(a.tobytes() for pair in images.values() for a in pair)).hexdigest())
    if key not in _MARGINS:
        model = hub_model(seed) if model is None else model
        _MARGINS[key] = {split: margins_of(model, *images[split]) for split in ("train", "val")}
    return _MARGINS[key]


def oracle_seed(model_id: int) -> int:
    """Oracle ``x`` of every forget set is one model (a ResNet-9 forward is what a hub costs to build); its files
    still differ per set, as each set orders the train samples its own way."""
    return 1000 + model_id


# -- the folder ------------------------------------------------------------------------------------------------------
def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, arr)


def save_checkpoint(path: Path, model: nn.Module, model_id: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = PREFIXES[model_id % len(PREFIXES)]
    torch.save({prefix + k: v for k, v in model.state_dict().items()}, path)


def _model(path: Path, seed: int, model_id: int, images: dict, real: bool) -> dict[str, np.ndarray]:
    """Write the model's checkpoint (a placeholder unless ``real``) and return its margins."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not real:
        path.write_bytes(b"not needed")
        return model_margins(seed, images)
    model = hub_model(seed)
    save_checkpoint(path, model, model_id)
    return model_margins(seed, images, model)


def build_hub(root: Path, arrays: dict, forget: dict[str, np.ndarray], *, n_hub: int,
              checkpoints: bool = False) -> Path:
    """``margins/``, ``models/``, ``forget_sets/`` (and a ``logits/`` file no import may read) for ``n_hub``
    pretrain models and ``n_hub`` oracles per forget set, pretrain model ``x`` being ``hub_model(x)`` and oracle
    ``x`` ``hub_model(oracle_seed(x))``.

    ``checkpoints``: real state dicts (else placeholder bytes, which a margins-only import must never open)."""
    images = hub_images(arrays)
    n_train = len(images["train"][1])
    m = root / "margins" / "cifar10"
    for x in range(n_hub):
        name = f"id_{x}_epoch_23"
        margins = _model(root / "models" / "cifar10" / "pretrain" / "resnet9" / f"{name}.pt", x, x, images,
                         checkpoints)
        _save(m / "pretrain" / "retain" / "resnet9" / f"{name}.npy", margins["train"])
        _save(m / "pretrain" / "val" / "resnet9" / f"{name}.npy", margins["val"])
        for fs, idx in forget.items():
            _save(m / "pretrain" / f"forget_{fs}" / "resnet9" / f"{name}.npy", margins["train"][idx])
    _save(root / "logits" / "cifar10" / "pretrain" / "val" / "resnet9" / "id_0_epoch_23.npy",
          np.zeros((len(images["val"][1]), 10), dtype=np.float32))
    for fs, idx in forget.items():
        _save(root / "forget_sets" / "cifar10" / f"forget_set_{fs}.npy", np.asarray(idx, dtype=np.int64))
        keep = np.ones(n_train, dtype=bool)
        keep[idx] = False
        retain = np.flatnonzero(keep)  # ascending
        for x in range(n_hub):
            name = f"id_{x}_epoch_23"
            margins = _model(root / "models" / "cifar10" / "oracle" / f"forget_{fs}" / "resnet9" / f"{name}.pt",
                             oracle_seed(x), x, images, checkpoints)
            folder = m / "oracle" / f"forget_{fs}"
            _save(folder / "retain" / "resnet9" / f"{name}.npy", margins["train"][retain])
            _save(folder / "forget" / "resnet9" / f"{name}.npy", margins["train"][idx])
            _save(folder / "val" / "resnet9" / f"{name}.npy", margins["val"])
    return root


def fork_hub(hub: Path, root: Path) -> Path:
    """A copy of ``hub`` made of hard links (checkpoints are tens of MB); change files only with ``replace``."""
    shutil.copytree(hub, root, copy_function=os.link)
    return root


def replace(path: Path, write: Callable[[Path], None]) -> None:
    """Write a new file at ``path`` without touching the hub it was linked from."""
    path.unlink()
    write(path)


def load(hub: Path, rel: str, ids: range) -> np.ndarray:
    """Margin files ``rel`` (with ``{x}`` for the model id) of models ``ids``, stacked."""
    return np.stack([np.load(hub / rel.format(x=x)) for x in ids])


# -- EasyDUB's evaluation, restated ----------------------------------------------------------------------------------
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


def oracle_floor_eval(hub: Path, fs: str, n: int, first: int) -> dict[str, np.ndarray]:
    """Oracles first..first+n-1 scored as if they were unlearned models, against oracles 0..n-1."""
    out = {}
    for split in ("retain", "forget", "val"):
        rel = f"margins/cifar10/oracle/forget_{fs}/{split}/resnet9/id_{{x}}_epoch_23.npy"
        out[split] = reference_klom(load(hub, rel, range(first, first + n)), load(hub, rel, range(n)))
    return out


def assert_rows_match(rows: list[dict], fs: str, method: str, expected: dict[str, np.ndarray], n: int) -> None:
    mine = {r["split"]: r for r in rows if r["forget_set"] == fs and r["method"] == method}
    assert set(mine) == {"retain", "forget", "val"}
    for split, values in expected.items():
        row = mine[split]
        assert row["n_samples"] == len(values) and row["n_models"] == row["n_oracles"] == n
        assert row["klom_mean"] == pytest.approx(float(np.mean(values)), abs=1e-9)
        for q in (5, 25, 50, 75, 95, 99):
            assert row[f"klom_p{q}"] == pytest.approx(float(np.percentile(values, q)), abs=1e-9), (split, q)
        assert row["klom_p95"] > 0  # not a vacuous comparison


def import_easydub(location, forget_sets, n_models, out, *, oracle_floor=False, **kwargs):
    """The EasyDUB import as the tests call it: ``raybench import easydub`` in Python (``pipeline.import_source``)."""
    from raybench.pipeline import import_source

    return import_source("easydub", location, forget_sets, n_models, out, floor=oracle_floor, **kwargs)
