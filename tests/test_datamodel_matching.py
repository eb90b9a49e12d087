"""Datamodel matching (DMM) on a tiny trained stack: it regresses towards the datamodel's prediction of the
model without F (original logits − scale·effect), it stays where it is when the effect is zero, its target is
the originals' own logits (checked against OM fine-tuned onto copies of the originals), and OM, whose loop it
shares, still follows its definition."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from raybench.data import load_dataset, resolve_forget_set
from raybench.methods import UnlearnData, get_method
from raybench.methods.base import flatten_per_model, per_model_batches
from raybench.methods.oracle_matching import matching_indices
from raybench.models import StackedModel, build_stack
from raybench.training import default_recipe, train_stack

SEED = 3


@dataclasses.dataclass
class World:
    originals: StackedModel
    oracles: StackedModel
    data: UnlearnData
    effect: torch.Tensor  # a synthetic datamodel effect: F's true-class logit raised by 4, nothing elsewhere


@pytest.fixture(scope="module")
def world() -> World:
    ds = load_dataset("digits")
    x, y = torch.tensor(ds.x_train), torch.tensor(ds.y_train)
    forget = torch.tensor(resolve_forget_set("3", ds).indices)
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[forget] = False
    retain = torch.nonzero(keep).squeeze(1)
    recipe = dataclasses.replace(default_recipe("digits", "mlp"), epochs=8)
    originals = train_stack(build_stack("mlp", [31, 32], ds.input_shape, ds.num_classes), x, y, recipe)
    oracles = train_stack(build_stack("mlp", [41, 42], ds.input_shape, ds.num_classes), x[retain], y[retain],
                          recipe)
    effect = torch.zeros(len(y), ds.num_classes)
    effect[forget, y[forget]] = 4.0
    return World(originals, oracles, UnlearnData(x, y, forget, retain, ds.num_classes, recipe), effect)


def dmm(world: World, stack: StackedModel, effect: torch.Tensor | None, epochs=(4,), **overrides) -> StackedModel:
    method = get_method("datamodel_matching")
    data = dataclasses.replace(world.data, datamodel_effect=effect)
    return list(method.fn(stack, data, {**method.defaults, **overrides}, epochs, SEED))[-1][1]


def logits(stack: StackedModel, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return stack.eval()(x)


def weights(stack: StackedModel) -> torch.Tensor:
    return flatten_per_model([p.detach().clone() for p in stack.parameters()])


def test_registered_with_a_datamodel_and_no_oracle():
    m = get_method("datamodel_matching")
    assert m.needs_datamodel and not m.needs_oracles and not m.needs_scores and m.version == 1
    assert m.defaults["scale"] == 1.0 and set(m.param_specs) == set(m.defaults)


def test_moves_forget_outputs_towards_the_datamodels_prediction(world):
    x = world.data.x_forget
    target = logits(world.originals, x) - world.effect[world.data.forget_idx]  # original − effect, per student

    def distance(stack):
        return ((logits(stack, x) - target) ** 2).mean(dim=(1, 2))

    before = distance(world.originals)
    out = dmm(world, world.originals.select([0, 1]), world.effect)
    assert (distance(out) < 0.25 * before).all()  # every student, most of the way
    # the true-class logit went down on F (what the effect asks), the retain predictions stayed
    y_f = world.data.y_forget
    drop = (logits(world.originals, x) - logits(out, x))[:, torch.arange(len(y_f)), y_f].mean(1)
    assert (drop > 2.0).all()
    xr = world.data.x_retain
    agree = (logits(out, xr).argmax(-1) == logits(world.originals, xr).argmax(-1)).float().mean()
    assert agree > 0.97
    # the scale multiplies the effect: half the effect, about half the drop
    half = dmm(world, world.originals.select([0, 1]), world.effect, scale=0.5)
    half_drop = (logits(world.originals, x) - logits(half, x))[:, torch.arange(len(y_f)), y_f].mean(1)
    assert ((half_drop > 0.3 * drop) & (half_drop < 0.7 * drop)).all()


def test_a_zero_effect_leaves_the_models_where_they_are(world):
    # the target is each original's own logits: zero loss, zero gradient, and Adam does not move (the MLP has no
    # BatchNorm or dropout, so its train-mode logits are its eval-mode ones)
    before = weights(world.originals)
    out = dmm(world, world.originals.select([0, 1]), torch.zeros_like(world.effect))
    assert torch.equal(weights(out), before)


def restated_matching(student: StackedModel, x: torch.Tensor, target: torch.Tensor, params: dict,
                      n_epochs: int) -> StackedModel:
    """OM's loop of the spec written out for one model: Adam(lr, weight decay) on MSE(student logits, target) over
    the multiset, batches from ``per_model_batches``, ExponentialLR(γ) stepped per epoch, train mode."""
    opt = torch.optim.Adam(student.parameters(), lr=params["lr"], weight_decay=params["weight_decay"])
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=params["gamma"])
    student.train()
    for epoch in range(1, n_epochs + 1):
        for idx in per_model_batches(len(x), params["batch_size"], student.seeds, SEED, epoch, x.device):
            loss = ((student(x[idx[0]][None])[0] - target[idx[0]]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return student


def test_dmm_restated_original_logits_minus_scale_times_effect(world):
    shift = torch.randn(world.effect.shape, generator=torch.Generator().manual_seed(0))
    params = {**get_method("datamodel_matching").defaults, "scale": 0.5}
    got = dmm(world, world.originals.select([1]), shift, epochs=(2,), scale=0.5)
    d = world.data
    ids = matching_indices(d.forget_idx, d.retain_idx, params["forget_multiplier"], params["retain_multiplier"],
                           SEED)
    x = d.x_train[ids]
    target = logits(world.originals.select([1]), x)[0] - 0.5 * shift[ids]  # the spec: θ0(x_j) − c·effect[j]
    want = restated_matching(world.originals.select([1]), x, target, params, 2)
    torch.testing.assert_close(weights(got), weights(want), atol=1e-5, rtol=0)


def test_a_model_matches_the_same_alone_as_in_a_stack(world):
    pair = dmm(world, world.originals.select([0, 1]), world.effect, epochs=(1,))
    for m in range(2):
        alone = dmm(world, world.originals.select([m]), world.effect, epochs=(1,))
        torch.testing.assert_close(weights(alone)[0], weights(pair)[m], atol=1e-5, rtol=0)


def test_refuses_without_a_datamodel_or_with_a_misshaped_one(world):
    with pytest.raises(ValueError, match="needs data.datamodel_effect"):
        dmm(world, world.originals.select([0]), None)
    with pytest.raises(ValueError, match=r"shape \(1437, 10\)"):
        dmm(world, world.originals.select([0]), world.effect[:100])


def test_oracle_matching_still_follows_its_definition(world):
    """OM, now sharing its loop with DMM, against the spec restated for one model and its own oracle."""
    om = get_method("oracle_matching")
    params = dict(om.defaults)
    data = dataclasses.replace(world.data, oracles=world.oracles.select([0]))
    got = list(om.fn(world.originals.select([0]), data, params, (3,), SEED))[-1][1]
    d = world.data
    ids = matching_indices(d.forget_idx, d.retain_idx, params["forget_multiplier"], params["retain_multiplier"],
                           SEED)
    x = d.x_train[ids]
    want = restated_matching(world.originals.select([0]), x, logits(world.oracles.select([0]), x)[0], params, 3)
    torch.testing.assert_close(weights(got), weights(want), atol=1e-5, rtol=0)
