"""Forget sets: which train samples an unlearning method must forget.

A forget set is a list of sample ids (indices into ``dataset.x_train``). It comes either from a built-in,
pinned definition (so "forget set 2 on digits" means the same 100 samples on every machine and in every
release) or from a user's ``.npy`` / ``.txt`` file. Every set goes through ``validate_indices``: a bad index
would otherwise surface much later as a wrong KLOM score rather than an error.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raybench.data.datasets import DATASETS, Dataset

_SHOW = 5  # how many offending values an error message names


@dataclass(frozen=True, eq=False)
class ForgetSet:
    """A validated forget set. ``indices`` is read-only int64, in the order it was defined or loaded."""

    id: str
    indices: np.ndarray
    description: str

    def __len__(self) -> int:
        return len(self.indices)


def _random_subset(seed: int, size: int) -> Callable[[Dataset], np.ndarray]:
    def build(ds: Dataset) -> np.ndarray:
        return np.sort(np.random.default_rng(seed).choice(ds.n_train, size, replace=False))

    return build


def _atypical_subpopulation(label: int, size: int) -> Callable[[Dataset], np.ndarray]:
    def build(ds: Dataset) -> np.ndarray:
        members = np.flatnonzero(ds.y_train == label)
        flat = ds.x_train[members].reshape(len(members), -1).astype(np.float64)
        prototype = flat[np.argmax(np.linalg.norm(flat - flat.mean(axis=0), axis=1))]
        nearest = np.argsort(np.linalg.norm(flat - prototype, axis=1), kind="stable")[:size]
        return np.sort(members[nearest])

    return build


def _easydub_file(set_id: str) -> Callable[[Dataset], np.ndarray]:
    """EasyDUB's published CIFAR-10 forget set, read from ``<data root>/forget_sets/cifar10/`` in file order."""

    def build(ds: Dataset) -> np.ndarray:
        from raybench.data.cifar10 import forget_set_path

        path = forget_set_path(getattr(ds, "root", None), set_id)
        if not path.is_file():
            raise ValueError(
                f"forget set {set_id!r} of cifar10 is EasyDUB's file {path}, which is missing. Fetch the ten files "
                f"into the data root with `python -c \"from raybench.easydub import download_forget_sets; "
                f"download_forget_sets('{path.parents[2]}')\"` (needs internet), or copy forget_sets/cifar10/ "
                "from a snapshot of the easydub/EasyDUB-dataset hub data set"
            )
        return _read_file(path, f"EasyDUB forget-set file {str(path)!r}")

    return build


# The ten CIFAR-10 sets of the KLOM benchmark (docs/methods.md#forget-sets); the sizes come from the files themselves.
_CIFAR10_SETS = {
    "1": "10 random train samples",
    "2": "100 random train samples",
    "3": "1,000 random train samples",
    "4": "10 samples with the top projection on PC1 of the datamodel matrix",
    "5": "100 samples with the top projection on PC1 of the datamodel matrix",
    "6": "250 highest + 250 lowest samples on PC1 of the datamodel matrix",
    "7": "10 samples with the top projection on PC2 of the datamodel matrix",
    "8": "100 samples with the top projection on PC2 of the datamodel matrix",
    "9": "250 highest + 250 lowest samples on PC2 of the datamodel matrix",
    "10": "100 samples nearest in CLIP space to train sample 6 (unsorted: file order kept)",
}

# id -> (description, builder). Pinned constants: changing one changes published results, so add new ids
# instead of editing existing ones.
_BUILTINS: dict[str, dict[str, tuple[str, Callable[[Dataset], np.ndarray]]]] = {
    "digits": {
        # Set 1: a handful of random points, the easiest case (tiny, no structure).
        "1": ("10 random train samples (numpy default_rng(1), sorted)", _random_subset(1, 10)),
        # Set 2: a larger random set (about 7% of train), the usual "random forget" case.
        "2": ("100 random train samples (numpy default_rng(2), sorted)", _random_subset(2, 100)),
        # Set 3: a structured subpopulation. The class-8 sample farthest (L2) from the class-8 mean is an
        # atypical "prototype"; with its 40 nearest class-8 neighbours (itself included) it forms "the eights
        # written in one unusual style", the kind of set on which forgetting is hard and visible in KLOM.
        "3": (
            "40 class-8 train samples nearest (L2) to the class-8 sample farthest from the class-8 mean",
            _atypical_subpopulation(8, 40),
        ),
    },
    "cifar10": {
        set_id: (f"EasyDUB forget set {set_id}: {desc} (forget_sets/cifar10/forget_set_{set_id}.npy)",
                 _easydub_file(set_id))
        for set_id, desc in _CIFAR10_SETS.items()
    },
}


def builtin_forget_sets(dataset_name: str) -> dict[str, str]:
    """Built-in forget-set ids of a data set, each with a one-line description."""
    if dataset_name not in DATASETS:
        raise ValueError(f"unknown dataset {dataset_name!r}; known: {', '.join(DATASETS)}")
    return {set_id: desc for set_id, (desc, _) in _BUILTINS.get(dataset_name, {}).items()}


def resolve_forget_set(spec: str, dataset: Dataset) -> ForgetSet:
    """Turn a user's forget-set spec into a validated ``ForgetSet``.

    ``spec`` is a built-in id of ``dataset`` (built-ins win over a file of the same name) or the path of a
    ``.npy`` file (a 1-D integer array) or a ``.txt`` file (integers separated by whitespace and/or commas;
    ``#`` starts a comment). A file's set takes the file's stem as its id and keeps the file's order.
    """
    spec = str(spec)
    builtins = _BUILTINS.get(dataset.name, {})
    if spec in builtins:
        desc, build = builtins[spec]
        source = f"built-in forget set {spec!r} of {dataset.name}"
        return _make(spec, validate_indices(build(dataset), dataset.n_train, source=source), desc)
    path = Path(spec)
    if not path.is_file():
        known = ", ".join(repr(k) for k in builtins) or "none"
        raise ValueError(
            f"unknown forget set {spec!r} for dataset {dataset.name!r}: not a built-in id "
            f"(built-ins: {known}) and not an existing .npy or .txt file"
        )
    source = f"forget-set file {str(path)!r}"
    indices = validate_indices(_read_file(path, source), dataset.n_train, source=source)
    return _make(path.stem, indices, f"{len(indices)} train samples from {path}")


def validate_indices(indices: object, n_train: int, *, source: str) -> np.ndarray:
    """Check that ``indices`` is a usable forget set for a train set of ``n_train`` samples; return int64.

    Rejects, with a message naming ``source`` and the offending values: anything not 1-D, an empty set,
    non-integer values (integral floats such as ``3.0`` are accepted), indices outside ``[0, n_train)``,
    duplicates, and a set covering the whole train set (nothing would be left to retain).
    """
    arr = np.asarray(indices)
    if arr.ndim != 1:
        raise ValueError(f"{source}: expected a 1-D list of indices, got an array of shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{source}: the forget set is empty")
    if arr.dtype.kind == "f":
        bad = arr[~(np.isfinite(arr) & (arr == np.round(arr)))]
        if bad.size:
            raise ValueError(f"{source}: non-integer values {_show(bad)}; indices must be integers")
    elif arr.dtype.kind not in "iu":
        raise ValueError(f"{source}: non-integer values (dtype {arr.dtype}); indices must be integers")
    out_of_range = arr[(arr < 0) | (arr >= n_train)]
    if out_of_range.size:
        raise ValueError(
            f"{source}: {out_of_range.size} indices out of range, first {_show(out_of_range)}; "
            f"valid train indices are 0..{n_train - 1}"
        )
    out = arr.astype(np.int64)
    values, counts = np.unique(out, return_counts=True)
    if len(values) < len(out):
        dup = values[counts > 1]
        raise ValueError(f"{source}: {dup.size} duplicated indices: {_show(dup)}")
    if len(out) == n_train:
        raise ValueError(
            f"{source}: the forget set covers all {n_train} train samples, leaving nothing to retain"
        )
    return out


def _read_file(path: Path, source: str) -> np.ndarray:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as err:  # object arrays need pickle, which we refuse to run from a user file
            raise ValueError(f"{source}: not a plain numeric .npy array ({err})") from err
    if suffix == ".txt":
        text = "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines())
        tokens = [tok for tok in re.split(r"[\s,]+", text) if tok]
        bad = [tok for tok in tokens if not re.fullmatch(r"[+-]?\d+", tok)]
        if bad:
            raise ValueError(
                f"{source}: non-integer values {', '.join(map(repr, bad[:_SHOW]))}"
                f"{' …' if len(bad) > _SHOW else ''}; indices must be integers"
            )
        values = [int(tok) for tok in tokens]
        huge = [tok for tok, v in zip(tokens, values, strict=True) if not -(1 << 63) <= v < (1 << 63)]
        if huge:  # beyond int64: no train set has such an index (and numpy could not hold it)
            raise ValueError(f"{source}: indices out of range, first {', '.join(huge[:_SHOW])}")
        return np.array(values, dtype=np.int64)
    raise ValueError(f"{source}: unsupported file type {path.suffix!r}; use .npy or .txt")


def _make(set_id: str, indices: np.ndarray, description: str) -> ForgetSet:
    indices.setflags(write=False)
    return ForgetSet(id=set_id, indices=indices, description=description)


def _show(values: np.ndarray) -> str:
    head = ", ".join(str(v) for v in values[:_SHOW].tolist())
    return f"[{head}{', …' if values.size > _SHOW else ''}]"
