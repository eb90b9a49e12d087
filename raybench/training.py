"""Train a stack of models from their seeds, and read margins off a stack.

This is the base training of raybench: originals are trained on the full train set and oracles on the retain
set with the same recipe, so any difference between the two ensembles comes from the forget set alone. The
recipe follows the KLOM benchmark (docs/methods.md#recipes): SGD with momentum and weight decay, a per-iteration
triangular learning-rate schedule that starts at exactly 0, a fresh random permutation per model per epoch,
and the last partial batch kept.

Everything a model sees is decided by its own seed: its initial weights (``seed``) and its data order
(``data_order_seed(seed)``). So a model does not depend on the stack it is trained in: on the CPU with a fixed
thread count, two runs of the same seeds agree bit for bit, and so does a model trained next to other
neighbours in a stack of the same size. Across stack sizes the ``mlp`` still agrees bit for bit; the ``cnn``
agrees up to float rounding, because the grouped-convolution kernel depends on the number of groups.

Precision: float32 everywhere, except that an architecture may ask for autocast on CUDA (``autocast_for``; the
ResNet-9 trains and evaluates in bf16 there, as EasyDUB does). Margins and top-1 margins are always computed in
float32.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from raybench import spec
from raybench.models import StackedModel

TRAINING_VERSION = 1
"""Version of what ``train_stack`` computes from a recipe and seeds (the base training of originals and oracles).
It is part of every train unit's id: bump it when a change here alters trained models, and a rerun into an
existing folder retrains (and, through their dependencies, re-unlearns) instead of reusing the old models."""

MARGINS_VERSION = 1
"""Version of how margins are read off a model (``margins_from_logits``, ``compute_margins``). Part of every unit
id: bump it when stored margins of the same models would change."""

# torch's CPU generator keeps only the low 32 bits of a seed (seed and seed + 2**32 give the same stream),
# so the offset is 2**31: with model seeds in [0, 2**31) (enforced by StackedModel), a data-order seed never
# equals any model's initialisation seed.
DATA_ORDER_SEED_OFFSET = 1 << 31

_FUSED_SGD_DEVICES = ("cuda",)


@dataclass(frozen=True)
class Recipe:
    """Hyper-parameters of the base training; stored with every run so results can be reproduced."""

    epochs: int
    batch_size: int
    lr: float  # peak learning rate
    momentum: float
    weight_decay: float
    warmup_fraction: float  # the lr peaks after this fraction of all iterations (triangular schedule)

    def __post_init__(self) -> None:
        """Strict checks (``RECIPE_SPECS``): integers are ints (not bools, not 2.5), reals finite and stored as
        floats, so a recipe that cannot train is refused while the config is validated, not after the work."""
        for name, check in RECIPE_SPECS.items():
            object.__setattr__(self, name, check.check(name, getattr(self, name)))

    def to_dict(self) -> dict:
        """Plain JSON-ready dict; ``Recipe(**d)`` rebuilds the recipe."""
        return dataclasses.asdict(self)


RECIPE_SPECS: dict[str, spec.Param] = {
    "epochs": spec.integer(1),
    "batch_size": spec.integer(1),
    "lr": spec.real(0, low_open=True),
    "momentum": spec.real(0, 1, high_open=True),
    "weight_decay": spec.real(0),
    "warmup_fraction": spec.real(0, 1, low_open=True),
}
"""Type and range of every recipe field (the same declarative checks as method parameters)."""

_DEFAULT_RECIPES: dict[tuple[str, str], Recipe] = {
    # ≈97.5% val accuracy (train ≈99.9%). 14 epochs, not 20: 30% less training in the laptop run for the same val
    # accuracy, and do_nothing still sits well clear of the floor (forget set 2's forget P95 2.4 against 0.67; 12
    # epochs: 1.5, 10: intervals overlap; docs/methods.md#recipes). lr 0.05 loses ~0.5 points.
    ("digits", "mlp"): Recipe(
        epochs=14, batch_size=64, lr=0.1, momentum=0.9, weight_decay=5e-4, warmup_fraction=0.25
    ),
    # ≈98% val accuracy; 10 epochs already reach it and a CNN step costs ~10x an MLP step on the CPU.
    ("digits", "cnn"): Recipe(
        epochs=10, batch_size=64, lr=0.1, momentum=0.9, weight_decay=5e-4, warmup_fraction=0.25
    ),
    # The KLOM benchmark's CIFAR-10 ResNet-9 (docs/methods.md#recipes, DUB train.py): 24 epochs of 196 steps, the lr
    # peaking at 0.4 after 5 epochs; momentum stays 0.9 (EasyDUB's OneCycleLR cycles it, §8 item 6).
    ("cifar10", "resnet9"): Recipe(
        epochs=24, batch_size=256, lr=0.4, momentum=0.9, weight_decay=5e-4, warmup_fraction=5 / 24
    ),
}


def default_recipe(dataset: str, arch: str) -> Recipe:
    """The recipe raybench uses for ``arch`` on ``dataset`` unless a run config overrides it."""
    try:
        return _DEFAULT_RECIPES[(dataset, arch)]
    except KeyError:
        known = ", ".join(f"{d}/{a}" for d, a in _DEFAULT_RECIPES)
        raise ValueError(
            f"no default recipe for dataset {dataset!r} with arch {arch!r}; known: {known}"
        ) from None


def lr_multiplier(step: int, total_steps: int, warmup_fraction: float) -> float:
    """Triangular schedule: linear over iterations [0, warmup·T, T] -> [0, 1, 0]; step 0 gives exactly 0."""
    return float(np.interp(step, [0, warmup_fraction * total_steps, total_steps], [0.0, 1.0, 0.0]))


def autocast_for(stack: StackedModel) -> contextlib.AbstractContextManager:
    """The autocast a stack's forward passes run under: an architecture opts in with a class attribute
    ``cuda_autocast_dtype`` (resnet9: bf16, as EasyDUB trains), and only on CUDA. Everything else, and every
    CPU run, stays in the stack's own dtype, so CPU results do not change with this setting."""
    dtype = getattr(stack, "cuda_autocast_dtype", None)
    if dtype is None or next(stack.parameters()).device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


@contextlib.contextmanager
def cudnn_autotune(stack: StackedModel) -> Iterator[None]:
    """cuDNN benchmark mode (time the algorithms once per input shape, keep the fastest) while a stack whose
    architecture opts in (class attribute ``cuda_cudnn_benchmark``) runs on CUDA; the global flag is restored
    afterwards. For the ResNet-9 on an H100 this cut a training step of 16 stacked models from 71.9 to 41.4 ms
    (bench/train_throughput.py); the small digits models do not opt in."""
    if not getattr(stack, "cuda_cudnn_benchmark", False) or next(stack.parameters()).device.type != "cuda":
        yield
        return
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def data_order_seed(seed: int) -> int:
    """The seed of the ``torch.Generator`` that shuffles the data for the model initialised from ``seed``."""
    return (seed + DATA_ORDER_SEED_OFFSET) % (1 << 32)


def train_stack(
    stack: StackedModel,
    x: torch.Tensor,
    y: torch.Tensor,
    recipe: Recipe,
    *,
    seeds: Sequence[int] | None = None,
    on_epoch_end: Callable[[int, StackedModel], None] | None = None,
    subsets: torch.Tensor | None = None,
) -> StackedModel:
    """Train every model of ``stack`` in place on ``(x, y)`` and return the stack.

    ``x``/``y`` are the training samples only (already restricted to the train or retain indices), ideally on
    the stack's device. Model m draws its data order from a ``torch.Generator`` seeded with
    ``data_order_seed(seeds[m])`` (``seeds`` defaults to ``stack.seeds``): a fresh permutation per
    epoch, cut into batches of ``batch_size`` with the last partial batch kept, fed as one ``(M, B, ...)``
    tensor. The loss is the sum over models of each model's mean cross-entropy, so one SGD over the stack is
    M independent SGDs. ``on_epoch_end(epoch, stack)`` (0-based epoch) runs after each epoch, e.g. to record
    margins; the stack is in train mode when it is called and must be left so.

    ``subsets`` (subset ensembles): an ``(M, n_sub)`` long tensor, row m the indices into ``x`` that model m trains
    on. Model m then permutes its own ``n_sub`` samples exactly as it would permute a train set of that size, so
    every model sees only its subset while the stack still takes one ``(M, B, ...)`` step.
    """
    seeds = stack.seeds if seeds is None else tuple(int(s) for s in seeds)
    if len(seeds) != stack.n_models:
        raise ValueError(f"got {len(seeds)} data-order seeds for a stack of {stack.n_models} models")
    if len(y) == 0 or len(x) != len(y):
        raise ValueError(f"need as many inputs as labels, and at least one; got {len(x)} and {len(y)}")
    param = next(stack.parameters())
    x = x.to(device=param.device, dtype=param.dtype)
    y = y.to(device=param.device, dtype=torch.long)
    n = len(y)
    if subsets is not None:
        if subsets.ndim != 2 or subsets.shape[0] != stack.n_models or subsets.shape[1] == 0:
            raise ValueError(f"subsets must be ({stack.n_models}, n_sub) indices, got shape {tuple(subsets.shape)}")
        subsets = subsets.to(device=param.device, dtype=torch.long)
        n = subsets.shape[1]

    batch = recipe.batch_size
    iters_per_epoch = math.ceil(n / batch)
    total = recipe.epochs * iters_per_epoch
    # On CUDA the fused kernel saves launches. On the CPU it is only ~10% faster for an MLP stack, and its
    # vectorised/scalar split depends on where a model's weights sit in the stack, which would break the
    # bit-for-bit independence of a model from its neighbours; the per-op update keeps it.
    optimizer = torch.optim.SGD(
        stack.parameters(),
        lr=recipe.lr,
        momentum=recipe.momentum,
        weight_decay=recipe.weight_decay,
        fused=param.device.type in _FUSED_SGD_DEVICES,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total, recipe.warmup_fraction)
    )
    generators = [torch.Generator().manual_seed(data_order_seed(s)) for s in seeds]

    stack.train()
    with cudnn_autotune(stack):
        for epoch in range(recipe.epochs):
            perms = torch.stack([torch.randperm(n, generator=g) for g in generators]).to(param.device)
            for k in range(iters_per_epoch):
                idx = perms[:, k * batch : (k + 1) * batch]  # (M, b); every model has the same b in a step
                if subsets is not None:  # positions in each model's own subset -> sample ids
                    idx = subsets.gather(1, idx)
                with autocast_for(stack):
                    logits = stack(x[idx])
                    # sum over models of per-model mean CE: each model's gradient is exactly its own, independent of M
                    loss = F.cross_entropy(logits.flatten(0, 1), y[idx].flatten(), reduction="sum") / idx.shape[1]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
            if on_epoch_end is not None:
                on_epoch_end(epoch, stack)
    return stack


def margins_from_logits(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Margins ``z_y - logsumexp_{j≠y} z_j`` of logits ``(M, B, C)`` for labels ``(B,)`` (or ``(M, B)``), as
    ``(M, B)`` float32. The one definition of a margin in raybench (docs/design.md#margins): computed in float32 even
    for bf16/fp16 logits, with the true class masked to -inf rather than subtracted, which stays exact when
    p_y is close to 1."""
    z = logits.float()
    target = y.to(device=z.device, dtype=torch.long).expand(z.shape[:-1]).unsqueeze(-1)
    z_y = z.gather(-1, target).squeeze(-1)
    others = z.scatter(-1, target, float("-inf"))
    return z_y - torch.logsumexp(others, dim=-1)


def top1_margins_from_logits(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Top-1 margins ``z_y - max_{j≠y} z_j`` of logits ``(M, B, C)`` for labels ``(B,)`` (or ``(M, B)``), as
    ``(M, B)`` float32: > 0 exactly when the true class is the model's top-1 prediction. A tie with another class
    gives 0 and counts as wrong (no arbitrary tie-break by class index). Accuracy needs its own number because
    the KLOM margin ``z_y - logsumexp_{j≠y} z_j`` is > 0 only when p_y > 1/2: logits [1.0, 0.9 × 9] with label 0
    are a correct prediction with margin -2.10. Computed in float32 like the margins (the cast of bf16/fp16
    logits is exact, and so is the sign of a float32 difference)."""
    z = logits.float()
    target = y.to(device=z.device, dtype=torch.long).expand(z.shape[:-1]).unsqueeze(-1)
    z_y = z.gather(-1, target).squeeze(-1)
    others = z.scatter(-1, target, float("-inf"))
    return z_y - others.amax(dim=-1)


def _eval_batch_size(stack: StackedModel, batch_size: int | None) -> int:
    if batch_size is not None:
        return batch_size
    budget = getattr(stack, "eval_batch_budget", None)
    return 4096 if budget is None else max(1, budget // stack.n_models)


def _eval_logits(stack: StackedModel, x: torch.Tensor, y: torch.Tensor, batch_size: int
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(logits, labels) of ``batch_size`` samples at a time, in eval mode; the train/eval mode is restored."""
    param = next(stack.parameters())
    was_training = stack.training
    stack.eval()
    try:
        with cudnn_autotune(stack):
            for start in range(0, len(y), batch_size):
                xb = x[start : start + batch_size].to(device=param.device, dtype=param.dtype)
                with autocast_for(stack):
                    logits = stack(xb)
                yield logits, y[start : start + batch_size]
    finally:
        stack.train(was_training)


@torch.no_grad()
def compute_margins(
    stack: StackedModel, x: torch.Tensor, y: torch.Tensor, *, batch_size: int | None = None
) -> np.ndarray:
    """Margins of every model on every sample, ``(M, n)`` float32 numpy, in eval mode without gradients.

    ``x`` is shared by all models and is moved to the stack's device and dtype ``batch_size`` rows at a time,
    so it may stay on the CPU. The stack's train/eval mode is restored afterwards. ``batch_size`` defaults to
    4096, or, for an architecture whose activations are large (a class attribute ``eval_batch_budget``: samples
    × models per batch), to that budget divided by M: a stack of 50 ResNet-9s on 4096 images at once would
    hold tens of GB of activations.
    """
    chunks = [margins_from_logits(logits, yb).cpu()
              for logits, yb in _eval_logits(stack, x, y, _eval_batch_size(stack, batch_size))]
    if not chunks:
        return np.zeros((stack.n_models, 0), dtype=np.float32)
    return torch.cat(chunks, dim=1).numpy()


@torch.no_grad()
def compute_logits(
    stack: StackedModel, x: torch.Tensor, y: torch.Tensor, *, batch_size: int | None = None
) -> torch.Tensor:
    """Logits of every model on every sample, ``(M, n, C)`` float32 on the CPU, in eval mode without gradients
    (batches as ``compute_margins``): what a subset unit keeps for the logit datamodel, and what its margins and
    top-1 margins are read from, so the stored margins are exactly those of the stored logits."""
    chunks = [logits.float().cpu() for logits, _ in _eval_logits(stack, x, y, _eval_batch_size(stack, batch_size))]
    if not chunks:
        return torch.zeros((stack.n_models, 0, 0), dtype=torch.float32)
    return torch.cat(chunks, dim=1)


@torch.no_grad()
def compute_scores(
    stack: StackedModel, x: torch.Tensor, y: torch.Tensor, *, batch_size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(margins, top-1 margins) of every model on every sample, two ``(M, n)`` float32 numpy arrays read off one
    forward pass (``compute_margins`` and ``top1_margins_from_logits``): what a stored snapshot keeps, so that
    accuracy is exact top-1 of the very logits KLOM was computed from. Arguments as ``compute_margins``."""
    margins, top1 = [], []
    for logits, yb in _eval_logits(stack, x, y, _eval_batch_size(stack, batch_size)):
        margins.append(margins_from_logits(logits, yb).cpu())
        top1.append(top1_margins_from_logits(logits, yb).cpu())
    if not margins:
        empty = np.zeros((stack.n_models, 0), dtype=np.float32)
        return empty, empty.copy()
    return torch.cat(margins, dim=1).numpy(), torch.cat(top1, dim=1).numpy()
