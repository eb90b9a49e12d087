"""RUM's meta-procedure: F cut into memorisation thirds (a partition of F, checked on hand-made scores), each
group unlearned by its own method, low -> mid -> high, on the stack the previous step left, with the retain set
shrinking as RUM defines it (spy methods record what each call received); and every way its parameters can be
wrong refused with one line before anything runs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from click.testing import CliRunner

import raybench.methods as registry
from raybench.cli import main
from raybench.config import ConfigError
from raybench.ids import model_seed
from raybench.methods import Method, UnlearnData, expand_grid, get_method
from raybench.methods.base import flatten_per_model
from raybench.methods.rum import memorisation_groups, normalise_params
from raybench.models import build_stack
from raybench.pipeline import load_config  # the config check a run makes before any work
from raybench.training import default_recipe

SEED = 5
N_TRAIN = 30
FORGET = [17, 4, 25, 9, 0, 12, 28, 6, 21, 3]  # not sorted: groups keep F's order
# scores by hand: ranked ascending, F's samples are 4(0.0) 0(0.05) 25(0.1) 12(0.2) | 6(0.3) 17(0.5) 21(0.5) |
# 3(0.7) 9(0.8) 28(0.9); 17 and 21 tie and keep F's order
SCORE_OF = {17: 0.5, 4: 0.0, 25: 0.1, 9: 0.8, 0: 0.05, 12: 0.2, 28: 0.9, 6: 0.3, 21: 0.5, 3: 0.7}
LOW, MID, HIGH = [4, 25, 0, 12], [17, 6, 21], [9, 28, 3]  # 10 = 4 + 3 + 3, each in F's order


def tiny_data() -> UnlearnData:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (N_TRAIN,), generator=g)
    scores = torch.full((N_TRAIN,), -1.0)  # retain samples' scores must not matter
    for i, s in SCORE_OF.items():
        scores[i] = s
    forget = torch.tensor(FORGET)
    retain = torch.tensor(sorted(set(range(N_TRAIN)) - set(FORGET)))
    return UnlearnData(x, y, forget, retain, 10, default_recipe("digits", "mlp"), scores=scores)


def tiny_stack():
    return build_stack("mlp", [1, 2], (1, 8, 8), 10)


def weights(stack) -> torch.Tensor:
    return flatten_per_model([p.detach().clone() for p in stack.parameters()])


@pytest.fixture
def spies(monkeypatch):
    """Three spy methods in the registry: each records what it received and adds its mark to the stack's first
    parameter, so the next step can tell which stack it was given."""
    calls = []

    def make(name: str, mark: float) -> Method:
        def fn(stack, data, params, epochs, seed):
            first = next(stack.parameters())
            calls.append({"name": name, "forget": data.forget_idx.tolist(), "retain": data.retain_idx.tolist(),
                          "params": dict(params), "epochs": tuple(epochs), "seed": seed, "stack": stack,
                          "seen": first.detach().flatten()[0].item(), "oracles": data.oracles,
                          "effect": data.datamodel_effect, "scores": data.scores})
            with torch.no_grad():
                first.flatten()[0] += mark
            yield epochs[-1], stack
        return Method(name, fn, f"spy {name}", defaults={"k": 1}, default_epochs=(2,), version=3)

    spy = {n: make(n, mark) for n, mark in (("spy_a", 1.0), ("spy_b", 10.0), ("spy_c", 100.0))}
    builtin = registry.available_methods
    monkeypatch.setattr(registry, "available_methods", lambda: {**builtin(), **spy})
    return calls


def rum_params(**groups) -> dict:
    params = {**get_method("rum").defaults, **groups}
    return normalise_params(params)


def run_rum(stack, data, params, epochs=(1,)):
    return list(get_method("rum").fn(stack, data, params, epochs, SEED))


def test_groups_are_the_thirds_by_score_and_a_partition_of_f():
    data = tiny_data()
    groups = [g.tolist() for g in memorisation_groups(data.forget_idx, data.scores)]
    assert groups == [LOW, MID, HIGH]
    assert sorted(sum(groups, [])) == sorted(FORGET)
    for n in (1, 2, 3, 7, 11, 12):  # sizes as equal as possible, low first, every sample once
        f = torch.arange(n)
        parts = memorisation_groups(f, torch.rand(n, generator=torch.Generator().manual_seed(n)))
        sizes = [len(p) for p in parts]
        assert sum(sizes) == n and max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
        assert sorted(torch.cat(parts).tolist()) == list(range(n))
        scores = torch.rand(n, generator=torch.Generator().manual_seed(n))
        parts = memorisation_groups(f, scores)
        nonempty = [scores[p] for p in parts if len(p)]
        assert all(a.max() <= b.min() for a, b in zip(nonempty, nonempty[1:], strict=False))


def test_groups_refuse_non_finite_scores():
    data = tiny_data()
    bad = data.scores.clone()
    bad[9] = float("nan")
    with pytest.raises(ValueError, match=r"finite.*\[9\]"):
        memorisation_groups(data.forget_idx, bad)


def test_each_group_is_unlearned_in_order_on_the_shrinking_retain_set(spies):
    data = tiny_data()
    params = rum_params(low_method="spy_a", low_params={"k": 2, "epochs": 4}, mid_method="spy_b", mid_params={},
                        high_method="spy_c", high_params={"k": 7})
    stack = tiny_stack()
    start = next(stack.parameters()).detach().flatten()[0].item()
    out = run_rum(stack, data, params, epochs=(1,))
    r = sorted(set(range(N_TRAIN)) - set(FORGET))
    assert [c["name"] for c in spies] == ["spy_a", "spy_b", "spy_c"]
    assert [c["forget"] for c in spies] == [LOW, MID, HIGH]
    assert [c["retain"] for c in spies] == [sorted(r + MID + HIGH), sorted(r + HIGH), r]
    assert [c["params"] for c in spies] == [{"k": 2}, {"k": 1}, {"k": 7}]  # the group's own, defaults filled
    assert [c["epochs"] for c in spies] == [(4,), (2,), (2,)]  # epochs given, else the method's default
    assert [c["seed"] for c in spies] == [model_seed(SEED, "rum", g) for g in ("low", "mid", "high")]
    assert all(c["oracles"] is None and c["effect"] is None and c["scores"] is None for c in spies)
    # each step starts from the previous step's stack: it sees the marks of all steps before it
    assert [round(c["seen"] - start, 3) for c in spies] == [0.0, 1.0, 11.0]
    assert [e for e, _ in out] == [1] and out[0][1] is spies[-1]["stack"]


def test_do_nothing_groups_and_empty_groups_are_skipped_but_leave_the_retain_set(spies):
    data = tiny_data()
    params = rum_params(low_method="do_nothing", low_params={}, mid_method="spy_b", mid_params={},
                        high_method="do_nothing", high_params={})
    run_rum(tiny_stack(), data, params)
    r = sorted(set(range(N_TRAIN)) - set(FORGET))
    assert [(c["name"], c["forget"], c["retain"]) for c in spies] == [("spy_b", MID, sorted(r + HIGH))]
    spies.clear()
    two = dataclasses.replace(data, forget_idx=torch.tensor([17, 4]),
                              retain_idx=torch.tensor(sorted(set(range(N_TRAIN)) - {17, 4})))
    params = rum_params(low_method="spy_a", low_params={}, mid_method="spy_b", mid_params={},
                        high_method="spy_c", high_params={})
    run_rum(tiny_stack(), two, params)  # 2 samples: low = [4], mid = [17], high empty
    assert [(c["name"], c["forget"]) for c in spies] == [("spy_a", [4]), ("spy_b", [17])]


def test_a_real_group_method_runs_as_it_would_alone():
    data = tiny_data()
    ft = {"lr": 0.05, "epochs": 2}
    params = rum_params(low_method="do_nothing", low_params={}, mid_method="do_nothing", mid_params={},
                        high_method="finetune", high_params=ft)
    got = run_rum(tiny_stack(), data, params)[-1][1]
    finetune = get_method("finetune")
    step = dataclasses.replace(data, forget_idx=torch.tensor(HIGH), scores=None)  # retain: R (the last step)
    want = list(finetune.fn(tiny_stack(), step, {**finetune.defaults, "lr": 0.05}, (2,),
                            model_seed(SEED, "rum", "high")))[-1][1]
    assert torch.equal(weights(got), weights(want))
    assert not torch.equal(weights(got), weights(tiny_stack()))


def test_default_rum_runs_on_a_stack_and_models_stay_independent():
    data = tiny_data()
    params = get_method("rum").defaults
    pair = run_rum(tiny_stack(), data, params)[-1][1]
    for m in range(2):
        alone = run_rum(tiny_stack().select([m]), data, params)[-1][1]
        torch.testing.assert_close(weights(alone)[0], weights(pair)[m], atol=1e-5, rtol=0)


def test_registered_needing_scores_with_the_main_rum_groups():
    m = get_method("rum")
    assert m.needs_scores and not m.needs_oracles and not m.needs_datamodel and m.one_snapshot
    d = m.defaults
    assert (d["low_method"], d["mid_method"], d["high_method"]) == ("do_nothing", "finetune", "salun")
    assert d["mid_params"]["lr"] == 0.1 and d["mid_params"]["epochs"] == 5 and d["high_params"]["epochs"] == 3
    assert d["mid_params"]["momentum"] == get_method("finetune").defaults["momentum"]  # defaults filled
    assert d["high_params"]["method_version"] == get_method("salun").version
    assert expand_grid(m, {}) == [d] and normalise_params(d) == d  # idempotent


def test_refuses_without_scores_or_with_several_epochs():
    data = dataclasses.replace(tiny_data(), scores=None)
    with pytest.raises(ValueError, match="rum needs data.scores"):
        run_rum(tiny_stack(), data, get_method("rum").defaults)
    with pytest.raises(ValueError, match=r"shape \(30,\)"):
        run_rum(tiny_stack(), dataclasses.replace(data, scores=torch.zeros(5)), get_method("rum").defaults)
    with pytest.raises(ValueError, match="single result"):
        run_rum(tiny_stack(), tiny_data(), get_method("rum").defaults, epochs=(1, 2))


@pytest.mark.parametrize("params,message", [
    ({"mid_method": "nosuch"}, r"rum.mid_method: unknown method 'nosuch'"),
    ({"high_method": "oracle_matching"}, "rum.high_method: 'oracle_matching' needs oracles"),
    ({"high_method": "datamodel_matching"}, "needs a datamodel"),
    ({"low_method": "rum"}, "needs memorisation scores"),
    ({"mid_params": {"lr": -1}}, r"rum.mid_params: finetune.lr must be > 0"),
    ({"mid_params": {"nosuch": 1}}, "rum.mid_params: method 'finetune' has no parameter nosuch"),
    ({"mid_params": {"lr": [0.1, 0.2]}}, "a list would sweep inside one group"),
    ({"mid_params": {"epochs": [2, 4]}}, "one number"),
    ({"mid_params": {"epochs": 0}}, "epochs must be positive integers"),
    ({"low_params": {"lr": 0.1}}, "do_nothing takes no parameters"),
    ({"mid_params": {"method_version": 99}}, "method_version 99 is not finetune's version"),
    ({"mid_params": 5}, r"rum.mid_params must be a table"),
    ({"mid_params": [{"lr": 0.1}, {"lr": 0.1, "momentum": 0.9}]}, "give the same parameters"),
])
def test_bad_group_settings_are_refused_by_the_config_check(params, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, methods="rum", params={"rum": params})


def test_a_group_without_epochs_runs_its_methods_last_default_snapshot():
    params = rum_params(high_method="gradient_ascent", high_params={"lr": 0.01})
    assert params["high_params"] == {"lr": 0.01, "forget_batch_size": 64, "epochs": 10, "method_version": 1}


def test_a_sweep_over_group_tables_plans_one_run_each():
    grid = expand_grid(get_method("rum"), {"mid_params": [{"lr": 0.1}, {"lr": 0.05}]})
    assert [g["mid_params"]["lr"] for g in grid] == [0.1, 0.05]


def test_the_cli_refuses_a_bad_group_method_with_exit_2(tmp_path):
    result = CliRunner().invoke(main, ["run", "--methods", "rum", "--param", "rum.mid_method=nosuch",
                                       "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "rum.mid_method: unknown method 'nosuch'" in result.output
