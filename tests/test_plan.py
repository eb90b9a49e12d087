"""Unit ids carry the versions of the code that computes them, and nothing a rerun should not react to.

Pure planning: no Ray, no files but a throwaway plugin module. A method's ``version``, ``TRAINING_VERSION`` and
``MARGINS_VERSION`` are bumped one at a time, and the ids that must change are the ones that do.
"""

from __future__ import annotations

import dataclasses
import sys

import pytest

from raybench import training, versions
from raybench.config import ConfigError, build_config
from raybench.data import load_dataset
from raybench.pipeline import plan_run
from raybench.plan import Unit, _check_unique, check_unit_sizes, plan_method_runs

PLUGIN = '''
from raybench.methods import Method


def shrink(stack, data, params, epochs, seed):
    """Multiply every weight by ``factor`` once per epoch."""
    for epoch in range(1, max(epochs) + 1):
        for p in stack.parameters():
            p.data.mul_(params["factor"])
        if epoch in epochs:
            yield epoch, stack


METHOD = Method("versioned", shrink, "shrink the weights", defaults={"factor": 0.5}, default_epochs=(1,))
'''
MODULE = "rb_versioned_plugin"


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / f"{MODULE}.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    yield f"{MODULE}:METHOD"
    sys.modules.pop(MODULE, None)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _ids(config, dataset) -> dict[tuple, str]:
    """Unit id by what the unit is (kind, role, method, forget set, models): stable across the plans compared."""
    return {(u.kind, u.role, u.method, u.forget_set, u.model_ids): u.id for u in plan_run(config, dataset).units}


def _config(plugin: str, tmp_path):
    return build_config(None, n_models=4, block_size=2, forget_sets="1,2", out=str(tmp_path / "out"),
                        methods=f"do_nothing,finetune,oracle_matching,{plugin}")


def test_a_method_version_changes_its_own_unit_ids_and_nothing_else(plugin, digits, tmp_path, monkeypatch):
    config = _config(plugin, tmp_path)
    before = _ids(config, digits)
    module = sys.modules[MODULE]
    monkeypatch.setattr(module, "METHOD", dataclasses.replace(module.METHOD, version=2))
    after = _ids(config, digits)
    assert before.keys() == after.keys()
    changed = {key for key in before if before[key] != after[key]}
    assert changed == {key for key in before if key[2] == plugin}
    assert {key[0] for key in changed} == {"unlearn"} and len(changed) == 2 * 2  # 2 forget sets x 2 blocks
    assert [u.code_versions["method"] for u in plan_run(config, digits).units if u.method == plugin] == [2] * 4


def test_training_and_margins_versions_change_what_depends_on_them(plugin, digits, tmp_path, monkeypatch):
    config = _config(plugin, tmp_path)
    before = _ids(config, digits)
    monkeypatch.setattr(training, "TRAINING_VERSION", training.TRAINING_VERSION + 1)
    retrained = _ids(config, digits)
    # every train unit (originals, oracles, matching oracles) and so every unlearn unit built on them
    assert all(before[key] != retrained[key] for key in before)
    monkeypatch.setattr(training, "TRAINING_VERSION", training.TRAINING_VERSION - 1)
    assert _ids(config, digits) == before
    monkeypatch.setattr(training, "MARGINS_VERSION", training.MARGINS_VERSION + 1)
    assert all(before[key] != v for key, v in _ids(config, digits).items())


def test_package_versions_are_recorded_but_change_no_id(plugin, digits, tmp_path, monkeypatch):
    config = _config(plugin, tmp_path)
    before, out = _ids(config, digits), config.output_uri()
    fake = {**versions.software_versions(), "torch": "0.0.1", "numpy": "0.0.1", "raybench": "9.9"}
    monkeypatch.setattr(versions, "software_versions", lambda: fake)
    assert versions.collect_versions("cpu")["torch"] == "0.0.1"  # what would be recorded did change
    assert _ids(config, digits) == before and config.output_uri() == out


def test_other_changes_leave_the_versions_alone(plugin, digits, tmp_path):
    """Sanity for the test above: a changed parameter does change ids (of that method only)."""
    config = _config(plugin, tmp_path)
    before = _ids(config, digits)
    swept = dataclasses.replace(config, params={plugin: {"factor": 0.25}})
    after = _ids(swept, digits)
    assert {key for key in before if before[key] != after.get(key)} == {key for key in before if key[2] == plugin}


def test_the_planner_refuses_a_unit_id_twice():
    unit = Unit("abc", "unlearn", "unlearned", "1", (0, 1), (5, 6), "finetune", {"lr": 0.1}, (1,))
    _check_unique([unit, dataclasses.replace(unit, id="abd")])
    with pytest.raises(ConfigError, match="unit abc twice"):
        _check_unique([unit, dataclasses.replace(unit, model_ids=(2, 3))])


def test_a_unit_whose_margins_cannot_be_stored_is_refused_before_any_work(digits, tmp_path):
    config = build_config(None, n_models=4000, block_size=4000, forget_sets="1", methods="finetune",
                          params={"finetune": {"epochs": list(range(1, 300))}}, out=str(tmp_path))
    runs = plan_method_runs(config)
    n = digits.n_train + digits.n_val
    assert 4000 * n * 299 > 2**31 - 1 >= 4000 * n * 29  # 299 snapshots are too many, 29 fit
    with pytest.raises(ConfigError, match="Parquet list column"):
        check_unit_sizes(config, runs, n)
    with pytest.raises(ConfigError, match="Parquet list column"):
        plan_run(config, digits)
    fits = dataclasses.replace(config, params={"finetune": {"epochs": list(range(1, 30))}})
    check_unit_sizes(fits, plan_method_runs(fits), n)


def test_the_reducer_scores_only_the_newest_version_of_an_ensemble():
    """After a bump the folder holds both versions' units of one ensemble (same models, other ids): the reducer
    takes the newest and ignores the rest, rather than counting every model twice."""
    from raybench.reduce import _groups
    from raybench.store import UnitOutput

    def unit(uid, role, models, method_version, training_version=1):
        meta = {"unit": uid, "role": role, "forget_set": "1" if role != "original" else "none",
                "method": "finetune" if role == "unlearned" else "none", "params": "{}", "model_ids": models,
                "code_versions": {"training": training_version, "margins": 1, "method": method_version}}
        return UnitOutput(uid, (f"{uid}.parquet",), meta)

    units = [unit("o1", "original", [0, 1], None, 1), unit("o2", "original", [0, 1], None, 2),
             unit("u1", "unlearned", [0, 1], 1), unit("u2", "unlearned", [0, 1], 2),
             unit("u3", "unlearned", [2, 3], 2), unit("u4", "unlearned", [2, 3], 1)]
    roles, oracles, methods = _groups({u.unit_id: u for u in units})
    assert [u.unit_id for u in roles["original"].units] == ["o2"]
    assert [u.unit_id for u in methods[("1", "finetune", "{}")].units] == ["u2", "u3"]
    legacy = [unit("a", "unlearned", [0], 1), UnitOutput("b", (), {**unit("b", "unlearned", [1], 1).meta,
                                                                    "code_versions": None})]
    assert [u.unit_id for u in _groups({u.unit_id: u for u in legacy})[2][("1", "finetune", "{}")].units] == ["a"]


def test_run_json_records_the_creating_and_the_latest_versions_outside_the_identity(tmp_path):
    import json

    from raybench.store import RunStore

    store = RunStore(str(tmp_path))
    old = {**versions.collect_versions("cpu"), "torch": "1.0"}
    new = {**old, "torch": "2.0", "device": "NVIDIA H200"}
    run_id = store.open_run({"n_models": 4}, old)
    assert store.open_run({"n_models": 4}, new) == run_id  # a torch upgrade does not orphan the folder
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["versions"] == old and info["latest_versions"] == new and "torch" not in json.dumps(info["identity"])
    RunStore(str(tmp_path / "other")).open_run({"n_models": 4})  # by default: this process's versions
    assert json.loads((tmp_path / "other" / "run.json").read_text())["versions"] == versions.collect_versions()


def test_the_floor_is_a_second_oracle_ensemble_with_seeds_of_its_own(digits, tmp_path):
    config = build_config(None, n_models=4, block_size=2, forget_sets="1,2", out=str(tmp_path / "out"),
                          methods="do_nothing,finetune,oracle_matching")
    units = plan_run(config, digits).units
    floor = [u for u in units if u.method == "oracle_floor"]
    assert [(u.kind, u.role, u.forget_set, u.model_ids) for u in floor] == [
        ("train", "unlearned", fs, ids) for fs in ("1", "2") for ids in ((0, 1), (2, 3))]
    for fs in ("1", "2"):
        floor_seeds = {s for u in floor if u.forget_set == fs for s in u.seeds}
        assert len(floor_seeds) == 4
        for role in ("oracle", "matching_oracle", "original"):
            others = {s for u in units if u.role == role and u.forget_set in (fs, "none") for s in u.seeds}
            assert others and not floor_seeds & others, role
    off = plan_run(dataclasses.replace(config, floor=False), digits).units
    assert {u.id for u in units} - {u.id for u in off} == {u.id for u in floor}  # nothing else changes


def test_the_floor_is_a_boolean_on_by_default(tmp_path):
    with pytest.raises(ConfigError, match="floor must be true or false"):
        build_config(None, floor="no", out=str(tmp_path))
    assert build_config(None, out=str(tmp_path)).floor is True
