"""The worker actor's body: one unit per call, on a device the actor holds for its lifetime.

Kept apart from the pool that drives it because this is the only engine code that runs *inside* worker processes
(Ray imports it there by name): it keeps the driver's data set resident on its device and leaves the unit itself
to the Ray-free ``units.run_unit``. Each call returns two objects, the unit's margins as an Arrow table and its
metadata, so that the table can go to Ray Data without passing through the driver.
"""

from __future__ import annotations

import os
import signal

from raybench.plan import Unit
from raybench.units import UnitContext, run_unit


class Worker:
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
        """Run ``unit``; with ``die_when_done`` (set only by fault-injection tests, see ``pool.run_units``'s
        ``kill_after``) SIGKILL this process after the unit's work is done and before its result returns."""
        result = run_unit(unit, self.ctx)
        if die_when_done:  # a worker process lost mid-unit: side effects done, nothing committed
            os.kill(os.getpid(), signal.SIGKILL)
        return result
