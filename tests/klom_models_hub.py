"""A fake ``royrin/KLOM-models`` folder from real (tiny) models on a tiny CIFAR-10, and DUB's KLOM restated on it.

Built independently of raybench's reader, so the two can disagree: the images are normalised by
``easydub_hub.hub_images`` (DUB's and EasyDUB's constants, restated there), every model is a small random CNN of
this file evaluated on them, its logits are saved as DUB's training script saves them (``torch.save`` of a float32
[n, 10] tensor, ``train_logits_{i}.pt`` / ``val_logits_{i}.pt``, train = every train image in train order), its
margins are ``z_y - logsumexp_{j≠y} z_j`` as DUB's ``get_margins_from_multimodel_logits`` computes them (float32
torch), and the aggregates stack them, row ``i`` = model ``i``. The files a margins import must never read are
written too (state dicts with ``model.`` keys, per-model margins, epoch-named logits), so a test can show they are
not requested. Nothing here calls raybench.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from easydub_hub import hub_images
from klom_reference import reference_sample
from scipy import stats
from torch import nn

HEAD_GAIN = 6.0  # random logits are small: scaled up, margins differ by units between samples and models
SPREAD = 0.3  # each model is one shared random network plus its own noise of this relative size


def tiny_model(seed: int) -> nn.Sequential:
    """One shared random CNN, perturbed per seed: the models' margins overlap (KLOM well inside its range, so
    bins and edges matter) and still differ by units between samples and between models."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 5, stride=2, padding=2), nn.ReLU(), nn.AdaptiveMaxPool2d(4), nn.Flatten(),
                          nn.Linear(128, 10))
    noise = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model[4].weight.mul_(HEAD_GAIN)
        for p in model.parameters():
            p.add_(SPREAD * p.std() * torch.randn(p.shape, generator=noise))
    return model.eval()


_LOGITS: dict[tuple[int, str], dict[str, torch.Tensor]] = {}


def model_logits(seed: int, images: dict) -> dict[str, torch.Tensor]:
    key = (seed, hashlib.sha256(b"".join(a.tobytes() for pair in images.values() for a in pair)).hexdigest())
    if key not in _LOGITS:
        model = tiny_model(seed)
        with torch.no_grad():
            _LOGITS[key] = {split: model(torch.from_numpy(x)).float() for split, (x, _) in images.items()}
    return _LOGITS[key]


def dub_margins(logits: torch.Tensor, labels: np.ndarray) -> torch.Tensor:
    """DUB's margin of [n, C] logits: the true logit minus the logsumexp of the others (float32)."""
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    one_hot = torch.nn.functional.one_hot(y, num_classes=logits.shape[1]).bool()
    return logits[one_hot] - logits.masked_fill(one_hot, -torch.inf).logsumexp(dim=-1)


def oracle_seed(forget_set: str, model_id: int) -> int:
    return 1000 * int(forget_set) + model_id


def _ensemble(folder: Path, aggregate: Path, seeds: list[int], images: dict, *, logits: bool,
              epoch_files: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    aggregate.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[torch.Tensor]] = {"train": [], "val": []}
    for i, seed in enumerate(seeds):
        z = model_logits(seed, images)
        for split, (_, y) in images.items():
            rows[split].append(dub_margins(z[split], y))
            if logits:
                torch.save(z[split].clone(), folder / f"{split}_logits_{i}.pt")
        if epoch_files:
            torch.save({f"model.{k}": v for k, v in tiny_model(seed).state_dict().items()},
                       folder / f"sd_{i}____epoch_23.pt")
            torch.save(z["train"].clone(), folder / f"{i}__train_logits__23.pt")
            torch.save(z["val"].clone(), folder / f"{i}__val_logits_23.pt")
            np.save(folder / f"{i}__val_margins_23.npy", rows["val"][-1].numpy())
    for split, margins in rows.items():
        torch.save(torch.stack(margins), aggregate / f"{split}_margins_all.pt")


def build_klom_hub(root: Path, arrays: dict, forget: dict[str, np.ndarray], *, n_originals: int,
                   n_oracles: int, logits: bool = True) -> Path:
    """``full_models/CIFAR10`` (originals = ``tiny_model(i)``), ``oracles/CIFAR10/forget_set_k`` and
    ``oracle_models/CIFAR10/only_margins/forget_set_k`` (oracle ``x`` = ``tiny_model(oracle_seed(k, x))``) and
    ``forget_set_indices/CIFAR10``, from ``write_cifar_folder``'s arrays."""
    images = hub_images(arrays)
    _ensemble(root / "full_models" / "CIFAR10", root / "full_models" / "CIFAR10", list(range(n_originals)),
              images, logits=logits, epoch_files=True)
    for fs, idx in forget.items():
        folder = root / "forget_set_indices" / "CIFAR10"
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / f"forget_set_{fs}.npy", np.asarray(idx, dtype=np.int64))
        _ensemble(root / "oracles" / "CIFAR10" / f"forget_set_{fs}",
                  root / "oracle_models" / "CIFAR10" / "only_margins" / f"forget_set_{fs}",
                  [oracle_seed(fs, x) for x in range(n_oracles)], images, logits=logits, epoch_files=False)
    return root


def add_living17(root: Path, n_models: int, n_train: int = 44, n_val: int = 12) -> None:
    """``full_models/LIVING17`` aggregates (random margins: no LIVING17 images here) and a forget set."""
    rng = np.random.default_rng(17)
    folder = root / "full_models" / "LIVING17"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        torch.save(torch.from_numpy(rng.normal(0, 3, (n_models, n)).astype(np.float32)),
                   folder / f"{split}_margins_all.pt")
    (root / "forget_set_indices" / "LIVING17").mkdir(parents=True, exist_ok=True)
    np.save(root / "forget_set_indices" / "LIVING17" / "forget_set_1.npy", np.arange(5))


def load_rows(path: Path, rows: range) -> np.ndarray:
    return torch.load(path)[rows.start:rows.stop].numpy()


# -- DUB's KLOM, restated from unlearning_bench/eval.py and run.py ----------------------------------------------------
def dub_compute_binned_kl(p_arr: np.ndarray, q_arr: np.ndarray, bin_count: int = 20, eps: float = 1e-5,
                          min_val: float = -100, max_val: float = 100) -> float:
    """DUB's ``compute_binned_KL_div`` as published: the definition's steps, then ``scipy.stats.entropy``, which
    renormalises the floored q' (docs/metrics.md#variants)."""
    p_arr = np.clip(p_arr, min_val, max_val)
    q_arr = np.clip(q_arr, min_val, max_val)
    start, end = min(p_arr.min(), q_arr.min()), max(p_arr.max(), q_arr.max())
    if start >= end:
        end = start + 1
    edges = np.linspace(start, end, bin_count + 1)
    p_idx, q_idx = np.digitize(p_arr, edges), np.digitize(q_arr, edges)
    p_counts = np.array([np.sum(p_idx == i) for i in range(1, bin_count + 1)])
    q_counts = np.array([np.sum(q_idx == i) for i in range(1, bin_count + 1)])
    p = p_counts / p_counts.sum() if p_counts.sum() > 0 else np.zeros(bin_count)
    q = q_counts / q_counts.sum() if q_counts.sum() > 0 else np.zeros(bin_count)
    q_safe = np.where(p > 0, np.maximum(q, eps), q)
    return float(stats.entropy(pk=p, qk=q_safe))


def dub_run_klom(hub: Path, fs: str, n: int, *, reversed_args: bool, unlearned: str = "originals",
                 per_sample=reference_sample) -> dict[str, np.ndarray]:
    """What DUB's ``run.py`` computes for do-nothing (the originals as the "unlearned" margins) or the floor
    (``unlearned="floor"``: oracles n..2n-1), split into raybench's views afterwards.

    run.py loads the oracle aggregates' first n rows, concatenates train and val along the samples, and loops over
    the columns; ``reversed_args`` calls the per-sample KL as run.py does, ``kl_from_margins(oracle, unlearned)``,
    so P comes from the oracles; without it, P comes from the unlearned models (the published direction).
    ``per_sample``: the definition (``reference_sample``, no renormalisation) or DUB's own scipy path."""
    oracle_dir = hub / "oracle_models" / "CIFAR10" / "only_margins" / f"forget_set_{fs}"
    oracle = np.concatenate([load_rows(oracle_dir / f"{s}_margins_all.pt", range(n)) for s in ("train", "val")], -1)
    if unlearned == "originals":
        folder, rows = hub / "full_models" / "CIFAR10", range(n)
    else:
        folder, rows = oracle_dir, range(n, 2 * n)
    other = np.concatenate([load_rows(folder / f"{s}_margins_all.pt", rows) for s in ("train", "val")], -1)
    assert oracle.shape == other.shape  # run.py asserts it too
    p, q = (oracle, other) if reversed_args else (other, oracle)
    values = np.array([per_sample(p[:, s], q[:, s]) for s in range(p.shape[1])])
    n_train = torch.load(oracle_dir / "train_margins_all.pt").shape[1]
    forget = np.load(hub / "forget_set_indices" / "CIFAR10" / f"forget_set_{fs}.npy")
    retain = np.setdiff1d(np.arange(n_train), forget)
    return {"retain": values[retain], "forget": values[forget], "val": values[n_train:]}


def top1_accuracy(folder: Path, ids: range, labels: dict[str, np.ndarray], idx: dict[str, np.ndarray]) -> dict:
    """Per split view, the mean over models and samples of "the true logit beats every other" (a tie is wrong)."""
    out = {}
    for view, (split, cols) in idx.items():
        right = []
        for i in ids:
            z = torch.load(folder / f"{split}_logits_{i}.pt").numpy()[cols]
            y = labels[split][cols]
            true = z[np.arange(len(y)), y]
            others = z.copy()
            others[np.arange(len(y)), y] = -np.inf
            right.append(true > others.max(axis=1))
        out[view] = float(np.mean(right))
    return out


def import_klom_models(location, forget_sets, n_models, out, *, oracle_floor=False, dataset=None, **kwargs):
    """The KLOM-models import as the tests call it: ``raybench import klom-models`` in Python."""
    from raybench.pipeline import import_source

    return import_source("klom-models", location, forget_sets, n_models, out, floor=oracle_floor, images=dataset,
                         **kwargs)
