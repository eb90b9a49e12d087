"""The ``files`` source: a user's own margins, one .npy matrix (models × samples) per split, read and checked.

This is how margins computed elsewhere (another code base, another cluster) meet a run's oracles
(``raybench score``, docs/design.md#scoring-margins-computed-elsewhere). A folder holds, in EasyDUB's convention:

* ``retain.npy``: the retain split, train sample ids outside the forget set in ascending order;
* ``forget.npy``: the forget split, in the forget set's own order (the order of ``forget_sets/<id>.json``);
* ``val.npy``: the val split, in the data set's order;
* optionally ``retain_top1.npy``, ``forget_top1.npy``, ``val_top1.npy``: top-1 margins ``z_y − max_{j≠y} z_j`` of
  the same models and samples (> 0: the top-1 prediction is right), all three or none. Without them accuracy is
  left empty: the KLOM margin cannot give it (``margin > 0`` means p_y > 1/2, not "y is the argmax").

Margins are ``z_y − logsumexp_{j≠y} z_j`` (docs/design.md#margins). Logits are not accepted: turning them into
margins needs each sample's label, and a run folder does not record labels (``dataset.json`` holds the data
set's name, fingerprint and sizes; an EasyDUB import not even a fingerprint), so they would have to be guessed
from a data set loaded on the side. Compute margins with the labels you trained on instead, e.g.
``raybench.training.margins_from_logits`` and ``top1_margins_from_logits``.

Only the reader is here, not a ``Source`` subclass: scoring writes nothing into a run folder, and a run config
has no way yet to name a folder of margins as the source of its ensembles.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raybench.sources.base import SourceError

SPLITS = ("retain", "forget", "val")
TOP1_SUFFIX = "_top1"
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_unlearned(margins: dict[str, np.ndarray], top1: dict[str, np.ndarray] | None = None, *, n_retain: int,
                    n_forget: int, n_val: int, where: str = "") -> tuple[dict[str, np.ndarray],
                                                                             dict[str, np.ndarray] | None]:
    """Margins (and top-1 margins) of one ensemble per split, checked and as float32; ``SourceError`` otherwise.

    Every split needs shape (models, samples of the split) with the same models ≥ 2, finite float values. They
    become float32, the dtype every stored margin has, so a matrix scores exactly as it would once imported
    into a run: values beyond float32's range are first clipped to it, which changes neither KLOM (it clips at
    ±100) nor the sign that accuracy reads. ``where`` names the matrices' origin in messages (a folder's files).
    """
    sizes = {"retain": n_retain, "forget": n_forget, "val": n_val}
    if not isinstance(margins, dict) or set(margins) != set(SPLITS):
        got = sorted(margins) if isinstance(margins, dict) else type(margins).__name__
        raise SourceError(f"unlearned margins must be a dict of the splits {', '.join(SPLITS)}, got {got}")
    if top1 is not None and (not isinstance(top1, dict) or set(top1) != set(SPLITS)):
        got = sorted(top1) if isinstance(top1, dict) else type(top1).__name__
        raise SourceError(f"top-1 margins must be given for all of {', '.join(SPLITS)} or none, got {got}")
    out: dict[str, dict[str, np.ndarray]] = {}
    n_models = None
    for kind, matrices in (("margins", margins), ("top-1 margins", top1)):
        if matrices is None:
            continue
        out[kind] = {}
        for split in SPLITS:
            name = f"{where}{split}{TOP1_SUFFIX if kind != 'margins' else ''}.npy" if where else f"{split} {kind}"
            a = matrices[split]
            if not isinstance(a, np.ndarray):
                raise SourceError(f"{name}: expected a numpy array, got {type(a).__name__}")
            if a.dtype.kind != "f":
                raise SourceError(f"{name}: expected float {kind}, got dtype {a.dtype}")
            expected = f"({n_models or 'models'}, {sizes[split]})"
            if a.ndim != 2 or a.shape[1] != sizes[split] or (n_models is not None and a.shape[0] != n_models):
                raise SourceError(f"{name} has shape {a.shape}, expected {expected} (models × the {sizes[split]} "
                                  f"samples of the run's {split} split, the same models in every split)")
            if a.shape[0] < 2:
                raise SourceError(f"{name} has {a.shape[0]} model(s): KLOM compares ensembles, give at least 2")
            n_models = a.shape[0]
            bad = ~np.isfinite(a)
            if bad.any():
                model, sample = np.argwhere(bad)[0]
                raise SourceError(f"{name} has NaN/inf values (first at model {model}, sample {sample})")
            if a.dtype.itemsize > 4:
                a = np.clip(a, -_FLOAT32_MAX, _FLOAT32_MAX)
            out[kind][split] = np.array(a, dtype=np.float32, order="C")  # a copy: never the caller's array
    return out["margins"], out.get("top-1 margins")


def read_unlearned_dir(path: str | Path, *, n_retain: int, n_forget: int, n_val: int) -> dict[str, np.ndarray]:
    """The matrices of a folder in the layout above, checked (``check_unlearned``), float32: keys ``retain``,
    ``forget``, ``val``, and ``retain_top1``, ``forget_top1``, ``val_top1`` where the folder has top-1 margins.

    ``SourceError`` (one line) for a missing folder or file, an unreadable file, a partial set of top-1 files,
    wrong shapes or non-finite values."""
    folder = Path(path)
    if not folder.is_dir():
        raise SourceError(f"{folder} is not a folder of margins (retain.npy, forget.npy, val.npy)")
    where = f"{folder}/"
    missing = [s for s in SPLITS if not (folder / f"{s}.npy").is_file()]
    if missing:
        logits = [f"{s}_logits.npy" for s in missing if (folder / f"{s}_logits.npy").exists()]
        hint = (f" ({', '.join(logits)} found: logits are not read, a run folder records no labels; store margins "
                "z_y - logsumexp_{j≠y} z_j instead)") if logits else ""
        raise SourceError(f"{where}{missing[0]}.npy is missing: a folder of margins holds retain.npy, forget.npy "
                          f"and val.npy{hint}")
    present = [s for s in SPLITS if (folder / f"{s}{TOP1_SUFFIX}.npy").is_file()]
    if present and len(present) != len(SPLITS):
        absent = [f"{s}{TOP1_SUFFIX}.npy" for s in SPLITS if s not in present]
        raise SourceError(f"{folder} has top-1 margins for {', '.join(present)} but not {', '.join(absent)}: give "
                          "all three or none")
    margins = {s: _load(folder / f"{s}.npy") for s in SPLITS}
    top1 = {s: _load(folder / f"{s}{TOP1_SUFFIX}.npy") for s in SPLITS} if present else None
    margins, top1 = check_unlearned(margins, top1, n_retain=n_retain, n_forget=n_forget, n_val=n_val, where=where)
    return {**margins, **({f"{s}{TOP1_SUFFIX}": m for s, m in top1.items()} if top1 else {})}


def _load(path: Path) -> np.ndarray:
    """One .npy matrix, memory-mapped (the float32 copy is the only one made in memory); never a pickle."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise SourceError(f"cannot read {path} as a .npy array: {' '.join(str(err).split())}") from err
