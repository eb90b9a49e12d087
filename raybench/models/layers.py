"""Layers that hold M independent copies of a Linear or Conv2d, with a leading model dimension.

Every parameter is shaped ``(M, ...)``, so selecting, concatenating or checkpointing models is indexing along
dim 0, and the weight of model m is a plain view ``weight[m]``. Forward passes use one batched kernel for all
M models (``baddbmm`` for linear layers, a grouped convolution for conv layers) instead of M small ones.

Each model is initialised from its own ``torch.Generator`` exactly as ``nn.Linear`` / ``nn.Conv2d`` initialise
themselves (kaiming-uniform weight with a=√5, then uniform bias in ±1/√fan_in), so a model's initial weights
depend only on its seed, never on the stack it sits in.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_ALIGN = 16  # float32 elements in 64 bytes, the alignment of PyTorch's CPU allocations


def _default_init(weight: torch.Tensor, bias: torch.Tensor, generator: torch.Generator) -> None:
    """PyTorch's default Linear/Conv init, drawn from ``generator`` in the same order as reset_parameters."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
    fan_in = weight[0].numel()
    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    nn.init.uniform_(bias, -bound, bound, generator=generator)


class StackedLinear(nn.Module):
    """M linear layers. ``weight`` is ``(M, in, out)`` (transposed w.r.t. nn.Linear, so the forward is one
    ``baddbmm`` with no transposes), ``bias`` is ``(M, out)``."""

    def __init__(
        self,
        n_models: int,
        in_features: int,
        out_features: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(n_models, in_features, out_features, **kw))
        self.bias = nn.Parameter(torch.empty(n_models, out_features, **kw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(M, B, in)`` -> ``(M, B, out)``, or a shared ``(B, in)`` -> ``(M, B, out)``.

        On the CPU the output is computed ``_ALIGN``-padded along features and sliced, so each model's block
        of the output is 64-byte aligned whatever B is. CPU BLAS picks its kernel by alignment: without the
        padding a model's logits (10 classes, a last batch of odd size) would differ in the last bits with the
        model's position in the stack, and training would not be independent of the neighbours. (On CUDA the
        padding would only add kernel launches.)
        """
        weight, bias = self.weight, self.bias
        pad = -self.out_features % _ALIGN if weight.device.type == "cpu" else 0
        if pad:
            weight, bias = F.pad(weight, (0, pad)), F.pad(bias, (0, pad))
        if x.dim() == 2:
            out = torch.matmul(x, weight)
            # without gradients in place: a fresh (M, B, out) buffer page-faults (models.mlp's forward says more)
            out = out.add_(bias.unsqueeze(1)) if not torch.is_grad_enabled() else out + bias.unsqueeze(1)
        else:
            out = torch.baddbmm(bias.unsqueeze(1), x, weight)
        return out[..., : self.out_features] if pad else out

    @torch.no_grad()
    def init_model_(self, m: int, generator: torch.Generator) -> None:
        """Initialise model m as ``nn.Linear`` would, drawing from ``generator`` (CPU, then copied over)."""
        weight = torch.empty(self.out_features, self.in_features)
        bias = torch.empty(self.out_features)
        _default_init(weight, bias, generator)
        self.weight[m].copy_(weight.t())
        self.bias[m].copy_(bias)

    def single(self, m: int) -> nn.Linear:
        """Model m's layer as an ordinary ``nn.Linear`` (a copy, on the stack's device and dtype)."""
        layer = nn.utils.skip_init(
            nn.Linear, self.in_features, self.out_features, device=self.weight.device, dtype=self.weight.dtype
        )
        with torch.no_grad():
            layer.weight.copy_(self.weight[m].t())
            layer.bias.copy_(self.bias[m])
        return layer

    @torch.no_grad()
    def load_model_(self, m: int, layer: nn.Module) -> None:
        """Copy an ordinary ``nn.Linear`` into model m's slot (the inverse of ``single``)."""
        _check_single(layer, nn.Linear, (self.out_features, self.in_features))
        self.weight[m].copy_(layer.weight.t())
        self.bias[m].copy_(layer.bias)

    def extra_repr(self) -> str:
        m = self.weight.shape[0]
        return f"n_models={m}, in_features={self.in_features}, out_features={self.out_features}"


class StackedConv2d(nn.Module):
    """M conv layers (stride 1). ``weight`` is ``(M, out, in, k, k)``: reshaped to ``(M·out, in, k, k)`` it is
    exactly the weight of a grouped convolution with ``groups=M`` over inputs laid out ``(B, M·in, H, W)``."""

    def __init__(
        self,
        n_models: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        padding: int = 0,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.padding = kernel_size, padding
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(
            torch.empty(n_models, out_channels, in_channels, kernel_size, kernel_size, **kw)
        )
        self.bias = nn.Parameter(torch.empty(n_models, out_channels, **kw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, M·in, H, W)`` -> ``(B, M·out, H', W')``, one group per model."""
        m = self.weight.shape[0]
        return F.conv2d(x, self.weight.flatten(0, 1), self.bias.flatten(), padding=self.padding, groups=m)

    def forward_shared(self, x: torch.Tensor) -> torch.Tensor:
        """A shared ``(B, in, H, W)`` -> ``(B, M·out, H', W')``: one ordinary convolution with M·out filters,
        which avoids materialising M copies of the input."""
        return F.conv2d(x, self.weight.flatten(0, 1), self.bias.flatten(), padding=self.padding)

    @torch.no_grad()
    def init_model_(self, m: int, generator: torch.Generator) -> None:
        """Initialise model m as ``nn.Conv2d`` would, drawing from ``generator`` (CPU, then copied over)."""
        weight = torch.empty(self.weight.shape[1:])
        bias = torch.empty(self.out_channels)
        _default_init(weight, bias, generator)
        self.weight[m].copy_(weight)
        self.bias[m].copy_(bias)

    def single(self, m: int) -> nn.Conv2d:
        """Model m's layer as an ordinary ``nn.Conv2d`` (a copy, on the stack's device and dtype)."""
        layer = nn.utils.skip_init(
            nn.Conv2d,
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            padding=self.padding,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            layer.weight.copy_(self.weight[m])
            layer.bias.copy_(self.bias[m])
        return layer

    @torch.no_grad()
    def load_model_(self, m: int, layer: nn.Module) -> None:
        """Copy an ordinary ``nn.Conv2d`` into model m's slot (the inverse of ``single``)."""
        _check_single(layer, nn.Conv2d, tuple(self.weight.shape[1:]))
        if (
            layer.stride != (1, 1)
            or layer.padding != (self.padding, self.padding)
            or layer.groups != 1
            or layer.dilation != (1, 1)
        ):
            raise ValueError(f"cannot stack {layer}: expected stride 1, padding {self.padding}, no groups")
        self.weight[m].copy_(layer.weight)
        self.bias[m].copy_(layer.bias)

    def extra_repr(self) -> str:
        return (
            f"n_models={self.weight.shape[0]}, in_channels={self.in_channels}, "
            f"out_channels={self.out_channels}, kernel_size={self.kernel_size}, padding={self.padding}"
        )


def _check_single(layer: nn.Module, kind: type[nn.Module], weight_shape: tuple[int, ...]) -> None:
    if not isinstance(layer, kind):
        raise ValueError(f"cannot stack {layer!r}: expected {kind.__name__}")
    if tuple(layer.weight.shape) != weight_shape or layer.bias is None:
        raise ValueError(f"cannot stack {layer!r}: expected weight shape {weight_shape} and a bias")
