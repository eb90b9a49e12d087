"""Data sets and forget sets: the sample ids every stored result refers to must never drift."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from sklearn.datasets import load_digits

from raybench.data import (
    DATASETS,
    ForgetSet,
    builtin_forget_sets,
    load_dataset,
    resolve_forget_set,
    validate_indices,
)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


# -- datasets --------------------------------------------------------------------------------------


def test_digits_shapes_and_dtypes(digits):
    assert DATASETS == ("digits", "cifar10")
    assert digits.name == "digits" and digits.num_classes == 10
    assert digits.input_shape == (1, 8, 8)
    assert digits.x_train.shape == (1437, 1, 8, 8) and digits.x_val.shape == (360, 1, 8, 8)
    assert digits.x_train.dtype == digits.x_val.dtype == np.float32
    for arr in (digits.y_train, digits.y_val, digits.source_train, digits.source_val):
        assert arr.dtype == np.int64
    assert len(digits.y_train) == len(digits.source_train) == 1437
    assert len(digits.y_val) == len(digits.source_val) == 360


def test_digits_split_is_sorted_disjoint_and_pinned(digits):
    assert np.all(np.diff(digits.source_train) > 0) and np.all(np.diff(digits.source_val) > 0)
    both = np.concatenate([digits.source_train, digits.source_val])
    assert np.array_equal(np.sort(both), np.arange(1797))
    # Pinned: if scikit-learn's split ever changes, every stored sample id would silently change meaning.
    assert digits.source_val[:6].tolist() == [21, 24, 28, 34, 35, 37]
    assert int(digits.source_val.sum()) == 337944


def test_digits_split_is_stratified(digits):
    total = np.bincount(load_digits().target, minlength=10)
    val = np.bincount(digits.y_val, minlength=10)
    assert np.all(np.abs(val - 0.2 * total) <= 1)


def test_digits_rows_match_source_and_use_train_statistics(digits):
    raw = load_digits()
    assert np.array_equal(digits.y_train, raw.target[digits.source_train])
    assert np.array_equal(digits.y_val, raw.target[digits.source_val])
    train_px = raw.images[digits.source_train] / 16.0
    mean, std = train_px.mean(), train_px.std()
    np.testing.assert_allclose(digits.x_train[:, 0], (train_px - mean) / std, atol=1e-5)
    np.testing.assert_allclose(
        digits.x_val[:, 0], (raw.images[digits.source_val] / 16.0 - mean) / std, atol=1e-5
    )
    assert abs(digits.x_train.mean()) < 1e-5 and abs(digits.x_train.std() - 1) < 1e-5


def test_dataset_is_cached_and_read_only(digits):
    assert load_dataset("digits") is digits
    with pytest.raises(ValueError, match="read-only"):
        digits.x_train[0, 0, 0, 0] = 1.0


def test_unknown_dataset():
    with pytest.raises(ValueError, match=r"unknown dataset 'x'; known: digits"):
        load_dataset("x")


def test_fingerprint_is_stable_and_sensitive(digits):
    fp = digits.fingerprint()
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fp == digits.fingerprint()
    copy = dataclasses.replace(digits, x_train=digits.x_train.copy())
    assert copy.fingerprint() == fp  # content, not identity
    y = digits.y_train.copy()
    y[0] = (y[0] + 1) % 10
    assert dataclasses.replace(digits, y_train=y).fingerprint() != fp
    x = digits.x_val.copy()
    x[0, 0, 0, 0] += 1e-3
    assert dataclasses.replace(digits, x_val=x).fingerprint() != fp
    assert dataclasses.replace(digits, name="other").fingerprint() != fp


def test_dataset_rejects_inconsistent_arrays(digits):
    with pytest.raises(ValueError, match="length"):
        dataclasses.replace(digits, y_train=digits.y_train[:-1])
    with pytest.raises(ValueError, match="float32"):
        dataclasses.replace(digits, x_train=digits.x_train.astype(np.float64))


# -- built-in forget sets --------------------------------------------------------------------------


def test_builtin_ids_and_sizes(digits):
    assert list(builtin_forget_sets("digits")) == ["1", "2", "3"]
    for set_id, size in (("1", 10), ("2", 100), ("3", 40)):
        fs = resolve_forget_set(set_id, digits)
        assert isinstance(fs, ForgetSet) and fs.id == set_id and len(fs) == size
        assert fs.indices.dtype == np.int64 and np.all(np.diff(fs.indices) > 0)
        assert fs.description == builtin_forget_sets("digits")[set_id]
    with pytest.raises(ValueError, match="unknown dataset"):
        builtin_forget_sets("nope")


def test_builtin_sets_are_pinned_and_deterministic(digits):
    assert resolve_forget_set("1", digits).indices.tolist() == [
        49,
        206,
        357,
        448,
        675,
        731,
        1079,
        1180,
        1360,
        1361,
    ]
    expected2 = np.sort(np.random.default_rng(2).choice(1437, 100, replace=False))
    assert np.array_equal(resolve_forget_set("2", digits).indices, expected2)
    for set_id in ("1", "2", "3"):
        assert np.array_equal(
            resolve_forget_set(set_id, digits).indices, resolve_forget_set(set_id, digits).indices
        )


def test_builtin_set_3_is_an_atypical_class_8_cluster(digits):
    idx = resolve_forget_set("3", digits).indices
    assert np.all(digits.y_train[idx] == 8)
    eights = np.flatnonzero(digits.y_train == 8)
    flat = digits.x_train.reshape(len(digits.x_train), -1).astype(np.float64)
    prototype = eights[np.argmax(np.linalg.norm(flat[eights] - flat[eights].mean(0), axis=1))]
    assert prototype in idx
    dist = np.linalg.norm(flat[eights] - flat[prototype], axis=1)
    inside = np.isin(eights, idx)
    assert dist[inside].max() <= dist[~inside].min()  # exactly the 40 nearest eights


# -- forget-set files ------------------------------------------------------------------------------


def test_npy_file_keeps_order_and_uses_stem(tmp_path, digits):
    path = tmp_path / "my_set.npy"
    np.save(path, np.array([5, 3, 9], dtype=np.int32))
    fs = resolve_forget_set(str(path), digits)
    assert fs.id == "my_set" and fs.indices.tolist() == [5, 3, 9] and fs.indices.dtype == np.int64
    assert not fs.indices.flags.writeable


def test_txt_file_with_commas_whitespace_and_comments(tmp_path, digits):
    path = tmp_path / "hard.txt"
    path.write_text("# my hard samples\n5, 3,9\n\n  12\t7 # trailing comment\n")
    fs = resolve_forget_set(str(path), digits)
    assert fs.id == "hard" and fs.indices.tolist() == [5, 3, 9, 12, 7]


def test_file_error_messages(tmp_path, digits):
    with pytest.raises(ValueError, match=r"unknown forget set 'nope'.*built-ins: '1', '2', '3'"):
        resolve_forget_set("nope", digits)
    with pytest.raises(ValueError, match="not an existing"):
        resolve_forget_set(str(tmp_path / "missing.npy"), digits)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n")
    with pytest.raises(ValueError, match="empty"):
        resolve_forget_set(str(empty), digits)
    bad = tmp_path / "bad.txt"
    bad.write_text("1 2 x 4.5")
    with pytest.raises(ValueError, match=r"non-integer values 'x', '4.5'"):
        resolve_forget_set(str(bad), digits)
    csv = tmp_path / "set.csv"
    csv.write_text("1,2")
    with pytest.raises(ValueError, match="unsupported file type '.csv'"):
        resolve_forget_set(str(csv), digits)
    obj = tmp_path / "obj.npy"
    np.save(obj, np.array([1, "a"], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="not a plain numeric"):
        resolve_forget_set(str(obj), digits)


# -- validation ------------------------------------------------------------------------------------


def test_validate_accepts_integers_and_integral_floats():
    out = validate_indices([4, 1, 2], 10, source="t")
    assert out.dtype == np.int64 and out.tolist() == [4, 1, 2]
    assert validate_indices(np.array([3.0, 0.0]), 10, source="t").tolist() == [3, 0]
    assert validate_indices(np.array([7], dtype=np.uint8), 10, source="t").tolist() == [7]


@pytest.mark.parametrize(
    ("indices", "message"),
    [
        ([], r"src: the forget set is empty"),
        (np.array([1.0, 2.5]), r"src: non-integer values \[2.5\]"),
        (np.array([True, False]), r"src: non-integer values \(dtype bool\)"),
        (np.array(["1"]), r"src: non-integer values"),
        (
            [3, -1, 10, 12, 4],
            r"src: 3 indices out of range, first \[-1, 10, 12\]; valid train indices are 0..9",
        ),
        ([3, 4, 3, 5, 5], r"src: 2 duplicated indices: \[3, 5\]"),
        (np.random.default_rng(0).permutation(10), r"covers all 10 train samples"),
        (np.zeros((2, 2), dtype=np.int64), r"1-D .* shape \(2, 2\)"),
    ],
)
def test_validate_rejects(indices, message):
    with pytest.raises(ValueError, match=message):
        validate_indices(indices, 10, source="src")


def test_validate_names_at_most_five_bad_values():
    with pytest.raises(ValueError, match=r"first \[10, 11, 12, 13, 14, …\]"):
        validate_indices(np.arange(5, 20), 10, source="src")
