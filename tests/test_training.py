"""Base training: the recipe, per-model data order, determinism, and the margin definition."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raybench import training
from raybench.data import load_dataset
from raybench.models import build_stack, grad_samples, reset_grad_samples
from raybench.training import (
    Execution,
    Recipe,
    choose_path,
    compute_margins,
    compute_scores,
    data_order_seed,
    default_recipe,
    lr_multiplier,
    margins_from_logits,
    top1_margins_from_logits,
    train_stack,
)

SHORT = Recipe(epochs=2, batch_size=256, lr=0.1, momentum=0.9, weight_decay=5e-4, warmup_fraction=0.25)


@pytest.fixture(scope="module")
def digits():
    ds = load_dataset("digits")
    return (
        torch.tensor(ds.x_train),
        torch.tensor(ds.y_train),
        torch.tensor(ds.x_val),
        torch.tensor(ds.y_val),
    )


def params(stack) -> list[torch.Tensor]:
    return [p.detach().clone() for p in stack.parameters()]


# -- margins ---------------------------------------------------------------------------------------


def test_margins_match_a_direct_per_sample_computation():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 5, generator=gen) * 10
    logits[0, 0] = torch.tensor([40.0, -3.0, 1.0, 0.5, 2.0])  # p_y ≈ 1: 1 - p_y would underflow
    y = torch.randint(0, 5, (7,), generator=gen)
    y[0] = 0
    got = margins_from_logits(logits, y)
    assert got.shape == (3, 7) and got.dtype == torch.float32
    z = logits.double().numpy()
    for m in range(3):
        for b in range(7):
            others = np.delete(z[m, b], y[b].item())
            expected = z[m, b, y[b]] - np.log(np.sum(np.exp(others)))
            assert got[m, b].item() == pytest.approx(expected, abs=1e-4)
    # per-model labels (M, B) are accepted too
    torch.testing.assert_close(margins_from_logits(logits, y.expand(3, 7)), got)


def test_margins_are_float32_for_low_precision_logits():
    logits = torch.randn(2, 4, 10).bfloat16()
    y = torch.arange(4)
    got = margins_from_logits(logits, y)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, margins_from_logits(logits.float(), y))


def _top1_reference(z: np.ndarray, y: int) -> tuple[float, bool]:
    """Restated from the definition, per sample in float64: the gap to the best other class, and whether the
    label is the unique argmax (a tie with another class is not a correct prediction)."""
    others = np.delete(z, y)
    return float(z[y] - others.max()), bool(z[y] > others.max())


def test_top1_margins_match_argmax_with_ties_counted_wrong():
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(3, 9, 10, generator=gen) * 0.3).bfloat16()  # close logits: margin and top-1 disagree
    y = torch.randint(0, 10, (9,), generator=gen)
    logits[0, 0] = torch.tensor([1.0] + [0.9] * 9)  # right with p_y ≈ 0.11: top-1 > 0 but margin ≈ -2.10
    y[0] = 0
    logits[0, 1] = torch.tensor([0.0, 2.0, 2.0] + [-1.0] * 7)  # the label ties class 2: wrong, though argmax is 1
    y[1] = 1
    got = top1_margins_from_logits(logits, y)
    assert got.shape == (3, 9) and got.dtype == torch.float32
    z = logits.float().double().numpy()  # the bf16 values, exactly
    for m in range(3):
        for b in range(9):
            gap, right = _top1_reference(z[m, b], int(y[b]))
            assert got[m, b].item() == pytest.approx(gap, abs=1e-6), (m, b)
            assert (got[m, b].item() > 0) == right, (m, b)
    margins = margins_from_logits(logits, y)
    assert got[0, 0].item() == pytest.approx(0.1, abs=2e-3) and margins[0, 0].item() == pytest.approx(-2.10, abs=0.01)
    assert got[0, 1].item() == 0.0 and logits[0, 1].argmax().item() == 1  # the tie: 0, i.e. wrong
    assert torch.equal(top1_margins_from_logits(logits, y.expand(3, 9)), got)
    assert torch.any((got > 0) != (margins > 0))  # the data can tell top-1 accuracy from P(p_y > 1/2)


def test_compute_scores_is_compute_margins_plus_top1_of_the_same_logits(digits):
    x, y, _, _ = digits
    stack = build_stack("mlp", [0, 1], (1, 8, 8), 10)
    margins, top1 = compute_scores(stack, x[:300], y[:300], batch_size=128)
    assert margins.shape == top1.shape == (2, 300) and margins.dtype == top1.dtype == np.float32
    np.testing.assert_array_equal(margins, compute_margins(stack, x[:300], y[:300], batch_size=128))
    with torch.no_grad():
        expected = top1_margins_from_logits(stack(x[:300]), y[:300]).numpy()
    np.testing.assert_allclose(top1, expected, atol=1e-6)
    assert stack.training  # mode restored
    assert np.all(top1 >= margins)  # max_{j≠y} z_j <= logsumexp_{j≠y} z_j
    assert [a.shape for a in compute_scores(stack, x[:0], y[:0])] == [(2, 0), (2, 0)]


def test_compute_margins_on_a_stack(digits):
    x, y, _, _ = digits
    stack = build_stack("mlp", [0, 1], (1, 8, 8), 10)
    got = compute_margins(stack, x[:300], y[:300], batch_size=128)
    assert isinstance(got, np.ndarray) and got.shape == (2, 300) and got.dtype == np.float32
    with torch.no_grad():
        expected = margins_from_logits(stack(x[:300]), y[:300]).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert stack.training  # mode restored
    assert compute_margins(stack, x[:0], y[:0]).shape == (2, 0)


@pytest.mark.parametrize(("arch", "m"), [("mlp", 3), ("mlp", 20), ("mlp", 130), ("cnn", 20)])  # 130: minimum batch
def test_default_cpu_batches_give_the_bits_of_one_batch(digits, arch, m):
    """Stored margins carry no record of the batches they were scored in (MARGINS_VERSION does not cover them), so
    the default CPU batches must give a sample the bits of one batch of every sample, whatever M."""
    x, y, _, _ = digits
    stack = build_stack(arch, range(m), (1, 8, 8), 10)
    batches = training._eval_batches(stack, len(y), None)
    sizes = [stop - start for start, stop in batches]
    assert batches[0][0] == 0 and batches[-1][1] == len(y) and sum(sizes) == len(y)
    assert all(a[1] == b[0] for a, b in zip(batches, batches[1:], strict=False))
    assert max(sizes) <= max(training.CPU_EVAL_MIN_BATCH, training.CPU_EVAL_BUDGET // m)
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= training.CPU_EVAL_MIN_BATCH // 2
    assert len(batches) > 1 or m == 3
    whole = compute_scores(stack, x, y, batch_size=len(y))
    for got, want in zip(compute_scores(stack, x, y), whole, strict=True):
        np.testing.assert_array_equal(got, want)


def test_explicit_eval_batches_step_through_the_samples(digits):
    stack = build_stack("mlp", [0, 1], (1, 8, 8), 10)
    assert training._eval_batches(stack, 300, 128) == [(0, 128), (128, 256), (256, 300)]
    assert training._eval_batches(stack, 0, None) == []


# -- recipe and schedule ---------------------------------------------------------------------------


def test_triangular_schedule():
    total = 100
    assert lr_multiplier(0, total, 0.25) == 0.0
    assert lr_multiplier(25, total, 0.25) == 1.0
    assert lr_multiplier(10, total, 0.25) == pytest.approx(0.4)
    assert lr_multiplier(99, total, 0.25) == pytest.approx(1 / 75)


def test_first_iteration_has_lr_zero(digits):
    x, y, _, _ = digits
    n = len(y)
    one_step = Recipe(epochs=1, batch_size=n, lr=1.0, momentum=0.0, weight_decay=0.1, warmup_fraction=0.5)
    stack = build_stack("mlp", [0, 1], (1, 8, 8), 10)
    before = params(stack)
    train_stack(stack, x, y, one_step)  # the only step is step 0: lr exactly 0, so nothing moves
    assert all(torch.equal(a, b) for a, b in zip(before, params(stack), strict=True))
    train_stack(
        stack,
        x,
        y,
        Recipe(epochs=2, batch_size=n, lr=1.0, momentum=0.0, weight_decay=0.1, warmup_fraction=0.5),
    )
    assert not any(torch.equal(a, b) for a, b in zip(before, params(stack), strict=True))


def test_recipe_validation_and_defaults():
    recipe = default_recipe("digits", "mlp")
    assert recipe.to_dict() == {
        "epochs": recipe.epochs,
        "batch_size": recipe.batch_size,
        "lr": recipe.lr,
        "momentum": recipe.momentum,
        "weight_decay": recipe.weight_decay,
        "warmup_fraction": recipe.warmup_fraction,
    }
    assert Recipe(**recipe.to_dict()) == recipe
    assert isinstance(default_recipe("digits", "cnn"), Recipe)
    with pytest.raises(ValueError, match="no default recipe"):
        default_recipe("digits", "resnet9")
    with pytest.raises(ValueError, match="warmup_fraction"):
        Recipe(epochs=1, batch_size=1, lr=0.1, momentum=0.9, weight_decay=0, warmup_fraction=0)
    with pytest.raises(ValueError, match="epochs"):
        Recipe(epochs=0, batch_size=1, lr=0.1, momentum=0.9, weight_decay=0, warmup_fraction=0.5)


# -- training --------------------------------------------------------------------------------------


def test_default_mlp_recipe_trains_accurate_models(digits):
    x, y, xv, yv = digits
    stack = train_stack(build_stack("mlp", range(4), (1, 8, 8), 10), x, y, default_recipe("digits", "mlp"))
    val_acc = (compute_scores(stack, xv, yv)[1] > 0).mean(axis=1)  # top-1
    assert val_acc.shape == (4,) and val_acc.min() > 0.93, val_acc


def test_training_is_deterministic(digits):
    x, y, _, _ = digits
    a = train_stack(build_stack("mlp", [0, 1, 2], (1, 8, 8), 10), x, y, SHORT)
    b = train_stack(build_stack("mlp", [0, 1, 2], (1, 8, 8), 10), x, y, SHORT)
    assert all(torch.equal(p, q) for p, q in zip(params(a), params(b), strict=True))
    assert not torch.equal(a.unstack(0)[1].weight, a.unstack(1)[1].weight)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_a_model_does_not_depend_on_its_neighbours(digits, arch):
    x, y, _, _ = digits
    recipe = (
        SHORT if arch == "mlp" else Recipe(1, 512, 0.1, 0.9, 5e-4, 0.5)
    )  # 1437 % 256, 1437 % 512: odd last batch

    def model_with_seed_2(seeds):
        stack = train_stack(build_stack(arch, seeds, (1, 8, 8), 10), x, y, recipe)
        return list(stack.select([seeds.index(2)]).parameters())

    reference = model_with_seed_2([1, 2])
    for p, q in zip(reference, model_with_seed_2([2, 3]), strict=True):
        assert torch.equal(p, q)  # same stack size, other neighbour and position: bit for bit
    for seeds in ([2], [5, 4, 3, 2, 1, 0, 9, 8, 7]):
        for p, q in zip(reference, model_with_seed_2(seeds), strict=True):
            if arch == "mlp":
                assert torch.equal(p, q)
            else:  # grouped-conv kernels depend on the group count: equal up to rounding only
                torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5)


def test_cpu_sgd_fuses_only_parameters_whose_model_blocks_are_whole_vector_runs():
    """A ragged block (the 10-class output bias) would put some models' elements in the fused kernel's scalar
    remainder, which rounds otherwise: the neighbour test above fails if it is fused."""
    stack = build_stack("mlp", range(9), (1, 8, 8), 10)
    fused, plain = training._sgd_groups(stack)
    assert fused["fused"] and not plain["fused"]
    assert [p.shape for p in plain["params"]] == [stack.fc3.bias.shape]
    assert len(fused["params"]) == len(list(stack.parameters())) - 1
    assert all(p[0].numel() % training.FUSED_CPU_BLOCK == 0 for p in fused["params"])


@pytest.mark.parametrize("momentum, weight_decay", [(0.9, 5e-4), (0.0, 5e-4), (0.9, 0.0)])
def test_stack_sgd_steps_as_torch_optim_sgd_with_lambda_lr_bit_for_bit(digits, momentum, weight_decay):
    """The direct kernel calls of ``_StackSGD`` against ``torch.optim.SGD`` stepped by ``LambdaLR`` over the same
    groups (fused and per-op), through the first step (momenta made) and the schedule's rise and fall."""
    x, y, _, _ = digits
    recipe = Recipe(epochs=1, batch_size=32, lr=0.1, momentum=momentum, weight_decay=weight_decay,
                    warmup_fraction=0.25)
    ours, theirs = build_stack("mlp", range(9), (1, 8, 8), 10), build_stack("mlp", range(9), (1, 8, 8), 10)
    total = 12
    sgd = training._StackSGD(training._sgd_groups(ours), recipe, total)
    optimizer = torch.optim.SGD(training._sgd_groups(theirs), lr=recipe.lr, momentum=momentum,
                                weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, total, 0.25))
    gen = torch.Generator().manual_seed(0)
    for _ in range(total):
        idx = torch.stack([torch.randperm(len(y), generator=gen)[:32] for _ in range(9)])
        sgd.zero_grad()
        training._stack_loss(ours, x[idx], y[idx], None).backward()
        sgd.step()
        optimizer.zero_grad()
        training._stack_loss(theirs, x[idx], y[idx], None).backward()
        optimizer.step()
        schedule.step()
    assert not torch.equal(ours.fc1.weight, build_stack("mlp", range(9), (1, 8, 8), 10).fc1.weight)
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(p, q)


def test_train_stack_equals_a_plain_per_model_loop(digits):
    """The documented semantics, spelled out for one model at a time with ordinary PyTorch."""
    x, y, _, _ = digits
    seeds = [5, 6]
    stack = build_stack("mlp", seeds, (1, 8, 8), 10)
    singles = [stack.unstack(i) for i in range(2)]
    train_stack(stack, x, y, SHORT)
    n, batch = len(y), SHORT.batch_size
    iters = math.ceil(n / batch)
    for seed, model in zip(seeds, singles, strict=True):
        opt = torch.optim.SGD(
            model.parameters(), lr=SHORT.lr, momentum=SHORT.momentum, weight_decay=SHORT.weight_decay
        )
        gen = torch.Generator().manual_seed(data_order_seed(seed))
        step = 0
        for _ in range(SHORT.epochs):
            perm = torch.randperm(n, generator=gen)
            for k in range(iters):
                idx = perm[k * batch : (k + 1) * batch]
                for group in opt.param_groups:
                    group["lr"] = SHORT.lr * lr_multiplier(step, SHORT.epochs * iters, SHORT.warmup_fraction)
                opt.zero_grad()
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
                step += 1
    for i, model in enumerate(singles):
        for k, v in model.state_dict().items():
            torch.testing.assert_close(stack.unstack(i).state_dict()[k], v, atol=1e-5, rtol=1e-5)


def test_cpu_loss_is_the_cross_entropy_of_the_real_classes(digits):
    """The -inf class padding (CPU_LOSS_CLASS_BLOCK) changes neither the loss nor any gradient beyond rounding:
    restated model by model with F.cross_entropy on the unpadded logits (padding with 0 would add 6 classes)."""
    x, y, _, _ = digits
    stack = build_stack("mlp", [3, 4, 5], (1, 8, 8), 10)
    idx = torch.stack([torch.randperm(len(y), generator=torch.Generator().manual_seed(s))[:29] for s in range(3)])
    training._stack_loss(stack, x[idx], y[idx], None).backward()
    grads = [p.grad.clone() for p in stack.parameters()]
    expected = 0.0
    for m in range(3):
        model = stack.unstack(m)
        loss = F.cross_entropy(model(x[idx[m]]), y[idx[m]])
        loss.backward()
        expected += loss.item()
        reference = [t for layer in model if isinstance(layer, torch.nn.Linear)
                     for t in (layer.weight.grad.t(), layer.bias.grad)]  # the stack's (in, out) weight layout
        for g, r in zip(grads, reference, strict=True):
            torch.testing.assert_close(g[m], r, atol=1e-6, rtol=1e-5)
    stack.zero_grad()
    torch.testing.assert_close(training._stack_loss(stack, x[idx], y[idx], None).item(), expected, atol=1e-5, rtol=0)


def test_data_order_stream_is_not_an_init_stream():
    seeds = range(0, 2**31, 2**27)
    data_seeds = {data_order_seed(s) for s in seeds}
    assert data_seeds.isdisjoint(seeds) and len(data_seeds) == len(seeds)
    # the CPU generator truncates seeds to 32 bits, so the data seed must differ within those bits
    assert all(0 <= d < 2**32 for d in data_seeds)
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(data_order_seed(5)))
    assert not torch.equal(perm, torch.randperm(50, generator=torch.Generator().manual_seed(5)))
    with pytest.raises(ValueError, match=r"seeds must be in \[0, 2\*\*31\)"):
        build_stack("mlp", [1, 2**31], (1, 8, 8), 10)


def test_on_epoch_end_and_seed_checks(digits):
    x, y, _, _ = digits
    stack = build_stack("mlp", [0, 1], (1, 8, 8), 10)
    seen = []
    train_stack(
        stack, x[:100], y[:100], SHORT, on_epoch_end=lambda epoch, s: seen.append((epoch, s is stack))
    )
    assert seen == [(0, True), (1, True)]
    # explicit data-order seeds replace the model seeds for shuffling only
    a = train_stack(build_stack("mlp", [0, 1], (1, 8, 8), 10), x, y, SHORT, seeds=[7, 8])
    b = train_stack(build_stack("mlp", [0, 1], (1, 8, 8), 10), x, y, SHORT)
    assert not torch.equal(a.fc1.weight, b.fc1.weight)
    with pytest.raises(ValueError, match="3 data-order seeds for a stack of 2"):
        train_stack(stack, x, y, SHORT, seeds=[1, 2, 3])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_matches_cpu(digits):
    x, y, xv, yv = digits
    cpu = train_stack(build_stack("mlp", [0, 1], (1, 8, 8), 10), x, y, SHORT)
    gpu = train_stack(build_stack("mlp", [0, 1], (1, 8, 8), 10).cuda(), x.cuda(), y.cuda(), SHORT)
    for p, q in zip(cpu.parameters(), gpu.parameters(), strict=True):
        torch.testing.assert_close(q.cpu(), p, atol=1e-3, rtol=1e-3)
    margins = compute_margins(gpu, xv, yv)  # CPU inputs are moved chunk by chunk
    np.testing.assert_allclose(margins, compute_margins(cpu, xv, yv), atol=1e-2)


# -- execution: the path and compilation ----------------------------------------------------------


def _train(digits, execution, seeds=(2, 7, 1), **kw):
    x, y, _, _ = digits
    stats: dict = {}
    reset_grad_samples()
    stack = train_stack(build_stack("mlp", list(seeds), (1, 8, 8), 10), x, y, SHORT, execution=execution,
                        stats=stats, **kw)
    return stack, stats, grad_samples()


def test_per_model_path_trains_the_stacked_models_bit_for_bit(digits):
    x = digits[0]
    rows = torch.stack([torch.randperm(len(x), generator=torch.Generator().manual_seed(s))[:700] for s in range(3)])
    for kw in ({}, {"subsets": rows}):
        seen: dict = {"stacked": [], "per_model": []}
        runs = {path: _train(digits, Execution(path=path), on_epoch_end=lambda e, s, p=path, seen=seen: seen[p].append(
            compute_margins(s, x, digits[1])), **kw) for path in ("stacked", "per_model")}
        (a, sa, ga), (b, sb, gb) = runs["stacked"], runs["per_model"]
        assert (sa["path"], sb["path"]) == ("stacked", "per_model")
        assert all(torch.equal(p, q) for p, q in zip(params(a), params(b), strict=True))
        assert ga == gb > 0  # work is counted per model on both paths
        assert len(seen["per_model"]) == SHORT.epochs
        assert all(np.array_equal(u, v) for u, v in zip(seen["stacked"], seen["per_model"], strict=True))


def test_auto_trains_a_large_stack_on_the_cpu_in_parts_bit_for_bit(digits, monkeypatch):
    """Parts of at most CPU_TRAIN_PART models (here 2: five models in parts of 1, 2, 2) give the models, the
    per-epoch margins and the work count of one stacked step."""
    monkeypatch.setattr(training, "CPU_TRAIN_PART", 2)
    x, seeds = digits[0], (2, 7, 1, 9, 4)
    rows = torch.stack([torch.randperm(len(x), generator=torch.Generator().manual_seed(s))[:700] for s in seeds])
    for kw in ({}, {"subsets": rows}):
        seen: dict = {"stacked": [], "auto": []}
        runs = {path: _train(digits, Execution(path=path), seeds, on_epoch_end=lambda e, s, p=path, seen=seen:
                             seen[p].append(compute_margins(s, x, digits[1])), **kw) for path in seen}
        (a, sa, ga), (b, sb, gb) = runs["stacked"], runs["auto"]
        assert (sa["parts"], sb["path"], sb["parts"]) == (1, "stacked", 3)
        assert all(torch.equal(p, q) for p, q in zip(params(a), params(b), strict=True))
        assert ga == gb > 0
        assert len(seen["auto"]) == SHORT.epochs
        assert all(np.array_equal(u, v) for u, v in zip(seen["stacked"], seen["auto"], strict=True))


def test_cpu_parts_are_near_equal_and_cover_the_stack():
    auto, cpu = Execution(), torch.device("cpu")
    for m in (1, 24, 25, 26, 50, 51, 101):
        bounds = training._part_bounds(m, cpu, auto, "stacked")
        sizes = [stop - start for start, stop in bounds]
        assert [a for a, _ in bounds] + [m] == [0] + [b for _, b in bounds]  # contiguous, from 0 to m
        assert len(bounds) == math.ceil(m / training.CPU_TRAIN_PART) and max(sizes) - min(sizes) <= 1
    assert training._part_bounds(50, cpu, Execution(path="stacked"), "stacked") == [(0, 50)]  # forced: one step
    assert training._part_bounds(50, torch.device("cuda"), auto, "stacked") == [(0, 50)]  # CUDA: what was timed
    assert training._part_bounds(3, cpu, auto, "per_model") == [(0, 1), (1, 2), (2, 3)]


def test_auto_is_stacked_on_the_cpu_and_otherwise_follows_the_timing(digits, monkeypatch):
    stack, stats, counted = _train(digits, Execution())
    assert stats["path"] == "stacked" and stats["calibration_s"] == 0 and "calibration" not in stats
    # where auto times both paths (CUDA), the faster one trains, and the timing's steps are not the unit's work
    monkeypatch.setattr(training, "_times_paths", lambda device: True)
    monkeypatch.setattr(training, "_path_choices", {})
    timed_stack, timed, timed_count = _train(digits, Execution())
    assert timed["path"] in ("stacked", "per_model") and timed["calibration_s"] > 0
    assert set(timed["calibration"]) == {"stacked_ms", "per_model_ms"}
    assert min(timed["calibration"], key=timed["calibration"].get) == f"{timed['path']}_ms"
    assert timed_count == counted
    assert all(torch.equal(p, q) for p, q in zip(params(stack), params(timed_stack), strict=True))


def test_choose_path_leaves_the_stack_alone_and_answers_once_per_shape(digits, monkeypatch):
    x, y, _, _ = digits
    monkeypatch.setattr(training, "_path_choices", {})
    stack = build_stack("mlp", [0, 1, 2, 3], (1, 8, 8), 10)
    before = params(stack)
    first = choose_path(stack, x, y, SHORT)
    assert first["path"] in ("stacked", "per_model") and first["stacked_ms"] > 0 and first["per_model_ms"] > 0
    assert all(torch.equal(p, q) for p, q in zip(before, params(stack), strict=True))
    assert choose_path(build_stack("mlp", [9, 8, 7, 6], (1, 8, 8), 10), x, y, SHORT) == first  # cached
    assert len(training._path_choices) == 1
    choose_path(build_stack("mlp", [9, 8], (1, 8, 8), 10), x, y, SHORT)  # another M is another shape
    assert len(training._path_choices) == 2


def test_execution_settings_are_checked():
    with pytest.raises(ValueError, match="unknown training path 'fast'; known: auto, stacked, per_model"):
        Execution(path="fast")
    with pytest.raises(ValueError, match="compile must be true or false"):
        Execution(compile="yes")


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="Inductor needs a C++ compiler on the CPU")
def test_compiled_training_is_reproducible_close_to_eager_and_compiled_once_per_shape(digits):
    """The tolerance docs/design.md#compiled-training states: compiled and eager models agree to 1e-4 (parameters)
    and 1e-3 (margins) after the short recipe; two compiled runs agree bit for bit."""
    import torch._dynamo.utils

    x, y, _, _ = digits
    eager, _, eager_count = _train(digits, Execution(path="stacked"))
    compiled, first, count = _train(digits, Execution(path="stacked", compile=True))
    assert first["compiled"] and first["compile_s"] > 0 and count == eager_count
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    again, second, _ = _train(digits, Execution(path="stacked", compile=True))
    other, third, _ = _train(digits, Execution(path="stacked", compile=True), seeds=(11, 12, 13))
    assert second["compile_s"] == third["compile_s"] == 0  # a new stack of the same shapes reuses the graphs
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert all(torch.equal(p, q) for p, q in zip(params(compiled), params(again), strict=True))
    assert not torch.equal(params(compiled)[0], params(other)[0])
    for p, q in zip(params(eager), params(compiled), strict=True):
        torch.testing.assert_close(q, p, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(compute_margins(compiled, x, y), compute_margins(eager, x, y), atol=1e-3)
