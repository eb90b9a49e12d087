"""Model architectures and the stacked M-model representation used for all training and unlearning."""

from raybench.models.registry import ARCHS, build_stack, concat_stacks, stack_models
from raybench.models.stacked import StackedModel, count_grad_samples, grad_samples, reset_grad_samples

__all__ = ["ARCHS", "StackedModel", "build_stack", "concat_stacks", "count_grad_samples", "grad_samples",
           "reset_grad_samples", "stack_models"]
