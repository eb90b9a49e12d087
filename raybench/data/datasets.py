"""Datasets as plain, normalised numpy arrays with stable sample ids.

Every result raybench stores is keyed by sample id (an index into a dataset's own train or val array), so
the split must never move: it is fixed, seeded and stratified, and the ids are sorted so that id ``i`` always
names the same source row. A run records ``Dataset.fingerprint()`` so results computed on different data can
never be silently mixed.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import numpy as np

DATASETS: tuple[str, ...] = ("digits", "cifar10")

# The split is part of the benchmark definition: changing these changes every sample id.
_VAL_FRACTION = 0.2
_SPLIT_SEED = 0


@dataclass(frozen=True, eq=False)
class Dataset:
    """A classification data set split into train and val, already normalised.

    ``x_*`` are float32 ``(n, *input_shape)``, ``y_*`` int64 ``(n,)``. ``source_*`` are the int64 indices of
    each row in the original source array, recorded with a run so a sample id can be traced back. The arrays
    are read-only because one instance is shared by every caller in the process (see ``load_dataset``); copy
    them (``torch.tensor(ds.x_train)``, ``np.array(...)``) to get a writable version. Equality is identity:
    compare ``fingerprint()`` to ask whether two datasets hold the same data.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    num_classes: int
    source_train: np.ndarray
    source_val: np.ndarray

    def __post_init__(self) -> None:
        for split in ("train", "val"):
            x, y, src = (getattr(self, f"{kind}_{split}") for kind in ("x", "y", "source"))
            if x.dtype != np.float32 or y.dtype != np.int64 or src.dtype != np.int64:
                raise ValueError(
                    f"{self.name}: {split} arrays must be float32 / int64 / int64, got "
                    f"{x.dtype} / {y.dtype} / {src.dtype}"
                )
            if not (len(x) == len(y) == len(src)):
                raise ValueError(
                    f"{self.name}: {split} arrays disagree in length: {len(x)}, {len(y)}, {len(src)}"
                )
            if len(y) and (y.min() < 0 or y.max() >= self.num_classes):
                raise ValueError(f"{self.name}: {split} labels outside [0, {self.num_classes})")
        if self.x_train.shape[1:] != self.x_val.shape[1:]:
            raise ValueError(
                f"{self.name}: train and val inputs differ in shape: "
                f"{self.x_train.shape[1:]} vs {self.x_val.shape[1:]}"
            )

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample, e.g. ``(1, 8, 8)``."""
        return tuple(int(d) for d in self.x_train.shape[1:])

    @property
    def n_train(self) -> int:
        return len(self.y_train)

    @property
    def n_val(self) -> int:
        return len(self.y_val)

    def fingerprint(self) -> str:
        """Short sha256 hex digest of the name, class count and every array (dtype, shape and bytes).

        Stored in run configs: two runs can only be compared or resumed together if they saw the same data.
        """
        return _fingerprint(self)


def _fingerprint(ds: Dataset) -> str:
    # Not cached: digits hashes in microseconds and CIFAR-10 in a fraction of a second, and a cache keyed on
    # the instance would go stale if a caller built a Dataset from arrays it later mutates.
    digest = hashlib.sha256()
    digest.update(f"{ds.name}\0{ds.num_classes}\0".encode())
    for field in ("x_train", "y_train", "x_val", "y_val", "source_train", "source_val"):
        arr = np.ascontiguousarray(getattr(ds, field))
        digest.update(f"{field}\0{arr.dtype.str}\0{arr.shape}\0".encode())
        digest.update(arr.data)
    return digest.hexdigest()[:16]


_NEEDS_ROOT: set[str] = {"cifar10"}  # data sets whose loader takes a root folder (downloads)


def load_dataset(name: str, root: str | None = None) -> Dataset:
    """Load a data set by name (cached per process, so every caller shares one read-only copy).

    ``root`` is where a downloadable data set lives (or is downloaded to); the embedded ones ignore it.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return _load_cached(name, root)


@functools.cache
def _load_cached(name: str, root: str | None) -> Dataset:
    loader = _LOADERS[name]
    return loader(root) if name in _NEEDS_ROOT else loader()


def _load_digits() -> Dataset:
    """scikit-learn's bundled 8×8 digits (1797 images, no download): the default data set for quick runs.

    Pixels (0..16) are scaled to [0, 1] and then standardised with the train split's scalar mean and std, so
    val is normalised with statistics it did not contribute to.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    raw = load_digits()
    x = (raw.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = raw.target.astype(np.int64)
    ids = np.arange(len(y), dtype=np.int64)
    src_train, src_val = train_test_split(ids, test_size=_VAL_FRACTION, stratify=y, random_state=_SPLIT_SEED)
    src_train, src_val = np.sort(src_train), np.sort(src_val)
    mean = x[src_train].mean(dtype=np.float64)
    std = x[src_train].std(dtype=np.float64)

    def norm(rows: np.ndarray) -> np.ndarray:
        return ((x[rows] - mean) / std).astype(np.float32)

    return _frozen(
        Dataset(
            name="digits",
            x_train=norm(src_train),
            y_train=y[src_train],
            x_val=norm(src_val),
            y_val=y[src_val],
            num_classes=10,
            source_train=src_train,
            source_val=src_val,
        )
    )


def _frozen(ds: Dataset) -> Dataset:
    for field in ("x_train", "y_train", "x_val", "y_val", "source_train", "source_val"):
        getattr(ds, field).setflags(write=False)
    return ds


def _load_cifar10(root: str | None) -> Dataset:
    from raybench.data.cifar10 import load_cifar10  # imported late: it imports this module

    return load_cifar10(root)


_LOADERS = {"digits": _load_digits, "cifar10": _load_cifar10}
