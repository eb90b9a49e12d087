"""Stable identities: run ids, unit ids and per-model seeds derived from what defines them.

A unit id is a hash of everything that determines the unit's output, so a rerun finds finished units by id and
two configs that happen to share a unit share its result. Seeds are derived from names, not from positions in
a config, so adding a forget set or a method never changes the models of another.
"""

from __future__ import annotations

import hashlib
import json


def canonical_json(obj: object) -> str:
    """One spelling per value: sorted keys, no spaces (the form hashed and stored in ``params`` columns)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def digest(obj: object, length: int = 16) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


SEED_BITS = 31  # torch's CPU generator keeps only 32 bits of a seed, and training adds 2**31 for data order


def model_seed(base_seed: int, *name: object) -> int:
    """A seed in [0, 2**31) named by its purpose, e.g. ``model_seed(0, "oracle", "2", 17)``."""
    return int(hashlib.sha256(canonical_json([base_seed, *name]).encode()).hexdigest()[:8], 16) >> (32 - SEED_BITS)


def ensemble_seeds(base_seed: int, *name: object, n: int) -> tuple[int, ...]:
    """Seeds of the n models of one ensemble, all distinct (two equal seeds would make two identical models).

    A collision (about 1 in 1,000 ensembles of 2,000) is resolved by re-deriving that model's seed with a salt,
    which depends only on this ensemble, so seeds stay stable across configs.
    """
    seeds: list[int] = []
    used: set[int] = set()
    for k in range(n):
        seed, salt = model_seed(base_seed, *name, k), 0
        while seed in used:
            salt += 1
            seed = model_seed(base_seed, *name, k, salt)
        used.add(seed)
        seeds.append(seed)
    return tuple(seeds)
