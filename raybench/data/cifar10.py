"""CIFAR-10 as the KLOM benchmark uses it (docs/methods.md#recipes): torchvision's files, no augmentation, fixed
normalisation.

train = the 50,000 training images and val = the 10,000 test images, in torchvision's order, so sample id ``i`` is
row ``i`` of each array (``source_* = arange``): the same ids as EasyDUB's forget sets and published margins.
Pixels go through ``ToTensor`` then ``Normalize(mean, std)`` with the published constants, done here once for the
whole array in float32 with the same float32 operations torchvision applies per image, so the values are
identical to the per-image transform (``tests/test_cifar10.py`` checks this).

The data root holds torchvision's ``cifar-10-batches-py/`` folder, and, for the built-in forget sets "1".."10",
``forget_sets/cifar10/forget_set_Z.npy``: the layout of the EasyDUB hub data set, so a local snapshot of
``easydub/EasyDUB-dataset`` can serve as the data root as it is (torchvision adds its folder beside the hub's).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raybench.data.datasets import Dataset, _frozen

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2023, 0.1994, 0.2010)
BASE_FOLDER = "cifar-10-batches-py"
FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")
ROOT_ENV = "RAYBENCH_DATA"
"""Environment variable naming the default data root (else ``~/.cache/raybench/data``)."""


@dataclass(frozen=True, eq=False)
class Cifar10Dataset(Dataset):
    """A ``Dataset`` that remembers its data root: the built-in forget sets are files under that root.

    ``root`` is where the data was read from, not part of the data: it is not in ``fingerprint()``.
    """

    root: str = ""


def default_root() -> Path:
    """``$RAYBENCH_DATA`` if set, else ``~/.cache/raybench/data``: where ``load_dataset("cifar10")`` looks."""
    return Path(os.environ.get(ROOT_ENV) or Path.home() / ".cache" / "raybench" / "data").expanduser()


def resolve_root(root: str | os.PathLike | None) -> Path:
    return Path(root).expanduser() if root else default_root()


def files_present(root: Path) -> bool:
    """Whether every file torchvision reads is there (their checksums are verified when they are read)."""
    return all((root / BASE_FOLDER / name).is_file() for name in FILES)


def normalize(images_hwc: np.ndarray) -> np.ndarray:
    """uint8 ``(n, 32, 32, 3)`` -> float32 ``(n, 3, 32, 32)``: ``ToTensor`` (÷255) then ``Normalize(MEAN, STD)``.

    Every step is the float32 operation torchvision performs (``x.float().div(255)``, ``.sub_(mean).div_(std)``
    with float32 mean/std), so the result equals the per-image transform bit for bit.
    """
    x = images_hwc.transpose(0, 3, 1, 2).astype(np.float32)
    x /= np.float32(255)
    x -= np.asarray(MEAN, dtype=np.float32)[:, None, None]
    x /= np.asarray(STD, dtype=np.float32)[:, None, None]
    return x


def load_cifar10(root: str | os.PathLike | None = None) -> Cifar10Dataset:
    """CIFAR-10 from ``root`` (see ``default_root``), downloading it there first only if files are missing.

    A present but corrupted file set is an error, not a silent re-download; a missing one that cannot be
    downloaded (offline) is an error naming the root and how to fill it.
    """
    from torchvision.datasets import CIFAR10

    path = resolve_root(root)
    present = files_present(path)
    try:
        if not present:
            path.mkdir(parents=True, exist_ok=True)
        train = CIFAR10(str(path), train=True, download=not present)
        val = CIFAR10(str(path), train=False, download=False)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; torchvision raises RuntimeError on checksums
        if present:
            raise ValueError(f"CIFAR-10 files in {path / BASE_FOLDER} are corrupted or unreadable ({err}); "
                             f"delete that folder to download them again") from err
        raise ValueError(
            f"CIFAR-10 is not in {path} (no {BASE_FOLDER}/ with {', '.join(FILES)}) and could not be downloaded "
            f"({type(err).__name__}: {err}). Download it on a machine with internet access, e.g. "
            f"`python -c \"import torchvision; torchvision.datasets.CIFAR10('{path}', download=True)\"`, and copy "
            f"the folder there, or give another data root (data_root in the run config, or ${ROOT_ENV})"
        ) from err
    n_train, n_val = len(train.targets), len(val.targets)
    return _frozen(Cifar10Dataset(
        name="cifar10",
        x_train=normalize(np.asarray(train.data)),
        y_train=np.asarray(train.targets, dtype=np.int64),
        x_val=normalize(np.asarray(val.data)),
        y_val=np.asarray(val.targets, dtype=np.int64),
        num_classes=10,
        source_train=np.arange(n_train, dtype=np.int64),
        source_val=np.arange(n_val, dtype=np.int64),
        root=str(path),
    ))


def forget_set_path(root: str | os.PathLike | None, set_id: str) -> Path:
    """Where EasyDUB's forget set ``set_id`` lives under a data root (the hub's own layout)."""
    return resolve_root(root) / "forget_sets" / "cifar10" / f"forget_set_{set_id}.npy"
