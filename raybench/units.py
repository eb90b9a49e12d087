"""Execute one unit: train or unlearn a stacked block of models and return its margins as an Arrow table.

Ray-free on purpose: ``engine.worker`` calls this inside worker actors, and tests and benchmarks call it in-process.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from raybench.data import Dataset, subset_indices
from raybench.methods import Method, UnlearnData, get_method
from raybench.models import StackedModel, build_stack, concat_stacks, grad_samples, reset_grad_samples
from raybench.plan import Unit
from raybench.store import Manifest, NonFiniteMargins, RunStore, margins_table
from raybench.training import (
    Execution,
    Recipe,
    compute_logits,
    compute_scores,
    margins_from_logits,
    top1_margins_from_logits,
    train_stack,
)
from raybench.versions import collect_versions

log = logging.getLogger(__name__)


@dataclass
class UnitContext:
    """What every unit of a run shares: data on the device, the store, and the run's settings."""

    run_id: str
    dataset: Dataset
    arch: str
    recipe: Recipe
    chunk_size: int
    store: RunStore
    device: torch.device
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    forget_indices: dict[str, np.ndarray]
    datamodel_effects: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # forget set -> (n_train, C)
    memorization: np.ndarray | None = None  # (n_train,) float32 scores of --scores, or None
    execution: Execution = dataclasses.field(default_factory=Execution)  # how base training runs here

    @classmethod
    def create(cls, *, run_id: str, dataset: Dataset, arch: str, recipe: dict, chunk_size: int, store_uri: str,
               forget_indices: dict[str, np.ndarray], device: str = "cpu",
               datamodel_effects: dict[str, np.ndarray] | None = None,
               memorization: np.ndarray | None = None, execution: dict | None = None) -> UnitContext:
        """``dataset`` is the driver's loaded copy (shipped through the object store): workers on other nodes
        need neither the data root nor a download, and every worker sees the very arrays the driver planned on.
        ``datamodel_effects`` and ``memorization`` are what ``--scores`` gives methods that declare
        ``needs_datamodel`` / ``needs_scores``; they are moved to the device only for such a method's unit.
        ``execution`` is ``Execution.to_dict()``: how this worker runs base training."""
        ds = dataset
        dev = torch.device(device)
        return cls(
            run_id=run_id, dataset=ds, arch=arch, recipe=Recipe(**recipe), chunk_size=chunk_size,
            store=RunStore(store_uri), device=dev,
            x_train=torch.tensor(ds.x_train, device=dev), y_train=torch.tensor(ds.y_train, device=dev),
            x_val=torch.tensor(ds.x_val, device=dev), y_val=torch.tensor(ds.y_val, device=dev),
            forget_indices=forget_indices, datamodel_effects=dict(datamodel_effects or {}),
            memorization=memorization, execution=Execution(**(execution or {})),
        )

    def retain_indices(self, forget_set: str) -> torch.Tensor:
        keep = np.ones(self.dataset.n_train, dtype=bool)
        keep[self.forget_indices[forget_set]] = False
        return torch.tensor(np.flatnonzero(keep), device=self.device)

    def new_stack(self, seeds: tuple[int, ...]) -> StackedModel:
        return build_stack(self.arch, seeds, self.dataset.input_shape, self.dataset.num_classes).to(self.device)

    def load_stack(self, unit_id: str) -> StackedModel:
        """The models a train unit checkpointed (originals, matching oracles)."""
        checkpoint = self.store.read_checkpoint(unit_id)
        stack = self.new_stack(tuple(checkpoint["seeds"]))
        stack.load_state_dict(checkpoint["state"])
        return stack

    def subset_inputs(self, method: Method, forget_set: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(datamodel effect of the forget set, memorisation scores) on the device, each only where the method
        declares it needs it (``needs_datamodel``, ``needs_scores``); a missing one is an error, not a None."""
        effect = scores = None
        if method.needs_datamodel:
            if forget_set not in self.datamodel_effects:
                raise RuntimeError(f"{method.name} needs the datamodel effect of forget set {forget_set}, which the "
                                   "run did not ship (no --scores?)")
            effect = torch.tensor(self.datamodel_effects[forget_set], dtype=torch.float32, device=self.device)
        if method.needs_scores:
            if self.memorization is None:
                raise RuntimeError(f"{method.name} needs memorisation scores, which the run did not ship")
            scores = torch.tensor(self.memorization, dtype=torch.float32, device=self.device)
        return effect, scores

    def train(self, stack: StackedModel, x: torch.Tensor, y: torch.Tensor, subsets: torch.Tensor | None = None
              ) -> dict:
        """Base training of ``stack`` under this worker's ``execution``; returns what ran (``train_stack``'s stats)."""
        stats: dict = {}
        train_stack(stack, x, y, self.recipe, subsets=subsets, execution=self.execution, stats=stats)
        return stats

    def scores(self, stack: StackedModel) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(margins, top-1 margins) by split, both from one forward pass per split (``compute_scores``)."""
        train, val = compute_scores(stack, self.x_train, self.y_train), compute_scores(stack, self.x_val, self.y_val)
        return {"train": train[0], "val": val[0]}, {"train": train[1], "val": val[1]}


def _compute_seconds(t0: float, training: dict) -> float:
    """Seconds since ``t0`` less what the process pays once per shape: compile warm-up, the ``auto`` path's timing."""
    return time.perf_counter() - t0 - training["compile_s"] - training["calibration_s"]


def run_unit(unit: Unit, ctx: UnitContext) -> tuple[pa.Table, dict]:
    """Do the unit's work; return its margins rows and its manifest metadata (timings, shapes).

    A train unit's ``compute_s`` leaves out what the process pays once per shape (compilation, the ``auto`` path's
    timing); the manifest's ``training`` record states those seconds."""
    t0 = time.perf_counter()
    tables = []
    compute_s = 0.0
    training = None
    work = []  # per snapshot: samples per model forwarded with gradients so far, compute seconds so far
    reset_grad_samples()
    if unit.kind == "train" and unit.role == "subset":
        stack = ctx.new_stack(unit.seeds)
        fraction = float(unit.params["fraction"])
        rows = torch.tensor(np.stack([subset_indices(s, fraction, ctx.dataset.n_train) for s in unit.seeds]),
                            device=ctx.device)
        training = ctx.train(stack, ctx.x_train, ctx.y_train, subsets=rows)
        compute_s = _compute_seconds(t0, training)
        work.append((grad_samples(), compute_s))
        logits = compute_logits(stack, ctx.x_train, ctx.y_train)
        # the logit datamodel's input, written before the unit reports success (as checkpoints are)
        ctx.store.write_array(ctx.store.subset_logits_path(unit.id), logits.numpy())
        y = ctx.y_train.cpu()
        train = (margins_from_logits(logits, y).numpy(), top1_margins_from_logits(logits, y).numpy())
        val = compute_scores(stack, ctx.x_val, ctx.y_val)
        tables.append(_table(unit, ctx, ctx.recipe.epochs, ({"train": train[0], "val": val[0]},
                                                            {"train": train[1], "val": val[1]})))
    elif unit.kind == "train":
        stack = ctx.new_stack(unit.seeds)
        if unit.role == "original":
            training = ctx.train(stack, ctx.x_train, ctx.y_train)
        else:  # oracles, matching oracles and the oracle_floor ensemble: retrained without the forget set
            idx = ctx.retain_indices(unit.forget_set)
            training = ctx.train(stack, ctx.x_train[idx], ctx.y_train[idx])
        if unit.role in ("original", "matching_oracle"):
            # Checkpoint before the unit reports success: an unlearn unit that depends on it can then rely on it.
            ctx.store.write_checkpoint(unit.id, {"seeds": list(unit.seeds), "state": stack.state_dict()})
        compute_s = _compute_seconds(t0, training)
        work.append((grad_samples(), compute_s))
        tables.append(_table(unit, ctx, ctx.recipe.epochs, ctx.scores(stack)))
    else:
        method = get_method(unit.method)
        stack = ctx.load_stack(unit.depends_on[0])
        oracles = None
        if method.needs_oracles:
            oracles = concat_stacks([ctx.load_stack(uid) for uid in unit.depends_on[1:]])
            # per_model pairing: matching oracle i for student i (matching-oracle ids run 0..N-1 like originals)
            chosen = unit.model_ids if unit.params.get("pairing") == "per_model" else range(
                int(unit.params["num_oracles"]))
            oracles = oracles.select(list(chosen))
        data = UnlearnData(ctx.x_train, ctx.y_train, torch.tensor(ctx.forget_indices[unit.forget_set],
                           device=ctx.device), ctx.retain_indices(unit.forget_set), ctx.dataset.num_classes,
                           ctx.recipe, oracles, *ctx.subset_inputs(method, unit.forget_set))
        last = time.perf_counter()
        seen = []
        for epoch, snapshot in method.fn(stack, data, dict(unit.params), unit.epochs, unit.method_seed):
            compute_s += time.perf_counter() - last
            work.append((grad_samples(), compute_s))
            tables.append(_table(unit, ctx, epoch, ctx.scores(snapshot)))
            seen.append(epoch)
            last = time.perf_counter()
        compute_s += time.perf_counter() - last
        if seen != list(unit.epochs):
            raise RuntimeError(f"method {unit.method} yielded epochs {seen}, expected {list(unit.epochs)}")
    table = pa.concat_tables(tables)
    meta = Manifest(unit.id, unit.kind, unit.role, unit.forget_set, unit.method, unit.params_json,
                    list(unit.epochs) or [ctx.recipe.epochs], list(unit.model_ids), list(unit.seeds), table.num_rows,
                    compute_s, time.perf_counter() - t0, [n for n, _ in work], [c for _, c in work],
                    unit.code_versions, collect_versions(ctx.device), training)
    return table, meta.to_dict()


def _table(unit: Unit, ctx: UnitContext, epoch: int, scores: tuple[dict[str, np.ndarray], dict[str, np.ndarray]]
           ) -> pa.Table:
    """Margins and top-1 margins rows of one snapshot, stored under the store's NaN/inf policy
    (``store.finite_margins``); NaN fails the unit with the reason."""
    margins, top1 = scores
    try:
        return margins_table(run=ctx.run_id, unit=unit.id, role=unit.role, method=unit.method,
                             params=unit.params_json, forget_set=unit.forget_set, model_ids=unit.model_ids,
                             seeds=unit.seeds, epoch=epoch, margins=margins, chunk_size=ctx.chunk_size, top1=top1)
    except NonFiniteMargins as err:
        raise FloatingPointError(f"{unit.method} on forget set {unit.forget_set}: {err} (the method diverged)"
                                 ) from None
