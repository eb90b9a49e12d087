"""Stacked models must be exactly M independent ordinary models, only faster."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raybench.models import ARCHS, StackedModel, build_stack, concat_stacks, stack_models

SHAPE = (1, 8, 8)
C = 10
SMALL_ARCHS = ("mlp", "cnn")  # the ones that take 8×8 digits; resnet9 has its own tests (tests/test_resnet9.py)


def reference_model(arch: str) -> nn.Module:
    """The architectures as plain PyTorch, written out independently of raybench.models."""
    if arch == "mlp":
        return nn.Sequential(
            nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, C)
        )
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, C),
    )


def assert_same_models(a: StackedModel, b: StackedModel) -> None:
    assert a.seeds == b.seeds and a.n_models == b.n_models
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), name


def test_archs():
    assert ARCHS == ("mlp", "cnn", "resnet9")
    with pytest.raises(ValueError, match=r"unknown arch 'resnet'; known: mlp, cnn, resnet9"):
        build_stack("resnet", [0], SHAPE, C)


@pytest.mark.parametrize("arch", SMALL_ARCHS)
def test_init_is_pytorch_default_from_the_model_seed(arch):
    stack = build_stack(arch, [3, 7, 11], SHAPE, C)
    assert stack.arch == arch and stack.seeds == (3, 7, 11) and stack.n_models == 3
    for i, seed in enumerate(stack.seeds):
        torch.manual_seed(seed)
        ref = reference_model(arch)
        got = stack.unstack(i).state_dict()
        assert list(got) == list(ref.state_dict())
        for k, v in ref.state_dict().items():
            assert torch.equal(got[k], v), (seed, k)


@pytest.mark.parametrize("arch", SMALL_ARCHS)
def test_init_does_not_depend_on_stack_position_or_global_rng(arch):
    rng_state = torch.get_rng_state()
    a = build_stack(arch, [3, 7, 11], SHAPE, C)
    assert torch.equal(torch.get_rng_state(), rng_state)
    b = build_stack(arch, [11, 5], SHAPE, C)
    assert_same_models(a.select([2]), b.select([0]))
    assert not torch.equal(
        a.unstack(0).state_dict()["1.weight" if arch == "mlp" else "0.weight"],
        a.unstack(1).state_dict()["1.weight" if arch == "mlp" else "0.weight"],
    )


@pytest.mark.parametrize("arch", SMALL_ARCHS)
def test_forward_matches_unstacked_models(arch):
    stack = build_stack(arch, [0, 1, 2], SHAPE, C)
    gen = torch.Generator().manual_seed(0)
    shared = torch.randn(5, *SHAPE, generator=gen)
    per_model = torch.randn(3, 5, *SHAPE, generator=gen)
    out_shared, out_per_model = stack(shared), stack(per_model)
    assert out_shared.shape == out_per_model.shape == (3, 5, C)
    for i in range(3):
        single = stack.unstack(i)
        assert all(
            type(m) in (nn.Sequential, nn.Linear, nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Flatten)
            for m in single.modules()
        )
        torch.testing.assert_close(out_shared[i], single(shared), atol=1e-5, rtol=0)
        torch.testing.assert_close(out_per_model[i], single(per_model[i]), atol=1e-5, rtol=0)


def test_forward_rejects_wrong_shapes():
    stack = build_stack("mlp", [0, 1], SHAPE, C)
    with pytest.raises(ValueError, match="expects input"):
        stack(torch.zeros(3, 5, *SHAPE))  # 3 batches for 2 models
    with pytest.raises(ValueError, match="expects input"):
        stack(torch.zeros(4, 64))


@pytest.mark.parametrize("arch", SMALL_ARCHS)
def test_select_concat_and_stack_models_round_trip(arch):
    stack = build_stack(arch, [10, 20, 30], SHAPE, C)
    picked = stack.select([2, 0])
    assert picked.seeds == (30, 10)
    assert_same_models(
        picked, concat_stacks([build_stack(arch, [30], SHAPE, C), build_stack(arch, [10], SHAPE, C)])
    )
    assert_same_models(concat_stacks([stack.select([0]), stack.select([1, 2])]), stack)
    rebuilt = stack_models([stack.unstack(i) for i in range(3)], arch, stack.seeds, SHAPE, C)
    assert type(rebuilt) is type(stack)
    assert_same_models(rebuilt, stack)


def test_copies_are_independent():
    stack = build_stack("mlp", [1, 2], SHAPE, C)
    before = stack.state_dict()["fc1.weight"].clone()
    single, picked = stack.unstack(0), stack.select([0])
    with torch.no_grad():
        single[1].weight.add_(1.0)
        picked.fc1.weight.add_(1.0)
    assert torch.equal(stack.fc1.weight, before)


def test_combination_errors():
    mlp, cnn = build_stack("mlp", [0], SHAPE, C), build_stack("cnn", [1], SHAPE, C)
    with pytest.raises(ValueError, match="cannot concatenate"):
        concat_stacks([mlp, cnn])
    with pytest.raises(ValueError, match="3 Linear/Conv2d layers; arch 'cnn' has 4"):
        stack_models([mlp.unstack(0)], "cnn", [0], SHAPE, C)
    with pytest.raises(ValueError, match="2 models but 1 seeds"):
        stack_models([mlp.unstack(0)] * 2, "mlp", [0], SHAPE, C)
    with pytest.raises(IndexError):
        mlp.select([1])
    with pytest.raises(ValueError, match="at least one model"):
        build_stack("mlp", [], SHAPE, C)


@pytest.mark.parametrize("arch", SMALL_ARCHS)
def test_sgd_on_the_stack_equals_independent_sgd(arch):
    """Sum of per-model mean losses + one optimiser over the stack == M optimisers on M separate models."""
    m, batch, steps, hp = 3, 8, 3, {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-3}
    stack = build_stack(arch, [4, 5, 6], SHAPE, C)
    singles = [stack.unstack(i) for i in range(m)]
    opt = torch.optim.SGD(stack.parameters(), **hp)
    opts = [torch.optim.SGD(s.parameters(), **hp) for s in singles]
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(m, batch, *SHAPE, generator=gen)
        y = torch.randint(0, C, (m, batch), generator=gen)
        opt.zero_grad()
        F.cross_entropy(stack(x).flatten(0, 1), y.flatten(), reduction="sum").div(batch).backward()
        opt.step()
        for i, (single, o) in enumerate(zip(singles, opts, strict=True)):
            o.zero_grad()
            F.cross_entropy(single(x[i]), y[i]).backward()
            o.step()
    initial = build_stack(arch, [4, 5, 6], SHAPE, C)
    for i, single in enumerate(singles):
        for k, v in single.state_dict().items():
            torch.testing.assert_close(stack.unstack(i).state_dict()[k], v, atol=1e-5, rtol=0)
            assert not torch.equal(v, initial.unstack(i).state_dict()[k]), (
                k
            )  # the steps did move every tensor


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", SMALL_ARCHS)
def test_cuda_matches_cpu(arch):
    stack = build_stack(arch, [0, 1], SHAPE, C)
    gpu = stack.to("cuda")
    x = torch.randn(2, 6, *SHAPE)
    cpu_out = build_stack(arch, [0, 1], SHAPE, C)(x)
    torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        gpu(x[0].cuda()).cpu()[1], build_stack(arch, [0, 1], SHAPE, C).unstack(1)(x[0]), atol=1e-4, rtol=1e-4
    )
    assert gpu.unstack(1)[0 if arch == "cnn" else 1].weight.device.type == "cuda"
    assert gpu.select([1]).fc2.weight.device.type == "cuda"
    assert concat_stacks([gpu, gpu]).n_models == 4


@pytest.mark.parametrize("shared", [False, True])
def test_scoring_forward_in_place_has_the_bits_of_the_forward_with_gradients(shared):
    """Without gradients the MLP computes its activations in place; the logits must be those of the ordinary
    forward, and the input untouched."""
    stack = build_stack("mlp", range(5), (1, 8, 8), 10)
    x = torch.randn(33, 1, 8, 8) if shared else torch.randn(5, 33, 1, 8, 8)
    kept = x.clone()
    with torch.no_grad():
        scored = stack(x)
    assert torch.equal(scored, stack(x).detach())
    assert torch.equal(x, kept)
