"""Plan a run, resume it, and hand the units left to the pool: the run's steps around the engine.

Temporary home: these functions are moving to ``raybench/pipeline.py``; until then they stay here unchanged, so
that the engine package keeps its old public names.

* Resume: units whose manifest exists are not planned again (docs/design.md#unit-ids-and-resume).
* An EasyDUB run (``easydub_source``) first imports the published models on the driver (``import_published``);
  its plan then holds only unlearn units to run.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import numpy as np

from raybench.config import ConfigError, RunConfig
from raybench.data import Dataset, ForgetSet, load_dataset
from raybench.easydub import EasyDubError, allocate_oracles, import_easydub, record_images
from raybench.engine.pool import EngineError, RunReport, run_units
from raybench.engine.runtime import start_ray
from raybench.plan import Plan, Unit, check_unit_sizes, make_plan, matching_oracle_count, plan_method_runs
from raybench.store import RunStore, StoreError
from raybench.versions import collect_versions

log = logging.getLogger(__name__)


def record_forget_sets(store: RunStore, plan: Plan) -> dict[str, np.ndarray]:
    """Store each forget set's indices with the run; refuse a set whose id now means other indices."""
    for fs_id, fs in plan.forget_sets.items():
        if not store.record_forget_set(fs_id, fs.description, fs.indices):
            raise ConfigError(f"forget set {fs_id!r} in {store.uri} has other indices than the one given now; "
                              "give it another name or use a new --out folder")
    return {fs_id: fs.indices for fs_id, fs in plan.forget_sets.items()}


STEPS = ("all", "train", "unlearn")


def execute(config: RunConfig, *, verbose: bool = False, progress: Callable[[str], None] | None = None,
            step: str = "all", kill_after: Callable[[Unit], bool] | None = None) -> tuple[Plan, RunStore, RunReport]:
    """Plan the run, skip finished units, run the rest on Ray; the summary is made by ``reduce`` afterwards.

    ``step``: ``"train"`` runs only the train units (originals, oracles, matching oracles), ``"unlearn"`` only
    the unlearn units, which needs the train units they start from to be committed already; ``"all"`` both.
    ``kill_after``: fault-injection tests only, passed to ``run_units`` (which says why it exists).
    """
    if step not in STEPS:
        raise ValueError(f"step must be one of {', '.join(STEPS)}, got {step!r}")
    store = RunStore(config.output_uri())
    with store.lock():  # one run at a time per folder; a refused run leaves no new folder behind
        return _execute(config, store, verbose=verbose, progress=progress, step=step, kill_after=kill_after)


def _execute(config: RunConfig, store: RunStore, *, verbose: bool, progress: Callable[[str], None] | None,
             step: str, kill_after: Callable[[Unit], bool] | None = None) -> tuple[Plan, RunStore, RunReport]:
    t0 = time.perf_counter()
    try:
        dataset = load_dataset(config.dataset, config.data_root or None)
    except ValueError as err:  # CIFAR-10 missing and offline, corrupted files: the user's to fix, exit code 2
        raise ConfigError(str(err)) from err
    check_unit_sizes(config, plan_method_runs(config), dataset.n_train + dataset.n_val)  # before any import
    versions = collect_versions()  # recorded in run.json, never part of its identity
    if config.easydub_source:
        plan = make_plan(config, dataset, import_published(config, dataset, store))
        run_id = store.open_run(config.identity(), versions)
    else:
        plan = make_plan(config, dataset)
        run_id = store.open_run({**config.identity(), "data": dataset.fingerprint()}, versions)
        store.write_json(store.path("dataset.json"), {
            "name": dataset.name, "fingerprint": dataset.fingerprint(), "n_train": dataset.n_train,
            "n_val": dataset.n_val, "source_train": dataset.source_train.tolist(),
            "source_val": dataset.source_val.tolist()})
    forget_indices = record_forget_sets(store, plan)
    store.clean_uncommitted()  # leftovers of an interrupted driver or a killed worker: never committed, never read
    done = store.completed_units()
    store.verify_units(done[u.id] for u in plan.units if u.id in done)  # a damaged unit is refused, not built on
    missing = [u.id for u in plan.units if u.kind == "import" and u.id not in done]
    if missing:  # the plan and the import disagree on unit ids: a bug, never something to train around
        raise StoreError(f"{len(missing)} imported unit(s) the plan needs are not in {store.uri}: {missing[:3]}")
    selected = [u for u in plan.units if step == "all" or u.kind == step]
    todo = [u for u in selected if u.id not in done]
    waiting = {dep for u in todo for dep in u.depends_on if dep not in done}  # "all" trains them first
    if step == "unlearn" and waiting:
        raise ConfigError(f"{len(waiting)} train unit(s) that these methods start from are not in {store.uri} yet: "
                          "run `raybench train` with the same config first (or `raybench run`, which does both)")
    report = RunReport(run_id, store.uri, len(selected), len(selected) - len(todo), 0)
    say = progress or (lambda msg: log.info(msg))
    if report.units_skipped:
        skipped_models = sum(u.n_models for u in selected if u.id in done)
        say(f"resuming {store.uri}: {report.units_skipped} of {len(selected)} units ({skipped_models} models) "
            f"already complete, skipped; {len(todo)} to run")
    if todo:
        owns_ray = start_ray(config, verbose)
        try:
            run_units(todo, plan, dataset, store, run_id, forget_indices, report, say, kill_after=kill_after)
        finally:
            if owns_ray:
                import ray

                ray.shutdown()
    report.wall_s = time.perf_counter() - t0
    if report.failed:
        lines = "\n".join(f"  {uid}: {err.strip().splitlines()[-1] if err.strip() else err}"
                          for uid, err in report.failed.items())
        raise EngineError(f"{len(report.failed)} unit(s) failed (the rest are saved; rerun to retry):\n{lines}")
    return plan, store, report


def import_published(config: RunConfig, dataset: Dataset, store: RunStore) -> dict[str, ForgetSet]:
    """An EasyDUB run's first step, on the driver (``raybench.easydub``): import the published originals (with
    checkpoints unless do_nothing is the only method), the scoring oracles and the matching oracles oracle
    matching needs; return the forget sets, read from the hub files. With checkpoints, the import first checks
    on ``dataset``'s images that the published state dicts reproduce the hub's margins. Finished imports are
    skipped, so this is cheap on a rerun."""
    method_runs = plan_method_runs(config)
    n_matching = matching_oracle_count(config, method_runs)
    try:
        # the capacity check, with the n_models that fits when oracle matching's count grows with n_models
        allocate_oracles(config.n_models, matching_oracles=lambda n: matching_oracle_count(
            dataclasses.replace(config, n_models=n), method_runs))
        report = import_easydub(config.easydub_source, config.forget_sets, config.n_models, store.uri,
                                block_size=config.block_size, chunk_size=config.chunk_size,
                                matching_oracles=n_matching,
                                checkpoints=any(r.method.fn is not None for r in method_runs),  # do_nothing: none
                                images=dataset)
        record_images(store, dataset.fingerprint())
    except EasyDubError as err:
        raise ConfigError(str(err)) from err
    log.info("EasyDUB import into %s: %d units written, %d already there", store.uri, len(report.units_written),
             len(report.units_skipped))
    return {fs: ForgetSet(fs, idx, f"EasyDUB forget set {fs} ({len(idx)} train samples)")
            for fs, idx in report.forget_sets.items()}
