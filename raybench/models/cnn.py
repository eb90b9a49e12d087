"""The ``cnn`` architecture: Conv(c→16, 3, pad 1) → ReLU → Conv(16→32, 3, pad 1) → ReLU → MaxPool2d(2) →
flatten → Linear(32·⌊H/2⌋·⌊W/2⌋, 64) → ReLU → Linear(64, C). No BatchNorm.

Stacked with grouped convolutions: activations are laid out ``(B, M·channels, H, W)``, one channel group per
model, so every conv, ReLU and pooling op runs once for all models. The dense head switches to the
``(M, B, features)`` layout of ``StackedLinear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raybench.models.layers import StackedConv2d, StackedLinear
from raybench.models.stacked import StackedLayer, StackedModel

CHANNELS = (16, 32)
HIDDEN = 64


class StackedCNN(StackedModel):
    arch = "cnn"

    def _build_layers(self, *, device: torch.device | str | None, dtype: torch.dtype | None) -> None:
        if len(self.input_shape) != 3:
            raise ValueError(f"cnn needs image inputs (C, H, W), got input shape {self.input_shape}")
        m, (c, h, w) = self.n_models, self.input_shape
        kw = {"device": device, "dtype": dtype}
        self.conv1 = StackedConv2d(m, c, CHANNELS[0], 3, padding=1, **kw)
        self.conv2 = StackedConv2d(m, CHANNELS[0], CHANNELS[1], 3, padding=1, **kw)
        self.fc1 = StackedLinear(m, CHANNELS[1] * (h // 2) * (w // 2), HIDDEN, **kw)
        self.fc2 = StackedLinear(m, HIDDEN, self.num_classes, **kw)

    def stacked_layers(self) -> list[StackedLayer]:
        return [self.conv1, self.conv2, self.fc1, self.fc2]

    def _forward(self, x: torch.Tensor, shared: bool) -> torch.Tensor:
        m = self.n_models
        if shared:
            z = self.conv1.forward_shared(x)
        else:  # (M, B, C, H, W) -> (B, M·C, H, W)
            z = self.conv1(x.transpose(0, 1).flatten(1, 2))
        z = F.relu(z)
        z = F.max_pool2d(F.relu(self.conv2(z)), 2)
        # (B, M·32, h, w) -> (M, B, 32·h·w): each model's features flattened channel-major, as nn.Flatten does
        z = z.reshape(z.shape[0], m, -1).transpose(0, 1)
        return self.fc2(F.relu(self.fc1(z)))

    def _assemble_single(self, layers: list[nn.Module]) -> nn.Module:
        conv1, conv2, fc1, fc2 = layers
        return nn.Sequential(
            conv1, nn.ReLU(), conv2, nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), fc1, nn.ReLU(), fc2
        )
