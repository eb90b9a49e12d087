"""``raybench run`` from top to bottom: data → store → plan → sources provide ensembles → engine → reduce → publish.

The one owner of a run. Every step is a call into a module below this one; none of them knows about the others:
the plan makes the units, the source (``raybench.sources``) provides its ensembles (an import source writes them,
the trained source hands them to the engine), the engine runs what must be trained or unlearned on Ray, and reduce
scores the folder through whatever task mapper it is given (Ray tasks on a multi-node cluster, else in process).
``cli.py`` only parses options, calls this module and maps its errors to exit codes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import posixpath
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from raybench.config import ConfigError, RunConfig, build_config, check_subsets_table, validate
from raybench.data import DIFFICULTY_IDS, Dataset, ForgetSet, difficulty_forget_sets, load_dataset
from raybench.engine import EngineError, RunReport, cluster_for_reduce, map_tasks, run_units, start_ray
from raybench.ids import digest
from raybench.metrics.selection import check_rule
from raybench.plan import (
    MethodInputs,
    Plan,
    Unit,
    check_unit_sizes,
    make_plan,
    plan_method_runs,
    source_units,
    subset_units,
    unavailable_methods,
)
from raybench.reduce import reduce_run, write_summary
from raybench.report import write_report
from raybench.selection import select_rows
from raybench.sources import Source, SourceError, source_for
from raybench.sources.trained import TrainedSource
from raybench.store import RunStore, StoreError
from raybench.subsets import SubsetScores, analyse, load_subset_scores, scores_digest, write_masks
from raybench.versions import collect_versions

log = logging.getLogger(__name__)

STEPS = ("all", "train", "unlearn")


@dataclass
class RunResult:
    """What ``run`` did: the plan, the run folder, the engine's report and the summary it published."""

    plan: Plan
    store: RunStore
    report: RunReport
    summary: dict
    page: str


def load_config(toml_path: str | None = None, **cli: object) -> RunConfig:
    """The run config of ``raybench run``: defaults < TOML < CLI (``config.build_config``), then what only the
    layers above the config can check (``check``)."""
    config = build_config(toml_path, **cli)
    check(config)
    return config


def check(config: RunConfig, source: Source | None = None) -> None:
    """Before anything starts: every method parameter's type and range (and every sweep's values distinct), and
    whether the run's source (``config.source``'s unless given) can provide the run (e.g. EasyDUB publishes 200
    oracles per forget set)."""
    plan_method_runs(config)
    difficulty = [fs for fs in config.forget_sets if fs in DIFFICULTY_IDS]
    if difficulty and not config.scores:
        raise ConfigError(f"forget set {difficulty[0]} is built from memorisation scores: give --scores SUBSET_RUN")
    if difficulty and config.source != "trained":
        raise ConfigError(f"forget set {difficulty[0]} needs oracles trained without it; source {config.source!r} "
                          "publishes oracles only for its own forget sets")
    try:
        (source or source_for(config.source)).check(config)
    except SourceError as err:
        raise ConfigError(str(err)) from err


def run(config: RunConfig, *, step: str = "all", verbose: bool = False, progress: Callable[[str], None] | None = None,
        kill_after: Callable[[Unit], bool] | None = None) -> RunResult:
    """``raybench run`` (``step="all"``), ``raybench train`` or ``raybench unlearn``: compute what is missing, then
    summarise every complete ensemble in the folder and write the report."""
    plan, store, report = execute(config, step=step, verbose=verbose, progress=progress, kill_after=kill_after)
    summary, page = summarize(store, select=config.select or None)
    return RunResult(plan, store, report, summary, page)


def execute(config: RunConfig, *, step: str = "all", verbose: bool = False,
            progress: Callable[[str], None] | None = None,
            kill_after: Callable[[Unit], bool] | None = None) -> tuple[Plan, RunStore, RunReport]:
    """Plan the run, let its source provide the ensembles, skip finished units and run the rest on Ray.

    ``step``: ``"train"`` runs only the train units (originals, oracles, matching oracles, the floor),
    ``"unlearn"`` only the unlearn units, which needs the train units they start from to be committed already;
    ``"all"`` both. ``kill_after``: the engine's fault-injection hook, for tests only (``engine.run_units``).
    """
    if step not in STEPS:
        raise ValueError(f"step must be one of {', '.join(STEPS)}, got {step!r}")
    check(config)
    source = _source(config.source)
    store = RunStore(config.output_uri())
    with store.lock():  # one run at a time per folder; a refused run leaves no new folder behind
        return _execute(config, source, store, verbose=verbose, progress=progress, step=step, kill_after=kill_after)


def _source(spec: str, cache_dir: str | None = None, variant: str | None = None) -> Source:
    try:
        return source_for(spec, cache_dir=cache_dir, variant=variant)
    except SourceError as err:
        raise ConfigError(str(err)) from err


def _load_dataset(config: RunConfig) -> Dataset:
    try:
        return load_dataset(config.dataset, config.data_root or None)
    except ValueError as err:  # CIFAR-10 missing and offline, corrupted files: the user's to fix, exit code 2
        raise ConfigError(str(err)) from err


def _execute(config: RunConfig, source: Source, store: RunStore, *, verbose: bool,
             progress: Callable[[str], None] | None, step: str,
             kill_after: Callable[[Unit], bool] | None) -> tuple[Plan, RunStore, RunReport]:
    t0 = time.perf_counter()
    # -- data: the images every unit trains or unlearns on, loaded once on the driver
    dataset = _load_dataset(config)
    check_unit_sizes(config, plan_method_runs(config), dataset.n_train + dataset.n_val)  # before any import
    scores = _subset_scores(config, dataset)
    say = progress or (lambda msg: log.info(msg))
    # -- store and plan: the run's identity is its source's; every unit id is made by the plan
    try:
        identity = source.identity(config, dataset)
        run_id = store.open_run(identity, collect_versions())  # versions recorded in run.json, never hashed
        forget_sets = _forget_sets(config, source, dataset, store, scores)
        effects = {fs_id: scores.effect(fs.indices) for fs_id, fs in forget_sets.items()} if scores else {}
        inputs = MethodInputs({fs_id: scores_digest(e) for fs_id, e in effects.items()},
                              scores.scores_sha256 if scores else None)
        plan = make_plan(config, dataset, forget_sets, source, identity, inputs)
        source.record_dataset(store, dataset)
        _record_forget_sets(store, forget_sets)
        if scores is not None:
            _record_scores(store, scores, effects, config.mem_size)
        store.clean_uncommitted()  # leftovers of an interrupted driver or a killed worker: never read
        # -- sources provide ensembles: an import source writes its units, the trained one hands them on
        provided = [u for u in plan.units if u.kind != "unlearn"]
        to_compute = source.provide(provided, store, run_id, dataset)
    except SourceError as err:
        raise ConfigError(str(err)) from err
    done = store.completed_units()
    store.verify_units(done[u.id] for u in plan.units if u.id in done)  # a damaged unit is refused, not built on
    missing = [u.id for u in provided if u not in to_compute and u.id not in done]
    if missing:
        raise StoreError(f"source {source.name} did not provide {len(missing)} unit(s) of this run: {missing[:3]}")
    # -- engine: what must be trained or unlearned, on Ray
    runnable = to_compute + [u for u in plan.units if u.kind == "unlearn"]
    selected = [u for u in runnable if step == "all" or u.kind == step]
    todo = [u for u in selected if u.id not in done]
    waiting = {dep for u in todo for dep in u.depends_on if dep not in done}  # "all" trains them first
    if step == "unlearn" and waiting:
        raise ConfigError(f"{len(waiting)} train unit(s) that these methods start from are not in {store.uri} yet: "
                          "run `raybench train` with the same config first (or `raybench run`, which does both)")
    report = RunReport(run_id, store.uri, len(selected), len(selected) - len(todo), 0)
    for message in unavailable_methods(config):  # never silently: the log and the progress line both say it
        log.warning(message)
        say(message)
    if report.units_skipped:
        skipped_models = sum(u.n_models for u in selected if u.id in done)
        say(f"resuming {store.uri}: {report.units_skipped} of {len(selected)} units ({skipped_models} models) "
            f"already complete, skipped; {len(todo)} to run")
    if todo:
        owns_ray = start_ray(config, verbose)
        try:
            run_units(todo, plan, dataset, store, run_id, {fs.id: fs.indices for fs in forget_sets.values()}, report,
                      say, kill_after=kill_after, datamodel_effects=effects,
                      memorization=None if scores is None else scores.scores)
        finally:
            if owns_ray:
                import ray

                ray.shutdown()
    report.wall_s = time.perf_counter() - t0
    if report.failed:
        lines = "\n".join(f"  {uid}: {err.strip().splitlines()[-1] if err.strip() else err}"
                          for uid, err in report.failed.items())
        raise EngineError(f"{len(report.failed)} unit(s) failed (the rest are saved; rerun to retry):\n{lines}")
    return plan, store, report


def plan_run(config: RunConfig, dataset: Dataset, store: RunStore | None = None) -> Plan:
    """The plan of ``config`` on ``dataset`` with its source's forget sets and identity, as ``raybench run``
    makes it (without running or writing anything)."""
    source = _source(config.source)
    scores = _subset_scores(config, dataset)
    try:
        forget_sets = _forget_sets(config, source, dataset, store, scores)
        inputs = None if scores is None else MethodInputs(
            {fs_id: scores_digest(scores.effect(fs.indices)) for fs_id, fs in forget_sets.items()},
            scores.scores_sha256)
        return make_plan(config, dataset, forget_sets, source, source.identity(config, dataset), inputs)
    except SourceError as err:
        raise ConfigError(str(err)) from err


def _subset_scores(config: RunConfig, dataset: Dataset) -> SubsetScores | None:
    """The subset run of ``--scores`` (None without it), checked to be of this run's data."""
    if not config.scores:
        return None
    try:
        return load_subset_scores(config.scores, dataset=dataset.name, fingerprint=dataset.fingerprint(),
                                  n_train=dataset.n_train)
    except StoreError as err:
        raise ConfigError(f"--scores {config.scores}: {err}") from err


def _forget_sets(config: RunConfig, source: Source, dataset: Dataset | None, store: RunStore | None,
                 scores: SubsetScores | None) -> dict[str, ForgetSet]:
    """The source's forget sets and, from ``--scores``, the difficulty sets (``mem_low`` … ``mem_mix``) the config
    names, after them."""
    wanted = [fs for fs in config.forget_sets if fs in DIFFICULTY_IDS]
    if not wanted:
        return source.forget_sets(config, dataset, store)
    if scores is None:
        raise ConfigError(f"forget set {wanted[0]} is built from memorisation scores: give --scores SUBSET_RUN")
    rest = tuple(fs for fs in config.forget_sets if fs not in DIFFICULTY_IDS)
    sets = source.forget_sets(dataclasses.replace(config, forget_sets=rest), dataset, store) if rest else {}
    try:
        built = difficulty_forget_sets(wanted, scores.scores, config.mem_size, f"subset run {scores.run_id}")
    except ValueError as err:
        raise ConfigError(str(err)) from err
    clash = sorted(set(sets) & set(built))
    if clash:
        raise ConfigError(f"two forget sets share the id {clash[0]} (a file named like a difficulty set): rename it")
    return {**sets, **built}


def _record_scores(store: RunStore, scores: SubsetScores, effects: dict, mem_size: int) -> None:
    """``scores.json`` and ``datamodel/<forget set>.npy``: which subset run the run used and the effect each forget
    set got. A folder whose results came from another subset run is refused: its units would mix with these."""
    path = store.path("scores.json")
    record = store.read_json(path) if store.exists(path) else {}
    if record and record.get("subset_run") != scores.run_id:
        raise ConfigError(f"{store.uri} was run with --scores from subset run {record.get('subset_run')}; this one "
                          f"is {scores.run_id}: use a new --out folder")
    entries = dict(record.get("effects", {}))
    for fs_id, effect in effects.items():
        file = posixpath.join("datamodel", f"{fs_id}.npy")
        digest_now = scores_digest(effect)
        if entries.get(fs_id, {}).get("sha256") != digest_now or not store.exists(store.path(file)):
            store.write_array(store.path(file), effect)
            entries[fs_id] = {"file": file, "sha256": digest_now, "shape": list(effect.shape)}
    store.write_json(path, {**scores.describe(), "mem_size": mem_size, "effects": entries})


def _record_forget_sets(store: RunStore, forget_sets: dict[str, ForgetSet]) -> None:
    """Store each forget set's indices with the run; refuse a set whose id now means other indices."""
    for fs_id, fs in forget_sets.items():
        if not store.record_forget_set(fs_id, fs.description, fs.indices):
            raise ConfigError(f"forget set {fs_id!r} in {store.uri} has other indices than the one given now; "
                              "give it another name or use a new --out folder")


# -- reduce and publish ----------------------------------------------------------------------------------------------
def summarize(store: RunStore, *, direction: str | None = None, n_boot: int | None = None,
              select: str | None = None) -> tuple[dict, str]:
    """The folder's summary, as ``raybench reduce`` gives it: every complete ensemble (ensembles of earlier runs
    into the same folder stay in it; a summary never loses one it had, see ``write_summary``), written as
    summary.csv / summary.json, then every row's per-sample values (``per_sample/``, docs/design.md#per-sample-values;
    the report may read them), then report.html and its plots. Returns summary.json's content and the page.
    ``n_boot``: the intervals' replicates (``reduce_run``'s default when None; 0: no interval). ``select``: a
    selection rule (``raybench.metrics.selection.RULES``): the rows of each method's choice on the tuning halves,
    scored on the scoring halves, are appended (``raybench.selection``; not in per_sample/)."""
    if select is not None:
        try:  # before the reduce: an unknown rule costs nothing
            check_rule(select)
        except ValueError as err:
            raise StoreError(str(err)) from None
    skipped: list[str] = []
    mapper = map_tasks if cluster_for_reduce() else None  # Ray tasks only on a cluster of several nodes
    kwargs = {} if direction is None else {"direction": direction}
    if n_boot is not None:
        kwargs["n_boot"] = n_boot
    samples: list[tuple[dict, dict]] = []  # every row's per-sample values, written once the summary is
    rows = reduce_run(store, skipped=skipped, mapper=mapper, on_samples=lambda r, c: samples.append((r, c)),
                      **kwargs)
    selection = select_rows(store, rows, select, mapper=mapper, **kwargs) if select is not None else None
    summary = write_summary(store, rows + (selection.rows if selection else []), skipped=skipped,
                            selection=selection.record if selection else None)
    csv_digest = hashlib.sha256(store.read_bytes(store.path("summary.csv"))).hexdigest()
    store.write_per_sample(samples, metadata={"run": summary["run"], "klom_version": summary["klom_version"],
                                              "summary_csv_sha256": csv_digest})
    return summary, write_report(store, summary)


# -- subset ensembles ---------------------------------------------------------------------------------------------
@dataclass
class SubsetResult:
    """What ``raybench subsets`` did: the folder, the engine's report and subsets.json's content."""

    store: RunStore
    report: RunReport
    record: dict


def subset_config(config: RunConfig) -> tuple[RunConfig, int, float]:
    """The run config of a subset ensemble (K models, one role, no forget set or method), K and the fraction
    (``[subsets]`` with its defaults)."""
    table = check_subsets_table(config.subsets)
    if config.source != "trained":
        raise ConfigError(f"raybench subsets trains its models; source {config.source!r} cannot provide them")
    k, fraction = table["n_models"], table["fraction"]
    sub = dataclasses.replace(config, n_models=k, n_oracles=None, forget_sets=(), methods=("do_nothing",),
                              params={}, floor=False, scores="", subsets=table)
    if not sub.out:
        key = {**sub.identity(), "subsets": table}
        sub = dataclasses.replace(sub, out=str(Path("runs") / f"{config.dataset}-subsets-{digest(key, 8)}"))
    return sub, k, fraction


def subset_identity(config: RunConfig, dataset: Dataset, n_models: int, fraction: float) -> dict:
    """A subset run's identity: the trained source's (data, architecture, recipe, seeds, fingerprint) plus
    K and the fraction, so a folder never mixes two fractions and no `raybench run` resumes into it."""
    return {**TrainedSource().identity(config, dataset), "subsets": {"n_models": n_models, "fraction": fraction}}


def subsets(config: RunConfig, *, verbose: bool = False, progress: Callable[[str], None] | None = None,
            kill_after: Callable[[Unit], bool] | None = None) -> SubsetResult:
    """``raybench subsets``: train the subset ensemble (K models, each on its seed's random fraction of the train
    set) through the engine like any run (stacked blocks, Parquet margins, resumable: finished units are
    skipped), then write its memorisation and datamodel (``raybench.subsets.analyse``)."""
    config, k, fraction = subset_config(config)
    t0 = time.perf_counter()
    store = RunStore(config.output_uri())
    say = progress or (lambda msg: log.info(msg))
    with store.lock():
        dataset = _load_dataset(config)
        identity = subset_identity(config, dataset, k, fraction)
        run_id = store.open_run(identity, collect_versions())
        TrainedSource().record_dataset(store, dataset)
        units = subset_units(config, identity, k, fraction)
        write_masks(store, [s for u in units for s in u.seeds], fraction, dataset.n_train)
        store.clean_uncommitted()
        done = store.completed_units()
        store.verify_units(done[u.id] for u in units if u.id in done)
        todo = [u for u in units if u.id not in done]
        report = RunReport(run_id, store.uri, len(units), len(units) - len(todo), 0)
        if report.units_skipped:
            say(f"resuming {store.uri}: {report.units_skipped} of {len(units)} subset units already complete, "
                f"skipped; {len(todo)} to run")
        if todo:
            owns_ray = start_ray(config, verbose)
            try:
                run_units(todo, Plan(config, {}, (), tuple(units)), dataset, store, run_id, {}, report, say,
                          kill_after=kill_after)
            finally:
                if owns_ray:
                    import ray

                    ray.shutdown()
        if report.failed:
            raise EngineError(f"{len(report.failed)} subset unit(s) failed (the rest are saved; rerun to retry)")
        say(f"memorisation and datamodel of {k} subset models")
        record = analyse(store, dataset.y_train, seed=config.seed)
    report.wall_s = time.perf_counter() - t0
    return SubsetResult(store, report, record)


# -- imports without a run ---------------------------------------------------------------------------------------
@dataclass
class ImportReport:
    """What an import did: the run, the data sizes it found, the units it wrote or found already committed, and
    the source's notes on anything that can make reduce's numbers differ from the publisher's."""

    run_id: str
    out: str
    source: str
    n_train: int
    n_val: int
    units_written: list[str]
    units_skipped: list[str]
    forget_sets: dict  # id -> indices, in file order
    notes: list[str]

    @property
    def forget_set_sizes(self) -> dict[str, int]:
        return {fs: len(idx) for fs, idx in self.forget_sets.items()}


def import_source(name: str, location: str | Path, forget_sets: Sequence[str], n_models: int, out: str, *,
                  n_oracles: int | None = None, matching_oracles: int = 0, floor: bool = False,
                  checkpoints: bool = False, block_size: int = 50, chunk_size: int = 8192,
                  images: Dataset | None = None, cache_dir: str | None = None,
                  variant: str | None = None) -> ImportReport:
    """``raybench import NAME``: a published source's originals ``0..n_models-1`` and, per forget set, its scoring
    oracles (``n_oracles``, default N), ``matching_oracles`` matching oracles and, with ``floor``, the
    ``oracle_floor`` ensemble, written into the run folder ``out``; no Ray. ``checkpoints`` stores the originals'
    state dicts too (what unlearning starts from), checked against the published margins on ``images`` where the
    source can. The units are the ones ``raybench run`` with ``source = "NAME:LOCATION"`` plans, so a run on the
    folder resumes from them. A rerun finds every unit committed and reads nothing from the source. ``variant``:
    which model folder of a hub that has several (``klom-models``); with no forget sets, only the originals are
    imported (e.g. KLOM-models' LIVING17, which has no published oracles)."""
    source = _source(f"{name}:{location}" if str(location) else name, cache_dir, variant)
    if source.trains:
        raise ConfigError(f"source {name!r} trains its models: use `raybench run`, not `raybench import`")
    ids = [str(fs).strip() for fs in forget_sets if str(fs).strip()]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"forget sets must be distinct ids like 2,5, got {list(forget_sets)}")
    for what, value, low in (("matching_oracles", matching_oracles, 0),):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{what} must be an integer >= {low}, got {value!r}")
    config = RunConfig(**source.config_defaults(), n_models=n_models, n_oracles=n_oracles, forget_sets=tuple(ids),
                       methods=("do_nothing",), block_size=block_size, chunk_size=chunk_size,
                       source=source.name if not str(location) else f"{source.name}:{location}", floor=floor,
                       out=out)
    validate(config, data_known=False)  # published margins: the data set need not be one raybench can load
    check(config, source)
    store = RunStore(out)
    with store.lock():  # like a run: one writer at a time, no empty folder left by a refusal
        identity = source.identity(config, images)
        try:
            run_id = store.open_run(identity)  # refuses another run's folder before reading the source
            sets = source.forget_sets(config, images, store)
            units = source_units(config, source, identity, sets, n_oracles=n_oracles or n_models,
                                 n_matching=matching_oracles, floor=floor, checkpoints=checkpoints)
            _record_forget_sets(store, sets)
            before = {u.id for u in units if store.is_complete(u.id)}
            source.provide(units, store, run_id, images)
        except SourceError as err:
            raise ConfigError(str(err)) from err
        store.clean_uncommitted()  # the writer's emptied staging folder: nothing is in flight under the lock
        missing = [u.id for u in units if not store.is_complete(u.id)]
        if missing:
            raise StoreError(f"source {source.name} did not provide {len(missing)} unit(s): {missing[:3]}")
        data = store.read_record(store.path("dataset.json"), "dataset.json", {"n_train": int, "n_val": int})
        notes = source.notes(store)
    return ImportReport(run_id, store.uri, str(location), data["n_train"], data["n_val"],
                        [u.id for u in units if u.id not in before], [u.id for u in units if u.id in before],
                        {fs_id: fs.indices for fs_id, fs in sets.items()}, notes)
