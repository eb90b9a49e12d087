"""``raybench compare RUN A B``: two method rows of a run folder, compared sample by sample per split.

Reads the per-sample KLOM that every summary writes (``per_sample/``, docs/design.md#per-sample-values) and runs
``metrics.paired.paired_comparison`` on each (forget set, split) where both rows exist. A row is named
``METHOD[@EPOCH]``; ``params`` picks one parameter combination where a method was swept.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.compute as pc

from raybench.ids import canonical_json
from raybench.metrics.paired import DEFAULT_N_BOOT, paired_comparison
from raybench.store import RunStore, StoreError

COMPARE_COLUMNS = ["forget_set", "split", "a", "b", "n_samples", "mean_a", "mean_b", "mean_diff", "diff_ci_low",
                   "diff_ci_high", "share_a_lower", "wilcoxon_statistic", "wilcoxon_p"]


def parse_row(spec: str, params: str | None = None) -> tuple[str, int | None, str | None]:
    """``METHOD[@EPOCH]`` and an optional params JSON object -> (method, epoch or None, canonical params or None)."""
    method, at, epoch = str(spec).partition("@")
    if not method:
        raise StoreError(f"row {spec!r}: expected METHOD[@EPOCH]")
    try:
        number = int(epoch) if at else None
    except ValueError:
        raise StoreError(f"row {spec!r}: the epoch after @ must be an integer") from None
    if params is None:
        return method, number, None
    try:
        value = json.loads(params)
    except json.JSONDecodeError as err:
        raise StoreError(f"params {params!r} is not JSON: {err}") from None
    if not isinstance(value, dict):
        raise StoreError(f"params must be a JSON object, got {params!r}")
    return method, number, canonical_json(value)


def compare(store: RunStore, a: tuple[str, int | None, str | None], b: tuple[str, int | None, str | None], *,
            n_boot: int = DEFAULT_N_BOOT, seed: int = 0) -> list[dict]:
    """One result per (forget set, split) where both rows exist; ``StoreError`` (one line) if a row is unknown or
    ambiguous (several epochs or parameter combinations match: name one)."""
    table = store.read_per_sample()
    if table.num_rows == 0:
        raise StoreError(f"{store.uri} has no per-sample values: run `raybench reduce {store.uri}` first")
    keys = {(fs, m, p, e) for fs, m, p, e in zip(*(table.column(c).to_pylist()
                                                 for c in ("forget_set", "method", "params", "epoch")), strict=True)}
    chosen = {}
    for name, (method, epoch, params) in (("A", a), ("B", b)):
        found = {(p, e) for _, m, p, e in keys if m == method and (epoch is None or e == epoch)
                 and (params is None or p == params)}
        if not found:
            raise StoreError(f"row {name} ({method}{'' if epoch is None else f'@{epoch}'}) is not in {store.uri}'s "
                             f"summary; methods there: {', '.join(sorted({m for _, m, _, _ in keys}))}")
        if len(found) > 1:
            options = ", ".join(f"{method}@{e} params {p}" for p, e in sorted(found, key=str)[:6])
            raise StoreError(f"row {name} ({method}) matches several rows ({options}): give METHOD@EPOCH and "
                             "--params-a/--params-b")
        chosen[name] = (method, *found.pop())
    out = []
    for fs in sorted({k[0] for k in keys}, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s)):
        for split in ("retain", "forget", "val"):
            values = {}
            for name, (method, params, epoch) in chosen.items():
                mask = pc.and_(pc.and_(pc.equal(table["forget_set"], fs), pc.equal(table["split"], split)),
                               pc.and_(pc.equal(table["method"], method), pc.equal(table["params"], params)))
                mask = pc.and_(mask, pc.is_null(table["epoch"]) if epoch is None else pc.equal(table["epoch"], epoch))
                rows = table.filter(mask)
                values[name] = (rows.column("sample_id").to_numpy(), rows.column("klom").to_numpy())
            if any(len(v[0]) == 0 for v in values.values()):
                continue  # a method of one forget set only
            if not np.array_equal(values["A"][0], values["B"][0]):
                raise StoreError(f"forget set {fs} {split}: the two rows hold other samples; rerun `raybench reduce`")
            result = paired_comparison(values["A"][1], values["B"][1], n_boot=n_boot, seed=seed)
            out.append({"forget_set": fs, "split": split, "a": _label(chosen["A"]), "b": _label(chosen["B"]),
                        **{k: result[k] for k in COMPARE_COLUMNS[4:]}})
    if not out:
        raise StoreError("the two rows share no forget set")
    return out


def _label(row: tuple[str, str, int | None]) -> str:
    method, params, epoch = row
    return f"{method}@{epoch}" + ("" if params == "{}" else f" {params}")
