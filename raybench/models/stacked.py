"""``StackedModel``: M independent models of one architecture trained and evaluated as one module.

Why stack: the models raybench trains are small and there are hundreds of them; launching each one's kernels
separately spends most of the time in Python and kernel-launch overhead. A stack runs one batched kernel per
layer for all M models. The models stay mathematically independent: no parameter is shared, and as long as the
loss is a *sum* of per-model losses, each model's gradient is exactly its own, so a plain ``torch.optim``
optimiser over the stack behaves as M independent optimisers (SGD, momentum and weight decay are all
element-wise).

Subclasses (one per architecture) define the layers and how activations flow between them; this base class
gives them seeding, input handling, and conversion to and from ordinary single models.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from raybench.models.layers import StackedConv2d, StackedLinear

StackedLayer = StackedLinear | StackedConv2d

MAX_SEED = 1 << 31

_grad_samples = 0


def grad_samples() -> int:
    """Samples per model passed forward with gradients enabled in this process (since ``reset_grad_samples``).

    A deterministic measure of a unit's work that needs nothing from the method: every gradient step, whatever
    the method, starts with such a forward pass. Counted by ``StackedModel.forward``; forward passes without
    gradients (margins, teachers, oracle targets) do not count. Inside ``torch.func`` transforms a forward sees
    one sample, so code that takes per-sample gradients counts them itself (``count_grad_samples``)."""
    return _grad_samples


def reset_grad_samples() -> None:
    global _grad_samples
    _grad_samples = 0


def count_grad_samples(n: int) -> None:
    global _grad_samples
    _grad_samples += int(n)


class StackedModel(nn.Module, ABC):
    """M models of architecture ``arch``; model i was initialised from ``seeds[i]``.

    The constructor allocates *uninitialised* parameters (copies and loads overwrite them anyway); use
    ``raybench.models.build_stack`` for freshly initialised models, or call ``reset_parameters()``.
    """

    arch: ClassVar[str]

    def __init__(
        self,
        seeds: Sequence[int],
        input_shape: Sequence[int],
        num_classes: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.seeds: tuple[int, ...] = tuple(int(s) for s in seeds)
        if not self.seeds:
            raise ValueError("a stack needs at least one model (got no seeds)")
        bad = [s for s in self.seeds if not 0 <= s < MAX_SEED]
        if bad:
            # torch's CPU generator keeps only 32 bits of a seed; below 2**31 there is also room for the
            # training data-order seeds (raybench.training.data_order_seed) without any collision.
            raise ValueError(f"model seeds must be in [0, 2**31), got {bad[:5]}")
        self.n_models: int = len(self.seeds)
        self.input_shape: tuple[int, ...] = tuple(int(d) for d in input_shape)
        self.num_classes: int = int(num_classes)
        self._build_layers(device=device, dtype=dtype)

    # -- what an architecture defines -------------------------------------------------------------------
    @abstractmethod
    def _build_layers(self, *, device: torch.device | str | None, dtype: torch.dtype | None) -> None:
        """Create the (uninitialised) stacked layers as attributes, for ``self.n_models`` models."""

    @abstractmethod
    def stacked_layers(self) -> list[StackedLayer]:
        """The parameterised layers, in the order the single model's ``nn.Linear``/``nn.Conv2d`` appear."""

    @abstractmethod
    def _forward(self, x: torch.Tensor, shared: bool) -> torch.Tensor:
        """Logits ``(M, B, C)`` for a shared ``(B, *input_shape)`` or per-model ``(M, B, *input_shape)`` x."""

    @abstractmethod
    def _assemble_single(self, layers: list[nn.Module]) -> nn.Module:
        """Wrap one model's plain layers (from ``stacked_layers()[j].single(i)``) into a single model."""

    # -- common behaviour ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, *input_shape)`` shared by all models, or ``(M, B, *input_shape)`` one batch per model.
        Returns logits ``(M, B, num_classes)``."""
        k = len(self.input_shape)
        shared = x.dim() == k + 1 and tuple(x.shape[1:]) == self.input_shape
        if shared or (x.dim() == k + 2 and x.shape[0] == self.n_models and tuple(x.shape[2:]) == self.input_shape):
            if torch.is_grad_enabled() and torch._C._functorch.maybe_current_level() is None:
                count_grad_samples(x.shape[0] if shared else x.shape[1])
            return self._forward(x, shared=shared)
        raise ValueError(
            f"{self.arch} stack of {self.n_models} models expects input (B, *{self.input_shape}) or "
            f"({self.n_models}, B, *{self.input_shape}), got {tuple(x.shape)}"
        )

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise model i from ``torch.Generator().manual_seed(seeds[i])`` with PyTorch's default init.

        The draws happen on the CPU in the single model's layer order, so model i gets exactly the weights
        that ``torch.manual_seed(seeds[i])`` followed by building the plain model would give, on any device
        and in any stack position. The global RNG is not touched.
        """
        layers = self.stacked_layers()
        for m, seed in enumerate(self.seeds):
            generator = torch.Generator().manual_seed(seed)
            for layer in layers:
                layer.init_model_(m, generator)

    def unstack(self, i: int) -> nn.Module:
        """Model i as a plain single model (ordinary layers, same device/dtype/mode), mapping
        ``(B, *input_shape)`` to ``(B, num_classes)``. A copy: training it leaves the stack unchanged."""
        if not 0 <= i < self.n_models:
            raise IndexError(f"model index {i} out of range for a stack of {self.n_models}")
        single = self._assemble_single([layer.single(i) for layer in self.stacked_layers()])
        return single.train(self.training)

    def select(self, idx: Sequence[int]) -> StackedModel:
        """A new stack holding copies of models ``idx`` (in that order), seeds carried along."""
        idx = [int(i) for i in idx]
        if not idx:
            raise ValueError("select needs at least one model index")
        bad = [i for i in idx if not 0 <= i < self.n_models]
        if bad:
            raise IndexError(f"model indices {bad} out of range for a stack of {self.n_models}")
        out = self._empty_like([self.seeds[i] for i in idx])
        rows = torch.tensor(idx, dtype=torch.long, device=self._param().device)
        out.load_state_dict({k: v.index_select(0, rows) for k, v in self.state_dict().items()})
        return out.train(self.training)

    def _empty_like(self, seeds: Sequence[int]) -> StackedModel:
        p = self._param()
        return type(self)(seeds, self.input_shape, self.num_classes, device=p.device, dtype=p.dtype)

    def _param(self) -> torch.Tensor:
        return next(self.parameters())

    def extra_repr(self) -> str:
        return (
            f"arch={self.arch!r}, n_models={self.n_models}, input_shape={self.input_shape}, "
            f"num_classes={self.num_classes}"
        )
