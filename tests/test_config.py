"""Every config value, recipe value and method parameter is checked for type and range before anything starts.

These all fail in ``pipeline.load_config`` (no data set, no Ray): each case names the rule it breaks.
"""

from __future__ import annotations

import math
import sys

import pytest

from raybench import spec
from raybench.config import ConfigError
from raybench.methods import Method, expand_grid, get_method, snapshot_epochs
from raybench.pipeline import load_config as build_config  # the config's own checks, then methods' and source's
from raybench.training import Recipe, default_recipe


def _bad(message: str, toml: str | None = None, tmp_path=None, **values):
    path = None
    if toml is not None:
        path = tmp_path / "job.toml"
        path.write_bytes(toml.encode() if isinstance(toml, str) else toml)
    with pytest.raises(ConfigError, match=message):
        build_config(str(path) if path else None, **values)


@pytest.mark.parametrize("values,message", [
    ({"params": {"finetune": {"batch_size": -1}}}, r"finetune.batch_size must be in \[1, "),
    ({"params": {"finetune": {"batch_size": 0}}}, r"finetune.batch_size must be in \[1, "),
    ({"params": {"finetune": {"batch_size": 2.5}}}, "finetune.batch_size must be an integer"),
    ({"params": {"finetune": {"batch_size": True}}}, "finetune.batch_size must be an integer"),
    ({"params": {"finetune": {"lr": "abc"}}}, "finetune.lr must be a number"),
    ({"params": {"finetune": {"lr": math.nan}}}, "finetune.lr must be a finite number"),
    ({"params": {"finetune": {"lr": math.inf}}}, "finetune.lr must be a finite number"),
    ({"params": {"finetune": {"lr": -1}}}, "finetune.lr must be > 0"),
    ({"params": {"finetune": {"lr": 0}}}, "finetune.lr must be > 0"),
    ({"params": {"finetune": {"momentum": 1.0}}}, r"finetune.momentum must be in \[0, 1\)"),
    ({"params": {"finetune": {"lr": [0.02, 0.02]}}}, "finetune.lr lists the value 0.02 twice"),
    ({"params": {"finetune": {"lr": [1, 1.0]}}}, "finetune.lr lists the value 1.0 twice"),
    ({"params": {"finetune": {"lr": []}}}, "sweeps over nothing"),
    ({"params": {"finetune": {"epochs": [0]}}}, "epochs must be positive integers"),
    ({"params": {"finetune": {"epochs": [True]}}}, "epochs must be positive integers"),
    ({"params": {"finetune": {"epochs": [2**31]}}}, "epochs must be positive integers"),
    ({"params": {"finetune": {"epochs": "abc"}}}, "epochs must be positive integers"),
    ({"params": {"retrain": {"epochs": [1, 2]}}}, "single result"),
    ({"params": {"do_nothing": {"epochs": [{}]}}}, "'do_nothing' has no epochs"),
    ({"params": {"salun": {"tau": 1.5}}}, r"salun.tau must be in \[0, 1\]"),
    ({"params": {"salun": {"rum_mask_bug": 1}}}, "salun.rum_mask_bug must be true or false"),
    ({"params": {"oracle_matching": {"pairing": "each"}}}, "oracle_matching.pairing must be one of"),
    ({"params": {"oracle_matching": {"num_oracles": 0}}}, "oracle_matching.num_oracles must be in"),
    ({"params": {"scrub": {"temperature": 0}}}, "scrub.temperature must be > 0"),
    ({"params": {"retrain": {"budget": -0.5}}}, "retrain.budget must be > 0"),
    ({"recipe": {"lr": math.nan}}, "bad recipe: lr must be a finite number"),
    ({"recipe": {"epochs": 2.5}}, "bad recipe: epochs must be an integer"),
    ({"recipe": {"epochs": True}}, "bad recipe: epochs must be an integer"),
    ({"recipe": {"batch_size": -1}}, r"bad recipe: batch_size must be in \[1, "),
    ({"recipe": {"warmup_fraction": 0}}, r"warmup_fraction must be in \(0, 1\]"),
    ({"recipe": {"momentum": math.inf}}, "momentum must be a finite number"),
    ({"recipe": 5}, "recipe must be a table"),
    ({"recipe": {"nosuch": 1}}, "unknown recipe key"),
    ({"seed": "abc"}, "seed must be an integer"),
    ({"seed": 2**64}, "seed must be in"),
    ({"seed": 1.0}, "seed must be an integer"),
    ({"out": 5}, "out must be a string"),
    ({"dataset": 5}, "dataset must be a string"),
    ({"methods": 5}, "methods must be a list"),
    ({"params": 5}, "params must be a table of tables"),
    ({"n_models": 1_000_000_000}, "n_models = 1000000000 is more than raybench plans"),
    ({"n_models": True}, "n_models must be a positive integer"),
    ({"block_size": 1_000_000}, "block_size = 1000000 is more than raybench plans"),
    ({"chunk_size": 2**30}, "chunk_size = 1073741824 is more than raybench plans"),
    ({"chunk_size": 0}, "chunk_size must be a positive integer"),
    ({"num_cpus": 0}, "num_cpus must be an integer >= 1"),
    ({"num_gpus": -1}, "num_gpus must be an integer >= 0"),
    ({"num_gpus": True}, "num_gpus must be an integer >= 0"),
    ({"train_path": "fast"}, "unknown training path 'fast'; known: auto, stacked, per_model"),
    ({"train_path": 1}, "train_path must be a string"),
    ({"compile": "yes"}, "compile must be true or false"),
])
def test_bad_values_are_refused_with_the_rule_they_break(values, message):
    _bad(message, **{"methods": "all", **values})


def test_good_values_pass_and_reals_are_normalised():
    config = build_config(None, methods="finetune", num_gpus=0, num_cpus=1,
                          params={"finetune": {"lr": [1, 0.5], "batch_size": 32}}, recipe={"weight_decay": 0})
    assert config.resolved_recipe().weight_decay == 0.0 and isinstance(config.resolved_recipe().weight_decay, float)
    grid = expand_grid(get_method("finetune"), config.params["finetune"])
    assert [g["lr"] for g in grid] == [1.0, 0.5] and all(isinstance(g["lr"], float) for g in grid)


@pytest.mark.parametrize("toml,message", [
    (b"\xff\xfe\x00dataset = 1\n", "is not UTF-8 text"),
    ("recipe = 5\n", "recipe must be a table"),
    ("out = 5\n", "out must be a string"),
    ("methods = 5\n", "methods must be a list"),
    ("seed = \"abc\"\n", "seed must be an integer"),
    ("[recipe]\nlr = nan\n", "lr must be a finite number"),
    ("[recipe]\nepochs = 2.5\n", "epochs must be an integer"),
    ("[params.finetune]\nlr = [0.02, 0.02]\n", "twice"),
    ("[params.finetune]\nlr = 1979-05-27\n", "finetune.lr must be a number"),
    ("num_cpus = 0\n", "num_cpus must be an integer >= 1"),
])
def test_bad_toml_is_refused(toml, message, tmp_path):
    _bad(message, toml, tmp_path)


def test_a_config_path_that_is_a_folder_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        build_config(str(tmp_path))


def test_recipe_is_strict_and_keeps_its_values():
    base = default_recipe("digits", "mlp").to_dict()
    assert Recipe(**base) == default_recipe("digits", "mlp")
    assert Recipe(**{**base, "lr": 1}).lr == 1.0 and isinstance(Recipe(**{**base, "lr": 1}).lr, float)
    for bad in ({"lr": -0.1}, {"lr": math.nan}, {"epochs": 2.0}, {"batch_size": False}, {"momentum": "0.9"}):
        with pytest.raises(ValueError):
            Recipe(**{**base, **bad})


# -- the declarative checks ---------------------------------------------------------------------------------------

def test_param_checks():
    assert spec.integer(1).check("n", 3) == 3
    assert spec.real(0, 1, high_open=True).check("m", 0) == 0.0
    for check, value, message in [
        (spec.integer(1), 0, r"n must be in \[1, 2147483647\], got 0"),
        (spec.integer(1, None), -5, "n must be >= 1, got -5"),
        (spec.real(0, low_open=True), 0, "n must be > 0, got 0"),
        (spec.real(), 10**400, "n must be a finite number"),
        (spec.real(0, 1, high_open=True), 1, r"n must be in \[0, 1\), got 1"),
        (spec.boolean(), "yes", "n must be true or false"),
        (spec.string(), 3, "n must be a string"),
        (spec.choice("a", "b"), "c", "n must be one of 'a', 'b', got 'c'"),
        (spec.choice(1, 2), True, "n must be one of"),
    ]:
        with pytest.raises(ValueError, match=message):
            check.check("n", value)


def test_every_builtin_declares_a_check_for_every_parameter_and_its_defaults_pass():
    from raybench.methods import available_methods

    for method in available_methods().values():
        assert set(method.param_specs) == set(method.defaults), method.name
        assert expand_grid(method, {}) == [method.defaults], method.name  # no default is normalised away
        snapshot_epochs(method, {})


def test_a_plugin_without_checks_is_checked_against_its_defaults_types(tmp_path, monkeypatch):
    module = "rb_unchecked_plugin"
    (tmp_path / f"{module}.py").write_text(
        "def fn(stack, data, params, epochs, seed):\n    yield from ((e, stack) for e in epochs)\n\n\n"
        "fn.defaults = {'factor': 0.5, 'steps': 3, 'flag': False, 'mode': 'a', 'extra': None}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    method = get_method(f"{module}:fn")
    assert expand_grid(method, {"factor": 1, "steps": 4, "flag": True, "mode": "b", "extra": [1, 2]})[0] == {
        "factor": 1.0, "steps": 4, "flag": True, "mode": "b", "extra": 1}
    for key, value, message in [("factor", "abc", "must be a number"), ("factor", math.nan, "finite"),
                                ("steps", 1.5, "must be an integer"), ("flag", 1, "true or false"),
                                ("mode", 2, "must be a string"), ("steps", True, "must be an integer")]:
        with pytest.raises(ValueError, match=message):
            expand_grid(method, {key: value})
    sys.modules.pop(module, None)


def test_a_plugin_declares_checks_and_a_version():
    method = Method("p", lambda *a: iter(()), "p", defaults={"k": 2}, param_specs={"k": spec.integer(2, 4)},
                    version=3)
    assert method.version == 3
    with pytest.raises(ValueError, match=r"p.k must be in \[2, 4\], got 5"):
        expand_grid(method, {"k": 5})
    for bad in ({"version": 0}, {"version": True}, {"param_specs": {"other": spec.integer()}},
                {"param_specs": {"k": int}}):
        with pytest.raises(ValueError, match="method 'p'"):
            Method("p", None, "p", defaults={"k": 2}, **bad)
