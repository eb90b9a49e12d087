"""KLOM must equal the published reference bit for bit (docs/metrics.md#klom), and fail loudly on bad input."""

import importlib
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from klom_reference import reference_klom, reference_sample

from raybench.metrics import klom, klom_details

klom_module = importlib.import_module("raybench.metrics.klom")  # the module, not the function it exports

RNG = np.random.default_rng(20261123)


def _cases():
    n = 400
    yield "gaussian-f32", RNG.normal(0, 1, (100, n)).astype(np.float32), RNG.normal(0, 1, (100, n)).astype(np.float32)
    yield "gaussian-f64", RNG.normal(0, 1, (100, n)), RNG.normal(0, 1, (100, n))
    yield "shifted", RNG.normal(2, 1, (100, n)).astype(np.float32), RNG.normal(0, 1, (100, n)).astype(np.float32)
    yield "disjoint", RNG.uniform(10, 11, (50, n)).astype(np.float32), RNG.uniform(-11, -10, (50, n)).astype(np.float32)
    # integers spanning exactly 20 units: every edge is an integer, so many values sit on interior edges
    ints_u = RNG.integers(0, 21, (60, n)).astype(np.float32)
    ints_o = RNG.integers(0, 21, (60, n)).astype(np.float32)
    ints_u[0], ints_o[0] = 0, 20  # pin the range to 0..20
    yield "ties-on-edges", ints_u, ints_o
    yield "coarse-ties", np.round(RNG.normal(0, 2, (40, n))).astype(np.float32), np.round(RNG.normal(0, 2, (40, n)))
    yield "beyond-clip", RNG.normal(0, 150, (50, n)).astype(np.float32), RNG.normal(30, 150, (50, n)).astype(np.float32)
    const = np.full((20, n), 3.25, np.float32)
    yield "constant", const, const.copy()
    yield "constant-vs-spread", const, RNG.normal(3, 1, (20, n)).astype(np.float32)
    yield "unequal-counts", RNG.normal(0, 1, (37, n)).astype(np.float32), RNG.normal(0, 1, (113, n)).astype(np.float32)
    yield "one-model-each", RNG.normal(0, 1, (1, n)).astype(np.float32), RNG.normal(0, 1, (1, n)).astype(np.float32)
    yield "tiny-range", (1e6 + RNG.integers(0, 3, (30, n))).astype(np.float32), np.full((30, n), 1e6, np.float32)


@pytest.mark.parametrize("name,u,o", list(_cases()), ids=[c[0] for c in _cases()])
@pytest.mark.parametrize("variant", ["easydub", "closed"])
def test_parity_with_reference_is_exact(name, u, o, variant):
    fast = klom(u, o, variant=variant)
    slow = reference_klom(u, o, closed=(variant == "closed"))
    assert fast.dtype == np.float64 and fast.shape == (u.shape[1],)
    np.testing.assert_array_equal(fast, slow)  # bit for bit, not within a tolerance


def test_parity_across_chunk_boundaries(monkeypatch):
    monkeypatch.setattr(klom_module, "_CHUNK", 300)
    u = RNG.normal(0.3, 1, (64, 1000)).astype(np.float32)
    o = RNG.normal(0, 1, (64, 1000)).astype(np.float32)
    np.testing.assert_array_equal(klom(u, o), reference_klom(u, o))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 12), st.integers(1, 12), st.integers(1, 6), st.integers(0, 2**32 - 1),
    st.sampled_from([np.float32, np.float64]), st.sampled_from([1, 3, 7, 20, 23]),
)
def test_property_parity(n_u, n_o, n_samples, seed, dtype, bins):
    rng = np.random.default_rng(seed)
    values = np.array([-150.0, -100.0, -3.5, -1.0, 0.0, 0.1, 1.0, 2.0, 7.25, 100.0, 250.0], dtype)
    u = rng.choice(values, (n_u, n_samples)) + rng.integers(0, 2) * rng.normal(0, 1, (n_u, n_samples)).astype(dtype)
    o = rng.choice(values, (n_o, n_samples))
    np.testing.assert_array_equal(klom(u, o, bins=bins), reference_klom(u, o, bins=bins))


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 9), st.integers(1, 9), st.integers(1, 40), st.integers(0, 2**32 - 1),
    st.sampled_from([np.float32, np.float64]), st.sampled_from([np.float32, np.float64]),
    st.booleans(), st.booleans(), st.booleans(), st.booleans(),
)
def test_any_mix_of_read_only_and_memory_orders_matches_the_reference(n_u, n_o, n, seed, dtype_u, dtype_o,
                                                                      frozen_u, frozen_o, fortran_u, fortran_o):
    """Arrow hands reduce read-only matrices, a concatenation of chunks is writable, a transposed view is
    F-ordered: every combination must score as the reference does (a numba typing error once hid here)."""
    rng = np.random.default_rng(seed)
    u = rng.normal(0.5, 2, (n_u, n)).astype(dtype_u)
    o = rng.normal(0, 2, (n_o, n)).astype(dtype_o)
    expected = reference_klom(u, o) if dtype_u == dtype_o == np.float32 else reference_klom(
        u.astype(np.float64), o.astype(np.float64))
    views = []
    for a, frozen, fortran in ((u, frozen_u, fortran_u), (o, frozen_o, fortran_o)):
        a = np.asfortranarray(a) if fortran else a.copy()
        a.flags.writeable = not frozen
        views.append(a)
    np.testing.assert_array_equal(klom_details(*views).values, expected)


def test_identical_ensembles_score_zero():
    x = RNG.normal(0, 1, (100, 200)).astype(np.float32)
    assert np.all(klom(x, x) == 0.0)


def test_mass_in_a_bin_the_oracle_leaves_empty_scores_ln_1e5():
    u = np.full((50, 3), 5.0, np.float32)
    o = np.vstack([np.full((49, 3), -5.0), np.full((1, 3), 6.0)]).astype(np.float32)
    np.testing.assert_allclose(klom(u, o), math.log(1e5))


def test_all_unlearned_on_top_edge_is_a_flagged_zero():
    """The reference drops values equal to the pooled maximum: P is empty and KLOM is a false perfect 0."""
    u = np.full((10, 4), 120.0, np.float32)  # clipped to 100 = the top edge
    o = RNG.normal(0, 1, (10, 4)).astype(np.float32)
    result = klom_details(u, o)
    assert np.all(result.values == 0.0)
    assert result.degenerate.all() and result.n_degenerate == 4
    assert np.all(result.dropped_unlearned == 10) and np.all(result.dropped_oracle == 0)
    closed = klom_details(u, o, variant="closed")  # keeping the top edge exposes the difference
    assert closed.n_degenerate == 0 and np.all(closed.values > 10)


def test_dropped_counts_match_top_edge_ties():
    u = np.array([[0.0], [1.0], [3.0], [3.0]], np.float32)
    o = np.array([[3.0], [2.0]], np.float32)
    result = klom_details(u, o)
    assert result.dropped_unlearned.tolist() == [2] and result.dropped_oracle.tolist() == [1]
    assert result.n_degenerate == 0


def test_all_values_equal_scores_zero():
    x = np.full((5, 3), -2.0)
    assert np.all(klom(x, x) == 0.0)


def test_large_input_is_processed_in_bounded_chunks(monkeypatch):
    calls = []
    original = klom_module._binned_terms

    def spy(u, o, s0, s1, *rest):
        calls.append((s0, s1))
        return original(u, o, s0, s1, *rest)

    monkeypatch.setattr(klom_module, "_binned_terms", spy)
    monkeypatch.setattr(klom_module, "_CHUNK", 100)
    klom(np.zeros((3, 250), np.float32), np.ones((3, 250), np.float32))
    assert calls == [(0, 100), (100, 200), (200, 250)]


@pytest.mark.parametrize(
    "u,o,message",
    [
        (np.zeros((3, 4)), np.zeros((3, 5)), "sample counts differ"),
        (np.zeros((0, 4)), np.zeros((3, 4)), "empty"),
        (np.zeros((3, 0)), np.zeros((3, 0)), "empty"),
        (np.zeros(4), np.zeros((3, 4)), "shape"),
        (np.array([[0.0, np.nan]]), np.zeros((1, 2)), "NaN/inf.*sample 1"),
        (np.zeros((1, 2)), np.array([[np.inf, 0.0]]), "oracle margins contain NaN/inf"),
        (np.array([["a"]]), np.zeros((1, 1)), "numeric"),
    ],
)
def test_bad_input_raises_clear_value_error(u, o, message):
    with pytest.raises(ValueError, match=message):
        klom(u, o)


@pytest.mark.parametrize(
    "kwargs,message",
    [({"variant": "scipy"}, "unknown KLOM variant"), ({"bins": 0}, "bins"), ({"clip": (1, 1)}, "clip"),
     ({"eps": 0}, "eps")],
)
def test_bad_parameters_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        klom(np.zeros((2, 2)), np.zeros((2, 2)), **kwargs)


def test_float32_margins_use_float32_edges_like_numpy2():
    """NumPy 2 builds float32 edges from float32 margins; a value on such an edge falls in the upper bin.

    Found by search: edge 11 of linspace(-18.151917, 13.854443, 21) is -0.54841995 in float32 but slightly
    larger in float64, so float64 edges would put the value one bin lower and change the score.
    """
    lo, hi, on_edge = np.float32(-18.151917), np.float32(13.854443), np.float32(-0.54841995)
    u = np.array([[lo], [on_edge], [on_edge], [hi]], np.float32)
    o = np.array([[lo], [hi], [-0.5], [-0.5]], np.float32)
    fast = klom(u, o)
    np.testing.assert_array_equal(fast, reference_klom(u, o))
    assert fast[0] != reference_klom(u.astype(np.float64), o.astype(np.float64))[0]


# -- the reversed direction: KL(oracle ‖ unlearned), DUB run.py's (docs/metrics.md#variants) -------------------------
@pytest.mark.parametrize("name,u,o", list(_cases()), ids=[c[0] for c in _cases()])
@pytest.mark.parametrize("variant", ["easydub", "closed"])
def test_reversed_direction_is_the_restated_definition_with_p_from_the_oracles(name, u, o, variant):
    """Per sample, P = the oracles' histogram and Q = the unlearned one, every other step as restated."""
    expected = np.array([reference_sample(o[:, i], u[:, i], closed=(variant == "closed")) for i in range(u.shape[1])])
    got = klom(u, o, variant=variant, direction="oracle-unlearned")
    np.testing.assert_array_equal(got, expected)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 12), st.integers(1, 12), st.integers(1, 6), st.integers(0, 2**32 - 1),
    st.sampled_from([np.float32, np.float64]), st.sampled_from([1, 3, 20]),
)
def test_property_reversed_direction(n_u, n_o, n_samples, seed, dtype, bins):
    rng = np.random.default_rng(seed)
    values = np.array([-150.0, -100.0, -3.5, -1.0, 0.0, 0.1, 1.0, 2.0, 7.25, 100.0, 250.0], dtype)
    u = rng.choice(values, (n_u, n_samples))
    o = rng.choice(values, (n_o, n_samples)) + rng.integers(0, 2) * rng.normal(0, 1, (n_o, n_samples)).astype(dtype)
    expected = np.array([reference_sample(o[:, i], u[:, i], bins=bins) for i in range(n_samples)])
    result = klom_details(u, o, bins=bins, direction="oracle-unlearned")
    np.testing.assert_array_equal(result.values, expected)
    # dropped counts stay named by ensemble, whichever defines P
    lo = np.minimum(np.clip(u, -100, 100).min(axis=0), np.clip(o, -100, 100).min(axis=0))
    hi = np.maximum(np.clip(u, -100, 100).max(axis=0), np.clip(o, -100, 100).max(axis=0))
    hi = np.where(lo >= hi, lo + 1, hi)  # one value in every model: the range is [lo, lo + 1), nothing dropped
    for ensemble, dropped in ((u, result.dropped_unlearned), (o, result.dropped_oracle)):
        assert dropped.tolist() == (np.clip(ensemble, -100, 100) == hi).sum(axis=0).tolist()


def test_reversed_direction_flags_an_empty_oracle_histogram_not_an_empty_unlearned_one():
    """Degenerate = P empty: in the reversed direction, every oracle value on the top edge."""
    rng = np.random.default_rng(7)
    on_top = np.full((10, 4), 120.0, np.float32)  # clipped to 100 = the top edge
    spread = rng.normal(0, 1, (10, 4)).astype(np.float32)
    flagged = klom_details(spread, on_top, direction="oracle-unlearned")  # oracles on the edge: P empty
    assert np.all(flagged.values == 0.0) and flagged.degenerate.all() and flagged.n_degenerate == 4
    assert np.all(flagged.dropped_oracle == 10) and np.all(flagged.dropped_unlearned == 0)
    real = klom_details(on_top, spread, direction="oracle-unlearned")  # unlearned on the edge: Q empty, a real gap
    assert real.n_degenerate == 0 and np.all(real.values > 10)
    assert klom_details(on_top, spread).n_degenerate == 4  # the default direction flags that one


def test_the_two_directions_differ_and_the_default_is_unlearned_oracle():
    rng = np.random.default_rng(3)
    u = rng.normal(1.5, 0.5, (40, 300)).astype(np.float32)
    o = rng.normal(0, 2, (40, 300)).astype(np.float32)
    np.testing.assert_array_equal(klom(u, o), klom(u, o, direction="unlearned-oracle"))
    np.testing.assert_array_equal(klom(u, o, direction="oracle-unlearned"), klom(o, u))
    assert not np.array_equal(klom(u, o), klom(u, o, direction="oracle-unlearned"))


def test_unknown_direction_is_refused():
    with pytest.raises(ValueError, match="unknown KL direction"):
        klom(np.zeros((2, 2)), np.zeros((2, 2)), direction="symmetric")
