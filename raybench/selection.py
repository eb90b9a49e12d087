"""``--select RULE``: each method's epoch and parameters chosen on one half of the models and oracles, scored on
the other half, as extra summary rows marked ``selection`` (docs/metrics.md#selection-without-leaking).

Why: picking the best (params, epoch) of a sweep by its KLOM against the oracles that then score it reports the
minimum of noisy numbers, which sits below what the chosen setting gets on fresh models (the winner's curse).
Here every ensemble of a forget set (its N models and its K oracles, positions in model-id order) is split into a
tuning half and a disjoint scoring half of N // 2 and K // 2 (``raybench.metrics.selection.halves``: one
permutation of the models for every ensemble, one of the oracles per forget set). Per (forget set, method), the
candidate minimising the rule on the tuning halves is chosen; its rows are then recomputed, every KLOM column and
the interval, on the scoring halves alone. The models are halved too, not only the oracles: the candidates'
scores share the models' noise, so a choice scored on the models it was chosen on would keep part of the flattery.

The tuning pass is ``raybench.convergence.entry_p95`` (the two halves are two subsamples of one size, scored in
one kernel call per chunk); the scoring pass is the reducer's own ``score_chunk`` with the halves' rows
(``ChunkJob.model_rows`` / ``oracle_rows``), built by ``summary_row``. Both read one chunk at a time and run as
Ray tasks through the reducer's task mapper where it is given one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from raybench.convergence import Subsample, _entries, _Entry, entry_p95
from raybench.field_metrics import FIELD_COLUMNS
from raybench.metrics import DIRECTIONS
from raybench.metrics.bootstrap import DEFAULT_N_BOOT, DEFAULT_SEED, MIN_MODELS
from raybench.metrics.selection import (
    RULE_TEXT,
    SELECT_SEED,
    SELECT_SPLITS,
    check_rule,
    halves,
    model_label,
    oracle_label,
    rule_value,
)
from raybench.reduce import (
    ChunkJob,
    TaskMapper,
    _open_store,
    _run_shape,
    check_interval_settings,
    collect_scores,
    klom_version_of,
    score_chunk,
    score_chunk_at,
    split_views,
    summary_row,
)
from raybench.store import RunStore, StoreError

HALVES_RULE = ("positions in model-id order; numpy.random.default_rng(SeedSequence([seed, *w])).permutation(n), w "
               "the first four little-endian 32-bit words of the SHA-256 of the label ('select\\x1fmodels' for every "
               "ensemble's models, 'select\\x1foracle\\x1f<forget set>' for its oracles): the first n // 2 tune, the "
               "next n // 2 score (sorted)")


@dataclass(frozen=True)
class Selection:
    """The selected rows (appended to the summary) and what summary.json records of the choice."""

    rows: list[dict]
    record: dict


def entry_p95_at(uri: str, *args: object) -> dict[str, np.ndarray]:
    """``entry_p95`` for a Ray task: opens the run folder by its URI (once per worker process)."""
    return entry_p95(_open_store(uri), *args)


def select_rows(store: RunStore, rows: Sequence[dict], rule: str, *, direction: str = DIRECTIONS[0],
                n_boot: int = DEFAULT_N_BOOT, boot_seed: int = DEFAULT_SEED, mapper: TaskMapper | None = None,
                seed: int = SELECT_SEED) -> Selection:
    """The selected rows of a reduce's ``rows`` (every full row of the folder's summary, as ``reduce_run`` gave
    them, in the same ``direction``): per (forget set, method), the (params, epoch) minimising ``rule`` on the
    tuning halves, scored on the scoring halves, three rows (retain, forget, val) with ``selection`` = ``rule``;
    ``do_nothing`` and ``oracle_floor`` get theirs too (one candidate each). ``ValueError`` for an unknown rule,
    ``StoreError`` for a folder whose ensembles cannot be halved (fewer than 4 models or oracles)."""
    check_rule(rule)
    check_interval_settings(n_boot, boot_seed)
    full = [r for r in rows if not r.get("selection")]
    if not full:
        raise StoreError(f"nothing to select from in {store.uri}: no complete ensemble")
    _, _, _, chunk_size, n_split = _run_shape(store)
    entries, n_models, n_oracles = _entries(store, {"rows": full})
    if min(n_models, n_oracles) < 4:
        raise StoreError(f"--select halves every ensemble: it needs at least 4 models and 4 oracles per ensemble, "
                         f"{store.uri} has {n_models} and {n_oracles}")
    tune_m, score_m = halves(n_models, model_label(), seed)
    oracle_halves = {e.forget_set: halves(n_oracles, oracle_label(e.forget_set), seed) for e in entries}
    half = len(tune_m), len(oracle_halves[entries[0].forget_set][0])

    # -- tuning pass: P95 per split view on both halves of every candidate (two subsamples of one size)
    items = [(e, [Subsample(half[0], 0, tune_m, oracle_halves[e.forget_set][0]),
                  Subsample(half[0], 1, score_m, oracle_halves[e.forget_set][1])],
              n_split, chunk_size, n_models, n_oracles, direction) for e in entries]
    results = (mapper(entry_p95_at, [(store.uri, *item) for item in items]) if mapper is not None
               else (entry_p95(store, *item) for item in items))
    p95 = [({v: float(a[0]) for v, a in r.items()}, {v: float(a[1]) for v, a in r.items()}) for r in results]
    by_key = {(r["forget_set"], r["method"], r["params"], r["epoch"], r["split"]): r for r in full}
    groups: dict[tuple[str, str], list[int]] = {}
    for k, e in enumerate(entries):
        groups.setdefault((e.forget_set, e.method), []).append(k)

    choices, candidates, chosen = [], [], []
    for (fs, method), ks in groups.items():
        whole = [{s: float(by_key[(fs, method, entries[k].params, entries[k].epoch, s)]["klom_p95"])
                  for s in SELECT_SPLITS} for k in ks]
        tuning = [rule_value(rule, p95[k][0]) for k in ks]
        scoring = [rule_value(rule, p95[k][1]) for k in ks]
        leaky_whole = [rule_value(rule, w) for w in whole]
        pick, pick_whole, pick_half = (_argmin(v) for v in (tuning, leaky_whole, scoring))
        for j, k in enumerate(ks):
            candidates.append({"forget_set": fs, "method": method, "params": entries[k].params,
                               "epoch": entries[k].epoch, "tuning": {**p95[k][0], "rule": tuning[j]},
                               "scoring": {**p95[k][1], "rule": scoring[j]}, "whole": {**whole[j],
                                                                                      "rule": leaky_whole[j]}})
        e = entries[ks[pick]]
        chosen.append(e)
        choices.append({
            "forget_set": fs, "method": method, "candidates": len(ks), "params": e.params, "epoch": e.epoch,
            "tuning": {**p95[ks[pick]][0], "rule": tuning[pick]},
            "scoring": {**p95[ks[pick]][1], "rule": scoring[pick]},
            "leaky": {"params": entries[ks[pick_whole]].params, "epoch": entries[ks[pick_whole]].epoch,
                      **whole[pick_whole], "rule": leaky_whole[pick_whole], "n_models": n_models,
                      "n_oracles": n_oracles},
            "leaky_scoring_half": {"params": entries[ks[pick_half]].params, "epoch": entries[ks[pick_half]].epoch,
                                   **p95[ks[pick_half]][1], "rule": scoring[pick_half]},
            "flattery": scoring[pick] - scoring[pick_half],
        })

    # -- scoring pass: the chosen candidates' rows on the scoring halves, every column the reducer computes
    selected = _score(store, chosen, by_key, score_m, oracle_halves, rule, n_split=n_split, chunk_size=chunk_size,
                      n_models=n_models, n_oracles=n_oracles, direction=direction, n_boot=n_boot,
                      boot_seed=boot_seed, mapper=mapper)
    record = {
        "rule": rule, "minimises": RULE_TEXT[rule], "seed": seed, "n_models": half[0], "n_oracles": half[1],
        "of_n_models": n_models, "of_n_oracles": n_oracles,
        "halves": {"rule": HALVES_RULE, "models": {"tuning": tune_m.tolist(), "scoring": score_m.tolist()},
                   "oracles": {fs: {"tuning": t.tolist(), "scoring": s.tolist()}
                               for fs, (t, s) in oracle_halves.items()}},
        "choices": choices, "candidates": candidates,
    }
    return Selection(selected, record)


def _argmin(values: list[float]) -> int:
    """The first position of the smallest value: ties go to the candidate listed first (summary order)."""
    return min(range(len(values)), key=lambda i: (values[i], i))


def _score(store: RunStore, chosen: list[_Entry], by_key: dict, score_m: np.ndarray, oracle_halves: dict, rule: str,
           *, n_split: dict[str, int], chunk_size: int, n_models: int, n_oracles: int, direction: str, n_boot: int,
           boot_seed: int, mapper: TaskMapper | None) -> list[dict]:
    jobs = []
    for e in chosen:
        label = f"{e.method} {e.params} on forget set {e.forget_set} (selection's scoring half)"
        for split, n in n_split.items():
            for chunk in range((n + chunk_size - 1) // chunk_size):
                jobs.append(ChunkJob(e.files, e.oracle_files, (e.stored_epoch,), split, chunk,
                                     min(chunk_size, n - chunk * chunk_size), n_models, n_oracles, label, direction,
                                     n_boot, (e.forget_set, e.method, e.params), boot_seed,
                                     tuple(int(i) for i in score_m),
                                     tuple(int(i) for i in oracle_halves[e.forget_set][1])))
    results = (mapper(score_chunk_at, [(store.uri, job) for job in jobs]) if mapper is not None and jobs
               else (score_chunk(store, job) for job in jobs))
    m, m_o = len(score_m), len(oracle_halves[chosen[0].forget_set][1])
    boot = n_boot if min(m, m_o) >= MIN_MODELS else 0
    out = []
    for e in chosen:
        scores = {split: a[0] for split, a in collect_scores(results, n_split, chunk_size, 1, boot).items()}
        for view, (source, idx) in split_views(e.forget_idx, n_split).items():
            values, degenerate, correct, oracle_correct, _, _, replicates = scores[source]
            whole = by_key[(e.forget_set, e.method, e.params, e.epoch, view)]
            row = summary_row(
                forget_set=e.forget_set, method=e.method, params=e.params, epoch=e.epoch, split=view, n_models=m,
                n_oracles=m_o, values=values[idx], degenerate=degenerate[idx], correct=correct[idx],
                oracle_correct=oracle_correct[idx], grad_samples=whole["grad_samples"], run_id=whole["run"],
                compute_s=whole.get("compute_s"), klom_version=klom_version_of(direction),
                replicates=None if replicates is None else replicates[:, idx], boot_seed=boot_seed)
            row.update(dict.fromkeys(FIELD_COLUMNS))  # whole-ensemble metrics: not recomputed on halves
            row["selection"] = rule
            out.append(row)
    return out
