"""The ``trained`` source: originals and oracles trained here, on Ray, from the run's own seeds.

It writes nothing itself: the plan makes train units for its ensembles (``plan.source_units``) and the engine
runs them. Its run identity is the config's (data, architecture, recipe, N, seeds) plus the data set's
fingerprint, so a folder is never resumed on other data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from raybench.plan import resolve_forget_sets
from raybench.sources.base import Source

if TYPE_CHECKING:
    from raybench.config import RunConfig
    from raybench.data import Dataset, ForgetSet
    from raybench.store import RunStore


class TrainedSource(Source):
    """Trains every ensemble; its forget sets are the config's (built-in ids or index files)."""

    name: ClassVar[str] = "trained"
    trains: ClassVar[bool] = True

    def identity(self, config: RunConfig, dataset: Dataset | None) -> dict:
        assert dataset is not None, "a trained run has its data set"
        return {**config.identity(), "data": dataset.fingerprint()}

    def forget_sets(self, config: RunConfig, dataset: Dataset | None,
                    store: RunStore | None = None) -> dict[str, ForgetSet]:
        assert dataset is not None, "a trained run has its data set"
        return resolve_forget_sets(config, dataset)

    def record_dataset(self, store: RunStore, dataset: Dataset | None) -> None:
        """``dataset.json``: the data set's sizes, fingerprint and source ids, which reduce reads."""
        assert dataset is not None
        store.record_dataset({"name": dataset.name, "fingerprint": dataset.fingerprint(),
                              "n_train": dataset.n_train, "n_val": dataset.n_val,
                              "source_train": dataset.source_train.tolist(),
                              "source_val": dataset.source_val.tolist()})
