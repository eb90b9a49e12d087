"""The worker pool and the dispatch loop: units → worker actors → write waves, surviving lost workers.

Its one job is getting every unit of a plan run exactly once to a committed result, whatever dies on the way, and
that is why it is separate from the Ray start-up (``runtime``), the actor body (``worker``) and the Parquet writer
(``writer``): the retry rules below are the engine's hardest part and read best alone.

* A pool of worker actors (one GPU each when the cluster has GPUs, else fractional CPUs so that Ray Data always
  finds a free CPU, docs/design.md#actors-and-cpus) keeps the data set resident and runs one *unit* (a stacked block
  of models) per call. The data set is the driver's loaded copy, put in the object store once: worker nodes need no
  data root. At most ``IN_FLIGHT_PER_WORKER`` calls are in flight per worker. A unit is sent only once the units it
  depends on are finished.
* Finished units are written in waves (``writer.write_wave``) while the actors keep training: when nothing is in
  flight, at least every ``FLUSH_SECONDS``, or as soon as a pending unit waits for a finished, unwritten one.
* Faults: actors restart (``max_restarts``) but never re-run a crashing call (``max_task_retries=0``, the poison
  pill of docs/design.md#faults-and-retries); the driver resubmits a unit whose actor died, up to ``MAX_ATTEMPTS``
  times, and replaces an actor that has used up its restarts. A wave whose results were lost with their node is
  recomputed. An exception raised by the unit's own code is not retried: it is recorded and reported, and every other
  unit still runs.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from raybench.data import Dataset
from raybench.engine.runtime import worker_options
from raybench.engine.worker import Worker
from raybench.engine.writer import write_wave
from raybench.plan import Plan, Unit
from raybench.store import RunStore

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


class WorkerPool:
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
              forget_indices: dict[str, np.ndarray], report: RunReport, say: Callable[[str], None],
              kill_after: Callable[[Unit], bool] | None = None, *,
              datamodel_effects: dict[str, np.ndarray] | None = None,
              memorization: np.ndarray | None = None) -> None:
    """Run ``todo`` (in dependency order) on a pool of worker actors and commit each unit; needs Ray started.

    Units lost with their worker are retried, failed ones are recorded in ``report.failed`` (with the units that
    depend on them), and everything finished is written even when the loop is interrupted.

    ``kill_after`` exists for fault-injection tests only; every normal run leaves it ``None``. It is asked, on the
    driver, about each unit's *first* attempt; when it returns True, that call tells its worker to SIGKILL itself
    after the unit's work is done (checkpoint written) and before the result returns. That is the worst moment for
    a fault, side effects done and nothing committed, and a test can only hit it reliably from inside the call.

    ``datamodel_effects`` (forget set -> (n_train, C)) and ``memorization`` ((n_train,)) are what ``--scores``
    gives methods that need them; like the forget sets' indices they reach every worker once, in its context.
    """
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

    config = plan.config
    n_workers, options, threads = worker_options(len(todo))
    report.n_workers = n_workers
    ctx_kwargs = {"run_id": run_id, "dataset": dataset, "arch": config.resolved_arch,
                  "recipe": config.resolved_recipe().to_dict(), "chunk_size": config.chunk_size,
                  "store_uri": store.uri, "forget_indices": forget_indices,
                  "datamodel_effects": datamodel_effects or {}, "memorization": memorization,
                  "execution": config.execution().to_dict()}
    ctx_ref = ray.put(ctx_kwargs)  # held by the driver for the whole run: restarted actors read it again
    worker_cls = ray.remote(Worker).options(max_restarts=MAX_RESTARTS, max_task_retries=0, **options)
    pool = WorkerPool(n_workers, lambda: worker_cls.remote(ctx_ref, threads))
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
                die = kill_after is not None and unit.id not in attempts and bool(kill_after(unit))
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
                lost = write_wave(store, finished, config.block_size)
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
                write_wave(store, finished, config.block_size)
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
