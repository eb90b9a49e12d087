"""Selection rules and the halves they are tuned and scored on (docs/metrics.md#selection-without-leaking).

A rule turns one candidate's P95 KLOM per split view (retain, forget, val) into the one number a sweep minimises.
Choosing a method's epoch or parameters by the same oracles that then score the choice flatters it (the winner's
curse over the candidates' noise), so the choice is made on a tuning half of the models and oracles and scored on
the disjoint other half. The rules and the halves live here, below the reducer, so that the run config can check a
rule's name before anything starts.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Mapping

import numpy as np

SELECT_SPLITS: tuple[str, ...] = ("retain", "forget", "val")
RULES: dict[str, Callable[[Mapping[str, float]], float]] = {
    "forget_p95": lambda p95: float(p95["forget"]),
    "mean_p95": lambda p95: float(sum(p95[s] for s in SELECT_SPLITS) / len(SELECT_SPLITS)),
    "max_p95": lambda p95: float(max(p95[s] for s in SELECT_SPLITS)),
}
"""What each rule minimises, from a candidate's P95 KLOM per split view."""
RULE_TEXT = {
    "forget_p95": "P95 KLOM on the forget split",
    "mean_p95": "mean of the retain, forget and val P95 KLOM",
    "max_p95": "largest of the retain, forget and val P95 KLOM",
}
SELECT_SEED = 0
"""Seed of the halves (recorded in summary.json's ``"selection"``)."""


def check_rule(rule: object) -> str:
    """``rule`` if it names a known rule; ``ValueError`` (one line naming the known ones) otherwise."""
    if not isinstance(rule, str) or rule not in RULES:
        raise ValueError(f"unknown selection rule {rule!r}; known: {', '.join(RULES)}")
    return rule


def rule_value(rule: str, p95: Mapping[str, float]) -> float:
    """The number ``rule`` minimises for one candidate whose P95 per split view is ``p95``."""
    return RULES[check_rule(rule)](p95)


def halves(n: int, label: str, seed: int = SELECT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(tuning, scoring) positions of an ensemble of ``n`` (counted in model-id order), ``n // 2`` each, sorted
    and disjoint: a permutation from ``SeedSequence([seed, *w])``, w the first four 32-bit words of the SHA-256 of
    ``label``; its first ``n // 2`` entries tune, the next ``n // 2`` score (one model is left out when ``n`` is
    odd, so both halves have the same size). Depends on (n, label, seed) only: every process draws the same."""
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 2:
        raise ValueError(f"an ensemble needs at least 2 models to be halved, got {n!r}")
    words = struct.unpack("<4I", hashlib.sha256(label.encode()).digest()[:16])
    order = np.random.default_rng(np.random.SeedSequence([seed, *words])).permutation(int(n))
    m = int(n) // 2
    return np.sort(order[:m]), np.sort(order[m:2 * m])


def model_label() -> str:
    """The halves' label of every scored ensemble's models (the same positions for every method and forget set,
    so the tuning models of two methods descend from the same originals)."""
    return "select\x1fmodels"


def oracle_label(forget_set: str) -> str:
    """The halves' label of one forget set's scoring oracles."""
    return f"select\x1foracle\x1f{forget_set}"
