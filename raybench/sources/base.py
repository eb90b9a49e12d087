"""The source contract: where a run's ensembles come from.

A run needs ensembles of models — originals, oracles per forget set, the matching oracles of oracle matching, the
``oracle_floor`` ensemble — and a *source* provides them. ``trained`` trains them on Ray; the published sources
(``easydub``, ``klom_models``) and ``files`` (a user's own margins) import them. The plan (``raybench.plan``)
makes every unit id and model block; a source only says which of its models hold each requested ensemble
(``model_ids``) and then provides the units the plan made (``provide``): an import source writes them into the
run folder through ``write_import_unit``, the one writer every import shares, and hands nothing to the engine; the
trained source writes nothing and hands every unit to the engine.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from raybench.plan import Ensemble
from raybench.store import Manifest, RunStore, margins_table

if TYPE_CHECKING:
    from raybench.config import RunConfig
    from raybench.data import Dataset, ForgetSet
    from raybench.plan import Unit

__all__ = ["Ensemble", "Source", "SourceError", "write_import_unit"]


class SourceError(ValueError):
    """The source cannot give what was asked (unknown source, missing files, too few models, bad shapes): exit
    code 2 in the CLI, nothing written."""


class Source(ABC):
    """Provides a run's ensembles. Subclasses set ``name`` (what ``source = "…"`` in a run config names) and
    ``trains`` (True: the plan makes train units for the engine; False: import units this source writes)."""

    name: ClassVar[str]
    trains: ClassVar[bool] = False

    def check(self, config: RunConfig) -> None:
        """Refuse, before any work, a run this source cannot provide (``SourceError``); the default refuses
        nothing."""
        return None

    def config_defaults(self) -> dict:
        """The run settings the source's models imply (``dataset``, ``arch``), for an import without a run config."""
        return {}

    @abstractmethod
    def identity(self, config: RunConfig, dataset: Dataset | None) -> dict:
        """The run identity (``RunStore.open_run``): what gives the stored units their meaning."""

    @abstractmethod
    def forget_sets(self, config: RunConfig, dataset: Dataset | None,
                    store: RunStore | None = None) -> dict[str, ForgetSet]:
        """The forget sets of the run, by id, with their indices into the train split. ``store``: the run folder,
        where an import source finds the sets an earlier import recorded (a resumed run needs no network)."""

    def model_ids(self, config: RunConfig, requests: Sequence[Ensemble]) -> dict[Ensemble, range]:
        """Which of the source's models hold each requested ensemble. No model may be in two ensembles of one forget
        set (a row would be judged by its own models); the default numbers every ensemble from 0, which is right
        for a source whose ensembles are all distinct models (trained ones have their own seeds per role)."""
        return {r: range(r.count) for r in requests}

    def sizes(self, dataset: Dataset | None) -> tuple[int, int]:
        """(train, val) samples the source's margins cover."""
        if dataset is None:
            raise SourceError(f"source {self.name} needs the data set to know its sizes")
        return dataset.n_train, dataset.n_val

    def record_dataset(self, store: RunStore, dataset: Dataset | None) -> None:
        """Record ``dataset.json`` before any unit is planned to run; an import source records it in ``provide``
        instead, once its files say how many samples they cover."""
        return None

    def notes(self, store: RunStore) -> list[str]:
        """What imports into ``store`` noticed that can make numbers differ from the publisher's (none by default)."""
        return []

    def provide(self, units: Sequence[Unit], store: RunStore, run_id: str, dataset: Dataset | None) -> list[Unit]:
        """Make ``units`` (the plan's units of this source) available: write import units that are not yet
        complete into ``store``; return the units the engine must compute."""
        return list(units)


def write_import_unit(store: RunStore, run_id: str, unit: Unit, *, source: str, epoch: int, chunk_size: int,
                      margins: dict[str, np.ndarray], top1: dict[str, np.ndarray] | None = None,
                      checkpoint: dict | None = None, extra: dict | None = None) -> None:
    """Commit one imported unit: its margins (and top-1 margins where the source has them) through the store's one
    margins writer, its checkpoint (``{"seeds", "state"}``, before the manifest, so a committed unit's checkpoint is
    always readable) and its manifest. ``extra`` adds source-specific fields to the manifest."""
    t0 = time.perf_counter()
    if checkpoint is not None and not store.exists(store.checkpoint_path(unit.id)):
        store.write_checkpoint(unit.id, checkpoint)
    model_ids = [int(i) for i in unit.model_ids]
    seeds = [int(s) for s in unit.seeds]
    table = margins_table(run=run_id, unit=unit.id, role=unit.role, method=unit.method, params=unit.params_json,
                          forget_set=unit.forget_set, model_ids=model_ids, seeds=seeds, epoch=epoch, margins=margins,
                          top1=top1, chunk_size=chunk_size)
    meta = Manifest(unit.id, "import", unit.role, unit.forget_set, unit.method, unit.params_json, [epoch],
                    model_ids, seeds, table.num_rows, wall_s=time.perf_counter() - t0,
                    extra={"source": source, **(extra or {})})
    store.write_unit(meta.to_dict(), table, row_group_size=len(model_ids))
