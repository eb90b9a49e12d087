"""Data sets and forget sets: the sample ids every stored margin refers to."""

from raybench.data.datasets import DATASETS, Dataset, load_dataset
from raybench.data.forget_sets import ForgetSet, builtin_forget_sets, resolve_forget_set, validate_indices
from raybench.data.subsets import (
    DIFFICULTY_IDS,
    difficulty_forget_sets,
    difficulty_groups,
    subset_indices,
    subset_masks,
)

__all__ = [
    "DATASETS",
    "DIFFICULTY_IDS",
    "Dataset",
    "ForgetSet",
    "builtin_forget_sets",
    "difficulty_forget_sets",
    "difficulty_groups",
    "load_dataset",
    "resolve_forget_set",
    "subset_indices",
    "subset_masks",
    "validate_indices",
]
