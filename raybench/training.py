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
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from raybench import spec
from raybench.models import StackedModel, count_grad_samples, grad_samples

TRAINING_VERSION = 2
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

FUSED_CPU_BLOCK = 16
"""On the CPU a parameter takes torch's fused SGD step (one pass over parameter, gradient and momentum instead of
four: the step's share of a digits unit falls from about 24 % to 9 %, bench/RESULTS.md) only when each model's
block of it holds a multiple of this many elements. The fused kernel updates runs of 16 floats (64 bytes) with
vector instructions and the remainder element by element, which rounds otherwise: with whole runs per model, no
element of any model falls in a remainder, so a model still trains bit for bit alike alone and in a stack of any
size. A parameter with a ragged block (the MLP's 10-class output bias) takes the per-op step. The vector runs
round as the per-op step does: the default run's summary.csv stayed byte-identical, so TRAINING_VERSION stands."""

CPU_LOSS_CLASS_BLOCK = 16
"""On the CPU the training loss pads each sample's logits with -inf up to a multiple of this many classes. torch's
CPU log-softmax (inside ``cross_entropy``) runs its vector code over whole rows of 16 floats and a scalar loop over
any other row length: for 10 classes its forward and backward took 0.8 ms of a 12 ms step for 50 digits MLPs, and
0.2 ms padded (bench/stack_loss.py). A -inf logit adds exp(-inf) = 0 to the softmax sum and gets a zero gradient,
so the loss is the cross-entropy of the real classes; each row is still reduced on its own, so a model trains alike
alone and in a stack. The sum's order differs from the scalar loop's, hence TRAINING_VERSION 2."""


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


TRAIN_PATHS = ("auto", "stacked", "per_model")
"""How ``train_stack`` runs a stack's models (``Execution.path``): all M in one batched step (``stacked``), one
model after the other through the same code at M = 1 (``per_model``), or ``auto``: on the CPU stacked in parts of
at most ``CPU_TRAIN_PART`` models (2.9-3.9x faster than per-model for 50 digits MLPs, bench/train_paths.py), and
on CUDA whichever a short timing of both on the unit's own shapes finds faster (``choose_path``), once per process
and shape."""

CPU_TRAIN_PART = 25
"""The most models ``auto`` steps at once on the CPU: a larger stack is trained as near-equal parts of at most this
many models, one part's epoch after the other's. With two workers sharing the last-level cache, a block of 50
digits CNNs trains 1.21-1.32x faster per model in two parts than in one step, 50 MLPs 1.01-1.07x, and parts of
13-17 gain nothing more (bench/train_parts.py): a part's weights, gradients and momenta stay in cache. A digits
MLP trains bit for bit alike in any part; the CNN's grouped convolution rounds with the group count."""

CALIBRATION_STEPS = 4
"""Timed steps per path when ``auto`` times both on CUDA (after as many untimed warm-up steps)."""

_COMPILE_RECOMPILE_LIMIT = 64  # graphs per compiled loss: one per (M, batch) shape, and a unit has two (full, last)


@dataclass(frozen=True)
class Execution:
    """How the base training runs on the device at hand: a matter of speed, not of what is trained.

    Every path trains each model from its own seed with its own data order, so on the CPU ``stacked`` and
    ``per_model`` give the same ``mlp`` models bit for bit (the ``cnn``'s grouped convolution rounds differently
    with the number of groups). ``compile`` runs the forward pass and loss through ``torch.compile`` (Inductor;
    the backward through AOTAutograd): its kernels round differently from eager ones, so a compiled model agrees
    with an eager one up to float rounding amplified by training (docs/design.md#compiled-training states the
    measured tolerance), while two compiled runs on one device agree bit for bit. It is off by default: its speed
    on the GPU is still to be measured (bench/gpu_throughput.py), and in a 2-core CPU run compiled units were
    slower than eager ones (docs/design.md#compiled-training)."""

    path: str = "auto"
    compile: bool = False
    compile_backend: str = "inductor"

    def __post_init__(self) -> None:
        if self.path not in TRAIN_PATHS:
            raise ValueError(f"unknown training path {self.path!r}; known: {', '.join(TRAIN_PATHS)}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be true or false, got {self.compile!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def data_order_seed(seed: int) -> int:
    """The seed of the ``torch.Generator`` that shuffles the data for the model initialised from ``seed``."""
    return (seed + DATA_ORDER_SEED_OFFSET) % (1 << 32)


def _pad_classes(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` (..., C) padded with -inf to whole runs of ``CPU_LOSS_CLASS_BLOCK`` classes (its docstring)."""
    return F.pad(logits, (0, -logits.shape[-1] % CPU_LOSS_CLASS_BLOCK), value=float("-inf"))


def _stack_loss(stack: StackedModel, xb: torch.Tensor, yb: torch.Tensor, autocast: torch.dtype | None
                ) -> torch.Tensor:
    """Sum over models of each model's mean cross-entropy: each model's gradient is exactly its own, whatever M.
    On the CPU the classes are padded first (``_pad_classes``)."""
    with contextlib.nullcontext() if autocast is None else torch.autocast("cuda", dtype=autocast):
        logits = stack(xb)
        if logits.device.type == "cpu":
            logits = _pad_classes(logits)
        return F.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="sum") / yb.shape[1]


_compiled_losses: dict[str, Callable] = {}


def _loss_fn(execution: Execution) -> Callable:
    """The eager loss, or its compiled form: one ``torch.compile`` per process and backend, so a later unit of the
    same architecture and shapes reuses the graphs of the first (Dynamo guards on the module's structure and the
    tensors' shapes, not on which stack it is)."""
    if not execution.compile:
        return _stack_loss
    if execution.compile_backend not in _compiled_losses:
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _COMPILE_RECOMPILE_LIMIT)
        _compiled_losses[execution.compile_backend] = torch.compile(_stack_loss, backend=execution.compile_backend,
                                                                    dynamic=False)
    return _compiled_losses[execution.compile_backend]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sgd_groups(stack: StackedModel) -> list[dict]:
    """The stack's parameters as SGD groups: all fused on CUDA (fewer launches); on the CPU fused where every
    model's block is whole runs of ``FUSED_CPU_BLOCK`` elements, the rest per-op; elsewhere all per-op."""
    params = list(stack.parameters())
    if params[0].device.type != "cpu":
        return [{"params": params, "fused": params[0].device.type == "cuda"}]
    whole = [p[0].numel() % FUSED_CPU_BLOCK == 0 for p in params]
    groups = [{"params": [p for p, w in zip(params, whole, strict=True) if w == fused], "fused": fused}
              for fused in (True, False)]
    return [g for g in groups if g["params"]]


class _StackSGD:
    """SGD with momentum and weight decay over ``_sgd_groups``, at the recipe's triangular learning rate of each
    step: the kernels of ``torch.optim.SGD`` (``torch._fused_sgd_`` for a fused group, its per-op update for the
    rest) called directly. ``torch.optim.SGD.step`` with ``LambdaLR`` spends about 0.3 ms a step in Python around
    those kernels, 5 % of a step of 25 digits MLPs on the CPU (bench/stack_sgd.py); the updates are torch.optim's
    bit for bit (tests/test_training.py)."""

    def __init__(self, groups: list[dict], recipe: Recipe, total_steps: int) -> None:
        self.groups = [(g["params"], g["fused"]) for g in groups]
        self.recipe, self.total_steps, self.steps = recipe, total_steps, 0
        self.momenta: list[list[torch.Tensor]] = []  # per group, made on the first step as torch.optim makes them

    def zero_grad(self) -> None:
        for params, _ in self.groups:
            for p in params:
                p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        r = self.recipe
        lr = r.lr * lr_multiplier(self.steps, self.total_steps, r.warmup_fraction)
        first = self.steps == 0
        for g, (params, fused) in enumerate(self.groups):
            grads = [p.grad for p in params]
            if fused:
                if first:
                    self.momenta.append([torch.empty_like(t) for t in grads] if r.momentum else [])
                torch._fused_sgd_(params, grads, self.momenta[g], weight_decay=r.weight_decay, momentum=r.momentum,
                                  lr=lr, dampening=0.0, nesterov=False, maximize=False,
                                  is_first_step=first and r.momentum != 0)
                continue
            if first:
                self.momenta.append([])
            for i, (p, grad) in enumerate(zip(params, grads, strict=True)):
                if r.weight_decay:
                    grad = grad.add(p, alpha=r.weight_decay)
                if r.momentum:
                    if first:
                        self.momenta[g].append(grad.clone())
                    else:
                        self.momenta[g][i].mul_(r.momentum).add_(grad)
                    grad = self.momenta[g][i]
                p.add_(grad, alpha=-lr)
        self.steps += 1


class _EpochRunner:
    """One SGD over one stack (optimiser, schedule, per-model data order): the state ``train_stack`` steps."""

    def __init__(self, stack: StackedModel, x: torch.Tensor, y: torch.Tensor, recipe: Recipe, seeds: Sequence[int],
                 subsets: torch.Tensor | None, loss: Callable, compiled_shapes: set | None, stats: dict) -> None:
        param = next(stack.parameters())
        self.stack, self.x, self.y, self.subsets, self.loss = stack, x, y, subsets, loss
        self.device = param.device
        self.n = len(y) if subsets is None else subsets.shape[1]
        self.batch = recipe.batch_size
        self.iters_per_epoch = math.ceil(self.n / self.batch)
        total = recipe.epochs * self.iters_per_epoch
        self.sgd = _StackSGD(_sgd_groups(stack), recipe, total)
        self.generators = [torch.Generator().manual_seed(data_order_seed(s)) for s in seeds]
        self.autocast = getattr(stack, "cuda_autocast_dtype", None) if self.device.type == "cuda" else None
        self.compiled_shapes, self.stats = compiled_shapes, stats

    def step(self, idx: torch.Tensor) -> None:
        """One SGD step on the samples ``idx`` ``(M, b)``. The first step of a shape under compile is the warm-up
        (Dynamo traces, Inductor builds): its time is counted in ``stats["compile_s"]``, not as training."""
        if self.subsets is not None:  # positions in each model's own subset -> sample ids
            idx = self.subsets.gather(1, idx)
        key = (type(self.stack), tuple(idx.shape), self.x.dtype, self.device)
        warmup = self.compiled_shapes is not None and key not in self.compiled_shapes
        if warmup:
            _sync(self.device)
            t0 = time.perf_counter()
        rows = idx.flatten()  # index_select: 4.7x faster than x[idx] for a (M, b) index on the CPU, the same rows
        xb = self.x.index_select(0, rows).view(*idx.shape, *self.x.shape[1:])
        loss = self.loss(self.stack, xb, self.y.index_select(0, rows).view(idx.shape), self.autocast)
        self.sgd.zero_grad()
        loss.backward()
        self.sgd.step()
        if warmup:
            _sync(self.device)
            self.stats["compile_s"] += time.perf_counter() - t0
            self.compiled_shapes.add(key)

    def epoch(self) -> None:
        perms = torch.stack([torch.randperm(self.n, generator=g) for g in self.generators]).to(self.device)
        for k in range(self.iters_per_epoch):
            self.step(perms[:, k * self.batch : (k + 1) * self.batch])  # (M, b); every model has the same b


_compiled_shapes: dict[str, set] = {}  # backend -> (architecture, step shape, dtype, device) compiled in this process
_path_choices: dict[tuple, dict] = {}  # what ``choose_path`` measured, per shape, in this process


def _shapes_compiled(execution: Execution) -> set | None:
    """The step shapes this process has compiled with ``execution``'s backend (None: eager, nothing to track)."""
    return _compiled_shapes.setdefault(execution.compile_backend, set()) if execution.compile else None


def choose_path(stack: StackedModel, x: torch.Tensor, y: torch.Tensor, recipe: Recipe,
                execution: Execution = Execution()) -> dict:
    """Time ``CALIBRATION_STEPS`` training steps of both paths on throwaway copies of ``stack`` (its models are
    not touched, nor is any random stream) and return ``{"path", "stacked_ms", "per_model_ms"}``, the times per
    model-step. Measured once per process and (architecture, M, batch, input shape, device, compile): a unit of
    the same shape reuses the answer."""
    param = next(stack.parameters())
    batch = min(recipe.batch_size, len(y))
    key = (stack.arch, stack.n_models, batch, stack.input_shape, param.device, param.dtype, execution.compile)
    if key not in _path_choices:
        xb, yb = x[:batch].to(param.device, param.dtype), y[:batch].to(param.device, torch.long)
        times = {}
        for path, probe in (("stacked", stack.select(range(stack.n_models))), ("per_model", stack.select([0]))):
            runner = _EpochRunner(probe, xb, yb, recipe, probe.seeds, None, _loss_fn(execution),
                                  _shapes_compiled(execution), {"compile_s": 0.0})
            idx = torch.arange(batch, device=param.device).expand(probe.n_models, batch)
            probe.train()
            with cudnn_autotune(probe):
                for _ in range(CALIBRATION_STEPS):  # warm-up: cuDNN autotuning, compilation, allocator
                    runner.step(idx)
                _sync(param.device)
                t0 = time.perf_counter()
                for _ in range(CALIBRATION_STEPS):
                    runner.step(idx)
                _sync(param.device)
            times[path] = (time.perf_counter() - t0) / CALIBRATION_STEPS / probe.n_models * 1e3
        _path_choices[key] = {"path": min(times, key=times.get), "stacked_ms": times["stacked"],
                              "per_model_ms": times["per_model"]}
    return dict(_path_choices[key])


def _times_paths(device: torch.device) -> bool:
    """Whether ``auto`` times both paths here: on CUDA the answer depends on the GPU, the architecture and M (for
    the ResNet-9 the grouped convolution was slower per model than the plain one on an H100); on the CPU the stacked
    step has always won (``TRAIN_PATHS``), and the timing would cost every laptop unit."""
    return device.type == "cuda"


def train_stack(
    stack: StackedModel,
    x: torch.Tensor,
    y: torch.Tensor,
    recipe: Recipe,
    *,
    seeds: Sequence[int] | None = None,
    on_epoch_end: Callable[[int, StackedModel], None] | None = None,
    subsets: torch.Tensor | None = None,
    execution: Execution = Execution(),
    stats: dict | None = None,
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

    ``execution`` picks the path and whether to compile (``Execution``). ``stats``, when given, receives what ran:
    ``path``, ``compiled``, ``compile_s`` (warm-up seconds of newly compiled shapes, a part of this call's time
    that later calls of the same shapes do not pay), ``calibration_s``, ``parts`` (how many parts of the stack
    stepped one after the other: M / ``CPU_TRAIN_PART`` rounded up under ``auto`` on the CPU, M on the per-model
    path, else 1) and, for ``auto`` on CUDA, the timings ``choose_path`` compared.
    """
    seeds = stack.seeds if seeds is None else tuple(int(s) for s in seeds)
    if len(seeds) != stack.n_models:
        raise ValueError(f"got {len(seeds)} data-order seeds for a stack of {stack.n_models} models")
    if len(y) == 0 or len(x) != len(y):
        raise ValueError(f"need as many inputs as labels, and at least one; got {len(x)} and {len(y)}")
    param = next(stack.parameters())
    x = x.to(device=param.device, dtype=param.dtype)
    y = y.to(device=param.device, dtype=torch.long)
    if subsets is not None:
        if subsets.ndim != 2 or subsets.shape[0] != stack.n_models or subsets.shape[1] == 0:
            raise ValueError(f"subsets must be ({stack.n_models}, n_sub) indices, got shape {tuple(subsets.shape)}")
        subsets = subsets.to(device=param.device, dtype=torch.long)
    stats = {} if stats is None else stats
    stats.update(path=execution.path, compiled=execution.compile, compile_s=0.0, calibration_s=0.0)
    if execution.path == "auto":
        if _times_paths(param.device) and stack.n_models > 1:
            t0, counted = time.perf_counter(), grad_samples()
            choice = choose_path(stack, x, y, recipe, execution)
            count_grad_samples(counted - grad_samples())  # the timing's throwaway steps are not the unit's work
            stats.update(path=choice.pop("path"), calibration=choice, calibration_s=time.perf_counter() - t0)
        else:
            stats["path"] = "stacked"
    loss = _loss_fn(execution)
    shapes = _shapes_compiled(execution)
    # parts of the stack, each with its own optimiser, interleaved by epoch so on_epoch_end sees them all
    bounds = _part_bounds(stack.n_models, param.device, execution, stats["path"])
    parts = [stack] if len(bounds) == 1 else [stack.select(range(a, b)) for a, b in bounds]
    runners = [_EpochRunner(part, x, y, recipe, seeds[a:b], None if subsets is None else subsets[a:b], loss, shapes,
                            stats) for part, (a, b) in zip(parts, bounds, strict=True)]
    stats["parts"] = len(parts)
    for part in parts:
        part.train()
    stack.train()
    counted = grad_samples()
    with cudnn_autotune(stack):
        for epoch in range(recipe.epochs):
            for runner in runners:
                runner.epoch()
            if len(parts) > 1 and (on_epoch_end is not None or epoch == recipe.epochs - 1):
                _write_back(stack, parts, bounds)
            if on_epoch_end is not None:
                on_epoch_end(epoch, stack)
    if len(parts) > 1:  # each part counted its own samples, as many per model as the stack's; the count is per model
        done = grad_samples() - counted
        count_grad_samples(done // len(parts) - done)
    return stack


def _part_bounds(n_models: int, device: torch.device, execution: Execution, path: str) -> list[tuple[int, int]]:
    """``(start, stop)`` of the models each part trains: one per model on the per-model path; on the CPU under
    ``auto``, near-equal parts of at most ``CPU_TRAIN_PART`` models; else the whole stack."""
    if path == "per_model":
        return [(m, m + 1) for m in range(n_models)]
    k = math.ceil(n_models / CPU_TRAIN_PART) if execution.path == "auto" and device.type == "cpu" else 1
    return [(n_models * i // k, n_models * (i + 1) // k) for i in range(k)]


@torch.no_grad()
def _write_back(stack: StackedModel, parts: list[StackedModel], bounds: list[tuple[int, int]]) -> None:
    """Copy the parts into their rows ``bounds`` of ``stack`` (parameters and buffers)."""
    state = stack.state_dict()  # tensors sharing the stack's storage
    for part, (start, stop) in zip(parts, bounds, strict=True):
        for name, tensor in part.state_dict().items():
            state[name][start:stop].copy_(tensor)


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


CPU_EVAL_BUDGET = 1 << 13
"""Samples × models per evaluation batch on the CPU for an architecture that sets no ``eval_batch_budget``: 50
digits MLPs score about 160 samples at a time, so a layer's activations (4 MB for 50 MLPs, against 37 MB for
one batch of 1,437) stay in cache instead of streaming through memory: 2.2× faster than one batch of the train
samples for 50 MLPs and 1.4× for 50 CNNs (bench/eval_batch.py)."""

CPU_EVAL_MIN_BATCH = 64
"""The fewest samples per CPU evaluation batch, however many models a stack holds. The CPU BLAS (MKL, measured)
multiplies fewer than 8 rows with another kernel, whose last bits differ; the default batches hold at least half
this, so a sample's margins are those of one batch of every sample, whatever M (tested)."""

CUDA_EVAL_BATCH = 4096  # samples per evaluation batch on CUDA for an architecture without eval_batch_budget


def _eval_batches(stack: StackedModel, n: int, batch_size: int | None) -> list[tuple[int, int]]:
    """``(start, stop)`` of each evaluation batch of ``n`` samples: ``batch_size`` at a time when given, else the
    architecture's ``eval_batch_budget`` / M; else, on the CPU, ``n`` split into batches of at most
    ``CPU_EVAL_BUDGET`` / M (at least ``CPU_EVAL_MIN_BATCH``) samples whose sizes differ by at most one, so that no
    batch is a small remainder; else ``CUDA_EVAL_BATCH``."""
    budget = getattr(stack, "eval_batch_budget", None)
    if batch_size is None and budget is None and next(stack.parameters()).device.type == "cpu":
        cap = max(CPU_EVAL_MIN_BATCH, CPU_EVAL_BUDGET // stack.n_models)
        k = math.ceil(n / cap)
        return [(n * i // k, n * (i + 1) // k) for i in range(k)]
    if batch_size is None:
        batch_size = CUDA_EVAL_BATCH if budget is None else max(1, budget // stack.n_models)
    return [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


def _eval_logits(stack: StackedModel, x: torch.Tensor, y: torch.Tensor, batch_size: int | None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(logits, labels) batch by batch (``_eval_batches``), in eval mode; the train/eval mode is restored."""
    param = next(stack.parameters())
    was_training = stack.training
    stack.eval()
    try:
        with cudnn_autotune(stack):
            for start, stop in _eval_batches(stack, len(y), batch_size):
                xb = x[start:stop].to(device=param.device, dtype=param.dtype)
                with autocast_for(stack):
                    logits = stack(xb)
                yield logits, y[start:stop]
    finally:
        stack.train(was_training)


@torch.no_grad()
def compute_margins(
    stack: StackedModel, x: torch.Tensor, y: torch.Tensor, *, batch_size: int | None = None
) -> np.ndarray:
    """Margins of every model on every sample, ``(M, n)`` float32 numpy, in eval mode without gradients.

    ``x`` is shared by all models and is moved to the stack's device and dtype ``batch_size`` rows at a time,
    so it may stay on the CPU. The stack's train/eval mode is restored afterwards. Without ``batch_size``, a batch
    holds the architecture's ``eval_batch_budget`` (samples × models; a stack of 50 ResNet-9s on 4096 images at
    once would hold tens of GB of activations) divided by M; else, on the CPU, about ``CPU_EVAL_BUDGET`` / M
    samples (activations that stay in cache), which gives the bits of one batch of every sample; else
    ``CUDA_EVAL_BATCH`` (``_eval_batches``).
    """
    chunks = [margins_from_logits(logits, yb).cpu()
              for logits, yb in _eval_logits(stack, x, y, batch_size)]
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
    chunks = [logits.float().cpu() for logits, _ in _eval_logits(stack, x, y, batch_size)]
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
    for logits, yb in _eval_logits(stack, x, y, batch_size):
        margins.append(margins_from_logits(logits, yb).cpu())
        top1.append(top1_margins_from_logits(logits, yb).cpu())
    if not margins:
        empty = np.zeros((stack.n_models, 0), dtype=np.float32)
        return empty, empty.copy()
    return torch.cat(margins, dim=1).numpy(), torch.cat(top1, dim=1).numpy()
