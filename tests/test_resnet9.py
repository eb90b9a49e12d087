"""The stacked ResNet-9 must be exactly M published ResNet-9s (docs/methods.md#recipes), only run as one module."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raybench.models import build_stack, concat_stacks, stack_models
from raybench.models.resnet9 import StackedResNet9, resnet9, resnet9_macs
from raybench.training import Recipe, compute_margins, compute_scores, default_recipe, lr_multiplier, train_stack

SHAPE = (3, 16, 16)  # the smallest input the architecture takes: keeps every layer, CPU-cheap
C = 10


def published_keys() -> list[tuple[str, tuple[int, ...]]]:
    """State-dict keys and shapes of EasyDUB's ``easydub/models.py::resnet9()``, written out from its module tree:
    Sequential(conv_bn, conv_bn, Residual(Sequential(conv_bn, conv_bn)), conv_bn, MaxPool, Residual(...),
    conv_bn, AdaptiveMaxPool, Flatten, Linear(bias=False), Mul), conv_bn = Sequential(Conv2d, BatchNorm2d, ReLU)."""
    blocks = [("0", 3, 64, 3), ("1", 64, 128, 5), ("2.module.0", 128, 128, 3), ("2.module.1", 128, 128, 3),
              ("3", 128, 256, 3), ("5.module.0", 256, 256, 3), ("5.module.1", 256, 256, 3), ("6", 256, 128, 3)]
    keys = []
    for prefix, c_in, c_out, k in blocks:
        keys.append((f"{prefix}.0.weight", (c_out, c_in, k, k)))
        keys += [(f"{prefix}.1.{name}", (c_out,)) for name in ("weight", "bias", "running_mean", "running_var")]
        keys.append((f"{prefix}.1.num_batches_tracked", ()))
    return [*keys, ("9.weight", (C, 128))]


def test_single_model_has_the_published_module_tree():
    model = resnet9()
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == published_keys()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.kernel_size[0], c.stride[0], c.padding[0]) for c in convs] == [
        (3, 1, 1), (5, 2, 2), (3, 1, 1), (3, 1, 1), (3, 1, 1), (3, 1, 1), (3, 1, 1), (3, 1, 0)]
    assert all(c.bias is None for c in convs) and model[9].bias is None
    assert model[10].weight == 0.2 and isinstance(model[4], nn.MaxPool2d) and isinstance(model[7], nn.AdaptiveMaxPool2d)
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        model.eval()
        by_hand = model[0:9](x) @ model[9].weight.t() * 0.2  # the head: no bias, then × 0.2
        torch.testing.assert_close(model(x), by_hand)


def test_every_tensor_is_per_model_and_init_is_the_published_default():
    stack = build_stack("resnet9", [3, 7], SHAPE, C)
    for name, t in [*stack.named_parameters(), *stack.named_buffers()]:
        assert t.shape[0] == 2, name  # p.reshape(M, -1) is per model; select/concat index dim 0
    for i, seed in enumerate(stack.seeds):
        torch.manual_seed(seed)
        ref = resnet9()  # the published code: default init from the global RNG, in module order
        got = stack.unstack(i).state_dict()
        assert list(got) == list(ref.state_dict())
        for k, v in ref.state_dict().items():
            assert torch.equal(got[k], v), (seed, k)
    assert not torch.equal(stack.unstack(0)[0][0].weight, stack.unstack(1)[0][0].weight)
    with pytest.raises(ValueError, match="at least 16"):
        build_stack("resnet9", [0], (3, 8, 8), C)


@pytest.mark.parametrize("training", [True, False])
def test_stacked_forward_equals_separate_models(training):
    stack = build_stack("resnet9", [0, 1], SHAPE, C)
    with torch.no_grad():  # non-trivial BN state, different per model, so eval mode tests it
        for bn in stack.bns:
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.1)
    stack.train(training)
    singles = [stack.unstack(i) for i in range(2)]
    assert all(s.training == training for s in singles)
    gen = torch.Generator().manual_seed(0)
    per_model = torch.randn(2, 3, *SHAPE, generator=gen)
    shared = torch.randn(2, *SHAPE, generator=gen)
    out_per_model = stack(per_model)
    expected = [singles[i](per_model[i]) for i in range(2)]
    assert out_per_model.shape == (2, 3, C)
    for i in range(2):
        torch.testing.assert_close(out_per_model[i], expected[i], atol=1e-4, rtol=1e-4)
        # the forward's running-statistics update lands in model i's own slot
        torch.testing.assert_close(stack.unstack(i).state_dict(), singles[i].state_dict(), atol=1e-6, rtol=1e-5)
    out_shared = stack(shared)
    for i in range(2):
        torch.testing.assert_close(out_shared[i], singles[i](shared), atol=1e-4, rtol=1e-4)


def test_sgd_step_on_the_stack_equals_per_model_steps():
    """Sum of per-model mean CE + one SGD over the stack == one SGD per plain model (momentum, wd, BN included)."""
    stack = build_stack("resnet9", [4, 5], SHAPE, C)
    singles = [stack.unstack(i) for i in range(2)]
    hp = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
    opt = torch.optim.SGD(stack.parameters(), **hp)
    opts = [torch.optim.SGD(s.parameters(), **hp) for s in singles]
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        x = torch.randn(2, 4, *SHAPE, generator=gen)
        y = torch.randint(0, C, (2, 4), generator=gen)
        opt.zero_grad()
        F.cross_entropy(stack(x).flatten(0, 1), y.flatten(), reduction="sum").div(4).backward()
        opt.step()
        for i, (single, o) in enumerate(zip(singles, opts, strict=True)):
            o.zero_grad()
            F.cross_entropy(single(x[i]), y[i]).backward()
            o.step()
    initial = build_stack("resnet9", [4, 5], SHAPE, C)
    for i, single in enumerate(singles):
        got, start = stack.unstack(i).state_dict(), initial.unstack(i).state_dict()
        for k, v in single.state_dict().items():
            torch.testing.assert_close(got[k], v, atol=1e-4, rtol=1e-4, msg=k)
            assert not torch.equal(v, start[k]), k  # the steps moved every tensor, counters included


def test_select_concat_and_stack_models_round_trip():
    stack = build_stack("resnet9", [10, 20, 30], SHAPE, C)
    stack.train()
    stack(torch.randn(3, 2, *SHAPE))  # running stats and counters differ from their initial values
    rebuilt = stack_models([stack.unstack(i) for i in range(3)], "resnet9", stack.seeds, SHAPE, C)
    assert isinstance(rebuilt, StackedResNet9)
    for (k, v), (k2, v2) in zip(rebuilt.state_dict().items(), stack.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), k
    joined = concat_stacks([stack.select([2]), stack.select([0, 1])])
    assert joined.seeds == (30, 10, 20)
    assert torch.equal(joined.bns[3].num_batches_tracked, torch.ones(3, dtype=torch.long))
    assert torch.equal(joined.convs[1].weight[0], stack.convs[1].weight[2])


def test_macs_match_a_count_by_forward_hooks():
    model, macs = resnet9(), []

    def count(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            macs.append(output.numel() * module.in_channels * module.kernel_size[0] * module.kernel_size[1])
        else:
            macs.append(output.numel() * module.in_features)

    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            m.register_forward_hook(count)
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, 32, 32))
    assert resnet9_macs((3, 32, 32)) == sum(macs) == 291_308_800


def test_cifar10_recipe_is_the_published_one():
    recipe = default_recipe("cifar10", "resnet9")
    assert recipe == Recipe(epochs=24, batch_size=256, lr=0.4, momentum=0.9, weight_decay=5e-4,
                            warmup_fraction=5 / 24)
    total = 24 * 196
    assert lr_multiplier(0, total, recipe.warmup_fraction) == 0.0
    assert lr_multiplier(5 * 196, total, recipe.warmup_fraction) == pytest.approx(1.0)
    assert lr_multiplier(total, total, recipe.warmup_fraction) == 0.0


def test_train_stack_trains_each_model_independently_of_its_neighbours():
    recipe = Recipe(epochs=1, batch_size=4, lr=0.05, momentum=0.9, weight_decay=5e-4, warmup_fraction=0.5)
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(7, *SHAPE, generator=gen), torch.randint(0, C, (7,), generator=gen)  # batches of 4 and 3
    pair = train_stack(build_stack("resnet9", [8, 9], SHAPE, C), x, y, recipe)
    alone = train_stack(build_stack("resnet9", [9], SHAPE, C), x, y, recipe)
    for k, v in alone.unstack(0).state_dict().items():
        torch.testing.assert_close(pair.unstack(1).state_dict()[k], v, atol=1e-4, rtol=1e-4, msg=k)
    margins = compute_margins(pair, x, y)
    assert margins.shape == (2, 7) and margins.dtype.name == "float32"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_runs_bf16_channels_last_with_float32_margins():
    cpu = build_stack("resnet9", [0, 1], (3, 32, 32), C).eval()
    gpu = build_stack("resnet9", [0, 1], (3, 32, 32), C).cuda().eval()
    x = torch.randn(64, 3, 32, 32)
    y = torch.randint(0, C, (64,))
    seen = []
    gpu.convs[1].register_forward_hook(lambda m, i, o: seen.append((o.dtype, o.is_contiguous(
        memory_format=torch.channels_last))))
    m_gpu, m_cpu = compute_margins(gpu, x, y), compute_margins(cpu, x, y)
    assert seen and seen[0] == (torch.bfloat16, True)
    assert m_gpu.dtype.name == "float32"
    assert float(abs(m_gpu - m_cpu).max()) < 0.05 * max(1.0, float(abs(m_cpu).max()))
    recipe = Recipe(epochs=1, batch_size=32, lr=0.1, momentum=0.9, weight_decay=5e-4, warmup_fraction=0.5)
    train_stack(gpu, x.cuda(), y.cuda(), recipe)
    assert all(p.dtype == torch.float32 for p in gpu.parameters())  # autocast: master weights stay float32


@pytest.mark.parametrize("name", ["finetune", "retrain", "l1_sparse", "gradient_ascent", "ascent_descent",
                                  "neggrad_plus", "scrub", "random_label", "salun", "influence", "oracle_matching"])
def test_every_method_runs_on_resnet9_stacks_model_by_model(name):
    """Methods on the architecture EasyDUB publishes (BatchNorm in train mode, per-model statistics): each runs,
    stays finite, and model 0 unlearns the same alone as beside another model."""
    from raybench.methods import UnlearnData, get_method

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, *SHAPE, generator=g), torch.randint(0, C, (48,), generator=g)
    forget = torch.tensor([5, 17, 3, 40, 22, 9])
    keep = torch.ones(48, dtype=torch.bool)
    keep[forget] = False
    method = get_method(name)
    params = {**method.defaults, **({"budget": 1 / 24} if name == "retrain" else {}),
              **({"num_grads": 4} if name == "influence" else {})}
    oracles = build_stack("resnet9", (8, 9), SHAPE, C)
    results = []
    for seeds in ((1, 2), (1,)):
        stack = build_stack("resnet9", seeds, SHAPE, C)
        data = UnlearnData(x, y, forget, torch.nonzero(keep).squeeze(1), C, default_recipe("cifar10", "resnet9"),
                           oracles.select(range(len(seeds))) if method.needs_oracles else None)
        (_, out), = method.fn(stack, data, params, (1,), 0)
        results.append(out)
    pair, alone = results
    before = build_stack("resnet9", (1,), SHAPE, C).state_dict()
    assert any(not torch.equal(v, before[k]) for k, v in alone.state_dict().items() if v.is_floating_point())
    for a, b in zip(pair.select([0]).state_dict().values(), alone.state_dict().values(), strict=True):
        assert torch.isfinite(a.float()).all()
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_top1_margins_are_exact_on_the_bf16_logits():
    """On the GPU the ResNet-9 evaluates in bf16: the top-1 margins are read off those very logits (captured from
    the same forward pass), cast to float32, and say "right" exactly where the label is the unique argmax."""
    import numpy as np

    gpu = build_stack("resnet9", [0, 1], (3, 32, 32), C).cuda()
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, C, (64,))
    seen = []
    gpu.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    margins, top1 = compute_scores(gpu, x, y)
    [logits] = seen
    assert logits.dtype == torch.bfloat16 and margins.dtype == top1.dtype == np.float32
    z = logits.double().cpu().numpy()
    for m in range(2):
        for b in range(64):
            others = np.delete(z[m, b], int(y[b]))
            assert top1[m, b] == pytest.approx(z[m, b, y[b]] - others.max(), abs=1e-6)
            assert (top1[m, b] > 0) == (z[m, b, y[b]] > others.max())
    assert np.all(top1 >= margins)
