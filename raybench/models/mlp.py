"""The ``mlp`` architecture: flatten → Linear(d, 128) → ReLU → Linear(128, 128) → ReLU → Linear(128, C).

Small enough to train hundreds of copies on a laptop CPU in seconds: the default for ``digits``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from raybench.models.layers import StackedLinear
from raybench.models.stacked import StackedLayer, StackedModel

HIDDEN = 128


class StackedMLP(StackedModel):
    arch = "mlp"

    def _build_layers(self, *, device: torch.device | str | None, dtype: torch.dtype | None) -> None:
        m, d = self.n_models, math.prod(self.input_shape)
        self.fc1 = StackedLinear(m, d, HIDDEN, device=device, dtype=dtype)
        self.fc2 = StackedLinear(m, HIDDEN, HIDDEN, device=device, dtype=dtype)
        self.fc3 = StackedLinear(m, HIDDEN, self.num_classes, device=device, dtype=dtype)

    def stacked_layers(self) -> list[StackedLayer]:
        return [self.fc1, self.fc2, self.fc3]

    def _forward(self, x: torch.Tensor, shared: bool) -> torch.Tensor:
        # shared (B, *shape) -> (B, d), which fc1 broadcasts to all models; (M, B, *shape) -> (M, B, d)
        z = x.flatten(1) if shared else x.flatten(2)
        # Scoring (no gradients) works in place: its batches of activations (4 MB for 50 MLPs) come from fresh
        # memory that page-faults on first touch, a sixth to a third of a snapshot's scoring (bench/eval_batch.py).
        inplace = not torch.is_grad_enabled()
        z = F.relu(self.fc1(z), inplace=inplace)
        z = F.relu(self.fc2(z), inplace=inplace)
        return self.fc3(z)

    def _assemble_single(self, layers: list[nn.Module]) -> nn.Module:
        fc1, fc2, fc3 = layers
        return nn.Sequential(nn.Flatten(), fc1, nn.ReLU(), fc2, nn.ReLU(), fc3)
