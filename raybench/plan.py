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
  stored exactly as an imported floor is (role ``unlearned``, method ``oracle_floor``, params ``{}``), so
  reduce scores both the same way; its epoch is the recipe's epochs (what a train unit stores).

* ``train`` with role ``subset`` — only in a subset run (``raybench subsets``, ``subset_units``): models each
  trained on the random fraction of the train set their seed picks, with their own seed stream.

``do_nothing`` has no units: its "unlearned" models are the originals, scored from their stored margins.
A unit id hashes everything that defines its output, so a rerun skips finished units whatever else changed. That
includes the versions of the code that computes it (``code_versions``): train units carry ``TRAINING_VERSION``
and ``MARGINS_VERSION``, unlearn units their method's ``version``, ``TRAINING_VERSION`` (a method may train, as
``retrain`` does, also on imported originals) and ``MARGINS_VERSION``. Bumping a method's version recomputes its
units and nothing else; package versions are recorded with the results, never hashed.

The ensembles come from the run's source (``raybench.sources``): the plan asks it which of its models hold each
one (``Source.model_ids``) and makes all unit ids here, in one place. A source that trains gets ``train`` units; one
that imports (published models) gets ``import`` units (``import_units``), which it writes before anything runs;
then only the unlearn units run on Ray.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from raybench import training
from raybench.config import ConfigError, RunConfig
from raybench.data import Dataset, ForgetSet, resolve_forget_set
from raybench.ids import digest, ensemble_seeds, model_seed
from raybench.methods import Method, expand_grid, params_json, resolve_methods, snapshot_epochs
from raybench.store import FLOOR_METHOD

if TYPE_CHECKING:
    from raybench.sources.base import Source

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
    checkpoint: bool = False  # import units: also store the models' checkpoint (something starts from them)

    @property
    def params_json(self) -> str:
        return params_json(self.params)

    @property
    def n_models(self) -> int:
        return len(self.model_ids)


@dataclass(frozen=True)
class Ensemble:
    """One ensemble the plan asks a source for: ``count`` models of ``role`` for ``forget_set`` (``"none"`` for the
    originals), stored under ``method`` (``"none"``, or ``oracle_floor`` for the noise-floor ensemble)."""

    role: str  # "original" | "oracle" | "matching_oracle" | "unlearned"
    forget_set: str
    count: int
    method: str = "none"


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


TRAIN_STREAMS = {"original": "original", "oracle": "oracle", "matching_oracle": "matching_oracle",
                 "unlearned": "floor_oracle", "subset": "subset"}
"""The seed stream of each trained ensemble (``ids.ensemble_seeds``): disjoint, so no two ensembles share a model;
the floor's stream is named after what it is, oracles with their own seeds."""


def _trained(config: RunConfig, request: Ensemble, ids: range, fs_digest: str | None, identity: dict) -> list[Unit]:
    """Train units of one ensemble, in blocks: seeds from the ensemble's own stream, ids hashing what defines the
    output (the forget set's indices, seeds, run identity, code versions)."""
    stream = TRAIN_STREAMS[request.role]
    fs_args = () if request.role == "original" else (request.forget_set,)
    all_seeds = ensemble_seeds(config.seed, stream, *fs_args, n=ids.stop)
    units = []
    for block in id_blocks(ids.start, len(ids), config.block_size):
        seeds = tuple(all_seeds[i] for i in block)
        versions = train_versions()
        key = {"kind": "train", "role": "floor_oracle" if request.role == "unlearned" else request.role}
        if fs_digest is not None:
            key["forget"] = fs_digest
        unit_id = digest({**key, "seeds": seeds, "identity": identity, "versions": versions})
        units.append(Unit(unit_id, "train", request.role, request.forget_set, block, seeds, request.method,
                          code_versions=versions))
    return units


SUBSET_ROLE = "subset"


def subset_units(config: RunConfig, identity: dict, n_models: int, fraction: float) -> list[Unit]:
    """Train units of a subset ensemble (``raybench subsets``): ``n_models`` models in blocks, seeds from their own
    stream, each trained on the ``fraction`` of the train set its seed picks (``data.subset_indices``), so a
    model's mask does not depend on which models share its block. ``params`` carries the fraction to the worker;
    the id hashes it with the seeds, the run identity and the code versions."""
    all_seeds = ensemble_seeds(config.seed, TRAIN_STREAMS[SUBSET_ROLE], n=n_models)
    units = []
    for block in id_blocks(0, n_models, config.block_size):
        seeds = tuple(all_seeds[i] for i in block)
        versions = train_versions()
        unit_id = digest({"kind": "train", "role": SUBSET_ROLE, "fraction": fraction, "seeds": seeds,
                          "identity": identity, "versions": versions})
        units.append(Unit(unit_id, "train", SUBSET_ROLE, NO_FORGET_SET, block, seeds,
                          params={"fraction": fraction}, code_versions=versions))
    return units


def train_versions() -> dict:
    """The code versions a train unit's id includes (read at call time, so tests can bump them)."""
    return {"training": training.TRAINING_VERSION, "margins": training.MARGINS_VERSION}


def unlearn_versions(method: Method) -> dict:
    """The code versions an unlearn unit's id includes."""
    return {"method": method.version, "training": training.TRAINING_VERSION, "margins": training.MARGINS_VERSION}


def ensemble_requests(forget_sets: list[str], *, n_models: int, n_oracles: int, n_matching: int,
                      floor: bool) -> list[Ensemble]:
    """The ensembles a run needs from its source: originals, then per forget set the scoring oracles, the matching
    oracles of oracle matching and the ``oracle_floor`` ensemble, in the order a source hands out its models."""
    requests = [Ensemble("original", NO_FORGET_SET, n_models)]
    for fs in forget_sets:
        requests.append(Ensemble("oracle", fs, n_oracles))
        if n_matching:
            requests.append(Ensemble("matching_oracle", fs, n_matching))
        if floor:
            requests.append(Ensemble("unlearned", fs, n_models, FLOOR_METHOD))
    return requests


def source_units(config: RunConfig, source: Source, identity: dict, forget_sets: dict[str, ForgetSet], *,
                 n_oracles: int, n_matching: int, floor: bool, checkpoints: bool) -> list[Unit]:
    """The units of every ensemble the run takes from ``source``, in execution order: train units for a source that
    trains, import units (the source's model ids, ``import_units``) for one that imports. ``checkpoints``: store
    the originals' checkpoints (something unlearns from them); matching oracles always carry theirs."""
    requests = ensemble_requests(list(forget_sets), n_models=config.n_models, n_oracles=n_oracles,
                                 n_matching=n_matching, floor=floor)
    try:
        ids = source.model_ids(config, requests)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    units: list[Unit] = []
    for request in requests:
        fs = forget_sets.get(request.forget_set)
        if source.trains:
            fs_digest = None if fs is None else digest(fs.indices.tolist())
            units.extend(_trained(config, request, ids[request], fs_digest, identity))
            continue
        blocks = import_units(source.name, identity, request.role, request.forget_set, ids[request],
                              config.block_size, request.method)
        keep = request.role == "matching_oracle" or (request.role == "original" and checkpoints)
        units.extend(dataclasses.replace(u, checkpoint=keep) for u in blocks)
    return units


def needs_subset_run(method: Method) -> str | None:
    """What a method needs from ``--scores SUBSET_RUN`` ("a datamodel", "memorisation scores"), None if nothing."""
    if method.needs_datamodel:
        return "a datamodel"
    if method.needs_scores:
        return "memorisation scores"
    return None


def unavailable_methods(config: RunConfig) -> list[str]:
    """Methods of ``--methods all`` dropped because the run has no ``--scores`` (what they need), as one-line
    reasons; the run says each one (``plan_method_runs`` drops them)."""
    if config.scores or list(config.methods) != ["all"]:
        return []
    try:
        methods = resolve_methods(config.methods)
    except ValueError:
        return []
    return [f"{m.name} skipped: it needs {need}; give --scores SUBSET_RUN" for m in methods
            if (need := needs_subset_run(m))]


def plan_method_runs(config: RunConfig) -> list[MethodRun]:
    """Every (method, parameter combination) of the run, with its snapshot epochs. Without ``--scores``, a
    method that needs a subset run's datamodel or scores is dropped from ``all`` (``unavailable_methods`` says
    which) and refused when named."""
    try:
        methods = resolve_methods(config.methods)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    unknown = sorted(set(config.params) - {m.name for m in methods})
    if unknown:
        raise ConfigError(f"parameters given for method(s) not in this run: {', '.join(unknown)}")
    method_runs = []
    for method in methods:  # parameters first: a typo is reported whether or not the run has --scores
        overrides = config.params.get(method.name, {})
        try:
            grid = expand_grid(method, overrides)
            epochs = snapshot_epochs(method, overrides)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        method_runs.extend(MethodRun(method, params, epochs) for params in grid)
    if not config.scores:
        named = list(config.methods) != ["all"]
        for method in methods:
            need = needs_subset_run(method)
            if need and named:
                raise ConfigError(f"{method.name} needs {need}: give --scores SUBSET_RUN")
        method_runs = [r for r in method_runs if not needs_subset_run(r.method)]
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


def make_plan(config: RunConfig, dataset: Dataset | None, forget_sets: dict[str, ForgetSet], source: Source,
              identity: dict, inputs: MethodInputs | None = None) -> Plan:
    """All units of ``config``, originals first, then per forget set its oracles, matching oracles and floor, then
    unlearning (a valid execution order). ``forget_sets`` and ``identity`` are the source's; an unlearn unit
    depends on the originals' unit it starts from and, for a method that matches oracles, on the matching
    oracles' units, as the method declares (``Method.needs_oracles``; ``do_nothing``, with no ``fn``, needs
    nothing and has no units). ``inputs``: digests of what ``--scores`` hands methods that declare
    ``needs_datamodel`` / ``needs_scores``; they enter those methods' unit ids, so another subset run recomputes
    them."""
    method_runs = plan_method_runs(config)
    if dataset is not None:
        check_unit_sizes(config, method_runs, dataset.n_train + dataset.n_val)
    n_matching = matching_oracle_count(config, method_runs)
    unlearns = any(r.method.fn is not None for r in method_runs)
    units = source_units(config, source, identity, forget_sets, n_oracles=config.n_oracles or config.n_models,
                         n_matching=n_matching, floor=config.floor, checkpoints=unlearns)
    originals = [u for u in units if u.role == "original"]
    recipe = config.resolved_recipe().to_dict()
    for fs in forget_sets.values():
        fs_digest = digest(fs.indices.tolist())
        matching = [u for u in units if u.role == "matching_oracle" and u.forget_set == fs.id]
        for run in method_runs:
            if run.method.fn is None:
                continue
            needs = tuple(u.id for u in matching) if run.method.needs_oracles else ()
            for original in originals:
                method_seed = model_seed(config.seed, "method", run.method.name, fs.id)
                # the recipe is in the id because methods read it (batch sizes, weight decay); for trained
                # originals it is also in their id, for imported ones it is not
                versions = unlearn_versions(run.method)
                key = {"kind": "unlearn", "method": run.method.name, "params": run.params, "epochs": run.epochs,
                       "forget": fs_digest, "depends": (original.id, *needs), "method_seed": method_seed,
                       "recipe": recipe, "versions": versions}
                key.update(_input_digests(run.method, fs.id, inputs))
                unit_id = digest(key)
                units.append(Unit(unit_id, "unlearn", "unlearned", fs.id, original.model_ids, original.seeds,
                                  run.method.name, run.params, run.epochs, (original.id, *needs), method_seed,
                                  versions))
    _check_unique(units)
    return Plan(config, forget_sets, tuple(method_runs), tuple(units))


@dataclass(frozen=True)
class MethodInputs:
    """Digests of what a subset run (``--scores``) hands methods: the datamodel effect per forget set and the
    memorisation scores."""

    effects: dict[str, str] = field(default_factory=dict)  # forget set -> sha256 of its (n_train, C) effect
    scores: str | None = None  # sha256 of the (n_train,) float32 scores


def _input_digests(method: Method, forget_set: str, inputs: MethodInputs | None) -> dict:
    """The unit-id entries of a method's ``--scores`` inputs; refuses a plan that lacks one (a method needing it
    is dropped or refused earlier, by ``plan_method_runs``)."""
    out = {}
    if method.needs_datamodel:
        if inputs is None or forget_set not in inputs.effects:
            raise ConfigError(f"{method.name} needs a datamodel: give --scores SUBSET_RUN")
        out["datamodel"] = inputs.effects[forget_set]
    if method.needs_scores:
        if inputs is None or inputs.scores is None:
            raise ConfigError(f"{method.name} needs memorisation scores: give --scores SUBSET_RUN")
        out["scores"] = inputs.scores
    return out


def resolve_forget_sets(config: RunConfig, dataset: Dataset) -> dict[str, ForgetSet]:
    """``config.forget_sets`` (built-in ids or index files) on ``dataset``, keyed by id (a file's id is its stem)."""
    try:
        resolved = [resolve_forget_set(spec, dataset) for spec in config.forget_sets]
    except ValueError as err:
        raise ConfigError(str(err)) from err
    forget_sets = {fs.id: fs for fs in resolved}
    if len(forget_sets) != len(resolved):
        raise ConfigError(f"two forget sets share an id: {', '.join(fs.id for fs in resolved)} (rename a file)")
    return forget_sets


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
