"""The one check of a margin matrix that the metrics take: (models, samples), numeric, finite.

Every metric refuses bad input the same way, with the same words, before it computes anything.
"""

from __future__ import annotations

import numpy as np


def margin_matrix(a: object, name: str, *, min_models: int = 1) -> np.ndarray:
    """``a`` as a float64 (models, samples) array, or a ValueError saying what is wrong with it."""
    a = np.asarray(a)
    if a.ndim != 2 or a.shape[0] < min_models or a.shape[1] == 0:
        raise ValueError(f"{name} margins must have shape (models >= {min_models}, samples >= 1), got {a.shape}")
    if a.dtype.kind not in "fiu":
        raise ValueError(f"{name} margins must be numeric, got dtype {a.dtype}")
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} margins contain NaN/inf values")
    return a
