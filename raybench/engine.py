"""Plan → Ray execution → store: the only module that talks to Ray core.

* A pool of worker actors (one GPU each when the cluster has GPUs, else fractional CPUs so that Ray Data always
  finds a free CPU, RAY.md §5.1) keeps the data set resident and runs one *unit* (a stacked block of models) per
  call. Calls return two objects: the unit's margins as an Arrow table and its metadata.
* As units finish, their tables go into a Ray Dataset (``from_arrow_refs``, no copy through the driver) that is
  written to Parquet (``partition_cols=["unit"]``) under ``staging/``; each unit is then committed (moved into
  its hive folder, manifest written last). Writing happens in waves while the actors keep training.
* Faults: actors restart (``max_restarts``) but never re-run a crashing call (``max_task_retries=0``, the poison
  pill of RAY.md §6); the driver resubmits a unit whose actor died, up to ``MAX_ATTEMPTS`` times. An exception
  raised by the unit's own code is not retried: it is recorded and reported, and every other unit still runs.
* Resume: units whose manifest exists are not planned again.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from raybench.config import ConfigError, RunConfig
from raybench.data import load_dataset
from raybench.plan import Plan, Unit, make_plan
from raybench.store import RunStore, StoreError
from raybench.units import UnitContext, run_unit

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # per unit, counting only attempts lost to dead workers
IN_FLIGHT_PER_WORKER = 2  # one running, one queued: the worker never waits for the driver
FLUSH_SECONDS = 5.0  # write finished units at least this often


class EngineError(RuntimeError):
    """Some units failed; the others are committed and a rerun retries only the failed ones."""


@dataclass
class RunReport:
    run_id: str
    out: str
    units_total: int
    units_skipped: int
    units_run: int
    failed: dict[str, str] = field(default_factory=dict)
    wall_s: float = 0.0
    compute_s: float = 0.0  # inside units: training / unlearning
    unit_s: float = 0.0  # inside units: everything (training, margins, checkpoints)
    n_workers: int = 0
    models_trained: int = 0

    def model_share(self) -> float:
        """Fraction of the workers' wall time spent inside units (the rest is Ray, I/O and waiting)."""
        return self.unit_s / (self.n_workers * self.wall_s) if self.n_workers and self.wall_s else float("nan")


def prepare_ray_environment() -> None:
    """Environment Ray reads at import/start: set before ``import ray`` (RAY.md §4, §13)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_SCHEDULER_EVENTS", "0")
    if not os.environ.get("RAY_ADDRESS"):
        # A laptop run starts its own local Ray: one auth mode for it and any CLI used next to it.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def start_ray(config: RunConfig, verbose: bool = False) -> bool:
    """Join ``config.address``/``RAY_ADDRESS`` or start a local Ray; return True if we started (and own) it."""
    prepare_ray_environment()
    import ray

    if ray.is_initialized():
        return False
    address = config.address or os.environ.get("RAY_ADDRESS")
    common = {"logging_level": logging.INFO if verbose else logging.WARNING, "log_to_driver": verbose}
    if address:
        ray.init(address=address, **common)  # no resource arguments when connecting (RAY.md §3)
    else:
        ray.init(address="local", num_cpus=config.num_cpus, num_gpus=config.num_gpus, include_dashboard=False,
                 **common)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    if not verbose:
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-write INFO lines drown the progress
    return True


def record_forget_sets(store: RunStore, plan: Plan) -> dict[str, np.ndarray]:
    """Store each forget set's indices with the run; refuse a set whose id now means other indices."""
    out = {}
    for fs_id, fs in plan.forget_sets.items():
        path = store.path("forget_sets", f"{fs_id}.json")
        record = {"id": fs_id, "description": fs.description, "indices": fs.indices.tolist()}
        if store.exists(path):
            if store.read_json(path)["indices"] != record["indices"]:
                raise ConfigError(f"forget set {fs_id!r} in {store.uri} has other indices than the one given now; "
                                  "give it another name or use a new --out folder")
        else:
            store.write_json(path, record)
        out[fs_id] = fs.indices
    return out


def execute(config: RunConfig, *, verbose: bool = False,
            progress: Callable[[str], None] | None = None) -> tuple[Plan, RunStore, RunReport]:
    """Plan the run, skip finished units, run the rest on Ray; the summary is made by ``reduce`` afterwards."""
    t0 = time.perf_counter()
    dataset = load_dataset(config.dataset, config.data_root or None)
    plan = make_plan(config, dataset)
    store = RunStore(config.output_uri())
    run_id = store.open_run({**config.identity(), "data": dataset.fingerprint()})
    store.write_json(store.path("dataset.json"), {
        "name": dataset.name, "fingerprint": dataset.fingerprint(), "n_train": dataset.n_train,
        "n_val": dataset.n_val, "source_train": dataset.source_train.tolist(),
        "source_val": dataset.source_val.tolist()})
    forget_indices = record_forget_sets(store, plan)
    store.remove_dir(store.path("staging"))  # leftovers of an interrupted driver: never committed, never read
    done = store.completed_units()
    todo = [u for u in plan.units if u.id not in done]
    report = RunReport(run_id, store.uri, len(plan.units), len(plan.units) - len(todo), 0)
    say = progress or (lambda msg: log.info(msg))
    if report.units_skipped:
        say(f"resuming {store.uri}: {report.units_skipped} of {len(plan.units)} units already complete, "
            f"{len(todo)} to run")
    if todo:
        owns_ray = start_ray(config, verbose)
        try:
            _run_units(todo, plan, store, run_id, forget_indices, report, say)
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


def _worker_options(n_units: int) -> tuple[int, dict, int]:
    """How many workers, their resource options, and torch threads each (RAY.md §5)."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = float(resources.get("CPU", 1))
    if gpus:
        return min(gpus, n_units), {"num_gpus": 1, "num_cpus": 1}, max(1, int(cpus // max(gpus, 1)) - 1)
    n = max(1, min(int(cpus), n_units))
    # Hold less than all CPUs so Ray Data's tasks can always be scheduled (the silent deadlock of RAY.md §5.1).
    per_worker = max(0.0, (cpus - 1) / n)
    return n, {"num_cpus": round(per_worker, 4)}, max(1, int(cpus // n))


def _run_units(todo: list[Unit], plan: Plan, store: RunStore, run_id: str, forget_indices: dict[str, np.ndarray],
               report: RunReport, say: Callable[[str], None]) -> None:
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

    config = plan.config
    n_workers, options, threads = _worker_options(len(todo))
    report.n_workers = n_workers
    ctx_kwargs = {"run_id": run_id, "dataset": config.dataset, "data_root": config.data_root or None,
                  "arch": config.resolved_arch,
                  "recipe": config.resolved_recipe().to_dict(), "chunk_size": config.chunk_size,
                  "store_uri": store.uri, "forget_indices": forget_indices}
    ctx_ref = ray.put(ctx_kwargs)
    worker_cls = ray.remote(_Worker)
    workers = [worker_cls.options(max_restarts=2, max_task_retries=0, **options).remote(ctx_ref, threads)
               for _ in range(n_workers)]
    log.info("started %d workers (%s, %d torch threads each)", n_workers, options, threads)

    pending = deque(todo)
    in_flight: dict = {}  # meta ref -> (unit, table ref, worker index)
    load = [0] * n_workers
    attempts: dict[str, int] = {}
    finished: list[tuple[Unit, object, dict]] = []
    complete = set(store.completed_units())
    models_total = sum(u.n_models for u in todo)
    models_done = 0
    started = last_flush = time.perf_counter()

    def ready(unit: Unit) -> bool:
        available = complete | {f[0].id for f in finished}
        return all(dep in available for dep in unit.depends_on)

    try:
        while pending or in_flight:
            for _ in range(len(pending)):
                worker = min(range(n_workers), key=load.__getitem__)
                if load[worker] >= IN_FLIGHT_PER_WORKER:
                    break
                unit = pending.popleft()
                if not ready(unit):
                    pending.append(unit)
                    continue
                table_ref, meta_ref = workers[worker].run.options(num_returns=2).remote(unit)
                in_flight[meta_ref] = (unit, table_ref, worker)
                load[worker] += 1
            if not in_flight:
                raise EngineError("no unit can start: a dependency failed (see errors above)")
            ready_refs, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
            for ref in ready_refs:
                unit, table_ref, worker = in_flight.pop(ref)
                load[worker] -= 1
                try:
                    meta = ray.get(ref, timeout=60)
                except (RayActorError, GetTimeoutError) as err:
                    attempts[unit.id] = attempts.get(unit.id, 0) + 1
                    if attempts[unit.id] < MAX_ATTEMPTS:
                        log.warning("worker lost while running unit %s (%s); retrying", unit.id, type(err).__name__)
                        pending.appendleft(unit)
                    else:
                        report.failed[unit.id] = f"worker lost {MAX_ATTEMPTS} times: {err}"
                    continue
                except RayTaskError as err:
                    report.failed[unit.id] = str(err)
                    _drop_dependents(unit, pending, report)
                    continue
                finished.append((unit, table_ref, meta))
                report.units_run += 1
                report.compute_s += meta["compute_s"]
                report.unit_s += meta["wall_s"]
                report.models_trained += unit.n_models
                models_done += unit.n_models
                elapsed = time.perf_counter() - started
                rate = models_done / elapsed
                eta = (models_total - models_done) / rate if rate > 0 else float("nan")
                say(f"units {report.units_skipped + report.units_run}/{report.units_total} · "
                    f"{models_done}/{models_total} models · {rate:.1f} models/s · ETA {eta:.0f}s")
            now = time.perf_counter()
            if finished and (not in_flight or now - last_flush > FLUSH_SECONDS or _blocked_on(finished, pending)):
                _write_wave(store, finished)
                complete.update(u.id for u, _, _ in finished)
                finished.clear()
                last_flush = now
        if finished:
            _write_wave(store, finished)
    finally:
        for worker in workers:
            ray.kill(worker)


def _blocked_on(finished: list, pending: deque) -> bool:
    """True when a pending unit waits for a finished-but-unwritten one (write now rather than idle)."""
    ids = {u.id for u, _, _ in finished}
    return any(dep in ids for u in pending for dep in u.depends_on)


def _drop_dependents(unit: Unit, pending: deque, report: RunReport) -> None:
    for dependent in [u for u in pending if unit.id in u.depends_on]:
        pending.remove(dependent)
        report.failed[dependent.id] = f"skipped: the original unit {unit.id} it starts from failed"


def _write_wave(store: RunStore, finished: list[tuple[Unit, object, dict]]) -> None:
    """Ray Data writes the finished units' tables under staging/, then each unit is committed."""
    import ray

    staging = store.staging_dir()
    dataset = ray.data.from_arrow_refs([table_ref for _, table_ref, _ in finished])
    dataset.write_parquet(staging, filesystem=store.fs, partition_cols=["unit"], compression="zstd",
                          use_dictionary=False)
    staged = store.staged_unit_files(staging)
    for unit, _, meta in finished:
        if unit.id not in staged:
            raise StoreError(f"Ray Data wrote no file for unit {unit.id}")
        store.commit_unit(meta, staged[unit.id])
    store.remove_dir(store.path("staging"))


class _Worker:
    """A Ray actor (wrapped with ``ray.remote`` at run time): data resident on its device, one unit per call."""

    def __init__(self, ctx_kwargs: dict, threads: int) -> None:
        import ray
        import torch

        torch.set_num_threads(threads)
        device = "cuda" if ray.get_gpu_ids() else "cpu"  # explicit: CPU workers must not grab GPU 0 (RAY.md §5.2)
        self.ctx = UnitContext.create(**ctx_kwargs, device=device)

    def run(self, unit: Unit):
        return run_unit(unit, self.ctx)
