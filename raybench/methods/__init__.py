"""The method registry: built-ins, plus plugins registered under the ``raybench.methods`` entry-point group,
plus any ``package.module:attribute`` named directly (see ``get_method``)."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import itertools
from importlib.metadata import entry_points

from raybench.ids import canonical_json
from raybench.methods import ascent, builtin, influence, oracle_matching, relabel, retrain, scrub, sparse
from raybench.methods.base import Method, MethodFn, Snapshots, UnlearnData, per_model_batches, stacked_cross_entropy

__all__ = [
    "Method", "MethodFn", "Snapshots", "UnlearnData", "per_model_batches", "stacked_cross_entropy",
    "available_methods", "get_method", "resolve_methods", "expand_grid", "params_json", "snapshot_epochs",
]

_BUILTIN = [
    Method("do_nothing", None, "the original models, unchanged (the upper reference)"),
    Method("finetune", builtin.finetune, "fine-tune on the retain set (SGD, momentum 0.9)",
           defaults={"lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 64},
           default_epochs=(5,)),
    Method("retrain", retrain.retrain, "retrain from scratch on the retain set (exact unlearning at budget 1.0)",
           defaults={"budget": 1.0}, default_epochs=(1,)),
    Method("l1_sparse", sparse.l1_sparse, "fine-tune on the retain set with a decaying l1 penalty (RUM FT_prune)",
           defaults={"lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 64, "alpha": 5e-4,
                     "horizon_epochs": 5, "no_l1_epochs": 0},
           default_epochs=(5,)),
    Method("gradient_ascent", ascent.gradient_ascent, "NegGrad: gradient ascent on the forget set (plain SGD)",
           defaults={"lr": 0.03, "forget_batch_size": 64},
           default_epochs=(1, 3, 5, 7, 10)),
    Method("ascent_descent", ascent.ascent_descent, "ascent on the forget set, then descent on the retain set",
           defaults={"lr": 0.05, "ascent_epochs": 3, "forget_batch_size": 32, "batch_size": 64},
           default_epochs=(5,)),
    Method("neggrad_plus", ascent.neggrad_plus, "NegGrad+: a*CE(retain) - (1-a)*CE(forget), batches zipped",
           defaults={"lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "alpha": 0.97, "batch_size": 64,
                     "forget_batch_size": 64},
           default_epochs=(5,)),
    Method("scrub", scrub.scrub, "SCRUB: distil away from the originals on forget, towards them on retain",
           defaults={"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "ascent_epochs": 3, "ce_weight": 0.99,
                     "kd_weight": 0.1, "temperature": 4.0, "forget_batch_size": 64, "batch_size": 64},
           default_epochs=(5,)),
    Method("random_label", relabel.random_label, "fine-tune on forget with random labels plus retain",
           defaults={"lr": 0.002, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 64},
           default_epochs=(5,)),
    Method("salun", relabel.salun, "SalUn: random-label training restricted to forget-salient weights",
           defaults={"lr": 0.002, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 64, "forget_batch_size": 64,
                     "tau": 0.5, "rum_mask_bug": False},
           default_epochs=(5,)),
    Method("influence", influence.influence, "one WoodFisher influence step (RUM wfisher / IU)",
           defaults={"alpha": 30.0, "num_grads": 256, "batch_size": 512}, default_epochs=(1,)),
    Method("oracle_matching", oracle_matching.oracle_matching,
           "regress logits onto retrained oracles' on forget + part of retain (OM)",
           defaults={"lr": 3e-3, "weight_decay": 0.0, "gamma": 0.95, "batch_size": 64, "forget_multiplier": 1.0,
                     "retain_multiplier": 5.0, "num_oracles": 1, "pairing": "per_model"},
           default_epochs=(10,), needs_oracles=True),
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
    docstring's first line as description, its attribute ``defaults`` (if any) as parameters, and one
    snapshot at epoch 1 by default.
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
    return Method(spec, obj, description, defaults=dict(getattr(obj, "defaults", {})), default_epochs=(1,))


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

    ``epochs`` (the snapshots to take) is a list by nature, not a sweep.
    """
    unknown = sorted(set(overrides) - set(method.defaults) - {"epochs"})
    if unknown:
        known = ", ".join(sorted(method.defaults)) or "none"
        raise ValueError(f"method {method.name!r} has no parameter {', '.join(unknown)}; its parameters: {known}")
    merged = {**method.defaults, **{k: v for k, v in overrides.items() if k != "epochs"}}
    keys = sorted(merged)
    axes = [merged[k] if isinstance(merged[k], list) else [merged[k]] for k in keys]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*axes)]


def snapshot_epochs(method: Method, overrides: dict) -> tuple[int, ...]:
    epochs = overrides.get("epochs", method.default_epochs)
    epochs = (epochs,) if isinstance(epochs, int) else tuple(epochs)
    if method.fn is not None and (not epochs or any(not isinstance(e, int) or e < 1 for e in epochs)):
        raise ValueError(f"method {method.name!r}: epochs must be positive integers, got {list(epochs)}")
    return tuple(sorted(set(epochs)))


def params_json(params: dict) -> str:
    return canonical_json(params)
