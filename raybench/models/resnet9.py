"""The ``resnet9`` architecture: EasyDUB's / data-unlearning-bench's CIFAR-10 ResNet-9, stacked
(docs/methods.md#recipes).

Single model (``resnet9()``, exactly the published module tree, so published state dicts load into it)::

    0  convBN(c→64,    k3 s1 p1)           convBN = Conv2d(bias=False) → BatchNorm2d → ReLU
    1  convBN(64→128,  k5 s2 p2)
    2  Residual(convBN(128→128) → convBN(128→128))          Residual(f)(x) = x + f(x)
    3  convBN(128→256, k3 s1 p1)
    4  MaxPool2d(2)
    5  Residual(convBN(256→256) → convBN(256→256))
    6  convBN(256→128, k3 s1 p0)
    7  AdaptiveMaxPool2d(1) · 8 Flatten · 9 Linear(128→C, bias=False) · 10 Mul(0.2)

Its state-dict keys are therefore ``0.0.weight`` (conv), ``0.1.{weight,bias,running_mean,running_var,
num_batches_tracked}`` (BN), …, ``2.module.0.0.weight``, ``2.module.1.1.running_var``, …, ``6.1.bias``,
``9.weight``: the names of EasyDUB's ``easydub/models.py::resnet9`` and DUB's ``ResNet9`` (the published
checkpoints add a ``model.`` or ``module.`` prefix, which ``raybench.easydub`` strips).

Stacked (``StackedResNet9``), as EasyDUB's ``multi_resnet9``: activations are ``(B, M·C, H, W)``, every conv is a
grouped convolution (``groups=M``) and every BatchNorm runs over the M·C channels, so each model normalises with
its own batch statistics and keeps its own running statistics. Unlike ``multi_resnet9``, every parameter and
buffer here has the model dimension first (conv ``(M, out, in, k, k)``, BN ``(M, C)``, head ``(M, in, out)``,
``num_batches_tracked`` ``(M,)``), like every other raybench stack: ``select``, ``concat_stacks`` and
checkpoints index dim 0, and ``p.reshape(M, -1)`` is per model.

On CUDA the activations are channels-last (NHWC), the layout in which cuDNN runs bf16 convolutions on tensor cores
without transposes, and training/margins run under bf16 autocast (``cuda_autocast_dtype``; margins are still
computed in float32 by ``raybench.training.margins_from_logits``). On the CPU everything stays float32 NCHW.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from raybench.models.stacked import StackedModel

HEAD_SCALE = 0.2
BN_EPS = 1e-5
BN_MOMENTUM = 0.1

# (in, out, kernel, stride, padding) of the 8 convBN blocks in module order; in=None means the input channels.
_CONVS: tuple[tuple[int | None, int, int, int, int], ...] = (
    (None, 64, 3, 1, 1),
    (64, 128, 5, 2, 2),
    (128, 128, 3, 1, 1),  # residual 1, first
    (128, 128, 3, 1, 1),  # residual 1, second
    (128, 256, 3, 1, 1),
    (256, 256, 3, 1, 1),  # residual 2, first
    (256, 256, 3, 1, 1),  # residual 2, second
    (256, 128, 3, 1, 0),
)
FEATURES = _CONVS[-1][1]


# -- the single model, with the published module tree ------------------------------------------------------------- --
class Mul(nn.Module):
    """Multiply by a constant (the published head's ×0.2); holds no state, so it adds no state-dict key."""

    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight

    def extra_repr(self) -> str:
        return f"weight={self.weight}"


class Residual(nn.Module):
    """``x + module(x)``; the attribute is called ``module`` because the published state dicts say ``2.module.…``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.module(x)


def conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Sequential:
    """The published ``conv_bn`` block from existing layers: Conv2d → BatchNorm2d → ReLU(inplace)."""
    return nn.Sequential(conv, bn, nn.ReLU(inplace=True))


def assemble_resnet9(layers: list[nn.Module]) -> nn.Sequential:
    """The published ``nn.Sequential`` from its 8 (Conv2d, BatchNorm2d) pairs and the head Linear, in module order."""
    if len(layers) != 2 * len(_CONVS) + 1:
        raise ValueError(f"resnet9 has {2 * len(_CONVS) + 1} parameterised layers, got {len(layers)}")
    blocks = [conv_bn(layers[2 * i], layers[2 * i + 1]) for i in range(len(_CONVS))]
    return nn.Sequential(
        blocks[0],
        blocks[1],
        Residual(nn.Sequential(blocks[2], blocks[3])),
        blocks[4],
        nn.MaxPool2d(2),
        Residual(nn.Sequential(blocks[5], blocks[6])),
        blocks[7],
        nn.AdaptiveMaxPool2d((1, 1)),
        nn.Flatten(),
        layers[-1],
        Mul(HEAD_SCALE),
    )


def resnet9(num_classes: int = 10, in_channels: int = 3) -> nn.Sequential:
    """A freshly initialised single ResNet-9 (PyTorch default init from the global RNG, as the published code)."""
    layers: list[nn.Module] = []
    for c_in, c_out, k, s, p in _CONVS:
        layers.append(nn.Conv2d(c_in or in_channels, c_out, k, stride=s, padding=p, bias=False))
        layers.append(nn.BatchNorm2d(c_out))
    layers.append(nn.Linear(FEATURES, num_classes, bias=False))
    return assemble_resnet9(layers)


def resnet9_macs(input_shape: tuple[int, int, int], num_classes: int = 10) -> int:
    """Multiply-accumulates of one forward pass of one model on one sample (convolutions and the head only).

    Used for achieved-FLOP/s figures: training costs about 3× this (forward, input grad, weight grad) × 2 FLOPs.
    """
    c, h, w = input_shape
    total = 0
    for i, (c_in, c_out, k, s, p) in enumerate(_CONVS):
        h, w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        total += (c_in or c) * c_out * k * k * h * w
        if i == 4:  # the MaxPool2d(2) after the 128→256 block
            h, w = h // 2, w // 2
    return total + FEATURES * num_classes


# -- stacked layers --------------------------------------------------------------------------------------------------
class StackedConvNoBias(nn.Module):
    """M bias-free convolutions with stride: ``weight`` ``(M, out, in, k, k)``, run as one grouped convolution."""

    def __init__(self, n_models: int, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                 padding: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.weight = nn.Parameter(torch.empty(n_models, out_channels, in_channels, kernel_size, kernel_size,
                                               device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, M·in, H, W)`` -> ``(B, M·out, H', W')``, one group per model."""
        return F.conv2d(x, self.weight.flatten(0, 1), None, self.stride, self.padding, groups=self.weight.shape[0])

    def forward_shared(self, x: torch.Tensor) -> torch.Tensor:
        """A shared ``(B, in, H, W)`` -> ``(B, M·out, H', W')``: one ordinary convolution with M·out filters, so
        the input is never copied M times."""
        return F.conv2d(x, self.weight.flatten(0, 1), None, self.stride, self.padding)

    @torch.no_grad()
    def init_model_(self, m: int, generator: torch.Generator) -> None:
        """Model m's weight as ``nn.Conv2d(bias=False)`` initialises it (kaiming-uniform a=√5; nothing else drawn)."""
        weight = torch.empty(self.weight.shape[1:])
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
        self.weight[m].copy_(weight)

    def single(self, m: int) -> nn.Conv2d:
        layer = nn.utils.skip_init(nn.Conv2d, self.in_channels, self.out_channels, self.kernel_size,
                                   stride=self.stride, padding=self.padding, bias=False,
                                   device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(self.weight[m])
        return layer

    @torch.no_grad()
    def load_model_(self, m: int, layer: nn.Module) -> None:
        """Copy a plain ``nn.Conv2d`` (same geometry, no bias) into model m's slot."""
        shape = tuple(self.weight.shape[1:])
        if not isinstance(layer, nn.Conv2d) or tuple(layer.weight.shape) != shape:
            raise ValueError(f"cannot stack {layer!r}: expected Conv2d with weight shape {shape}")
        geometry = (layer.stride, layer.padding, layer.groups, layer.dilation, layer.bias is None)
        if geometry != ((self.stride,) * 2, (self.padding,) * 2, 1, (1, 1), True):
            raise ValueError(f"cannot stack {layer}: expected stride {self.stride}, padding {self.padding}, no bias")
        self.weight[m].copy_(layer.weight)

    def extra_repr(self) -> str:
        return (f"n_models={self.weight.shape[0]}, {self.in_channels}→{self.out_channels}, k={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, bias=False")


class StackedBatchNorm2d(nn.Module):
    """M BatchNorm2d layers over ``(B, M·C, H, W)``: one ``F.batch_norm`` over M·C channels, statistics per model.

    Parameters and running statistics are ``(M, C)`` and passed to ``F.batch_norm`` as flat views, so the in-place
    running-statistics update lands in them. ``num_batches_tracked`` is ``(M,)``: kept only so that a model converts
    to and from a plain ``nn.BatchNorm2d`` state dict without loss (with momentum 0.1 it does not affect the maths).
    """

    def __init__(self, n_models: int, channels: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.channels = channels
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.ones(n_models, channels, **kw))
        self.bias = nn.Parameter(torch.zeros(n_models, channels, **kw))
        self.register_buffer("running_mean", torch.zeros(n_models, channels, **kw))
        self.register_buffer("running_var", torch.ones(n_models, channels, **kw))
        self.register_buffer("num_batches_tracked", torch.zeros(n_models, dtype=torch.long, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.num_batches_tracked.add_(1)
        return F.batch_norm(x, self.running_mean.view(-1), self.running_var.view(-1), self.weight.view(-1),
                            self.bias.view(-1), self.training, BN_MOMENTUM, BN_EPS)

    @torch.no_grad()
    def init_model_(self, m: int, generator: torch.Generator) -> None:
        """As ``nn.BatchNorm2d`` initialises itself: weight 1, bias 0, fresh running statistics (draws nothing)."""
        del generator  # BatchNorm's initialisation is deterministic; the model's stream is left untouched
        self.weight[m].fill_(1.0)
        self.bias[m].zero_()
        self.running_mean[m].zero_()
        self.running_var[m].fill_(1.0)
        self.num_batches_tracked[m] = 0

    def single(self, m: int) -> nn.BatchNorm2d:
        layer = nn.BatchNorm2d(self.channels, eps=BN_EPS, momentum=BN_MOMENTUM, device=self.weight.device,
                               dtype=self.weight.dtype)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                getattr(layer, name).copy_(getattr(self, name)[m])
        return layer

    @torch.no_grad()
    def load_model_(self, m: int, layer: nn.Module) -> None:
        """Copy a plain ``nn.BatchNorm2d`` (affine, tracking running statistics) into model m's slot."""
        if (not isinstance(layer, nn.BatchNorm2d) or layer.num_features != self.channels or not layer.affine
                or not layer.track_running_stats):
            raise ValueError(f"cannot stack {layer!r}: expected BatchNorm2d({self.channels}) with running stats")
        if layer.eps != BN_EPS or layer.momentum != BN_MOMENTUM:
            raise ValueError(f"cannot stack {layer!r}: expected eps={BN_EPS}, momentum={BN_MOMENTUM}")
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            getattr(self, name)[m].copy_(getattr(layer, name))

    def extra_repr(self) -> str:
        return f"n_models={self.weight.shape[0]}, channels={self.channels}"


class StackedHead(nn.Module):
    """M bias-free ``Linear(in→out)``: ``weight`` ``(M, in, out)`` (transposed w.r.t. nn.Linear), one ``bmm``."""

    def __init__(self, n_models: int, in_features: int, out_features: int, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(n_models, in_features, out_features, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(M, B, in)`` -> ``(M, B, out)``."""
        return torch.bmm(x, self.weight)

    @torch.no_grad()
    def init_model_(self, m: int, generator: torch.Generator) -> None:
        weight = torch.empty(self.out_features, self.in_features)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
        self.weight[m].copy_(weight.t())

    def single(self, m: int) -> nn.Linear:
        layer = nn.utils.skip_init(nn.Linear, self.in_features, self.out_features, bias=False,
                                   device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(self.weight[m].t())
        return layer

    @torch.no_grad()
    def load_model_(self, m: int, layer: nn.Module) -> None:
        shape = (self.out_features, self.in_features)
        if not isinstance(layer, nn.Linear) or tuple(layer.weight.shape) != shape or layer.bias is not None:
            raise ValueError(f"cannot stack {layer!r}: expected Linear with weight shape {shape} and no bias")
        self.weight[m].copy_(layer.weight.t())

    def extra_repr(self) -> str:
        return f"n_models={self.weight.shape[0]}, {self.in_features}→{self.out_features}, bias=False"


# -- the stack -------------------------------------------------------------------------------------------------------
class StackedResNet9(StackedModel):
    """M ResNet-9s; see the module docstring for the layout. Needs inputs of at least 16×16 pixels (the last
    convolution has no padding and runs on the image downsampled 4×)."""

    arch = "resnet9"
    cuda_autocast_dtype: ClassVar[torch.dtype] = torch.bfloat16
    """Read by ``raybench.training``: forward passes on CUDA run under this autocast, as EasyDUB trains."""
    cuda_cudnn_benchmark: ClassVar[bool] = True
    """Read by ``raybench.training``: let cuDNN time its algorithms on CUDA (1.7× faster steps on an H100)."""
    eval_batch_budget: ClassVar[int] = 1 << 15
    """Samples × models per margin batch (``raybench.training.compute_margins``): the first activation of a batch
    is then 2**15 × 64 × 32 × 32 bf16 values = 4 GiB, whatever M."""

    def _build_layers(self, *, device: torch.device | str | None, dtype: torch.dtype | None) -> None:
        if len(self.input_shape) != 3 or min(self.input_shape[1:]) < 16:
            raise ValueError(f"resnet9 needs image inputs (C, H, W) of at least 16×16, got {self.input_shape}")
        m, kw = self.n_models, {"device": device, "dtype": dtype}
        convs, bns = [], []
        for c_in, c_out, k, s, p in _CONVS:
            convs.append(StackedConvNoBias(m, c_in or self.input_shape[0], c_out, k, s, p, **kw))
            bns.append(StackedBatchNorm2d(m, c_out, **kw))
        self.convs = nn.ModuleList(convs)
        self.bns = nn.ModuleList(bns)
        self.head = StackedHead(m, FEATURES, self.num_classes, **kw)

    def stacked_layers(self) -> list[nn.Module]:
        pairs = [layer for pair in zip(self.convs, self.bns, strict=True) for layer in pair]
        return [*pairs, self.head]

    def _block(self, i: int, z: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bns[i](self.convs[i](z)), inplace=True)

    def _forward(self, x: torch.Tensor, shared: bool) -> torch.Tensor:
        m = self.n_models
        nhwc = x.is_cuda
        if shared:
            if nhwc:
                x = x.contiguous(memory_format=torch.channels_last)
            z = F.relu(self.bns[0](self.convs[0].forward_shared(x)), inplace=True)
        else:
            b, (c, h, w) = x.shape[1], self.input_shape
            if nhwc:  # (M, B, C, H, W) -> a channels-last (B, M·C, H, W) in one copy
                x = x.permute(1, 3, 4, 0, 2).reshape(b, h, w, m * c).permute(0, 3, 1, 2)
            else:
                x = x.transpose(0, 1).flatten(1, 2)
            z = self._block(0, x)
        z = self._block(1, z)
        z = z + self._block(3, self._block(2, z))
        z = F.max_pool2d(self._block(4, z), 2)
        z = z + self._block(6, self._block(5, z))
        z = F.adaptive_max_pool2d(self._block(7, z), 1)
        z = z.reshape(z.shape[0], m, FEATURES).transpose(0, 1)  # (B, M·128, 1, 1) -> (M, B, 128)
        return self.head(z) * HEAD_SCALE

    def _assemble_single(self, layers: list[nn.Module]) -> nn.Module:
        return assemble_resnet9(layers)
