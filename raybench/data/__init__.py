"""Data sets and forget sets: the sample ids every stored margin refers to."""

from raybench.data.datasets import DATASETS, Dataset, load_dataset
from raybench.data.forget_sets import ForgetSet, builtin_forget_sets, resolve_forget_set, validate_indices

__all__ = [
    "DATASETS",
    "Dataset",
    "ForgetSet",
    "builtin_forget_sets",
    "load_dataset",
    "resolve_forget_set",
    "validate_indices",
]
