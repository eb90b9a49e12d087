"""RunConfig: what a run computes, from defaults, a TOML file (``jobs/*.toml``) and CLI overrides, validated.

Precedence: CLI option > TOML file > default. Every value is validated here, before Ray starts, so a typo costs
an exit code 2 and a clear message, not a cluster allocation; what needs the method registry or the source (method
parameters, what a source can provide) is checked by ``pipeline.load_config`` right after, still before any work.

TOML keys mirror the CLI (``dataset``, ``data_root``, ``arch``, ``n_models``, ``n_oracles``, ``forget_sets``,
``methods``, ``block_size``, ``chunk_size``, ``seed``, ``out``, ``address``, ``num_cpus``, ``num_gpus``,
``source``, ``floor``, ``select``, ``scores``, ``mem_size``, ``train_path``, ``compile``), plus tables ``[recipe]``
(base training overrides), ``[params.<method>]`` (method parameters; a list value sweeps over its items, except
``epochs``, the list of snapshots to score) and ``[subsets]`` (``n_models``, ``fraction``: the ensemble
``raybench subsets`` trains).

``source`` names where the run's originals and oracles come from (``raybench.sources``): ``"trained"`` (the
default: trained here on Ray) or a published source as ``"NAME"`` or ``"NAME:FOLDER_OR_REPO"``; then only the
unlearning runs here, starting from the source's models.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from raybench import spec
from raybench.data import DATASETS
from raybench.ids import digest
from raybench.metrics.selection import check_rule
from raybench.models import ARCHS
from raybench.training import Execution, Recipe, default_recipe

DEFAULT_ARCH = {"digits": "mlp", "cifar10": "resnet9"}


class ConfigError(ValueError):
    """Invalid configuration: reported to the user with exit code 2."""


@dataclass(frozen=True)
class RunConfig:
    dataset: str = "digits"
    data_root: str = ""  # where downloadable data sets live (e.g. CIFAR-10); unused by digits
    arch: str = ""  # empty: the dataset's default
    n_models: int = 100
    n_oracles: int | None = None  # oracles per forget set that score the methods (default: n_models)
    forget_sets: tuple[str, ...] = ("1", "2", "3")
    methods: tuple[str, ...] = ("all",)
    params: dict = field(default_factory=dict)  # method -> {param: value or list (sweep)}
    recipe: dict = field(default_factory=dict)  # overrides of the dataset/arch default recipe
    block_size: int = 50  # models per Ray call (a stacked block)
    chunk_size: int = 8192  # samples per Parquet row
    seed: int = 0
    out: str = ""  # empty: runs/<dataset>-<run id>
    address: str = ""  # empty: start a local Ray (or join RAY_ADDRESS when set)
    num_cpus: int | None = None
    num_gpus: int | None = None
    source: str = "trained"  # where originals and oracles come from: "trained", or "NAME[:FOLDER_OR_REPO]"
    floor: bool = True  # the oracle_floor ensemble: N more oracles per forget set, scored like a method
    select: str = ""  # a selection rule (raybench.metrics.selection.RULES): rows chosen without leaking; "": none
    subsets: dict = field(default_factory=dict)  # [subsets] n_models, fraction: `raybench subsets`' ensemble
    scores: str = ""  # a subset run folder: memorisation scores and the datamodel of `--scores SUB` ("" = none)
    mem_size: int = 50  # samples per difficulty group (mem_low / mem_mid / mem_high; mem_mix holds three)
    # How the base training runs (training.Execution): speed only, so neither enters the identity; each unit's
    # manifest records what ran.
    train_path: str = "auto"  # "auto" | "stacked" | "per_model"
    compile: bool = False  # torch.compile the training step

    def execution(self) -> Execution:
        try:
            return Execution(path=self.train_path, compile=self.compile)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    @property
    def resolved_arch(self) -> str:
        return self.arch or DEFAULT_ARCH.get(self.dataset, "mlp")

    def resolved_recipe(self) -> Recipe:
        base = default_recipe(self.dataset, self.resolved_arch).to_dict()
        unknown = sorted(set(self.recipe) - set(base))
        if unknown:
            raise ConfigError(f"unknown recipe key(s) {', '.join(unknown)}; known: {', '.join(sorted(base))}")
        try:
            return Recipe(**{**base, **self.recipe})
        except (TypeError, ValueError) as err:
            raise ConfigError(f"bad recipe: {err}") from err

    def identity(self) -> dict:
        """What gives trained units their meaning; two configs with equal identity can share a run folder. A
        source that imports its models has its own identity (``Source.identity``)."""
        identity = {
            "dataset": self.dataset,
            "arch": self.resolved_arch,
            "recipe": self.resolved_recipe().to_dict(),
            "n_models": self.n_models,
            "block_size": self.block_size,
            "chunk_size": self.chunk_size,
            "seed": self.seed,
        }
        if self.n_oracles is not None and self.n_oracles != self.n_models:
            identity["n_oracles"] = self.n_oracles
        return identity

    def output_uri(self) -> str:
        """``out``, else ``runs/<dataset>-<digest>`` of what the run computes (its source included)."""
        if self.out:
            return self.out
        key = self.identity() if self.source == "trained" else {**self.identity(), "source": self.source}
        return str(Path("runs") / f"{self.dataset}-{digest(key, 8)}")


def load_toml(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text (TOML must be): {err.reason} at byte "
                          f"{err.start}") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from None


def build_config(toml_path: str | None = None, **cli: object) -> RunConfig:
    """Defaults < TOML < CLI (``None`` CLI values mean "not given"), then validation."""
    values: dict = {}
    if toml_path:
        values.update(load_toml(toml_path))
    for key, value in cli.items():
        if value is None:
            continue
        if key in ("params", "recipe") and isinstance(values.get(key), dict):
            merged = {m: dict(p) for m, p in values[key].items()} if key == "params" else dict(values[key])
            for k, v in value.items():
                merged[k] = {**merged.get(k, {}), **v} if key == "params" else v
            values[key] = merged
        else:
            values[key] = value
    names = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    for key in ("forget_sets", "methods"):
        if key in values:
            values[key] = _as_names(values[key], key)
    config = RunConfig(**values)
    validate(config)
    return config


def _as_names(value: object, key: str) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ConfigError(f"{key} must be a list or a comma-separated string, got {value!r}")
    names = tuple(str(v).strip() for v in items if str(v).strip())
    if not names:
        raise ConfigError(f"{key} is empty")
    if len(set(names)) != len(names):
        raise ConfigError(f"{key} lists an entry twice: {', '.join(names)}")
    return names


MAX_CHUNK_SIZE = 1 << 24
"""Samples per Parquet row at most (16.7M, over 13x ImageNet's train set): sample offsets are int32 and a chunk is
one matrix the reducer holds per ensemble."""

MAX_BLOCK_SIZE = 10_000
"""Models per stacked block at most: a block lives in one worker's memory (10,000 digits MLPs take about 2 GB of
activations and gradients; 100,000 exhausted 23 GB). Larger architectures need far smaller blocks, which this
bound cannot judge."""

_STRING_KEYS = ("dataset", "data_root", "arch", "out", "address", "source", "select", "scores", "train_path")


def validate(config: RunConfig, *, data_known: bool = True) -> None:
    """Every value's type and range, the recipe's and every method parameter's, before anything starts.

    Bounds: ``2 <= n_models <= spec.MAX_MODELS``, ``1 <= block_size <= MAX_BLOCK_SIZE``, ``1 <= chunk_size <=
    MAX_CHUNK_SIZE``, ``seed`` a 64-bit integer, ``num_cpus >= 1`` (a Ray with no CPU computes every unit and then
    hangs writing them), ``num_gpus >= 0``. That one unit's margins fit a Parquet list column needs the data set's
    size, so ``plan.check_unit_sizes`` checks it once the data set is loaded, still before any work.
    ``data_known=False`` (an import of published margins) accepts a data set and architecture raybench cannot load
    or build, such as KLOM-models' LIVING17 ResNet-18s.
    """
    for key in _STRING_KEYS:
        if not isinstance(getattr(config, key), str):
            raise ConfigError(f"{key} must be a string, got {getattr(config, key)!r}")
    if data_known and config.dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {config.dataset!r}; known: {', '.join(DATASETS)}")
    if data_known and config.resolved_arch not in ARCHS:
        raise ConfigError(f"unknown arch {config.arch!r}; known: {', '.join(ARCHS)}")
    for key, low, high in (("n_models", 1, spec.MAX_MODELS), ("block_size", 1, MAX_BLOCK_SIZE),
                           ("chunk_size", 1, MAX_CHUNK_SIZE)):
        value = getattr(config, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{key} must be a positive integer, got {value!r}")
        if value > high:
            raise ConfigError(f"{key} = {value} is more than raybench plans (at most {high:,})")
    if config.n_models < 2:
        raise ConfigError("n_models must be at least 2: KLOM compares distributions over models")
    if config.n_oracles is not None:
        _check(spec.integer(2, spec.MAX_MODELS), "n_oracles", config.n_oracles)
    _check(spec.integer(-(1 << 63), (1 << 63) - 1), "seed", config.seed)
    if config.select:
        try:
            check_rule(config.select)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    for key in ("floor", "compile"):
        if not isinstance(getattr(config, key), bool):
            raise ConfigError(f"{key} must be true or false, got {getattr(config, key)!r}")
    config.execution()
    for key, low in (("num_cpus", 1), ("num_gpus", 0)):
        value = getattr(config, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ConfigError(f"{key} must be an integer >= {low}, got {value!r}")
    for key in ("forget_sets", "methods"):
        value = getattr(config, key)
        if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key} must be a list of names, got {value!r}")
    if not isinstance(config.params, dict) or not all(isinstance(v, dict) for v in config.params.values()):
        raise ConfigError("params must be a table of tables: [params.<method>] key = value")
    check_subsets_table(config.subsets)
    _check(spec.integer(1, spec.MAX_MODELS * 1000), "mem_size", config.mem_size)
    if not isinstance(config.recipe, dict):
        raise ConfigError(f"recipe must be a table of recipe values ([recipe] key = value), got {config.recipe!r}")
    if data_known:
        config.resolved_recipe()
    remote = bool(config.address) or bool(os.environ.get("RAY_ADDRESS"))
    out = config.output_uri()
    if remote and "://" not in out and not os.path.isabs(out):
        raise ConfigError(
            f"--out {out!r} is relative but the run joins a Ray cluster: on a cluster, relative paths land in the "
            "job's temporary working dir; give an absolute path on shared storage or a URI (s3://, gs://)"
        )


SUBSET_DEFAULTS = {"n_models": 100, "fraction": 0.5}
"""The subset ensemble when neither ``[subsets]`` nor the CLI says otherwise: a half of the train set per model
gives each sample as many IN as OUT models, which makes the memorisation estimate's error smallest for K models."""

SUBSET_SPECS = {"n_models": spec.integer(6, spec.MAX_MODELS), "fraction": spec.real(0, 1, low_open=True,
                                                                                     high_open=True)}


def check_subsets_table(table: object) -> dict:
    """``[subsets]`` with its defaults filled in: ``n_models`` (K >= 6: the datamodel holds out folds of at least 3
    models) and ``fraction`` (0 < alpha < 1); unknown keys are refused."""
    if not isinstance(table, dict):
        raise ConfigError(f"subsets must be a table ([subsets] n_models = K, fraction = A), got {table!r}")
    unknown = sorted(set(table) - set(SUBSET_SPECS))
    if unknown:
        raise ConfigError(f"unknown [subsets] key(s) {', '.join(unknown)}; known: {', '.join(sorted(SUBSET_SPECS))}")
    values = {**SUBSET_DEFAULTS, **table}
    for key, check in SUBSET_SPECS.items():
        try:
            values[key] = check.check(f"subsets.{key}", values[key])
        except ValueError as err:
            raise ConfigError(str(err)) from None
    return values


def _check(check: spec.Param, name: str, value: object) -> None:
    try:
        check.check(name, value)
    except ValueError as err:
        raise ConfigError(str(err)) from None
