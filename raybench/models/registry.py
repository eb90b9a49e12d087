"""Building, converting and combining stacks by architecture name."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from raybench.models.cnn import StackedCNN
from raybench.models.mlp import StackedMLP
from raybench.models.resnet9 import StackedResNet9
from raybench.models.stacked import StackedModel

_ARCHS: dict[str, type[StackedModel]] = {"mlp": StackedMLP, "cnn": StackedCNN, "resnet9": StackedResNet9}
ARCHS: tuple[str, ...] = tuple(_ARCHS)


def _arch_class(arch: str) -> type[StackedModel]:
    if arch not in _ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}")
    return _ARCHS[arch]


def build_stack(
    arch: str, seeds: Sequence[int], input_shape: tuple[int, ...], num_classes: int
) -> StackedModel:
    """Freshly initialised models, model i from ``seeds[i]``, on the CPU (move with ``.to(device)``)."""
    stack = _arch_class(arch)(seeds, input_shape, num_classes)
    stack.reset_parameters()
    return stack


def stack_models(
    models: Sequence[nn.Module],
    arch: str,
    seeds: Sequence[int],
    input_shape: tuple[int, ...],
    num_classes: int,
) -> StackedModel:
    """Stack plain single models (as ``StackedModel.unstack`` returns them) into one stack: the inverse of
    ``unstack``. The stack takes the device and dtype of the first model's parameters."""
    if len(models) != len(seeds):
        raise ValueError(f"got {len(models)} models but {len(seeds)} seeds")
    if not models:
        raise ValueError("stack_models needs at least one model")
    first = next(models[0].parameters())
    stack = _arch_class(arch)(seeds, input_shape, num_classes, device=first.device, dtype=first.dtype)
    targets = stack.stacked_layers()
    for m, model in enumerate(models):
        # BatchNorm layers carry per-model state too (resnet9); the mlp and cnn have none
        layers = [mod for mod in model.modules() if isinstance(mod, nn.Linear | nn.Conv2d | nn.BatchNorm2d)]
        if len(layers) != len(targets):
            raise ValueError(
                f"model {m} has {len(layers)} Linear/Conv2d layers; arch {arch!r} has {len(targets)}"
            )
        for target, layer in zip(targets, layers, strict=True):
            target.load_model_(m, layer)
    return stack


def concat_stacks(stacks: Sequence[StackedModel]) -> StackedModel:
    """One stack holding the models of ``stacks`` in order (seeds concatenated). All must share architecture,
    input shape, class count, device and dtype."""
    if not stacks:
        raise ValueError("concat_stacks needs at least one stack")
    first = stacks[0]
    for s in stacks[1:]:
        if (s.arch, s.input_shape, s.num_classes) != (first.arch, first.input_shape, first.num_classes):
            raise ValueError(
                f"cannot concatenate a {s.arch} stack for {s.input_shape}/{s.num_classes} classes "
                f"with a {first.arch} stack for {first.input_shape}/{first.num_classes} classes"
            )
    kinds = {(p.device, p.dtype) for s in stacks for p in s.parameters()}
    if len(kinds) > 1:
        raise ValueError(f"cannot concatenate stacks on different devices/dtypes: {sorted(map(str, kinds))}")
    out = first._empty_like([seed for s in stacks for seed in s.seeds])
    states = [s.state_dict() for s in stacks]
    out.load_state_dict({k: torch.cat([st[k] for st in states]) for k in states[0]})
    return out.train(first.training)
