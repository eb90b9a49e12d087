"""Plan → Ray execution → store: the only package that talks to Ray core, one job per module.

* ``runtime``: start or join Ray, size the workers to the cluster, plain Ray tasks for the reducer (``map_tasks``).
* ``pool``: the worker actors and the dispatch loop (``run_units``): dependencies, retries, replaced actors.
* ``worker``: the actor's body, the only engine code that runs inside worker processes.
* ``writer``: one write wave, finished units → Parquet through Ray Data → committed units.

Imports run one way: the engine imports plan, store, units, data, config and versions; only ``raybench.pipeline``
above it imports it, and reduce gets its task mapper from there instead.
Ray itself is imported only inside functions, so importing the engine starts nothing.
"""

from raybench.engine.pool import (
    FLUSH_SECONDS,
    IN_FLIGHT_PER_WORKER,
    MAX_ATTEMPTS,
    MAX_RESTART_WAIT_S,
    MAX_RESTARTS,
    RESTART_PAUSE_S,
    EngineError,
    RunReport,
    WorkerPool,
    run_units,
)
from raybench.engine.runtime import cluster_for_reduce, map_tasks, prepare_ray_environment, start_ray, worker_options
from raybench.engine.worker import Worker
from raybench.engine.writer import write_wave

__all__ = [
    "FLUSH_SECONDS", "IN_FLIGHT_PER_WORKER", "MAX_ATTEMPTS", "MAX_RESTARTS", "MAX_RESTART_WAIT_S", "RESTART_PAUSE_S",
    "EngineError", "RunReport", "Worker", "WorkerPool", "cluster_for_reduce", "map_tasks", "prepare_ray_environment",
    "run_units", "start_ray", "worker_options", "write_wave",
]
