"""Ray-runtime plumbing: start or join Ray, size the workers to the cluster, run plain Ray tasks for the reducer.

Everything that depends on which Ray is at hand, and nothing about units, lives here, so that the environment
Ray reads before its import (docs/design.md#auth-mode, docs/design.md#connecting) is set in one place and the
sizing rules of docs/design.md#actors-and-cpus have one home.

* Determinism: the torch thread count ``worker_options`` gives depends on the cluster's shape alone, never on how
  many units are left, so a resumed or retried unit reproduces the bits of an undisturbed run.
* Reduce: ``map_tasks`` runs the reducer's per-(group, split, chunk) jobs as plain Ray tasks
  (docs/design.md#reduce-tasks); ``cluster_for_reduce`` decides whether that is worth it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator

from raybench.config import RunConfig

log = logging.getLogger(__name__)


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


def worker_options(n_units: int) -> tuple[int, dict, int]:
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
