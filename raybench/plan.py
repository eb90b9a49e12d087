"""Plan: expand a RunConfig into work units with stable ids. Pure: no Ray, no files.

Units:
* ``train`` — a block of M models of one role: ``original`` (all train samples; forget set ``none``, shared by
  every forget set) or ``oracle`` (train minus one forget set).
* ``unlearn`` — one method with one parameter combination on one block of originals for one forget set; it
  depends on the ``train`` unit of those originals (it loads their checkpoint).
* ``train`` with role ``matching_oracle`` — for oracle-matching methods only: oracles trained on the retain set
  with their own seeds, so the oracles a method fine-tunes against are never the ones that score it
  (docs/methods.md#oracle_matching); unlearn units of such methods also depend on them.
* ``train`` with role ``unlearned`` and method ``oracle_floor`` (unless ``config.floor`` is off) — a second
  oracle ensemble per forget set, trained on the retain set like the oracles but with its own seeds (the
  ``floor_oracle`` stream, disjoint from the oracles' and the matching oracles'), and scored against the oracles
  like a method: KLOM of exact unlearning at this N, the noise floor every method's row is read against. It is
  stored exactly as EasyDUB's imported floor is (role ``unlearned``, method ``oracle_floor``, params ``{}``), so
  reduce scores both the same way; its epoch is the recipe's epochs (what a train unit stores).

``do_nothing`` has no units: its "unlearned" models are the originals, scored from their stored margins.
A unit id hashes everything that defines its output, so a rerun skips finished units whatever else changed. That
includes the versions of the code that computes it (``code_versions``): train units carry ``TRAINING_VERSION``
and ``MARGINS_VERSION``, unlearn units their method's ``version``, ``TRAINING_VERSION`` (a method may train, as
``retrain`` does, also on imported originals) and ``MARGINS_VERSION``. Bumping a method's version recomputes its
units and nothing else; package versions are recorded with the results, never hashed.

With ``easydub_source`` set, originals, oracles and matching oracles are not trained: they are ``import`` units
(EasyDUB's published models, written by ``raybench.easydub.import_easydub`` before anything runs, under the ids
``import_unit_id`` gives them), and only the unlearn units run on Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from raybench import training
from raybench.config import ConfigError, RunConfig
from raybench.data import Dataset, ForgetSet, resolve_forget_set
from raybench.easydub import EasyDubError, allocate_oracles
from raybench.ids import digest, ensemble_seeds, model_seed
from raybench.methods import Method, expand_grid, params_json, resolve_methods, snapshot_epochs
from raybench.store import FLOOR_METHOD

NO_FORGET_SET = "none"  # forget_set of originals: they are trained on all train samples
NO_SEED = -1  # the seed of an imported model: not seeded by raybench


@dataclass(frozen=True)
class Unit:
    """One Ray call's worth of work; a plain, picklable description (the worker rebuilds everything from it)."""

    id: str
    kind: str  # "train" | "unlearn" | "import" (published models, committed before the run starts)
    role: str  # "original" | "oracle" | "matching_oracle" | "unlearned"
    forget_set: str
    model_ids: tuple[int, ...]
    seeds: tuple[int, ...]
    method: str = "none"
    params: dict = field(default_factory=dict)
    epochs: tuple[int, ...] = ()
    depends_on: tuple[str, ...] = ()  # unlearn: the originals' train unit, then any matching-oracle units
    method_seed: int = 0
    code_versions: dict = field(default_factory=dict)  # the code versions hashed into ``id`` (see module doc)

    @property
    def params_json(self) -> str:
        return params_json(self.params)

    @property
    def n_models(self) -> int:
        return len(self.model_ids)


def id_blocks(first: int, count: int, size: int) -> list[tuple[int, ...]]:
    """Model ids ``first .. first+count-1`` in blocks of ``size``: the units of one ensemble, trained or imported."""
    return [tuple(range(start, min(first + count, start + size))) for start in range(first, first + count, size)]


def import_unit_id(source: str, identity: dict, role: str, forget_set: str, method: str,
                   model_ids: tuple[int, ...] | list[int]) -> str:
    """Stable id of an imported unit: what it holds (source, role, forget set, the source's model ids) in which
    run."""
    return digest({"kind": "import", "source": source, "role": role, "forget_set": forget_set, "method": method,
                   "model_ids": list(model_ids), "identity": identity})


def import_units(source: str, identity: dict, role: str, forget_set: str, ids: range, block_size: int,
                 method: str = "none") -> list[Unit]:
    """The import units holding a source's models ``ids`` of one role and forget set, in blocks of ``block_size``."""
    return [Unit(import_unit_id(source, identity, role, forget_set, method, block), "import", role, forget_set,
                 block, (NO_SEED,) * len(block), method) for block in id_blocks(ids.start, len(ids), block_size)]


@dataclass(frozen=True)
class MethodRun:
    """One method with one parameter combination, as it appears in the summary."""

    method: Method
    params: dict
    epochs: tuple[int, ...]


@dataclass(frozen=True)
class Plan:
    config: RunConfig
    forget_sets: dict[str, ForgetSet]
    method_runs: tuple[MethodRun, ...]
    units: tuple[Unit, ...]

    def units_of(self, kind: str) -> list[Unit]:
        return [u for u in self.units if u.kind == kind]


def matching_oracle_count(config: RunConfig, method_runs: list[MethodRun]) -> int:
    """How many matching oracles per forget set the oracle-matching runs need (0 when there are none)."""
    counts = [config.n_models if r.params.get("pairing") == "per_model" else int(r.params.get("num_oracles", 1))
              for r in method_runs if r.method.needs_oracles]
    if counts and min(counts) < 1:
        raise ConfigError(f"num_oracles must be at least 1, got {min(counts)}")
    return max(counts, default=0)


def _matching_oracles(config: RunConfig, fs_id: str, fs_digest: str, count: int, identity: dict) -> list[Unit]:
    """Train units for the oracles that oracle-matching methods fine-tune against (disjoint seeds)."""
    if config.easydub_source:  # published oracles beyond the scoring ones, where the import put them
        try:
            ids = allocate_oracles(config.n_models, matching_oracles=count).matching
        except EasyDubError as err:
            raise ConfigError(str(err)) from err
        return _imported(identity, "matching_oracle", fs_id, ids.start, len(ids), config.block_size)
    units = []
    all_seeds = ensemble_seeds(config.seed, "matching_oracle", fs_id, n=count)
    for ids in id_blocks(0, count, config.block_size):
        seeds = tuple(all_seeds[i] for i in ids)
        versions = train_versions()
        unit_id = digest({"kind": "train", "role": "matching_oracle", "forget": fs_digest, "seeds": seeds,
                          "identity": identity, "versions": versions})
        units.append(Unit(unit_id, "train", "matching_oracle", fs_id, ids, seeds, code_versions=versions))
    return units


def _floor_oracles(config: RunConfig, fs_id: str, fs_digest: str, identity: dict) -> list[Unit]:
    """Train units of the noise-floor ensemble: N oracles on the retain set with seeds of their own, stored as the
    "unlearned" models of method ``oracle_floor`` (no checkpoint: nothing starts from them)."""
    units = []
    all_seeds = ensemble_seeds(config.seed, "floor_oracle", fs_id, n=config.n_models)
    for ids in id_blocks(0, config.n_models, config.block_size):
        seeds = tuple(all_seeds[i] for i in ids)
        versions = train_versions()
        unit_id = digest({"kind": "train", "role": "floor_oracle", "forget": fs_digest, "seeds": seeds,
                          "identity": identity, "versions": versions})
        units.append(Unit(unit_id, "train", "unlearned", fs_id, ids, seeds, FLOOR_METHOD, code_versions=versions))
    return units


def train_versions() -> dict:
    """The code versions a train unit's id includes (read at call time, so tests can bump them)."""
    return {"training": training.TRAINING_VERSION, "margins": training.MARGINS_VERSION}


def unlearn_versions(method: Method) -> dict:
    """The code versions an unlearn unit's id includes."""
    return {"method": method.version, "training": training.TRAINING_VERSION, "margins": training.MARGINS_VERSION}


def _imported(identity: dict, role: str, fs_id: str, first: int, count: int, block_size: int) -> list[Unit]:
    """The import units holding EasyDUB's models ``first .. first+count-1`` of one role and forget set."""
    return import_units("easydub", identity, role, fs_id, range(first, first + count), block_size)


def plan_method_runs(config: RunConfig) -> list[MethodRun]:
    """Every (method, parameter combination) of the run, with its snapshot epochs."""
    try:
        methods = resolve_methods(config.methods)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    unknown = sorted(set(config.params) - {m.name for m in methods})
    if unknown:
        raise ConfigError(f"parameters given for method(s) not in this run: {', '.join(unknown)}")
    method_runs = []
    for method in methods:
        overrides = config.params.get(method.name, {})
        try:
            grid = expand_grid(method, overrides)
            epochs = snapshot_epochs(method, overrides)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        method_runs.extend(MethodRun(method, params, epochs) for params in grid)
    return method_runs


LIST_OFFSET_MAX = (1 << 31) - 1
"""A Parquet/Arrow ``list<float32>`` column addresses at most this many values (int32 offsets)."""


def check_unit_sizes(config: RunConfig, method_runs: list[MethodRun], n_samples: int) -> None:
    """Refuse, before any work, a unit whose margins table cannot be stored: its margins (models of one block x
    samples of both splits x snapshots) go into one ``list<float32>`` column, which ``store.margins_table`` would
    only refuse after the unit was computed. Train units have one snapshot, unlearn units one per epoch asked."""
    block = min(config.block_size, config.n_models)
    snapshots = max((len(r.epochs) for r in method_runs if r.method.fn is not None), default=1)
    total = block * n_samples * snapshots
    if total > LIST_OFFSET_MAX:
        raise ConfigError(f"one unit would hold {block} models x {n_samples} samples x {snapshots} snapshot(s) = "
                          f"{total:,} margins, more than a Parquet list column holds ({LIST_OFFSET_MAX:,}); "
                          "lower block_size or the number of snapshot epochs")


def make_plan(config: RunConfig, dataset: Dataset, forget_sets: dict[str, ForgetSet] | None = None) -> Plan:
    """All units of ``config``, originals first, then oracles, then unlearning (a valid execution order).

    ``forget_sets`` (id -> set) replaces resolving ``config.forget_sets`` on ``dataset``: an EasyDUB run takes
    them from the hub files it imported.
    """
    identity = config.identity()
    if forget_sets is None:
        try:
            resolved = [resolve_forget_set(spec, dataset) for spec in config.forget_sets]
        except ValueError as err:
            raise ConfigError(str(err)) from err
        forget_sets = {fs.id: fs for fs in resolved}  # keyed by id: a file's id is its stem
        if len(forget_sets) != len(resolved):
            raise ConfigError(f"two forget sets share an id: {', '.join(fs.id for fs in resolved)} (rename a file)")
    method_runs = plan_method_runs(config)
    check_unit_sizes(config, method_runs, dataset.n_train + dataset.n_val)
    n_matching = matching_oracle_count(config, method_runs)
    recipe = config.resolved_recipe().to_dict()

    units: list[Unit] = []
    if config.easydub_source:
        originals = _imported(identity, "original", NO_FORGET_SET, 0, config.n_models, config.block_size)
    else:
        originals = []
        original_seeds = ensemble_seeds(config.seed, "original", n=config.n_models)
        for ids in id_blocks(0, config.n_models, config.block_size):
            seeds = tuple(original_seeds[i] for i in ids)
            versions = train_versions()
            unit_id = digest({"kind": "train", "role": "original", "seeds": seeds, "identity": identity,
                              "versions": versions})
            originals.append(Unit(unit_id, "train", "original", NO_FORGET_SET, ids, seeds, code_versions=versions))
    units.extend(originals)
    for fs in forget_sets.values():
        if config.easydub_source:
            units.extend(_imported(identity, "oracle", fs.id, 0, config.n_models, config.block_size))
            continue
        fs_digest = digest(fs.indices.tolist())
        oracle_seeds = ensemble_seeds(config.seed, "oracle", fs.id, n=config.n_models)
        for ids in id_blocks(0, config.n_models, config.block_size):
            seeds = tuple(oracle_seeds[i] for i in ids)
            versions = train_versions()
            unit_id = digest({"kind": "train", "role": "oracle", "forget": fs_digest, "seeds": seeds,
                              "identity": identity, "versions": versions})
            units.append(Unit(unit_id, "train", "oracle", fs.id, ids, seeds, code_versions=versions))
        if config.floor:  # an EasyDUB run's floor is the import's (``import-easydub --oracle-floor``)
            units.extend(_floor_oracles(config, fs.id, fs_digest, identity))
    for fs in forget_sets.values():
        fs_digest = digest(fs.indices.tolist())
        matching = _matching_oracles(config, fs.id, fs_digest, n_matching, identity) if n_matching else []
        units.extend(matching)
        for run in method_runs:
            if run.method.fn is None:
                continue
            needs = tuple(u.id for u in matching) if run.method.needs_oracles else ()
            for original in originals:
                method_seed = model_seed(config.seed, "method", run.method.name, fs.id)
                # the recipe is in the id because methods read it (batch sizes, weight decay); for trained
                # originals it is also in their id, for imported ones it is not
                versions = unlearn_versions(run.method)
                unit_id = digest({"kind": "unlearn", "method": run.method.name, "params": run.params,
                                  "epochs": run.epochs, "forget": fs_digest, "depends": (original.id, *needs),
                                  "method_seed": method_seed, "recipe": recipe, "versions": versions})
                units.append(Unit(unit_id, "unlearn", "unlearned", fs.id, original.model_ids, original.seeds,
                                  run.method.name, run.params, run.epochs, (original.id, *needs), method_seed,
                                  versions))
    _check_unique(units)
    return Plan(config, forget_sets, tuple(method_runs), tuple(units))


def _check_unique(units: list[Unit]) -> None:
    """Two planned units with one id would be computed twice and committed under one manifest, and every later
    reduce would fail on duplicate model ids: refuse the plan instead (the config checks should make this
    unreachable; this is the last line)."""
    seen: dict[str, Unit] = {}
    for unit in units:
        if unit.id in seen:
            first = seen[unit.id]
            raise ConfigError(f"the plan holds unit {unit.id} twice ({first.kind} {first.method} {first.params_json} "
                              f"on forget set {first.forget_set}); refusing to run it twice")
        seen[unit.id] = unit
