import numpy as np
import pytest

from raybench.metrics import STAT_NAMES, summarize


def test_summary_uses_numpy_linear_percentiles():
    v = np.arange(101, dtype=np.float64) ** 1.5
    s = summarize(v, prefix="klom_")
    assert list(s) == ["klom_" + n for n in STAT_NAMES]
    assert s["klom_mean"] == pytest.approx(v.mean())
    for q in (5, 25, 50, 75, 95, 99):
        assert s[f"klom_p{q}"] == np.percentile(v, q)
    assert summarize(np.array([0.0, 10.0]))["p95"] == pytest.approx(9.5)  # linear interpolation


@pytest.mark.parametrize("bad", [np.array([]), np.zeros((2, 2)), np.array([1.0, np.nan])])
def test_summary_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        summarize(bad)
