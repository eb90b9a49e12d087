"""RUM, the meta-procedure of Zhao et al. (docs/methods.md#rum; RUM ``main_rum.py``): split F into groups of
homogeneous memorisation and unlearn them one after another, each with its own method.

Why: methods forget low- and high-memorisation samples at very different rates, so one method with one setting
over a mixed F over- or under-shoots part of it. The steps run low → mid → high; step g starts from the models
step g−1 left, forgets group g, and retains train minus every group processed so far (g included): the groups
still pending are ordinary retain data until their turn.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import torch

from raybench.ids import model_seed
from raybench.methods.base import Method, Snapshots, UnlearnData, single_snapshot
from raybench.models import StackedModel

GROUPS = ("low", "mid", "high")
"""The groups in the order they are unlearned (RUM's order for memorisation scores)."""

VERSION_KEY = "method_version"
"""The key under which a group's normalised parameters record its method's version, so that a new version of a
method that rum calls changes rum's unit ids too."""

Lookup = Callable[[str], Method]


def memorisation_groups(forget_idx: torch.Tensor, scores: torch.Tensor) -> list[torch.Tensor]:
    """F as its low, mid and high thirds by memorisation score (each in F's own order).

    F's samples are ranked by score (ties in F's order) and cut into three runs of sizes as equal as possible,
    the lower groups taking the remainder first (``numpy.array_split``): 10 samples → 4, 3, 3.
    """
    s = scores[forget_idx].double().cpu().numpy()
    if not np.isfinite(s).all():
        bad = forget_idx.cpu().numpy()[~np.isfinite(s)]
        raise ValueError(f"rum: memorisation scores must be finite; not so for train samples {bad[:5].tolist()}")
    order = np.argsort(s, kind="stable")
    positions = [np.sort(part) for part in np.array_split(order, len(GROUPS))]
    return [forget_idx[torch.as_tensor(p, dtype=torch.long, device=forget_idx.device)] for p in positions]


def normalise_params(params: dict, lookup: Lookup | None = None) -> dict:
    """rum's parameters checked and completed: each group's method must exist, need nothing rum cannot give it
    (oracles, a datamodel or scores of its own group) and take the group's parameters, which come back with that
    method's defaults filled in, its single run length as ``epochs`` and its version as ``method_version``.

    Idempotent. ValueError (one line naming the group) on anything that does not fit.
    """
    # late import: the registry imports this module, and these helpers are the registry's own
    from raybench.methods import expand_grid, get_method, snapshot_epochs

    lookup = lookup or get_method
    out = dict(params)
    for group in GROUPS:
        name, given = params[f"{group}_method"], params[f"{group}_params"]
        where = f"rum.{group}_params"
        try:
            method = lookup(name)
        except (KeyError, ValueError) as err:
            raise ValueError(f"rum.{group}_method: {err}") from None
        needs = [w for w, flag in (("oracles", method.needs_oracles), ("a datamodel", method.needs_datamodel),
                                   ("memorisation scores", method.needs_scores)) if flag]
        if needs:
            raise ValueError(f"rum.{group}_method: {name!r} needs {' and '.join(needs)}, which rum cannot give "
                             "one group; choose a method that needs none")
        if not isinstance(given, dict):
            raise ValueError(f"{where} must be a table of {name}'s parameters, got {given!r}")
        given = dict(given)
        version = given.pop(VERSION_KEY, method.version)
        if version != method.version:
            raise ValueError(f"{where}: {VERSION_KEY} {version!r} is not {name}'s version {method.version}; "
                             f"leave {VERSION_KEY} out")
        if method.fn is None:
            if given:
                raise ValueError(f"{where}: {name} takes no parameters, got {', '.join(sorted(given))}")
            out[f"{group}_params"] = {}
            continue
        if any(isinstance(v, list) for k, v in given.items() if k != "epochs"):
            raise ValueError(f"{where}: a list would sweep inside one group; sweep rum.{group}_params instead "
                             "(a list of tables)")
        try:
            (full,) = expand_grid(method, given)
            # no epochs given: the method's own run length (its last default snapshot)
            epochs = snapshot_epochs(method, given) if "epochs" in given else (max(method.default_epochs),)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        if len(epochs) != 1:
            raise ValueError(f"{where}: epochs is the group's run length, one number; got {list(epochs)}")
        out[f"{group}_params"] = {**full, "epochs": epochs[0], VERSION_KEY: method.version}
    return out


def rum(stack: StackedModel, data: UnlearnData, params: dict, epochs: Sequence[int], seed: int) -> Snapshots:
    """RUM (docs/methods.md#rum): ``memorisation_groups`` of F by ``data.scores``, then per group, low → mid →
    high, its method (``<group>_method`` with ``<group>_params``) on forget = the group and retain = train minus
    the groups done so far, each step on the stack the previous one yielded. One snapshot, at the end.

    A group's method runs under the seed ``model_seed(seed, "rum", group)`` and sees no oracles, datamodel or
    scores. An empty group (|F| < 3) and a ``do_nothing`` group change nothing, but leave the retain set all the same.
    """
    from raybench.methods import get_method  # late import: the registry imports this module

    epoch = single_snapshot("rum", epochs)
    scores = data.scores
    if scores is None:
        raise ValueError("rum needs data.scores, the train samples' memorisation scores (the run has none)")
    if tuple(scores.shape) != (len(data.x_train),):
        raise ValueError(f"rum: data.scores must have shape ({len(data.x_train)},) (one per train sample), "
                         f"got {tuple(scores.shape)}")
    params = normalise_params(params)
    # the engine's R plus every group still pending; each group leaves it at its own step and stays out
    in_retain = torch.zeros(len(data.x_train), dtype=torch.bool, device=data.forget_idx.device)
    in_retain[data.retain_idx] = True
    in_retain[data.forget_idx] = True
    for group, forget in zip(GROUPS, memorisation_groups(data.forget_idx, scores), strict=True):
        in_retain[forget] = False
        retain_idx = torch.nonzero(in_retain).squeeze(1)
        method = get_method(params[f"{group}_method"])
        if method.fn is None or len(forget) == 0:
            continue
        group_params = {k: v for k, v in params[f"{group}_params"].items() if k not in ("epochs", VERSION_KEY)}
        run_epochs = (params[f"{group}_params"]["epochs"],)
        step = dataclasses.replace(data, forget_idx=forget, retain_idx=retain_idx, oracles=None,
                                   datamodel_effect=None, scores=None)
        snapshots = list(method.fn(stack, step, group_params, run_epochs, model_seed(seed, "rum", group)))
        if not snapshots:
            raise RuntimeError(f"rum: {method.name} yielded no model for the {group} group")
        stack = snapshots[-1][1]
    yield epoch, stack
