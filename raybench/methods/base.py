"""What an unlearning method is: a plain function over a model stack and the run's data.

A method never imports Ray, never writes files and does not know how many models it holds: it receives the
stacked originals (all M at once), the run's data on the stack's device, its parameters and a seeded generator,
and *yields* ``(epoch, stack)`` at each requested epoch. Yielding lets the engine take margins of a snapshot
without the method copying models, so ``epochs=[1, 3, 5]`` costs one run of 5 epochs.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from raybench.ids import model_seed
from raybench.models import StackedModel
from raybench.spec import Param, infer
from raybench.training import Recipe

Snapshots = Iterator[tuple[int, StackedModel]]
MethodFn = Callable[["StackedModel", "UnlearnData", dict, Sequence[int], int], Snapshots]


@dataclass(frozen=True)
class UnlearnData:
    """The data a method may use, on the stack's device. Sample ids index the dataset's train array."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    forget_idx: torch.Tensor  # long, in forget-set order
    retain_idx: torch.Tensor  # long, ascending
    num_classes: int
    recipe: Recipe  # the base training recipe (methods scale their defaults from it)
    # For oracle-matching methods only: K oracles trained on the retain set, *disjoint* from the oracles that
    # score KLOM (docs/methods.md#oracle_matching), as one stack. None unless the method declares ``needs_oracles``.
    oracles: StackedModel | None = None
    # For datamodel methods only: (n_train, C) float32, the datamodel's summed effect of the forget set on the
    # logits of every train sample; None unless the method declares ``needs_datamodel``.
    datamodel_effect: torch.Tensor | None = None
    # For score-driven methods only: (n_train,) float32 memorisation of every train sample (higher = more
    # memorised); None unless the method declares ``needs_scores``.
    scores: torch.Tensor | None = None

    @property
    def x_forget(self) -> torch.Tensor:
        return self.x_train[self.forget_idx]

    @property
    def y_forget(self) -> torch.Tensor:
        return self.y_train[self.forget_idx]

    @property
    def x_retain(self) -> torch.Tensor:
        return self.x_train[self.retain_idx]

    @property
    def y_retain(self) -> torch.Tensor:
        return self.y_train[self.retain_idx]


@dataclass(frozen=True)
class Method:
    """A registered unlearning method.

    ``fn(stack, data, params, epochs, seed)`` yields snapshots; ``fn is None`` marks ``do_nothing``, whose
    "unlearned" models are the originals themselves (scored from the stored original margins, never recomputed).
    ``defaults`` lists every parameter with its default: unknown parameters are rejected, so a typo in a sweep
    cannot silently run the default. ``param_specs`` gives parameters their type and range (``raybench.spec``),
    checked before anything runs; a parameter without one is checked against its default's type.

    ``version`` is part of every unit id the method produces: bump it whenever what the method computes changes
    (a bug fix, a new default behaviour), and a rerun into an existing folder recomputes this method's units,
    and only them, instead of reusing results of the old code.
    """

    name: str
    fn: MethodFn | None
    description: str
    defaults: dict = field(default_factory=dict)
    default_epochs: tuple[int, ...] = (0,)
    needs_oracles: bool = False  # if True, params must hold "num_oracles" and data.oracles is that many oracles
    needs_datamodel: bool = False  # if True, data.datamodel_effect is the forget set's effect (needs --scores)
    needs_scores: bool = False  # if True, data.scores holds every train sample's memorisation (needs --scores)
    one_snapshot: bool = False  # produces one result (no trajectory): exactly one snapshot epoch may be asked
    version: int = 1
    param_specs: dict[str, Param] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1:
            raise ValueError(f"method {self.name!r}: version must be a positive integer, got {self.version!r}")
        extra = sorted(set(self.param_specs) - set(self.defaults))
        if extra:
            raise ValueError(f"method {self.name!r}: param_specs for parameters without a default: {extra}")
        bad = [k for k, v in self.param_specs.items() if not isinstance(v, Param)]
        if bad:
            raise ValueError(f"method {self.name!r}: param_specs must be raybench.spec.Param objects: {bad}")

    def spec_of(self, name: str) -> Param | None:
        """The check for parameter ``name``: declared, else inferred from its default (None: not checked)."""
        return self.param_specs.get(name) or infer(self.defaults.get(name))


def per_model_batches(n: int, batch_size: int, seeds: Sequence[int], seed: int, epoch: int,
                      device: torch.device) -> Iterator[torch.Tensor]:
    """Index batches (M, b) over ``n`` samples: a fresh permutation per model per epoch, last partial batch kept.

    Each model's order comes from its own seed mixed with the method's seed and the epoch, so it does not
    depend on which models share the stack.
    """
    generators = [torch.Generator().manual_seed(model_seed(seed, "data-order", s, epoch)) for s in seeds]
    perms = torch.stack([torch.randperm(n, generator=g) for g in generators]).to(device)
    for start in range(0, n, batch_size):
        yield perms[:, start:start + batch_size]


def stacked_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum over models of each model's mean cross-entropy: logits (M, b, C), y (M, b) or (b,).

    Summing (not averaging) over models keeps each model's gradient exactly what it would be alone.
    """
    y = y.expand(logits.shape[:2])
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / logits.shape[1]


def cycled_batches(n: int, batch_size: int, seeds: Sequence[int], seed: int, epoch: int,
                   device: torch.device) -> Iterator[torch.Tensor]:
    """Endless index batches (M, b) over ``n`` samples: ``per_model_batches`` pass after pass, each pass freshly
    permuted (pass p uses the stream ``model_seed(seed, "pass", p)``), for loaders zipped with a longer one.
    """
    for p in itertools.count():
        yield from per_model_batches(n, batch_size, seeds, model_seed(seed, "pass", p), epoch, device)


def model_generators(seeds: Sequence[int], seed: int, *name: object) -> list[torch.Generator]:
    """One CPU ``torch.Generator`` per model, seeded from the method's seed, the model's seed and ``name``."""
    return [torch.Generator().manual_seed(model_seed(seed, *name, s)) for s in seeds]


def flatten_per_model(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stacked tensors (each ``(M, ...)``, e.g. a stack's parameters or their gradients) -> ``(M, P)``: row m is
    model m's flattened vector, in parameter order."""
    m = tensors[0].shape[0]
    return torch.cat([t.reshape(m, -1) for t in tensors], dim=1)


def unflatten_per_model(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Inverse of ``flatten_per_model``: ``(M, P)`` -> tensors shaped like ``like``."""
    sizes = [t[0].numel() for t in like]
    return [chunk.reshape(t.shape) for chunk, t in zip(flat.split(sizes, dim=1), like, strict=True)]


def frozen_copy(stack: StackedModel) -> StackedModel:
    """A copy of every model of ``stack`` in eval mode with gradients off: a teacher or reference that no
    optimiser can move (its parameters are new tensors, not the stack's)."""
    copy = stack.select(range(stack.n_models)).eval()
    copy.requires_grad_(False)
    return copy


def single_snapshot(name: str, epochs: Sequence[int]) -> int:
    """For methods that produce one result (no epochs to snapshot): the one epoch to yield it under."""
    if len(epochs) != 1:
        raise ValueError(f"method {name!r} produces a single result; request one snapshot epoch, got {list(epochs)}")
    return int(epochs[0])
