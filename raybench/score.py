"""Score margins computed elsewhere against a run's oracles: EasyDUB's workflow, in one call.

A method run in another code base gives its models' margins per split (``raybench.sources.files`` has the
conventions); ``score`` compares them with the oracles of one forget set of a trained or imported run folder and
returns the summary rows a run would have for them (``raybench.reduce.SUMMARY_COLUMNS``), computed by the same
code: reduce's oracle reading and checks, the KLOM kernel and reduce's row builder. KLOM is per sample, so the
rows equal, bit for bit, what ``raybench reduce`` gives once the same margins are stored in the run. The field's
other metrics (``raybench.field_metrics.FIELD_COLUMNS``) are left blank here: they pair models by id with the run's
oracles and originals, which margins computed elsewhere do not carry.

The top level imports nothing heavy: ``raybench/__init__.py`` imports ``score`` from here, so that
``import raybench`` stays cheap and ``raybench.score`` is always this function (importing a submodule named like
the function later would otherwise rebind the package attribute to the module).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

    from raybench.reduce import OracleViews
    from raybench.store import RunStore

DEFAULT_METHOD = "external"


def score(unlearned: Mapping[str, np.ndarray], against: str | RunStore, forget_set: str, *,
          top1: Mapping[str, np.ndarray] | None = None, method: str = DEFAULT_METHOD,
          params: Mapping | str | None = None, epoch: int | None = None) -> list[dict]:
    """Summary rows (retain, forget, val) of ``unlearned`` against the oracles of ``forget_set`` in the run folder
    ``against`` (a path, a pyarrow URI or a ``RunStore``).

    ``unlearned`` maps ``retain``, ``forget``, ``val`` to (models, samples) float margins: retain in ascending
    train-id order (train minus the forget set), forget in the forget set's own order (``forget_sets/<id>.json``),
    val in data-set order; the same models ≥ 2 in each. ``top1`` holds their top-1 margins (same shapes) and
    gives the accuracy column, which is otherwise empty. ``method``, ``params`` (a dict or a JSON object) and
    ``epoch`` only label the rows; ``grad_samples`` is empty (the work done elsewhere is not known).

    Raises ``SourceError`` for bad matrices and ``StoreError`` for a folder that is not a run of this format
    version, an unknown forget set or incomplete oracles (both ``ValueError``, one line).
    """
    from raybench.reduce import read_oracles
    from raybench.sources.files import check_unlearned

    labels = _labels(method, params, epoch)
    oracles = read_oracles(_store(against), str(forget_set))
    margins, top1_margins = check_unlearned(dict(unlearned), None if top1 is None else dict(top1),
                                            **_sizes(oracles))
    return _rows(oracles, margins, top1_margins, *labels)


def score_folder(folder: str | Path, against: str | RunStore, forget_set: str, *, method: str = DEFAULT_METHOD,
                 params: Mapping | str | None = None, epoch: int | None = None) -> list[dict]:
    """``score`` of a folder of .npy matrices (``raybench.sources.files.read_unlearned_dir``: ``retain.npy``,
    ``forget.npy``, ``val.npy``, optionally their ``*_top1.npy``), checked against the run's split sizes."""
    from raybench.reduce import read_oracles
    from raybench.sources.files import SPLITS, TOP1_SUFFIX, read_unlearned_dir

    labels = _labels(method, params, epoch)
    oracles = read_oracles(_store(against), str(forget_set))
    matrices = read_unlearned_dir(folder, **_sizes(oracles))
    top1 = {s: matrices[f"{s}{TOP1_SUFFIX}"] for s in SPLITS} if f"retain{TOP1_SUFFIX}" in matrices else None
    return _rows(oracles, {s: matrices[s] for s in SPLITS}, top1, *labels)


def _store(against: str | RunStore) -> RunStore:
    from raybench.store import RunStore, StoreError

    if isinstance(against, RunStore):
        return against
    if not isinstance(against, str | Path):
        raise StoreError(f"against must be a run folder (a path, URI or RunStore), got {type(against).__name__}")
    return RunStore(str(against))


def _sizes(oracles: OracleViews) -> dict[str, int]:
    sizes = oracles.sizes
    return {"n_retain": sizes["retain"], "n_forget": sizes["forget"], "n_val": sizes["val"]}


def _labels(method: str, params: Mapping | str | None, epoch: int | None) -> tuple[str, str, int | None]:
    """(method, canonical params JSON, epoch) for the rows, checked before anything is read."""
    import json

    from raybench.ids import canonical_json
    from raybench.sources.files import SourceError

    if not isinstance(method, str) or not method.strip() or method != method.strip():
        raise SourceError(f"method must be a non-empty name without surrounding spaces, got {method!r}")
    if isinstance(params, str):
        try:
            params = json.loads(params)
        except json.JSONDecodeError as err:
            raise SourceError(f"params {params!r} is not JSON: {err}") from None
    params = {} if params is None else params
    if not isinstance(params, Mapping):
        raise SourceError(f"params must be a JSON object (a dict), got {type(params).__name__}")
    try:
        text = canonical_json(dict(params))
    except (TypeError, ValueError) as err:
        raise SourceError(f"params must be JSON values: {err}") from None
    if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0):
        raise SourceError(f"epoch must be a non-negative integer or None, got {epoch!r}")
    return method, text, epoch


def _rows(oracles: OracleViews, margins: dict[str, np.ndarray], top1: dict[str, np.ndarray] | None,
          method: str, params: str, epoch: int | None) -> list[dict]:
    """Per view, KLOM and accuracy per sample as reduce's chunk jobs compute them, then reduce's row builder; the
    interval's half-samples are drawn from the same identity (forget set, method, params) as reduce draws them."""
    from raybench.metrics import klom_details, klom_replicates
    from raybench.reduce import SUMMARY_COLUMNS, _top1_accuracy, interval_draws, summary_row

    rows = []
    for view, oracle in oracles.margins.items():
        result = klom_details(margins[view], oracle)
        n_models, width = margins[view].shape
        correct = _top1_accuracy(None if top1 is None else top1[view], width)
        draws = interval_draws(n_models, oracles.n_oracles, oracles.forget_set, method, params)
        replicates = None if draws is None else klom_replicates(margins[view], oracle, draws)
        row = summary_row(forget_set=oracles.forget_set, method=method, params=params, epoch=epoch, split=view,
                          n_models=n_models, n_oracles=oracles.n_oracles, values=result.values,
                          degenerate=result.degenerate, correct=correct, oracle_correct=oracles.correct[view],
                          grad_samples=None, run_id=oracles.run_id, compute_s=None, replicates=replicates)
        rows.append({k: row.get(k) for k in SUMMARY_COLUMNS})  # the field's metrics: blank (see the docstring)
    return rows
