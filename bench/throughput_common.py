"""Pieces shared by the ResNet-9 throughput benchmarks (``train_throughput.py``, ``gpu_throughput.py``), so that both
time the same loop, the same ``train_stack`` call and the same margin pass, and extrapolate the same way."""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from raybench.models import StackedModel
from raybench.models.resnet9 import resnet9, resnet9_macs
from raybench.training import Execution, Recipe, compute_margins, default_recipe, train_stack

STACKED = Execution(path="stacked")  # the benchmarks time a path they name, never `auto`'s choice

RECIPE = default_recipe("cifar10", "resnet9")
N_TRAIN, N_VAL = 50_000, 10_000


def steps_per_model(batch: int) -> int:
    """Optimiser steps of the full recipe at this batch size: 24 epochs × ⌈50,000 / batch⌉ (4,704 at 256)."""
    return RECIPE.epochs * math.ceil(N_TRAIN / batch)


def flops_per_sample(hw: int) -> float:
    """Analytic FLOPs of one training step per image: conv + head MACs × 2 FLOP × 3 (forward, input gradient,
    weight gradient); BatchNorm, ReLU, pooling and the optimiser are memory-bound and not counted."""
    return resnet9_macs((3, hw, hw)) * 2 * 3


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds ``fn`` takes until its work is done: CUDA events on a GPU (the queue is drained first), the wall
    clock on the CPU."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    sync(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def one_epoch_recipe(batch: int) -> Recipe:
    """The ResNet-9 recipe cut to one epoch: ``train_stack`` then runs exactly ⌈n/batch⌉ steps."""
    return Recipe(epochs=1, batch_size=batch, lr=RECIPE.lr, momentum=RECIPE.momentum,
                  weight_decay=RECIPE.weight_decay, warmup_fraction=RECIPE.warmup_fraction)


def extrapolate(step_s: float, margins_s_per_model: float, m: int, flops_per_step: float, peak: float,
                steps_per_model: int) -> dict:
    per_model_s = step_s * steps_per_model / m + margins_s_per_model
    return {"step_ms": 1e3 * step_s, "s_per_model": per_model_s, "models_per_hour": 3600 / per_model_s,
            "train_tflops": flops_per_step / step_s / 1e12,
            "fraction_of_peak": flops_per_step / step_s / peak,
            "gpu_hours_per_2000": 2000 * per_model_s / 3600}


def random_data(n: int, hw: int, device: torch.device, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random CIFAR-shaped images and labels, resident on ``device`` (timings do not depend on pixel values)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, 3, hw, hw, device=device, generator=gen)
    y = torch.randint(0, 10, (n,), device=device, generator=gen)
    return x, y


def time_train_stack(stack: StackedModel, x: torch.Tensor, y: torch.Tensor, batch: int, warmup: int,
                     device: torch.device, execution: Execution = STACKED, stats: dict | None = None) -> float:
    """Seconds per optimiser step of ``raybench.training.train_stack`` over all of ``(x, y)`` (one epoch of
    ``len(y) / batch`` steps), after an untimed call of ``warmup`` steps (cuDNN autotuning, the allocator, and
    under ``execution.compile`` the compilation, whose seconds land in ``stats["compile_s"]``)."""
    recipe = one_epoch_recipe(batch)
    if warmup > 0:
        train_stack(stack, x[: warmup * batch], y[: warmup * batch], recipe, execution=execution, stats=stats)
    return timed(lambda: train_stack(stack, x, y, recipe, execution=execution), device) / math.ceil(len(y) / batch)


def time_margins(stack: StackedModel, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> float:
    """Seconds of one ``compute_margins`` pass of the whole stack over ``(x, y)``, after an untimed pass (the
    eval batch shapes get their own cuDNN autotuning)."""
    compute_margins(stack, x, y)
    return timed(lambda: compute_margins(stack, x, y), device)


def fused_sgd_supported(device: torch.device) -> bool:
    """Whether this torch has ``torch.optim.SGD(..., fused=True)`` for ``device`` (CUDA from torch 2.3, CPU later)."""
    if "fused" not in inspect.signature(torch.optim.SGD).parameters:
        return False
    try:
        torch.optim.SGD([torch.zeros(1, device=device, requires_grad=True)], lr=0.1, fused=True)
    except (RuntimeError, ValueError):
        return False
    return True


class LoopTrainer:
    """One plain ``resnet9()`` trained the way data-unlearning-bench trains: one model at a time, SGD with the
    recipe's momentum and weight decay, autocast on CUDA (``precision``: bf16, or fp16 with a GradScaler as DUB
    does), channels-last on CUDA, batches gathered from data resident on the device (DUB streams from an ffcv
    loader, so this is the loop's best case). ``compile_mode`` compiles forward and loss (and so, through
    AOTAutograd, the backward) with ``torch.compile``; the optimiser step stays eager."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int, device: torch.device, *,
                 precision: str = "bf16", fused: bool | None = None, compile_mode: str | None = None,
                 compile_backend: str = "inductor") -> None:
        torch.manual_seed(0)
        cuda = device.type == "cuda"
        self.model = resnet9().to(device)
        self.x, self.y, self.batch, self.device = x, y, batch, device
        if cuda:
            self.model = self.model.to(memory_format=torch.channels_last)
            self.x = x.contiguous(memory_format=torch.channels_last)
        self.fused = cuda if fused is None else fused
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=RECIPE.momentum,
                                   weight_decay=RECIPE.weight_decay, fused=self.fused)
        self.amp_dtype = torch.float16 if precision == "fp16" else torch.bfloat16
        self.use_amp = cuda
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)
        self.loss_fn = self._loss
        if compile_mode is not None:
            self.loss_fn = torch.compile(self._loss, backend=compile_backend,
                                         mode=None if compile_mode == "default" else compile_mode)
        self.model.train()

    def _loss(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            return F.cross_entropy(self.model(xb), yb)

    def run(self, steps: int) -> None:
        """``steps`` optimiser steps over a fresh permutation (``steps × batch`` must not exceed the data)."""
        perm = torch.randperm(len(self.y), device=self.device)
        for k in range(steps):
            idx = perm[k * self.batch:(k + 1) * self.batch]
            loss = self.loss_fn(self.x[idx], self.y[idx])
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
