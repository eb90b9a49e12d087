"""Plan → Ray execution → store: the only module that talks to Ray core.

* A pool of worker actors (one GPU each when the cluster has GPUs, else fractional CPUs so that Ray Data always
  finds a free CPU, docs/design.md#actors-and-cpus) keeps the data set resident and runs one *unit* (a stacked block of
  models) per call. Calls return two objects: the unit's margins as an Arrow table and its metadata. The data set is the
  driver's loaded copy, put in the object store once: worker nodes need no data root.
* As units finish, their tables go into a Ray Dataset (``from_arrow_refs``, no copy through the driver) that is
  written to Parquet (``partition_cols=["unit"]``) under ``staging/``; each unit is then committed (moved into
  its hive folder, manifest written last). Writing happens in waves while the actors keep training.
* Faults: actors restart (``max_restarts``) but never re-run a crashing call (``max_task_retries=0``, the poison
  pill of docs/design.md#faults-and-retries); the driver resubmits a unit whose actor died, up to ``MAX_ATTEMPTS``
  times, and replaces an actor that has used up its restarts. A wave whose results were lost with their node is
  recomputed. An exception raised by the unit's own code is not retried: it is recorded and reported, and every other
  unit still runs.
* Determinism: a unit's output depends only on the unit (its seeds) and the torch thread count, which is fixed by
  the cluster's shape, never by how many units are left, so a resumed or retried unit reproduces the bits of an
  undisturbed run.
* Resume: units whose manifest exists are not planned again.
* Reduce: ``map_tasks`` runs the reducer's per-(group, split, chunk) jobs as plain Ray tasks
  (docs/design.md#reduce-tasks).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from raybench.config import RunConfig
from raybench.data import Dataset
from raybench.plan import Plan, Unit
from raybench.store import PARQUET_WRITE_OPTIONS, RunStore, StoreError
from raybench.units import UnitContext, run_unit

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # per unit, counting only attempts lost to dead workers (or lost results)
MAX_RESTARTS = 2  # per actor; after that the driver replaces it with a fresh one
IN_FLIGHT_PER_WORKER = 2  # one running, one queued: the worker never waits for the driver
RESTART_PAUSE_S = 0.5  # between pings of a worker that is restarting
MAX_RESTART_WAIT_S = 120.0  # a worker not answering pings for this long is replaced
FLUSH_SECONDS = 15.0  # write finished units at least this often (a killed driver loses at most this much work)

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
    units_retried: int = 0  # attempts lost to dead workers or lost results, and run again
    wall_s: float = 0.0
    compute_s: float = 0.0  # inside units: training / unlearning
    unit_s: float = 0.0  # inside units: everything (training, margins, checkpoints)
    n_workers: int = 0
    models_trained: int = 0

    def model_share(self) -> float:
        """Fraction of the workers' wall time spent inside units (the rest is Ray, I/O and waiting)."""
        return self.unit_s / (self.n_workers * self.wall_s) if self.n_workers and self.wall_s else float("nan")


def prepare_ray_environment() -> None:
    """Environment Ray reads at import/start: set before ``import ray`` (docs/design.md#auth-mode,
    docs/design.md#connecting)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_SCHEDULER_EVENTS", "0")
    if not os.environ.get("RAY_ADDRESS"):
        # A laptop run starts its own local Ray: one auth mode for it and any CLI used next to it.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def start_ray(config: RunConfig | None = None, verbose: bool = False) -> bool:
    """Join ``config.address``/``RAY_ADDRESS`` or start a local Ray; return True if we started a local Ray.

    Only a local instance is "owned" (shut down after the run): a cluster connection stays open so that the
    reducer can use the cluster too; it closes when the driver exits.
    """
    prepare_ray_environment()
    import ray

    if ray.is_initialized():
        return False
    config = config or RunConfig()
    address = config.address or os.environ.get("RAY_ADDRESS")
    common = {"logging_level": logging.INFO if verbose else logging.WARNING, "log_to_driver": verbose}
    if address:
        ray.init(address=address, **common)  # no resource arguments when connecting (docs/design.md#connecting)
    else:
        ray.init(address="local", num_cpus=config.num_cpus, num_gpus=config.num_gpus, include_dashboard=False,
                 **common)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    if not verbose:
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-write INFO lines drown the progress
    return not address


def _worker_options(n_units: int) -> tuple[int, dict, int]:
    """How many workers, their resource options, and torch threads each (docs/design.md#actors-and-cpus).

    The thread count depends on the cluster alone, not on ``n_units``: CPU results can change with the number
    of threads, and a resumed run (few units left) must reproduce the bits of an uninterrupted one.
    """
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = float(resources.get("CPU", 1))
    if gpus:
        return min(gpus, n_units), {"num_gpus": 1, "num_cpus": 1}, max(1, int(cpus // max(gpus, 1)) - 1)
    slots = max(1, int(cpus))
    n = min(slots, n_units)
    # Hold less than all CPUs so Ray Data's tasks can always be scheduled (the silent deadlock of
    # docs/design.md#actors-and-cpus).
    per_worker = max(0.0, (cpus - 1) / n)
    return n, {"num_cpus": round(per_worker, 4)}, max(1, int(cpus // slots))


class _Pool:
    """The worker actors, and which of them can take calls.

    A worker whose process died is *down* until a ``ping`` answers: Ray restarts the actor, but calls sent
    meanwhile fail (``ActorDiedError`` naming the dead process, or ``ActorUnavailableError``) and would burn the
    units' attempts for nothing. An actor that has used its restarts, or whose pings keep failing, is replaced.
    """

    def __init__(self, n: int, make: Callable[[], object]) -> None:
        self.make = make
        self.actors = [make() for _ in range(n)]
        self.load = [0] * n
        self.generation = [0] * n  # deaths seen; a call remembers the generation it was sent to
        self.down = [False] * n
        self.probe: dict = {}  # ping ref -> worker
        self.probe_failures = [0] * n
        self.retry_at = [0.0] * n

    def usable(self) -> list[int]:
        return [w for w in range(len(self.actors)) if not self.down[w]]

    def lost(self, worker: int, sent_to: int) -> None:
        """A call to ``worker`` failed because its process died (``sent_to``: the generation the call was sent
        to). One death per generation: the calls queued on a dying actor all fail together."""
        if sent_to == self.generation[worker]:
            self.generation[worker] += 1
            if self.generation[worker] % (MAX_RESTARTS + 1) == 0:
                self.replace(worker, f"died {MAX_RESTARTS + 1} times")
                return
        self.down[worker] = True

    def replace(self, worker: int, why: str) -> None:
        import ray

        log.warning("worker %d %s; replacing it", worker, why)
        ray.kill(self.actors[worker])
        self.actors[worker] = self.make()
        self.down[worker] = True  # until the new actor answers a ping
        self.probe_failures[worker] = 0

    def send_probes(self) -> None:
        now = time.monotonic()
        probing = set(self.probe.values())
        for w in range(len(self.actors)):
            if self.down[w] and w not in probing and self.retry_at[w] <= now:
                self.probe[self.actors[w].ping.remote()] = w

    def probe_done(self, ref) -> None:
        import ray
        from ray.exceptions import RayActorError

        worker = self.probe.pop(ref)
        try:
            ray.get(ref)
        except RayActorError:
            self.probe_failures[worker] += 1
            self.retry_at[worker] = time.monotonic() + RESTART_PAUSE_S
            if self.probe_failures[worker] * RESTART_PAUSE_S > MAX_RESTART_WAIT_S:
                self.replace(worker, f"did not come back within {MAX_RESTART_WAIT_S:.0f} s")
            return
        self.down[worker] = False
        self.probe_failures[worker] = 0

    def kill_all(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)


def run_units(todo: list[Unit], plan: Plan, dataset: Dataset, store: RunStore, run_id: str,
              forget_indices: dict[str, np.ndarray], report: RunReport, say: Callable[[str], None], *,
              kill_after: Callable[[Unit], bool] | None = None) -> None:
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

    config = plan.config
    n_workers, options, threads = _worker_options(len(todo))
    report.n_workers = n_workers
    ctx_kwargs = {"run_id": run_id, "dataset": dataset, "arch": config.resolved_arch,
                  "recipe": config.resolved_recipe().to_dict(), "chunk_size": config.chunk_size,
                  "store_uri": store.uri, "forget_indices": forget_indices}
    ctx_ref = ray.put(ctx_kwargs)  # held by the driver for the whole run: restarted actors read it again
    worker_cls = ray.remote(_Worker).options(max_restarts=MAX_RESTARTS, max_task_retries=0, **options)
    pool = _Pool(n_workers, lambda: worker_cls.remote(ctx_ref, threads))
    log.info("started %d workers (%s, %d torch threads each)", n_workers, options, threads)

    pending = deque(todo)
    in_flight: dict = {}  # meta ref -> (unit, table ref, worker index, worker generation)
    attempts: dict[str, int] = {}
    finished: list[tuple[Unit, object, dict]] = []
    complete = set(store.completed_units())
    models_total = sum(u.n_models for u in todo)
    models_done = 0
    started = last_flush = time.perf_counter()

    def ready(unit: Unit) -> bool:
        available = complete | {f[0].id for f in finished}
        return all(dep in available for dep in unit.depends_on)

    def retry(unit: Unit, why: str) -> None:
        attempts[unit.id] = attempts.get(unit.id, 0) + 1
        if attempts[unit.id] < MAX_ATTEMPTS:
            log.warning("unit %s: %s; retrying (attempt %d of %d)", unit.id, why, attempts[unit.id] + 1,
                        MAX_ATTEMPTS)
            report.units_retried += 1
            pending.appendleft(unit)
        else:
            report.failed[unit.id] = f"{why}, {MAX_ATTEMPTS} times"
            _drop_dependents(unit, pending, report)

    try:
        while pending or in_flight:
            pool.send_probes()
            usable = pool.usable()
            for _ in range(len(pending) if usable else 0):
                worker = min(usable, key=pool.load.__getitem__)
                if pool.load[worker] >= IN_FLIGHT_PER_WORKER:
                    break
                unit = pending.popleft()
                if not ready(unit):
                    pending.append(unit)
                    continue
                die = kill_after is not None and unit.id not in attempts and kill_after(unit)
                table_ref, meta_ref = pool.actors[worker].run.options(num_returns=2).remote(unit, die)
                in_flight[meta_ref] = (unit, table_ref, worker, pool.generation[worker])
                pool.load[worker] += 1
            if not in_flight and not finished and not pool.probe and len(usable) == n_workers:
                raise EngineError("no unit can start: a dependency failed (see errors above)")
            waiting = list(in_flight) + list(pool.probe)
            if waiting:
                ready_refs = ray.wait(waiting, num_returns=1, timeout=1.0)[0]
            else:
                ready_refs = []
                time.sleep(0.05)  # only restarting workers, between two pings
            for ref in ready_refs:
                if ref in pool.probe:
                    pool.probe_done(ref)
                    continue
                unit, table_ref, worker, sent_to = in_flight.pop(ref)
                pool.load[worker] -= 1
                try:
                    meta = ray.get(ref, timeout=60)
                except (RayActorError, GetTimeoutError) as err:
                    # ActorDiedError or, for an actor that will restart, ActorUnavailableError ("may or may not
                    # have been executed"): either way the call was sent to a worker believed alive and is lost.
                    pool.lost(worker, sent_to)
                    retry(unit, f"worker lost ({type(err).__name__})")
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
                lost = _write_wave(store, finished, config.block_size)
                for unit in lost:
                    report.units_run -= 1
                    models_done -= unit.n_models
                    retry(unit, "result lost before it was written (node lost?)")
                lost_ids = {u.id for u in lost}
                complete.update(u.id for u, _, _ in finished if u.id not in lost_ids)
                finished.clear()
                last_flush = now
    finally:
        pool.kill_all()
        if finished:  # interrupted (Ctrl-C, an error): keep what is already computed
            try:
                _write_wave(store, finished, config.block_size)
            except Exception as err:  # the exception that stopped the run matters more: log, do not raise
                log.warning("could not save %d finished unit(s) while stopping: %s", len(finished), err)


def _blocked_on(finished: list, pending: deque) -> bool:
    """True when a pending unit waits for a finished-but-unwritten one (write now rather than idle)."""
    ids = {u.id for u, _, _ in finished}
    return any(dep in ids for u in pending for dep in u.depends_on)


def _drop_dependents(unit: Unit, pending: deque, report: RunReport) -> None:
    for dependent in [u for u in pending if unit.id in u.depends_on]:
        pending.remove(dependent)
        report.failed[dependent.id] = f"skipped: the original unit {unit.id} it starts from failed"


def _write_wave(store: RunStore, finished: list[tuple[Unit, object, dict]], block_size: int) -> list[Unit]:
    """Ray Data writes the finished units' tables under staging/, then each unit is committed.

    Returns the units whose results were lost (the node holding them died before the write); the others are
    committed. A write that fails with every result still readable is a storage error and is raised.
    One row group per ``block_size`` rows: a full block's rows for one (epoch, split, chunk), so the reducer's
    chunk filter decodes one row group per file.
    """
    import ray
    from ray.exceptions import ObjectLostError, RayError

    staging = store.staging_dir()
    try:
        dataset = ray.data.from_arrow_refs([table_ref for _, table_ref, _ in finished])
        dataset.write_parquet(staging, filesystem=store.fs, partition_cols=["unit"], row_group_size=block_size,
                              **PARQUET_WRITE_OPTIONS)
    except RayError as err:
        lost: list[Unit] = []
        for unit, table_ref, _ in finished:
            try:
                ray.get(table_ref, timeout=60)
            except (ObjectLostError, RayError):
                lost.append(unit)
        if not lost:
            raise
        log.warning("%d unit result(s) lost before they were written (%s); recomputing them", len(lost),
                    type(err).__name__)
        store.remove_dir(staging)
        kept = [entry for entry in finished if entry[0] not in lost]
        return lost + (_write_wave(store, kept, block_size) if kept else [])
    staged = store.staged_unit_files(staging)
    for unit, _, meta in finished:
        if unit.id not in staged:
            raise StoreError(f"Ray Data wrote no file for unit {unit.id}")
        store.commit_unit(meta, staged[unit.id])
    store.remove_dir(staging)
    return []


def map_tasks(fn: Callable, items: list, *, max_in_flight: int | None = None) -> Iterator:
    """``fn(*item)`` for every item as plain Ray tasks; yields the results in item order (needs Ray started).

    For the reducer: one small task per (group, split, chunk) reading only its files (docs/design.md#reduce-tasks, never
    Ray Data groupby). Tasks are retried on worker loss and on ``OSError`` (object-store hiccups,
    docs/design.md#faults-and-retries). At most ``max_in_flight`` (default: the cluster's CPUs) run at once and no task
    starts more than twice that far ahead of the next result to yield, so the driver holds a bounded number of results
    however many jobs.
    """
    import ray

    remote = ray.remote(fn).options(num_cpus=1, max_retries=3, retry_exceptions=[OSError])
    limit = max_in_flight or max(1, int(ray.cluster_resources().get("CPU", 1)))
    running: dict = {}  # ref -> index
    done: dict[int, object] = {}
    submitted = next_out = 0
    while next_out < len(items):
        while submitted < len(items) and len(running) < limit and submitted < next_out + 2 * limit:
            running[remote.remote(*items[submitted])] = submitted
            submitted += 1
        if next_out not in done:
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                done[running.pop(ref)] = ray.get(ref)
        while next_out in done:
            yield done.pop(next_out)
            next_out += 1


def cluster_for_reduce(min_nodes: int = 2) -> bool:
    """Whether reducing should use Ray tasks: a Ray is running here (or ``RAY_ADDRESS`` names one, which is then
    joined) and it has at least ``min_nodes`` live nodes. On one machine the in-process reducer is as fast (the
    KLOM kernel is already multi-threaded) and starts nothing."""
    prepare_ray_environment()
    import ray

    if not ray.is_initialized():
        if not os.environ.get("RAY_ADDRESS"):
            return False
        try:
            start_ray()
        except (ConnectionError, RuntimeError, ValueError) as err:  # a stale RAY_ADDRESS must not stop a reduce
            log.warning("cannot join the Ray cluster at RAY_ADDRESS (%s); reducing in this process", err)
            return False
    return sum(1 for node in ray.nodes() if node.get("Alive")) >= min_nodes


class _Worker:
    """A Ray actor (wrapped with ``ray.remote`` at run time): data resident on its device, one unit per call."""

    def __init__(self, ctx_kwargs: dict, threads: int) -> None:
        import ray
        import torch

        torch.set_num_threads(threads)
        # explicit: CPU workers must not grab GPU 0 (docs/design.md#actors-and-cpus)
        device = "cuda" if ray.get_gpu_ids() else "cpu"
        self.ctx = UnitContext.create(**ctx_kwargs, device=device)

    def ping(self) -> bool:
        """Answered once the actor (re)started: the driver sends it units again."""
        return True

    def run(self, unit: Unit, die_when_done: bool = False) -> tuple:
        result = run_unit(unit, self.ctx)
        if die_when_done:  # the kill_after test hook of run_units: a worker process lost mid-unit
            os.kill(os.getpid(), signal.SIGKILL)
        return result
