"""The method registry: built-ins, plus plugins registered under the ``raybench.methods`` entry-point group,
plus any ``package.module:attribute`` named directly (see ``get_method``)."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import itertools
from importlib.metadata import entry_points

from raybench import spec
from raybench.ids import canonical_json
from raybench.methods import (
    ascent,
    builtin,
    datamodel_matching,
    influence,
    oracle_matching,
    relabel,
    retrain,
    rum,
    scrub,
    sparse,
)
from raybench.methods.base import Method, MethodFn, Snapshots, UnlearnData, per_model_batches, stacked_cross_entropy

__all__ = [
    "Method", "MethodFn", "Snapshots", "UnlearnData", "per_model_batches", "stacked_cross_entropy",
    "available_methods", "get_method", "resolve_methods", "expand_grid", "params_json", "snapshot_epochs",
]

# Parameter checks shared by the SGD-based methods: learning rates are positive, momentum in [0, 1).
_LR = spec.real(0, low_open=True)
_BATCH = spec.integer(1)
_SGD = {"lr": _LR, "momentum": spec.real(0, 1, high_open=True), "weight_decay": spec.real(0), "batch_size": _BATCH}

_BUILTIN = [
    Method("do_nothing", None, "the original models, unchanged (the upper reference)"),
    Method("finetune", builtin.finetune, "fine-tune on the retain set (SGD, momentum 0.9)",
           defaults={"lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 64},
           default_epochs=(5,), param_specs=_SGD),
    Method("retrain", retrain.retrain, "retrain from scratch on the retain set (exact unlearning at budget 1.0)",
           defaults={"budget": 1.0}, default_epochs=(1,), one_snapshot=True,
           param_specs={"budget": spec.real(0, low_open=True)}),
    Method("l1_sparse", sparse.l1_sparse, "fine-tune on the retain set with a decaying l1 penalty (RUM FT_prune)",
           defaults={"lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 64, "alpha": 5e-4,
                     "horizon_epochs": 5, "no_l1_epochs": 0},
           default_epochs=(5,),
           param_specs={**_SGD, "alpha": spec.real(0), "horizon_epochs": spec.integer(1),
                        "no_l1_epochs": spec.integer(0)}),
    Method("gradient_ascent", ascent.gradient_ascent, "NegGrad: gradient ascent on the forget set (plain SGD)",
           defaults={"lr": 0.03, "forget_batch_size": 64},
           default_epochs=(1, 3, 5, 7, 10), param_specs={"lr": _LR, "forget_batch_size": _BATCH}),
    Method("ascent_descent", ascent.ascent_descent, "ascent on the forget set, then descent on the retain set",
           defaults={"lr": 0.05, "ascent_epochs": 3, "forget_batch_size": 32, "batch_size": 64},
           default_epochs=(5,),
           param_specs={"lr": _LR, "ascent_epochs": spec.integer(0), "forget_batch_size": _BATCH,
                        "batch_size": _BATCH}),
    Method("neggrad_plus", ascent.neggrad_plus, "NegGrad+: a*CE(retain) - (1-a)*CE(forget), batches zipped",
           defaults={"lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "alpha": 0.97, "batch_size": 64,
                     "forget_batch_size": 64},
           default_epochs=(5,), param_specs={**_SGD, "alpha": spec.real(0, 1), "forget_batch_size": _BATCH}),
    Method("scrub", scrub.scrub, "SCRUB: distil away from the originals on forget, towards them on retain",
           defaults={"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "ascent_epochs": 3, "ce_weight": 0.99,
                     "kd_weight": 0.1, "temperature": 4.0, "forget_batch_size": 64, "batch_size": 64},
           default_epochs=(5,),
           param_specs={**_SGD, "ascent_epochs": spec.integer(0), "ce_weight": spec.real(0),
                        "kd_weight": spec.real(0), "temperature": spec.real(0, low_open=True),
                        "forget_batch_size": _BATCH}),
    Method("random_label", relabel.random_label, "fine-tune on forget with random labels plus retain",
           defaults={"lr": 0.002, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 64},
           default_epochs=(5,), param_specs=_SGD),
    Method("salun", relabel.salun, "SalUn: random-label training restricted to forget-salient weights",
           defaults={"lr": 0.002, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 64, "forget_batch_size": 64,
                     "tau": 0.5, "rum_mask_bug": False},
           default_epochs=(5,),
           param_specs={**_SGD, "forget_batch_size": _BATCH, "tau": spec.real(0, 1), "rum_mask_bug": spec.boolean()}),
    Method("influence", influence.influence, "one WoodFisher influence step (RUM wfisher / IU)",
           defaults={"alpha": 30.0, "num_grads": 256, "batch_size": 512}, default_epochs=(1,), one_snapshot=True,
           param_specs={"alpha": spec.real(), "num_grads": spec.integer(1), "batch_size": _BATCH},
           version=2),  # 2: the recursion on forward-mode dot products (same algebra, other float rounding)
    Method("oracle_matching", oracle_matching.oracle_matching,
           "regress logits onto retrained oracles' on forget + part of retain (OM)",
           defaults={"lr": 3e-3, "weight_decay": 0.0, "gamma": 0.95, "batch_size": 64, "forget_multiplier": 1.0,
                     "retain_multiplier": 5.0, "num_oracles": 1, "pairing": "per_model"},
           default_epochs=(10,), needs_oracles=True,
           param_specs={"lr": _LR, "weight_decay": spec.real(0), "gamma": spec.real(0, 1, low_open=True),
                        "batch_size": _BATCH, "forget_multiplier": spec.real(0), "retain_multiplier": spec.real(0),
                        "num_oracles": spec.integer(1, spec.MAX_MODELS), "pairing": spec.choice("mean", "per_model")}),
    Method("datamodel_matching", datamodel_matching.datamodel_matching,
           "OM's loop onto the originals' logits minus the datamodel's effect of F (DMM; no oracle)",
           defaults={"lr": 1e-3, "weight_decay": 0.0, "gamma": 0.95, "batch_size": 64, "forget_multiplier": 5.0,
                     "retain_multiplier": 20.0, "scale": 1.0},
           default_epochs=(4, 10), needs_datamodel=True,
           param_specs={"lr": _LR, "weight_decay": spec.real(0), "gamma": spec.real(0, 1, low_open=True),
                        "batch_size": _BATCH, "forget_multiplier": spec.real(0), "retain_multiplier": spec.real(0),
                        "scale": spec.real()}),
]


def available_methods() -> dict[str, Method]:
    """Built-ins, then plugins (an entry point names a ``Method`` object or a factory returning one)."""
    methods = {m.name: m for m in _BUILTIN}
    for ep in entry_points(group="raybench.methods"):
        obj = ep.load()
        method = obj() if callable(obj) and not isinstance(obj, Method) else obj
        if not isinstance(method, Method):
            raise ValueError(f"entry point {ep.name!r} ({ep.value}) does not give a raybench Method")
        methods[method.name] = method
    return methods


def get_method(name: str) -> Method:
    """A registered method by name, or ``"package.module:attribute"`` imported on the spot.

    The attribute is a ``Method`` or a plain method function. Either way the method is named by the spec string
    itself, so a worker process that receives the name can import it again. A function is wrapped with its
    docstring's first line as description, its attributes ``defaults``, ``param_specs`` and ``version`` (if any)
    as parameters, their checks and its version (default 1), and one snapshot at epoch 1 by default.
    """
    if ":" in name:
        return _import_method(name)
    methods = available_methods()
    if name not in methods:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(methods)} "
                         "(or name one as package.module:attribute)")
    return methods[name]


def _import_method(spec: str) -> Method:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr or ":" in attr:
        raise ValueError(f"method spec {spec!r} must look like package.module:attribute")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"method {spec!r}: cannot import module {module_name!r} ({err})") from err
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"method {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if isinstance(obj, Method):
        return dataclasses.replace(obj, name=spec)
    if not callable(obj):
        raise ValueError(f"method {spec!r}: {attr!r} is neither a raybench Method nor a function")
    doc = inspect.getdoc(obj) or ""
    description = doc.splitlines()[0] if doc else f"plugin method {spec}"
    return Method(spec, obj, description, defaults=dict(getattr(obj, "defaults", {})), default_epochs=(1,),
                  version=getattr(obj, "version", 1), param_specs=dict(getattr(obj, "param_specs", {})))


def resolve_methods(spec: str | list[str] | tuple[str, ...]) -> list[Method]:
    """``"all"`` or names (comma-separated string or list) -> methods, in registry order for ``all``."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError("no methods given")
    if names == ["all"]:
        return list(available_methods().values())
    if len(set(names)) != len(names):
        raise ValueError(f"method listed twice: {', '.join(names)}")
    return [get_method(n) for n in names]


def expand_grid(method: Method, overrides: dict) -> list[dict]:
    """Every parameter combination: overrides replace defaults; a list value is a sweep over its items.

    Each value is checked against the parameter's spec (``Method.spec_of``) and comes back normalised (a real as
    a float), then each combination by the method's own ``normalise`` if it has one. A sweep that lists a value
    twice, or no value, is refused: it would plan one unit twice (or none).
    ``epochs`` (the snapshots to take) is a list by nature, not a sweep.
    """
    unknown = sorted(set(overrides) - set(method.defaults) - {"epochs"})
    if unknown:
        known = ", ".join(sorted(method.defaults)) or "none"
        raise ValueError(f"method {method.name!r} has no parameter {', '.join(unknown)}; its parameters: {known}")
    merged = {**method.defaults, **{k: v for k, v in overrides.items() if k != "epochs"}}
    keys = sorted(merged)
    axes = []
    for key in keys:
        values = merged[key] if isinstance(merged[key], list) else [merged[key]]
        if not values:
            raise ValueError(f"{method.name}.{key}: an empty list sweeps over nothing")
        check = method.spec_of(key)
        checked = [v if check is None else check.check(f"{method.name}.{key}", v) for v in values]
        seen = set()
        for value in checked:
            try:
                text = canonical_json(value)
            except (TypeError, ValueError):
                raise ValueError(f"{method.name}.{key}: {value!r} is not a plain JSON value") from None
            if text in seen:
                raise ValueError(f"{method.name}.{key} lists the value {text} twice; list each sweep value once "
                                 "(each one is its own set of units)")
            seen.add(text)
        axes.append(checked)
    grid = [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*axes)]
    if method.normalise is None:
        return grid
    grid = [method.normalise(params) for params in grid]
    texts = [canonical_json(params) for params in grid]
    if len(set(texts)) != len(texts):  # e.g. two group tables that differ only by a default written out
        twice = next(t for t in texts if texts.count(t) > 1)
        raise ValueError(f"{method.name}: two swept values give the same parameters {twice}; list each once")
    return grid


def snapshot_epochs(method: Method, overrides: dict) -> tuple[int, ...]:
    """The epochs to snapshot, sorted: positive integers (not booleans) up to ``spec.INT32_MAX`` (the stored
    column is int32), a single one for a method that produces one result."""
    if method.fn is None:  # the originals as they are: nothing to snapshot
        if "epochs" in overrides:
            raise ValueError(f"method {method.name!r} has no epochs: its models are the originals")
        return tuple(method.default_epochs)
    epochs = overrides.get("epochs", method.default_epochs)
    epochs = (epochs,) if isinstance(epochs, int) else tuple(epochs) if isinstance(epochs, list | tuple) else epochs
    if not isinstance(epochs, tuple) or not epochs or any(
            isinstance(e, bool) or not isinstance(e, int) or not 1 <= e <= spec.INT32_MAX for e in epochs):
        shown = list(epochs) if isinstance(epochs, tuple) else epochs
        raise ValueError(f"method {method.name!r}: epochs must be positive integers up to {spec.INT32_MAX}, "
                         f"got {shown!r}")
    epochs = tuple(sorted(set(epochs)))
    if method.one_snapshot and len(epochs) != 1:
        raise ValueError(f"method {method.name!r} produces a single result; request one snapshot epoch, "
                         f"got {list(epochs)}")
    return epochs


def params_json(params: dict) -> str:
    return canonical_json(params)


# rum last: its defaults are normalised by the registry's own helpers (expand_grid over its group methods), so
# the rows above and the functions of this module must exist first.
_RUM_GROUPS = {"low_method": "do_nothing", "low_params": {}, "mid_method": "finetune",
               "mid_params": {"lr": 0.1, "epochs": 5}, "high_method": "salun", "high_params": {"epochs": 3}}
_BUILTIN.append(Method(
    "rum", rum.rum, "RUM: F split into memorisation thirds, unlearned low -> mid -> high, a method per group",
    defaults=rum.normalise_params(_RUM_GROUPS, {m.name: m for m in _BUILTIN}.__getitem__),
    default_epochs=(1,), one_snapshot=True, needs_scores=True, normalise=rum.normalise_params,
    param_specs={f"{g}_{k}": spec.string() if k == "method" else spec.table()
                 for g in rum.GROUPS for k in ("method", "params")}))
