"""`--select RULE`: each method's (params, epoch) chosen on a tuning half of the models and oracles, scored on the
other half (docs/metrics.md#selection-without-leaking).

A synthetic run folder is written straight through the store (no training), as tests/test_reduce_ci.py does: one
forget set in shuffled order, originals, oracles, the floor and a method swept over two parameter values at two
epochs, the train split over several chunks. The oracles on the documented tuning positions are drawn around -1,
those on the scoring positions around 1, so that the choice made on the tuning half (the candidate centred at -1)
differs from the one all the oracles make. Expected values are restated from the documented halves rule with
numpy, the published KLOM (tests/klom_reference.py) and numpy's percentile, never from our reducer.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner
from klom_reference import reference_klom

from raybench.cli import main
from raybench.config import ConfigError, build_config
from raybench.ids import canonical_json, digest
from raybench.pipeline import summarize
from raybench.reduce import interval_draws, read_summary, reduce_run
from raybench.store import RunStore, margins_table

N, BLOCK, N_TRAIN, N_VAL, CHUNK = 40, 16, 130, 60, 50
FS = "s"
FORGET = [129, 3, 64, 20, 101, 30, 77, 12, 0, 55, 88, 41]
B = 12  # interval replicates in the restatement: the reference KLOM is a slow loop
P1, P2 = canonical_json({"lr": 1}), canonical_json({"lr": 2})  # as runs store params


def _label_halves(n: int, label: str, seed: int = 0) -> tuple[list[int], list[int]]:
    """The documented rule, restated: permutation from SeedSequence([seed, sha256 words]), n//2 each."""
    words = struct.unpack("<4I", hashlib.sha256(label.encode()).digest()[:16])
    order = np.random.default_rng(np.random.SeedSequence([seed, *words])).permutation(n)
    return sorted(order[: n // 2].tolist()), sorted(order[n // 2: 2 * (n // 2)].tolist())


MODELS = _label_halves(N, "select\x1fmodels")
ORACLES = _label_halves(N, f"select\x1foracle\x1f{FS}")


def _margins() -> dict:
    """(role, method, params, epoch) -> {"train", "val"}: (models, samples) float32, models in id order."""
    rng = np.random.default_rng(3)

    def draw(loc, scale=1.0):
        return {s: rng.normal(loc, scale, (N, n)).astype(np.float32) for s, n in (("train", N_TRAIN), ("val", N_VAL))}

    oracle = draw(1.0)
    for s in oracle:  # the tuning oracles around -1, the scoring ones around 1
        oracle[s][ORACLES[0]] -= 2.0
    return {("original", "none", "{}", 20): draw(3.0), ("oracle", "none", "{}", 20): oracle,
            ("unlearned", "oracle_floor", "{}", 20): draw(0.5, 1.1),
            ("unlearned", "m", P1, 1): draw(-1.0), ("unlearned", "m", P1, 2): draw(2.0),
            ("unlearned", "m", P2, 1): draw(0.0, 1.4), ("unlearned", "m", P2, 2): draw(-3.0)}


def _write(store: RunStore, margins: dict) -> None:
    store.open_run({"n_models": N, "chunk_size": CHUNK, "synthetic": True})
    store.write_json(store.path("dataset.json"), {"n_train": N_TRAIN, "n_val": N_VAL})
    store.write_json(store.path("forget_sets", f"{FS}.json"), {"id": FS, "indices": FORGET})
    units: dict[tuple, list] = {}
    for (role, method, params, epoch), m in margins.items():
        units.setdefault((role, method, params), []).append((epoch, m))
    for (role, method, params), epochs in units.items():
        fs = "none" if role == "original" else FS
        for start in range(0, N, BLOCK):
            ids = range(start, min(N, start + BLOCK))
            unit = digest([role, method, params, start])
            tables = [margins_table(run="synthetic", unit=unit, role=role, method=method, params=params,
                                    forget_set=fs, model_ids=ids, seeds=ids, epoch=e, chunk_size=CHUNK,
                                    margins={k: v[ids.start: ids.stop] for k, v in m.items()})
                      for e, m in epochs]
            meta = {"unit": unit, "kind": "synthetic", "role": role, "forget_set": fs, "method": method,
                    "params": params, "epochs": [e for e, _ in epochs], "model_ids": list(ids), "seeds": list(ids)}
            store.write_unit(meta, pa.concat_tables(tables))


@pytest.fixture(scope="module")
def margins() -> dict:
    return _margins()


@pytest.fixture(scope="module")
def run(tmp_path_factory, margins) -> RunStore:
    store = RunStore(str(tmp_path_factory.mktemp("select")))
    _write(store, margins)
    return store


@pytest.fixture(scope="module")
def summary(run) -> dict:
    summary, _ = summarize(run, select="mean_p95", n_boot=B)
    return summary


def _views(m: dict) -> dict[str, np.ndarray]:
    train = m["train"]
    return {"retain": train[:, np.setdiff1d(np.arange(N_TRAIN), FORGET)], "forget": train[:, FORGET],
            "val": m["val"]}


def _p95(u: dict, o: dict, models: list[int], oracles: list[int]) -> dict[str, float]:
    return {s: float(np.percentile(reference_klom(u[s][models], o[s][oracles]), 95)) for s in u}


def _mean_p95(*args: object) -> float:
    return sum(_p95(*args).values()) / 3


CANDIDATES = [("m", P1, 1), ("m", P1, 2), ("m", P2, 1), ("m", P2, 2)]


def _key(method: str, params: str, epoch: int) -> tuple:
    if method == "do_nothing":
        return ("original", "none", "{}", 20)
    return ("unlearned", method, params, epoch)


def test_halves_are_disjoint_deterministic_and_recorded(summary):
    record = summary["selection"]
    for tune, score in (MODELS, ORACLES):
        assert len(tune) == len(score) == N // 2 and not set(tune) & set(score)
    assert record["halves"]["models"] == {"tuning": MODELS[0], "scoring": MODELS[1]}
    assert record["halves"]["oracles"] == {FS: {"tuning": ORACLES[0], "scoring": ORACLES[1]}}
    assert (record["rule"], record["seed"], record["n_models"], record["n_oracles"]) == ("mean_p95", 0, N // 2, N // 2)
    assert _label_halves(7, "x") != _label_halves(7, "y") and len(_label_halves(7, "x")[1]) == 3  # odd: one out


def test_the_choice_minimises_the_rule_on_the_tuning_half_and_differs_from_the_leaky_one(summary, margins):
    o = _views(margins[("oracle", "none", "{}", 20)])
    tuning = {c: _mean_p95(_views(margins[_key(*c)]), o, MODELS[0], ORACLES[0]) for c in CANDIDATES}
    whole = {c: _mean_p95(_views(margins[_key(*c)]), o, list(range(N)), list(range(N))) for c in CANDIDATES}
    scoring = {c: _mean_p95(_views(margins[_key(*c)]), o, MODELS[1], ORACLES[1]) for c in CANDIDATES}
    honest, leaky = min(tuning, key=tuning.get), min(whole, key=whole.get)
    assert honest != leaky  # the case is built so that the tuning half and all the oracles disagree
    choice = next(c for c in summary["selection"]["choices"] if c["method"] == "m")
    assert (choice["method"], choice["params"], choice["epoch"]) == honest
    assert (choice["leaky"]["params"], choice["leaky"]["epoch"]) == leaky[1:]
    assert choice["tuning"]["rule"] == pytest.approx(tuning[honest], rel=1e-12)
    assert choice["leaky"]["rule"] == pytest.approx(whole[leaky], rel=1e-12)
    best_half = min(scoring, key=scoring.get)
    assert choice["leaky_scoring_half"]["rule"] == pytest.approx(scoring[best_half], rel=1e-12)
    assert choice["flattery"] == pytest.approx(scoring[honest] - scoring[best_half], rel=1e-9, abs=1e-12)
    assert choice["candidates"] == 4


def test_selected_rows_are_klom_against_the_scoring_half_alone(summary, margins):
    o = _views(margins[("oracle", "none", "{}", 20)])
    selected = [r for r in summary["rows"] if r.get("selection")]
    assert {r["selection"] for r in selected} == {"mean_p95"}
    assert [(r["method"], r["split"]) for r in selected] == [
        (m, s) for m in ("do_nothing", "oracle_floor", "m") for s in ("retain", "forget", "val")]
    for choice in summary["selection"]["choices"]:
        u = _views(margins[_key(choice["method"], choice["params"], choice["epoch"])])
        draws = interval_draws(N // 2, N // 2, FS, choice["method"], choice["params"], n_boot=B, seed=0)
        for split in ("retain", "forget", "val"):
            row = next(r for r in selected if (r["method"], r["split"]) == (choice["method"], split))
            assert (row["params"], row["epoch"], row["n_models"], row["n_oracles"]) == (
                choice["params"], choice["epoch"], N // 2, N // 2)
            uu, oo = u[split][MODELS[1]], o[split][ORACLES[1]]
            values = reference_klom(uu, oo)
            assert row["klom_mean"] == pytest.approx(values.mean(), rel=1e-12)
            for q in (5, 25, 50, 75, 95, 99):
                assert row[f"klom_p{q}"] == pytest.approx(np.percentile(values, q), rel=1e-12, abs=1e-15)
            assert row["klom_p95"] == pytest.approx(choice["scoring"][split], rel=1e-12)
            stats = np.array([np.percentile(reference_klom(uu[draws.unlearned[b]], oo[draws.oracle[b]]), 95)
                              for b in range(B)])
            lo, hi = np.percentile(stats - stats.mean(), [2.5, 97.5])
            assert row["klom_p95_ci_low"] == pytest.approx(max(0.0, np.percentile(values, 95) + lo), rel=1e-9)
            assert row["klom_p95_ci_high"] == pytest.approx(np.percentile(values, 95) + hi, rel=1e-9)
            assert row["tow"] is None and row["mia_auc"] is None  # whole-ensemble metrics are not halved


def test_the_full_rows_and_per_sample_file_are_those_of_a_reduce_without_select(run, summary):
    plain = reduce_run(run, n_boot=B)
    full = [r for r in summary["rows"] if not r.get("selection")]
    assert len(full) == len(plain) == 3 * 6
    for a, b in zip(plain, full, strict=True):
        assert {k: v for k, v in a.items() if k != "compute_s"} == {k: v for k, v in b.items() if k != "compute_s"}
    table = run.read_per_sample(FS)
    assert len({(m, p, e) for m, p, e in zip(*(table.column(c).to_pylist() for c in ("method", "params", "epoch")),
                                           strict=True)}) == 6  # no selected row there
    text = (run.path("summary.csv"))
    header, *lines = open(text).read().splitlines()
    assert header.split(",")[-1] == "selection"
    assert sum(line.endswith(",mean_p95") for line in lines) == 9


def test_report_compare_and_convergence_read_a_folder_with_selected_rows(run, summary):
    page = open(run.path("report.html")).read()
    assert "Selection without leaking" in page and "mean_p95" in page
    result = CliRunner().invoke(main, ["compare", run.uri, "m@1", "do_nothing", "--params-a", P1, "--n-boot", "50"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["convergence", run.uri, "--n", "4", "--draws", "1"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["report", run.uri])
    assert result.exit_code == 0, result.output
    assert "selected by mean_p95" in result.output
    assert read_summary(run)["selection"]["rule"] == "mean_p95"


@pytest.mark.parametrize("rule", ["forget_p95", "max_p95"])
def test_the_other_rules_minimise_what_they_name(run, margins, rule, tmp_path):
    from raybench.selection import select_rows

    rows = reduce_run(run, n_boot=0)
    record = select_rows(run, rows, rule, n_boot=0).record
    o = _views(margins[("oracle", "none", "{}", 20)])
    combine = (lambda p: p["forget"]) if rule == "forget_p95" else (lambda p: max(p.values()))
    tuning = {c: combine(_p95(_views(margins[_key(*c)]), o, MODELS[0], ORACLES[0])) for c in CANDIDATES}
    choice = next(c for c in record["choices"] if c["method"] == "m")
    assert (choice["method"], choice["params"], choice["epoch"]) == min(tuning, key=tuning.get)
    assert choice["tuning"]["rule"] == pytest.approx(min(tuning.values()), rel=1e-12)


def test_no_selected_rows_without_select(tmp_path, margins):
    store = RunStore(str(tmp_path / "plain"))
    _write(store, margins)
    summary, _ = summarize(store, n_boot=0)
    assert "selection" not in summary and not any(r.get("selection") for r in summary["rows"])
    lines = open(store.path("summary.csv")).read().splitlines()
    assert lines[0].endswith(",selection") and all(line.endswith(",") for line in lines[1:])


def test_an_unknown_rule_exits_2_with_one_line(run, tmp_path):
    result = CliRunner().invoke(main, ["reduce", run.uri, "--select", "forget_p50"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "forget_p50" in result.output and "forget_p95" in result.output
    result = CliRunner().invoke(main, ["run", "--select", "best", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    config = tmp_path / "c.toml"
    config.write_text('select = "best"\n')
    with pytest.raises(ConfigError, match="unknown selection rule 'best'; known: forget_p95, mean_p95, max_p95"):
        build_config(str(config))
    result = CliRunner().invoke(main, ["run", "--config", str(config), "--out", str(tmp_path / "y")])
    assert result.exit_code == 2 and "unknown selection rule" in result.output, result.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_run_passes_the_config_key_on_to_the_summary(tmp_path, margins, monkeypatch):
    from raybench import pipeline

    store = RunStore(str(tmp_path / "run"))
    _write(store, margins)
    monkeypatch.setattr(pipeline, "execute", lambda config, **_: (None, store, None))
    config = tmp_path / "c.toml"
    config.write_text('select = "max_p95"\n')
    result = pipeline.run(pipeline.load_config(str(config), out=store.uri))
    assert result.summary["selection"]["rule"] == "max_p95"
    assert sum(1 for r in result.summary["rows"] if r.get("selection") == "max_p95") == 9


def test_through_a_task_mapper_the_rows_are_the_same(run):
    from raybench.selection import select_rows

    rows = reduce_run(run, n_boot=0)
    calls = []

    def mapper(fn, items):  # what engine.map_tasks does, in process: fn(*item) by URI, in item order
        calls.append(fn.__name__)
        return (fn(*item) for item in items)

    here = select_rows(run, rows, "forget_p95", n_boot=4)
    mapped = select_rows(run, rows, "forget_p95", n_boot=4, mapper=mapper)
    assert calls == ["entry_p95_at", "score_chunk_at"]
    assert mapped.record == here.record and mapped.rows == here.rows
