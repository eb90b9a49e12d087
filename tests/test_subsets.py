"""Subset ensembles end to end: masks, difficulty groups, the subset role's training, `--scores` planning rules,
the CLI's exit-2 cases, and `raybench subsets` then `raybench run --scores SUB` (resumable, nothing recomputed)."""

import dataclasses
import json
import sys
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from raybench import plan as plan_module
from raybench.cli import main
from raybench.config import ConfigError, RunConfig, build_config
from raybench.data import difficulty_forget_sets, difficulty_groups, load_dataset, subset_indices, subset_masks
from raybench.data.subsets import subset_size
from raybench.methods import Method, available_methods, get_method
from raybench.models import build_stack
from raybench.pipeline import load_config, plan_run, subsets
from raybench.plan import MethodInputs, make_plan, plan_method_runs, subset_units, unavailable_methods
from raybench.sources.trained import TrainedSource
from raybench.store import RunStore
from raybench.subsets import SubsetError, load_subset_scores
from raybench.training import default_recipe, train_stack
from raybench.units import UnitContext, run_unit

# -- masks -----------------------------------------------------------------------------------------------------


def test_a_mask_is_its_seed_s_default_rng_choice():
    for seed, fraction, n in ((5, 0.5, 100), (123456, 0.7, 1437), (0, 0.01, 50)):
        want = np.sort(np.random.default_rng(seed).choice(n, max(1, round(fraction * n)), replace=False))
        assert subset_indices(seed, fraction, n).tolist() == want.tolist()
    assert subset_size(0.999, 10) == 9 and subset_size(0.001, 10) == 1  # never all, never none


def test_masks_do_not_depend_on_the_other_models():
    seeds = [11, 22, 33, 44]
    masks = subset_masks(seeds, 0.3, 200)
    assert masks.shape == (4, 200) and masks.sum(axis=1).tolist() == [60] * 4
    assert np.array_equal(subset_masks(seeds[2:], 0.3, 200), masks[2:])
    units = subset_units(RunConfig(block_size=3), {"x": 1}, 7, 0.5)
    assert [u.model_ids for u in units] == [(0, 1, 2), (3, 4, 5), (6,)]
    assert all(u.role == "subset" and u.forget_set == "none" and u.params == {"fraction": 0.5} for u in units)
    other = subset_units(RunConfig(block_size=3), {"x": 1}, 7, 0.6)
    assert {u.id for u in units}.isdisjoint(u.id for u in other)  # the fraction is in the id
    assert [u.seeds for u in other] == [u.seeds for u in units]  # ...not in the seeds


def test_a_subset_model_trains_on_its_subset_alone_and_whatever_its_block():
    ds = load_dataset("digits")
    x, y = torch.tensor(ds.x_train), torch.tensor(ds.y_train)
    recipe = default_recipe("digits", "mlp")
    seeds = (101, 202, 303)
    rows = torch.tensor(np.stack([subset_indices(s, 0.4, ds.n_train) for s in seeds]))
    torch.set_num_threads(1)
    block = train_stack(build_stack("mlp", seeds, ds.input_shape, 10), x, y, recipe, subsets=rows)
    alone = train_stack(build_stack("mlp", seeds[1:2], ds.input_shape, 10), x[rows[1]], y[rows[1]], recipe)
    for a, b in zip(block.select([1]).parameters(), alone.parameters(), strict=True):
        assert torch.equal(a, b)  # model 1 of the block is the model trained alone on x[its rows]
    with pytest.raises(ValueError, match="subsets must be"):
        train_stack(build_stack("mlp", seeds, ds.input_shape, 10), x, y, recipe, subsets=rows[:2])


# -- difficulty groups -------------------------------------------------------------------------------------------


def test_difficulty_groups_hand_case():
    scores = np.array([0.0, 0.9, 0.5, 0.45, 0.1, 1.0, 0.55, 0.0, 0.2, 0.7])
    g = difficulty_groups(scores, 2)
    assert g["mem_high"].tolist() == [1, 5]
    assert g["mem_low"].tolist() == [0, 7]  # the two zeros
    assert g["mem_mid"].tolist() == [2, 3]  # |0.5 - 0.5| = 0, then 0.45 and 0.55 tie at 0.05: the lower id
    assert g["mem_mix"].tolist() == [0, 1, 2, 3, 5, 7]
    ties = difficulty_groups(np.zeros(10), 3)
    assert ties["mem_high"].tolist() == [0, 1, 2] and ties["mem_low"].tolist() == [0, 1, 2]


def test_difficulty_mix_counts_a_shared_sample_once_and_sizes_are_checked():
    scores = np.array([0.1, 0.6, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    g = difficulty_groups(scores, 2)
    assert g["mem_high"].tolist() == [0, 1] and g["mem_mid"].tolist() == [0, 1]
    assert g["mem_mix"].tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="need more than"):
        difficulty_groups(scores, 3)
    with pytest.raises(ValueError, match="NaN"):
        difficulty_groups(np.array([np.nan, 0, 0, 0, 0]), 1)
    sets = difficulty_forget_sets(["mem_high"], scores, 2, "subset run X")
    assert sets["mem_high"].indices.tolist() == [0, 1] and "subset run X" in sets["mem_high"].description


# -- planning rules for methods that need --scores ---------------------------------------------------------------


def _noop(stack, data, params, epochs, seed):
    yield from ((e, stack) for e in epochs)


DM_METHOD = Method("dm_probe", _noop, "needs a datamodel", default_epochs=(1,), needs_datamodel=True)


@pytest.fixture
def all_with_dm(monkeypatch):
    """``--methods all`` with a method that needs a datamodel registered after the built-ins."""
    registry = {**available_methods(), DM_METHOD.name: DM_METHOD}
    monkeypatch.setattr(plan_module, "resolve_methods",
                        lambda spec: list(registry.values()) if list(spec) == ["all"] else [registry[n] for n in spec])


def test_all_skips_a_method_needing_a_datamodel_without_scores_and_says_so(all_with_dm):
    config = RunConfig()
    names = {r.method.name for r in plan_method_runs(config)}
    assert "dm_probe" not in names and "finetune" in names
    assert "dm_probe skipped: it needs a datamodel; give --scores SUBSET_RUN" in unavailable_methods(config)
    with pytest.raises(ConfigError, match="dm_probe needs a datamodel: give --scores SUBSET_RUN"):
        plan_method_runs(RunConfig(methods=("finetune", "dm_probe")))
    assert "dm_probe" in {r.method.name for r in plan_method_runs(RunConfig(scores="/some/sub"))}
    assert unavailable_methods(RunConfig(scores="/some/sub")) == []


def test_unit_ids_of_such_methods_hash_what_they_receive(all_with_dm):
    ds = load_dataset("digits")
    config = RunConfig(n_models=2, methods=("finetune", "dm_probe"), forget_sets=("1",), scores="/sub", floor=False)
    source = TrainedSource()
    sets, identity = source.forget_sets(config, ds), source.identity(config, ds)

    def ids(inputs):
        p = make_plan(config, ds, sets, source, identity, inputs)
        return {u.method: u.id for u in p.units_of("unlearn")}

    a, b = ids(MethodInputs({"1": "aaa"}, "s1")), ids(MethodInputs({"1": "bbb"}, "s1"))
    assert a["finetune"] == b["finetune"] and a["dm_probe"] != b["dm_probe"]
    with pytest.raises(ConfigError, match="needs a datamodel"):
        ids(None)


# -- CLI: bad input exits with 2 and one line ----------------------------------------------------------------------


@pytest.fixture
def dm_plugin(tmp_path, monkeypatch):
    (tmp_path / "rb_dm_probe.py").write_text(textwrap.dedent('''
        from raybench.methods import Method

        def probe(stack, data, params, epochs, seed):
            assert data.datamodel_effect is not None and data.datamodel_effect.shape == (len(data.y_train), 10)
            yield from ((e, stack) for e in epochs)

        METHOD = Method("probe", probe, "needs a datamodel", default_epochs=(1,), needs_datamodel=True)
        '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "rb_dm_probe:METHOD"
    sys.modules.pop("rb_dm_probe", None)


def _exit2(args, match):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert match in result.output and result.output.strip().count("\n") == 0, result.output


def test_cli_bad_input(tmp_path, dm_plugin):
    out = str(tmp_path / "r")
    _exit2(["run", "--forget-sets", "mem_high", "--out", out], "give --scores SUBSET_RUN")
    _exit2(["run", "--methods", dm_plugin, "--out", out], "needs a datamodel: give --scores SUBSET_RUN")
    _exit2(["run", "--scores", str(tmp_path / "nothing"), "--forget-sets", "mem_low", "--out", out],
           "does not exist")
    normal = tmp_path / "normal"
    normal.mkdir()
    (normal / "run.json").write_text(json.dumps({"run": "x", "format_version": 2, "identity": {}}))
    _exit2(["run", "--scores", str(normal), "--forget-sets", "mem_low", "--out", out], "is not a subset run")
    _exit2(["run", "--scores", str(normal), "--forget-sets", "mem_low", "--source", "easydub", "--out", out],
           "publishes oracles only for its own forget sets")
    _exit2(["run", "--mem-size", "0", "--out", out], "mem_size")
    _exit2(["subsets", "--fraction", "1.5", "--out", out], "subsets.fraction")
    _exit2(["subsets", "--n-models", "3", "--out", out], "subsets.n_models")
    _exit2(["memorization", str(normal)], "is not a subset run")
    with pytest.raises(ConfigError, match="unknown \\[subsets\\] key"):
        build_config(subsets={"models": 3})


# -- end to end ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sub(ray_session, tmp_path_factory):
    """`raybench subsets` with 12 models in blocks of 6: returns the folder and the CLI's output."""
    out = tmp_path_factory.mktemp("sub") / "SUB"
    result = CliRunner().invoke(main, ["subsets", "--n-models", "12", "--fraction", "0.5", "--block-size", "6",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_subsets_writes_masks_memorization_and_the_datamodel(sub):
    out, output = sub
    assert "2 units run, 0 already complete" in output and "datamodel held-out correlation" in output
    masks = np.load(out / "masks.npy")
    n = load_dataset("digits").n_train
    assert masks.shape == (12, n) and (masks.sum(axis=1) == round(0.5 * n)).all()
    table = pq.read_table(out / "memorization.parquet")
    assert table.column_names[:5] == ["sample_id", "mem", "mem_se", "n_in", "n_out"]
    assert table.column("sample_id").to_pylist() == list(range(n))
    assert (table.column("n_in").to_numpy() == masks.sum(axis=0)).all()
    record = json.loads((out / "subsets.json").read_text())
    assert record["n_models"] == 12 and -1 <= record["datamodel"]["heldout_corr"] <= 1
    logits = sorted((out / "subset_logits").glob("*.npy"))
    assert len(logits) == 2 and np.load(logits[0]).shape == (6, n, 10)
    result = CliRunner().invoke(main, ["memorization", str(out)])
    assert result.exit_code == 0 and "high (> 0.5)" in result.output and (out / "plots/memorization.png").is_file()
    again = CliRunner().invoke(main, ["subsets", "--n-models", "12", "--fraction", "0.5", "--block-size", "6",
                                      "--out", str(out)])
    assert again.exit_code == 0 and "0 units run, 2 already complete" in again.output  # nothing recomputed
    _exit2(["subsets", "--n-models", "12", "--fraction", "0.6", "--block-size", "6", "--out", str(out)],
           "holds another run")


def test_run_with_scores_end_to_end_and_resumes(sub, tmp_path, dm_plugin):
    subset_dir, _ = sub
    out = tmp_path / "RUN"
    args = ["run", "--scores", str(subset_dir), "--forget-sets", "mem_low,mem_high", "--mem-size", "20",
            "--methods", "do_nothing,finetune", "--param", "finetune.epochs=1", "--n-models", "2",
            "--block-size", "2", "--no-floor", "--out", str(out)]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert "mem_high" in first.output and "mem_low" in first.output
    mem = pq.read_table(subset_dir / "memorization.parquet").column("mem").to_numpy(zero_copy_only=False)
    high = json.loads((out / "forget_sets/mem_high.json").read_text())["indices"]
    assert high == difficulty_groups(np.nan_to_num(mem).astype(np.float32), 20)["mem_high"].tolist()
    record = json.loads((out / "scores.json").read_text())
    assert record["subset_run"] == json.loads((subset_dir / "run.json").read_text())["run"]
    assert set(record["effects"]) == {"mem_low", "mem_high"}
    assert np.load(out / "datamodel/mem_high.npy").shape == (len(mem), 10)
    second = CliRunner().invoke(main, args)
    assert second.exit_code == 0 and ": 0 units run" in second.output, second.output  # nothing recomputed
    # a method that needs the datamodel receives the forget set's effect, as recorded in the run folder; the probe
    # asserts it was handed one (in process: Ray workers cannot import a module written by a test)
    config = load_config(None, scores=str(subset_dir), forget_sets="mem_high", mem_size=20, methods=dm_plugin,
                         n_models=2, block_size=2, floor=False, out=str(out))
    ds = load_dataset("digits")
    store = RunStore(str(out))
    unit = plan_run(config, ds, store).units_of("unlearn")[0]
    effect = np.load(out / "datamodel/mem_high.npy")
    ctx = UnitContext.create(run_id="x", dataset=ds, arch="mlp", recipe=default_recipe("digits", "mlp").to_dict(),
                             chunk_size=8192, store_uri=str(out), forget_indices={"mem_high": np.array(high)},
                             datamodel_effects={"mem_high": effect})
    seen = {}
    real_fn = get_method(dm_plugin).fn

    def spy(stack, data, params, epochs, seed):
        seen["effect"] = data.datamodel_effect
        yield from real_fn(stack, data, params, epochs, seed)

    import rb_dm_probe

    object.__setattr__(rb_dm_probe.METHOD, "fn", spy)
    run_unit(unit, ctx)
    assert torch.equal(seen["effect"], torch.tensor(effect))
    with pytest.raises(RuntimeError, match="did not ship"):
        run_unit(unit, dataclasses.replace(ctx, datamodel_effects={}))


def test_a_subset_unit_killed_mid_run_is_retried_and_the_results_are_unchanged(sub, tmp_path):
    """The worker of the first unit dies after its logits are written and before its result returns (the worst
    moment, tests/test_faults.py's hook): the unit is retried, and memorisation and datamodel equal an undisturbed
    run's."""
    reference, _ = sub
    config = build_config(None, subsets={"n_models": 12, "fraction": 0.5}, block_size=6, out=str(tmp_path / "S"))
    asked = []
    result = subsets(config, kill_after=lambda unit: asked.append(unit.id) or len(asked) == 1)
    assert result.report.units_retried == 1 and result.report.units_run == 2 and not result.report.failed
    got, want = (pq.read_table(p / "memorization.parquet").to_pandas() for p in (tmp_path / "S", reference))
    for column in want.columns:  # bit for bit, NaN where a sample has no IN or no OUT model
        assert np.array_equal(got[column].to_numpy(), want[column].to_numpy(), equal_nan=column.startswith(("m", "p")))
    got, want = (json.loads((p / "subsets.json").read_text())["datamodel"] for p in (tmp_path / "S", reference))
    assert got == want


def test_scores_of_another_data_set_or_other_data_are_refused(sub):
    out, _ = sub
    n = load_dataset("digits").n_train
    with pytest.raises(SubsetError, match="subset run of digits"):
        load_subset_scores(str(out), dataset="cifar10", fingerprint=None, n_train=50_000)
    with pytest.raises(SubsetError, match="other digits data"):
        load_subset_scores(str(out), dataset="digits", fingerprint="0" * 16, n_train=n)
    scores = load_subset_scores(str(out), dataset="digits", fingerprint=load_dataset("digits").fingerprint(),
                                n_train=n)
    mem = pq.read_table(out / "memorization.parquet").column("mem").to_numpy(zero_copy_only=False)
    assert np.array_equal(scores.scores, np.nan_to_num(mem).astype(np.float32))
    forget = np.array([3, 17, 40])
    assert np.allclose(scores.effect(forget), scores.datamodel.coefficients(forget).sum(axis=0).reshape(n, 10),
                       atol=1e-5)
