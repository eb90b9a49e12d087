"""Model architectures and the stacked M-model representation used for all training and unlearning."""

from raybench.models.registry import ARCHS, build_stack, concat_stacks, stack_models
from raybench.models.stacked import StackedModel

__all__ = ["ARCHS", "StackedModel", "build_stack", "concat_stacks", "stack_models"]
