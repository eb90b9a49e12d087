"""Reduce stored margins to the summary: KLOM and accuracy per (forget set, method, params, epoch, split).

Accuracy is top-1 accuracy, read from the stored ``top1_margins`` (> 0: right, a tie is wrong), averaged over
models and the samples of a split; it is left empty where some model's top-1 margins are not stored.

Reads the run folder alone (``raybench reduce OUT`` needs nothing else) and never retrains. The work is a list of
jobs, one per (ensemble, split, sample chunk); each reads only its chunk of its files with pyarrow filters, so
memory holds one chunk of every model, not the run. The jobs run in this process, or as plain Ray tasks on a
cluster of several nodes (docs/design.md#reduce-tasks: not Ray Data groupby, which shuffles everything). The retain
and forget splits are the columns of the stored ``train`` split outside / inside the forget set; the forget
split keeps the forget set's own order. Each row also gets the 95 % interval of its P95 and mean KLOM over the
models of both ensembles (half-samples drawn per ensemble identity, docs/metrics.md#uncertainty). The field's other
metrics (ToW, ε, U-LiRA, SVC-MIA, IAM) need whole ensembles per split, so ``raybench.field_metrics`` fills them
into the rows in a second pass, one job per ensemble.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import logging
import struct
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from raybench.field_metrics import FIELD_COLUMNS, fill_field_metrics, metrics_record
from raybench.metrics import DIRECTIONS, KLOM_VERSION, klom_details, summarize
from raybench.metrics.bootstrap import (
    DEFAULT_LEVEL,
    DEFAULT_N_BOOT,
    DEFAULT_SEED,
    DEFAULT_STATS,
    METHOD,
    MIN_MODELS,
    BootstrapDraws,
    bootstrap_interval,
    ensemble_rows,
    klom_replicates,
)
from raybench.store import FLOOR_METHOD, RunStore, StoreError, UnitOutput, csv_text, margins_matrix, top1_matrix
from raybench.versions import summary_versions

log = logging.getLogger(__name__)

SUMMARY_COLUMNS = [
    "forget_set", "method", "params", "epoch", "split", "n_models", "n_oracles", "n_samples",
    "klom_mean", "klom_p5", "klom_p25", "klom_p50", "klom_p75", "klom_p95", "klom_p99", "klom_degenerate",
    "accuracy", "oracle_accuracy", "grad_samples", "klom_version", "run",
    "klom_p95_ci_low", "klom_p95_ci_high", "klom_mean_ci_low", "klom_mean_ci_high",
    *FIELD_COLUMNS, "selection",
]
"""``grad_samples``: samples per model that the method passed forward with gradients up to that epoch
(``raybench.models.grad_samples``): its work, deterministic, comparable with ``retrain`` (epochs × retain size).
Wall-clock ``compute_s`` (summed over the ensemble's units) is in summary.json only: summary.csv stays bit-identical
however the run was scheduled, interrupted or retried. ``klom_*_ci_*``: the 95 % interval of P95 and mean KLOM over
the models of both ensembles (``raybench.metrics.bootstrap``, docs/metrics.md#uncertainty), empty where not
computed. ``FIELD_COLUMNS``: the field's other metrics (``raybench.field_metrics``). Both are empty in summaries
written before them. ``selection``: empty, except on the rows ``--select RULE`` adds (``raybench.selection``), where
it is the rule's name."""
BASE_COLUMNS = SUMMARY_COLUMNS[: SUMMARY_COLUMNS.index("run") + 1]
"""The columns every summary this format has written holds; later columns are absent from older summaries."""
INTERVAL_COLUMNS = [f"klom_{stat}_ci_{end}" for stat in DEFAULT_STATS for end in ("low", "high")]


@dataclass(frozen=True)
class Group:
    """The units whose models together form one ensemble (all blocks of one role/method/params/forget set)."""

    forget_set: str
    method: str
    params: str
    units: tuple[UnitOutput, ...]

    @property
    def n_models(self) -> int:
        return sum(len(u.meta["model_ids"]) for u in self.units)

    @property
    def epochs(self) -> list[int]:
        return sorted({e for u in self.units for e in u.meta["epochs"]})

    def work(self, epoch: int) -> tuple[float | int | None, float | None]:
        """(grad_samples per model, compute seconds of all models) up to ``epoch``, from the manifests; None
        where a unit did not record it (imported models)."""
        samples, seconds = 0, 0.0
        for u in self.units:
            m = u.meta
            if "grad_samples" not in m or epoch not in m["epochs"]:
                return None, None
            k = m["epochs"].index(epoch)
            samples += m["grad_samples"][k] * len(m["model_ids"])
            seconds += m["compute_s_by_epoch"][k]
        per_model = samples / self.n_models
        return (int(per_model) if per_model == int(per_model) else per_model), seconds


def _groups(units: dict[str, UnitOutput]) -> tuple[dict, dict, dict]:
    """Committed units by role: originals (one group), oracles and unlearned (keyed by forget set, method…)."""
    originals, oracles, unlearned = [], defaultdict(list), defaultdict(list)
    for u in units.values():
        m = u.meta
        if m["role"] == "original":
            originals.append(u)
        elif m["role"] == "oracle":
            oracles[m["forget_set"]].append(u)
        elif m["role"] == "unlearned":  # matching oracles are inputs of methods, not scored
            unlearned[(m["forget_set"], m["method"], m["params"])].append(u)

    def ordered(us: list) -> tuple:
        return tuple(sorted(_newest(us), key=lambda u: min(u.meta["model_ids"])))

    original_group = Group("none", "do_nothing", "{}", ordered(originals))
    oracle_groups = {fs: Group(fs, "none", "{}", ordered(us)) for fs, us in oracles.items()}
    method_groups = {key: Group(*key, ordered(us)) for key, us in unlearned.items()}
    return {"original": original_group}, oracle_groups, method_groups


def _code_version(unit: UnitOutput) -> tuple[int, int, int]:
    """(training, margins, method) versions the unit was planned with; 0 where its manifest has none (imports)."""
    v = unit.meta.get("code_versions") or {}
    return v.get("training") or 0, v.get("margins") or 0, v.get("method") or 0


def _newest(units: list[UnitOutput]) -> list[UnitOutput]:
    """The units of one ensemble made by the newest code: after a version bump the folder still holds the old
    version's units (other ids, same models), which are ignored rather than mixed in or counted twice."""
    if not units:
        return units
    newest = max(_code_version(u) for u in units)
    return [u for u in units if _code_version(u) == newest]


def _check_complete(group: Group, n_expected: int, what: str, skipped: list[str] | None = None, *,
                    warn: bool = True) -> bool:
    ids = sorted(i for u in group.units for i in u.meta["model_ids"])
    if len(ids) != len(set(ids)):
        raise StoreError(f"{what}: model ids stored twice ({len(ids)} rows for {len(set(ids))} models)")
    if len(ids) != n_expected:
        if warn:  # a caller that refuses instead (``read_oracles``) says it in its one-line error
            log.warning("%s: %d of %d models stored; skipped (rerun `raybench run` to finish it)", what, len(ids),
                        n_expected)
        if skipped is not None:
            skipped.append(f"{what}: {len(ids)} of {n_expected} models stored")
        return False
    return True


@dataclass(frozen=True)
class ChunkJob:
    """One reduce task: one ensemble against its forget set's oracles on one (split, chunk), every epoch.

    Plain data (file lists, no store object), so it can be shipped to a Ray task that opens the run folder by
    its URI. It holds at most two (models × chunk width) margin matrices at a time, and a top-1 matrix of one of
    them while it is reduced to per-sample accuracy: memory is bounded by the chunk size, whatever the number of
    samples. With an interval (``n_boot`` > 0) its result adds ``n_boot × width`` float64 per epoch (13 MB for
    200 × 8,192), the replicates' per-sample KLOM, drawn from ``boot_key`` so every chunk uses the same models.
    """

    files: tuple[str, ...]  # the ensemble's Parquet files, relative to the run folder
    oracle_files: tuple[str, ...]
    epochs: tuple[int | None, ...]  # stored epochs to read; None: the one snapshot of a train unit (originals)
    split: str
    chunk: int
    width: int
    n_models: int
    n_oracles: int
    label: str  # for error messages
    direction: str = DIRECTIONS[0]  # KL(unlearned ‖ oracle), or "oracle-unlearned" (docs/metrics.md#variants)
    n_boot: int = 0  # replicates of the summaries' interval; 0: none (docs/metrics.md#uncertainty)
    boot_key: tuple[str, str, str] = ("", "", "")  # (forget set, method, params): seeds the draws, see interval_draws
    boot_seed: int = DEFAULT_SEED
    model_rows: tuple[int, ...] | None = None  # score only these rows (positions in model-id order); None: all
    oracle_rows: tuple[int, ...] | None = None  # the same for the oracles (a selection's halves)


TaskMapper = Callable[[Callable, list], Iterator]
"""Runs ``fn(*item)`` for every item and yields the results in item order (``raybench.engine.map_tasks``)."""

ChunkScores = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]
"""Per sample of one chunk: KLOM, degenerate flag, top-1 accuracy of the ensemble, of the oracles (NaN where
some model's top-1 margins are not stored), the values of the ensemble and of the oracles dropped on the top
edge (``KlomResult``, which only the per-sample output stores), and the (B, chunk) per-sample KLOM of the
interval's replicates (None when no interval is computed)."""

SampleSink = Callable[[dict, dict[str, np.ndarray]], None]
"""Called by ``reduce_run`` once per summary row, in row order, with the row and its split view's per-sample
columns (``PER_SAMPLE_FIELDS``, in the view's sample order): what ``RunStore.write_per_sample`` stores."""
PER_SAMPLE_FIELDS = ("sample_id", "klom", "degenerate", "accuracy", "oracle_accuracy", "dropped_unlearned",
                     "dropped_oracle")


def _matrices(store: RunStore, files: tuple[str, ...], job: ChunkJob, epoch: int | None, n_models: int,
              what: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Margins and top-1 margins (None: not stored for some model) of one chunk, read together."""
    table = store.read_margin_files(files, split=job.split, chunk=job.chunk, epoch=epoch)
    matrix, top1 = margins_matrix(table), top1_matrix(table)
    for name, m in (("margins", matrix), ("top-1 margins", top1)):
        if m is not None and m.shape != (n_models, job.width):
            raise StoreError(f"{job.label} ({what}) {job.split} chunk {job.chunk}: stored {name} have shape "
                             f"{m.shape}, expected {(n_models, job.width)}")
    return matrix, top1


def _rows_of(matrix: np.ndarray, top1: np.ndarray | None, rows: tuple[int, ...] | None
             ) -> tuple[np.ndarray, np.ndarray | None]:
    """The given rows of a chunk's margins and top-1 margins (all of them for None)."""
    if rows is None:
        return matrix, top1
    picked = np.asarray(rows, dtype=np.int64)
    return matrix[picked], None if top1 is None else top1[picked]


def _top1_accuracy(top1: np.ndarray | None, width: int) -> np.ndarray:
    """Per sample, the share of models whose top-1 prediction is right (top-1 margin > 0: a tie is wrong); NaN
    when not known, which leaves the accuracy of every split view holding the sample empty."""
    return np.full(width, np.nan) if top1 is None else (top1 > 0).mean(axis=0)


def score_chunk(store: RunStore, job: ChunkJob) -> list[ChunkScores]:
    """The job's per-sample scores, one entry per epoch (the oracles' chunk is read once for all epochs)."""
    oracle, oracle_top1 = _rows_of(*_matrices(store, job.oracle_files, job, None, job.n_oracles, "oracles"),
                                   job.oracle_rows)
    oracle_correct = _top1_accuracy(oracle_top1, job.width)
    del oracle_top1
    n_models = job.n_models if job.model_rows is None else len(job.model_rows)
    draws = interval_draws(n_models, len(oracle), *job.boot_key, n_boot=job.n_boot, seed=job.boot_seed)
    out = []
    for epoch in job.epochs:
        unlearned, top1 = _rows_of(*_matrices(store, job.files, job, epoch, job.n_models, "models"), job.model_rows)
        correct = _top1_accuracy(top1, job.width)
        del top1
        result = klom_details(unlearned, oracle, direction=job.direction)
        replicates = None if draws is None else klom_replicates(unlearned, oracle, draws, direction=job.direction)
        out.append((result.values, result.degenerate, correct, oracle_correct,
                    result.dropped_unlearned.astype(np.int32), result.dropped_oracle.astype(np.int32), replicates))
        del unlearned
    return out


def interval_draws(n_models: int, n_oracles: int, forget_set: str, method: str, params: str, *,
                   n_boot: int = DEFAULT_N_BOOT, seed: int = DEFAULT_SEED) -> BootstrapDraws | None:
    """The half-samples of one ensemble and its oracles for the interval of its rows (None: ``n_boot`` is 0 or an
    ensemble has fewer than ``MIN_MODELS`` models).

    Each side is seeded from ``seed`` and its identity alone (``SeedSequence([seed, *sha256 words])`` of
    ``unlearned/forget set/method/params``, of ``oracle/forget set``), so every chunk job, in any process, in any
    order, draws the same models: the rows do not depend on chunking or scheduling, and every method of a forget
    set is read against the same oracle half-samples.
    """
    if n_boot == 0 or min(n_models, n_oracles) < MIN_MODELS:
        return None
    return BootstrapDraws(ensemble_rows(n_models, n_boot=n_boot, seed=_entropy(seed, "unlearned", forget_set, method,
                                                                                 params)),
                          ensemble_rows(n_oracles, n_boot=n_boot, seed=_entropy(seed, "oracle", forget_set)),
                          n_models, n_oracles, seed)


def _entropy(seed: int, *parts: str) -> list[int]:
    """SeedSequence entropy: the seed and four 32-bit words of the SHA-256 of the identity parts."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return [seed, *struct.unpack("<4I", digest[:16])]


def check_interval_settings(n_boot: int, seed: int) -> None:
    """``n_boot`` 0 (no interval) or an integer >= 2, ``seed`` a non-negative integer; ``StoreError`` otherwise."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot == 1 or n_boot < 0:
        raise StoreError(f"n_boot must be 0 (no interval) or an integer >= 2, got {n_boot!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise StoreError(f"the interval's seed must be a non-negative integer, got {seed!r}")


@functools.lru_cache(maxsize=4)
def _open_store(uri: str) -> RunStore:
    return RunStore(uri)


def score_chunk_at(uri: str, job: ChunkJob) -> list[ChunkScores]:
    """``score_chunk`` for a Ray task: opens the run folder by its URI (once per worker process)."""
    return score_chunk(_open_store(uri), job)


@dataclass(frozen=True, eq=False)
class _Scoring:
    """One ensemble to score against one forget set's oracles, at the epochs listed (summary epoch numbers)."""

    group: Group
    oracle: Group
    forget_set: str
    forget_idx: np.ndarray
    epochs: tuple[int, ...]
    stored_epochs: tuple[int | None, ...]


def _run_shape(store: RunStore) -> tuple[dict, int, int, int, dict[str, int]]:
    """(run.json, N, oracles per forget set, chunk size, samples per stored split) of a run folder, checked."""
    info = store.run_info()
    identity = info["identity"]
    for key in ("n_models", "chunk_size"):
        if not isinstance(identity.get(key), int):
            raise StoreError(f"{store.path('run.json')} is not a valid run.json: its identity has no {key}")
    n_models, chunk_size = identity["n_models"], identity["chunk_size"]
    n_oracles = identity.get("n_oracles", n_models)  # an import can score N models against more oracles
    dataset = store.read_record(store.path("dataset.json"), "dataset.json", {"n_train": int, "n_val": int})
    return info, n_models, n_oracles, chunk_size, {"train": dataset["n_train"], "val": dataset["n_val"]}


def reduce_run(store: RunStore, *, forget_sets: list[str] | None = None,
               methods: list[tuple[str, str]] | None = None, mapper: TaskMapper | None = None,
               skipped: list[str] | None = None, direction: str = DIRECTIONS[0], n_boot: int = DEFAULT_N_BOOT,
               boot_seed: int = DEFAULT_SEED, on_samples: SampleSink | None = None) -> list[dict]:
    """Summary rows for every complete (forget set, method, params) group, or only the ones asked for.

    ``methods`` is a list of (method, params JSON); ``do_nothing`` is scored from the originals.
    ``mapper``: how the per-(group, split, chunk) jobs run, ``mapper(score_chunk_at, [(uri, job), ...])`` yielding
    the results in order (``raybench.engine.map_tasks``: Ray tasks, which the pipeline passes on a cluster of
    several nodes); None runs them in this process. Both give the same rows bit for bit: every job is computed by
    the same code on the same inputs.
    ``skipped`` (if given) is appended one line per ensemble left out as incomplete, for ``write_summary``.
    Every file read is first checked against its manifest, and every unit against its forget set's record
    (``StoreError`` otherwise): a damaged folder gives no numbers rather than wrong ones.
    ``direction`` = ``"oracle-unlearned"`` scores KL(oracle ‖ unlearned), DUB ``run.py``'s number, and marks every
    row's ``klom_version`` with it (``klom_version_of``); the default is the published KL(unlearned ‖ oracle).
    ``on_samples`` (if given) receives every row's per-sample values (``SampleSink``), for the per-sample file.
    ``n_boot`` half-sample replicates (0: none) seeded by ``boot_seed`` and each ensemble's identity give each row's
    ``klom_p95_ci_*`` / ``klom_mean_ci_*`` (docs/metrics.md#uncertainty); the other columns do not depend on them.
    Rows with an interval carry its settings under ``"bootstrap"``; ``write_summary`` records them at the top.
    """
    if direction not in DIRECTIONS:
        raise StoreError(f"unknown KL direction {direction!r}; known: {', '.join(DIRECTIONS)}")
    check_interval_settings(n_boot, boot_seed)
    info, n_models, n_oracles, chunk_size, n_split = _run_shape(store)
    role_groups, oracle_groups, method_groups = _groups(store.completed_units())
    original = role_groups["original"]
    for fs in sorted(({f for f, _, _ in method_groups} | set(store.forget_set_ids())) - set(oracle_groups),
                     key=_natural):
        if (forget_sets is None or fs in forget_sets) and skipped is not None:
            skipped.append(f"oracles of forget set {fs}: none stored")

    scorings: list[_Scoring] = []
    for fs in sorted(oracle_groups, key=_natural):
        if forget_sets is not None and fs not in forget_sets:
            continue
        oracle = oracle_groups[fs]
        if not _check_complete(oracle, n_oracles, f"oracles of forget set {fs}", skipped):
            continue
        # the floor right after do_nothing: every method's row is read against both
        candidates = [(original, [0])] + [(g, g.epochs) for (f, _, _), g in sorted(
            method_groups.items(), key=lambda item: (item[0][1] != FLOOR_METHOD, item[0])) if f == fs]
        chosen = []
        for group, epochs in candidates:
            if methods is not None and (group.method, group.params) not in methods:
                continue
            what = f"method {group.method} {group.params} on forget set {fs}"
            if not _check_complete(group, n_models, what, skipped):
                continue
            chosen.append((group, epochs))
        if not chosen:
            continue
        forget_idx = store.check_forget_set(fs, oracle.units + tuple(u for g, _ in chosen if g is not original
                                                                     for u in g.units))
        for group, epochs in chosen:
            stored = tuple(None if group is original else e for e in epochs)
            scorings.append(_Scoring(group, oracle, fs, forget_idx, tuple(epochs), stored))
    store.verify_units(list({u.unit_id: u for sc in scorings for u in sc.group.units + sc.oracle.units}.values()))

    jobs: list[ChunkJob] = []
    for sc in scorings:
        files = tuple(f for u in sc.group.units for f in u.files)
        oracle_files = tuple(f for u in sc.oracle.units for f in u.files)
        label = f"{sc.group.method} {sc.group.params} on forget set {sc.forget_set}"
        for split, n in n_split.items():
            for chunk in range((n + chunk_size - 1) // chunk_size):
                width = min(chunk_size, n - chunk * chunk_size)
                jobs.append(ChunkJob(files, oracle_files, sc.stored_epochs, split, chunk, width,
                                     sc.group.n_models, sc.oracle.n_models, label, direction, n_boot,
                                     (sc.forget_set, sc.group.method, sc.group.params), boot_seed))
    if mapper is not None and jobs:
        log.info("reducing %d chunk jobs through %s", len(jobs), getattr(mapper, "__name__", "the task mapper"))
        results = mapper(score_chunk_at, [(store.uri, job) for job in jobs])
    else:
        results = (score_chunk(store, job) for job in jobs)  # lazily: one job's matrices in memory at a time

    rows = []
    for sc in scorings:
        boot = n_boot if min(sc.group.n_models, sc.oracle.n_models) >= MIN_MODELS else 0
        per_sample = collect_scores(results, n_split, chunk_size, len(sc.epochs), boot)
        for k, epoch in enumerate(sc.epochs):
            built = _rows(sc, epoch, {split: a[k] for split, a in per_sample.items()}, n_split, info["run"],
                          klom_version_of(direction), boot_seed)
            rows.extend(built)
            if on_samples is not None:
                _emit_samples(on_samples, built, split_views(sc.forget_idx, n_split),
                              {split: a[k] for split, a in per_sample.items()})
    fill_field_metrics(store, rows, scorings, original, n_split=n_split, chunk_size=chunk_size, mapper=mapper)
    return rows


def collect_scores(results: Iterator[list[ChunkScores]], n_split: dict[str, int], chunk_size: int, n_epochs: int,
                   boot: int) -> dict[str, list[tuple]]:
    """One ensemble's chunk results (its jobs' in job order: split by split, chunk by chunk) put together per
    stored split, one tuple of whole-split arrays per epoch in ``ChunkScores``' order (the replicates None when
    ``boot`` is 0). Holds (B, n) float64 replicates per epoch while the ensemble's rows are built: B × 8 bytes per
    sample."""
    per_sample = {}
    for split, n in n_split.items():
        arrays = [(np.empty(n), np.zeros(n, dtype=bool), np.zeros(n), np.zeros(n), np.zeros(n, dtype=np.int32),
                   np.zeros(n, dtype=np.int32), np.empty((boot, n)) if boot else None) for _ in range(n_epochs)]
        for chunk in range((n + chunk_size - 1) // chunk_size):
            cols = slice(chunk * chunk_size, min(n, (chunk + 1) * chunk_size))
            for target, scores in zip(arrays, next(results), strict=True):
                for full, part in zip(target, scores, strict=True):
                    if full is not None:
                        full[..., cols] = part
        per_sample[split] = arrays
    return per_sample


def _emit_samples(sink: SampleSink, rows: list[dict], views: dict[str, tuple[str, np.ndarray]],
                  scores: dict[str, ChunkScores]) -> None:
    """Each row's per-sample columns, taken from its stored split at its view's sample ids (as ``_rows`` takes
    them), so that the per-sample file holds exactly the values each summary row was computed from."""
    for row in rows:
        source, idx = views[row["split"]]
        values, degenerate, correct, oracle_correct, dropped_u, dropped_o = (a[idx] for a in scores[source][:6])
        sink(row, dict(zip(PER_SAMPLE_FIELDS, (idx.astype(np.int64), values, degenerate, correct, oracle_correct,
                                               dropped_u, dropped_o), strict=True)))


def klom_version_of(direction: str) -> str:
    """The ``klom_version`` of rows scored in ``direction``: ``KLOM_VERSION`` for the default, suffixed with the
    direction otherwise, so a reversed number is never taken for the published one (and the default summary.csv
    is unchanged)."""
    return KLOM_VERSION if direction == DIRECTIONS[0] else f"{KLOM_VERSION}+{direction}"


def _rows(sc: _Scoring, epoch: int, per_sample: dict[str, tuple], n_split: dict[str, int], run_id: str,
          klom_version: str, boot_seed: int) -> list[dict]:
    """One summary row per split view (retain, forget, val) of one ensemble at one epoch."""
    grad_samples, compute_s = (0, 0.0) if sc.group.method == "do_nothing" else sc.group.work(epoch)
    rows = []
    for split, (source, idx) in split_views(sc.forget_idx, n_split).items():
        values, degenerate, correct, oracle_correct, _, _, replicates = per_sample[source]
        rows.append(summary_row(
            forget_set=sc.forget_set, method=sc.group.method, params=sc.group.params, epoch=epoch, split=split,
            n_models=sc.group.n_models, n_oracles=sc.oracle.n_models, values=values[idx],
            degenerate=degenerate[idx], correct=correct[idx], oracle_correct=oracle_correct[idx],
            grad_samples=grad_samples, run_id=run_id, compute_s=compute_s, klom_version=klom_version,
            replicates=None if replicates is None else replicates[:, idx], boot_seed=boot_seed))
    return rows


def split_views(forget_idx: np.ndarray, n_split: dict[str, int]) -> dict[str, tuple[str, np.ndarray]]:
    """The scored splits as views of the stored ones (docs/design.md#splits-and-sample-ids): view -> (stored
    split, sample ids in the view's order): retain ascending, forget in the forget set's own order, val whole."""
    in_forget = np.zeros(n_split["train"], dtype=bool)
    in_forget[forget_idx] = True
    return {"retain": ("train", np.flatnonzero(~in_forget)), "forget": ("train", forget_idx),
            "val": ("val", np.arange(n_split["val"]))}


def summary_row(*, forget_set: str, method: str, params: str, epoch: int | None, split: str, n_models: int,
                n_oracles: int, values: np.ndarray, degenerate: np.ndarray, correct: np.ndarray,
                oracle_correct: np.ndarray, grad_samples: float | int | None, run_id: str,
                compute_s: float | None, klom_version: str = KLOM_VERSION, replicates: np.ndarray | None = None,
                boot_seed: int = DEFAULT_SEED) -> dict:
    """One summary row from the per-sample scores of one split view (KLOM, degenerate flags, top-1 accuracy of
    the ensemble and of the oracles, NaN where unknown, and the interval's ``(B, samples)`` replicates or None):
    the one row builder of ``reduce_run`` and ``score``."""
    row = {
        "forget_set": forget_set, "method": method, "params": params, "epoch": epoch, "split": split,
        "n_models": n_models, "n_oracles": n_oracles, "n_samples": len(values),
        **summarize(values, prefix="klom_"), "klom_degenerate": int(degenerate.sum()),
        "accuracy": _accuracy(correct), "oracle_accuracy": _accuracy(oracle_correct),
        "grad_samples": grad_samples, "klom_version": klom_version, "run": run_id,
        **dict.fromkeys(INTERVAL_COLUMNS), "compute_s": compute_s, "selection": None,
    }
    if replicates is not None:
        interval = bootstrap_interval(replicates, values, stats=DEFAULT_STATS, seed=boot_seed)
        row.update(interval.columns(prefix="klom_"))
        row["bootstrap"] = interval_settings(interval.n_boot, boot_seed)
    return row


def interval_settings(n_boot: int, seed: int) -> dict:
    """What summary.json's ``"bootstrap"`` records (docs/metrics.md#uncertainty)."""
    return {"n_boot": n_boot, "seed": seed, "method": METHOD, "level": DEFAULT_LEVEL}


def _accuracy(per_sample: np.ndarray) -> float | None:
    """Top-1 accuracy over a split view; None (blank in the CSV) if any sample's is unknown: never a proxy."""
    return None if np.isnan(per_sample).any() else float(per_sample.mean())


@dataclass(frozen=True)
class OracleViews:
    """One forget set's complete oracle ensemble per split view, read and checked as ``reduce_run`` reads it:
    what ``raybench.score`` compares margins computed elsewhere with."""

    forget_set: str
    run_id: str
    n_oracles: int
    forget_idx: np.ndarray
    margins: dict[str, np.ndarray]  # view -> (oracles, samples) float32, in the view's sample order
    correct: dict[str, np.ndarray]  # view -> per-sample top-1 accuracy of the oracles, NaN where not stored

    @property
    def sizes(self) -> dict[str, int]:
        return {view: m.shape[1] for view, m in self.margins.items()}


def read_oracles(store: RunStore, forget_set: str) -> OracleViews:
    """The oracles of ``forget_set`` in a run folder, per split view; ``StoreError`` (one line) for a folder that
    is not a run of this format version, an unknown forget set, oracles incomplete, or damaged files."""
    info, _, n_oracles, chunk_size, n_split = _run_shape(store)
    known = store.forget_set_ids()
    if forget_set not in known:
        raise StoreError(f"{store.uri} has no forget set {forget_set!r} (it has: "
                         f"{', '.join(sorted(known, key=_natural)) or 'none'})")
    what = f"oracles of forget set {forget_set} in {store.uri}"
    oracle = _groups(store.completed_units())[1].get(forget_set)
    if oracle is None:
        raise StoreError(f"{what}: none stored; finish them with `raybench run` (or the import) first")
    skipped: list[str] = []
    if not _check_complete(oracle, n_oracles, what, skipped, warn=False):
        raise StoreError(f"{skipped[0]}; finish them with `raybench run` (or the import) first")
    forget_idx = store.check_forget_set(forget_set, oracle.units)
    store.verify_units(oracle.units)
    files = tuple(f for u in oracle.units for f in u.files)
    stored = {}
    for split, n in n_split.items():  # chunk by chunk, exactly as the reduce jobs read them
        margins, correct = [], []
        for chunk in range((n + chunk_size - 1) // chunk_size):
            width = min(chunk_size, n - chunk * chunk_size)
            job = ChunkJob(files, files, (None,), split, chunk, width, oracle.n_models, oracle.n_models, what)
            matrix, top1 = _matrices(store, files, job, None, oracle.n_models, "oracles")
            margins.append(matrix)
            correct.append(_top1_accuracy(top1, width))
        stored[split] = (np.concatenate(margins, axis=1), np.concatenate(correct))
    views = split_views(forget_idx, n_split)
    return OracleViews(forget_set, info["run"], oracle.n_models, forget_idx,
                       {v: stored[s][0][:, idx] for v, (s, idx) in views.items()},
                       {v: stored[s][1][idx] for v, (s, idx) in views.items()})


def _natural(s: str) -> tuple:
    return (0, int(s), "") if s.isdigit() else (1, 0, s)


def _summary_groups(store: RunStore) -> set[tuple[str, str, str]]:
    """(forget set, method, params) of every ensemble in the folder's summary.csv (none if there is none)."""
    path = store.path("summary.csv")
    if not store.exists(path):
        return set()
    reader = csv.DictReader(io.StringIO(store.read_bytes(path).decode(errors="replace")))
    if not {"forget_set", "method", "params"} <= set(reader.fieldnames or ()):
        return set()  # not a summary this code wrote: nothing in it to lose
    return {(r["forget_set"], r["method"], r["params"]) for r in reader}


def summary_csv(rows: list[dict]) -> str:
    """The text of ``summary.csv`` for these rows (floats as repr: the bits survive a round trip)."""
    return csv_text(rows, SUMMARY_COLUMNS)


def write_summary(store: RunStore, rows: list[dict], *, skipped: list[str] | None = None,
                  selection: dict | None = None) -> dict:
    """``summary.csv`` and ``summary.json`` in the run folder; the JSON also carries the run's identity, each
    row's wall-clock ``compute_s``, ``versions`` (``raybench.versions.summary_versions``) and, when rows have
    intervals, their settings as ``"bootstrap"`` (one setting per summary), and ``selection`` (what
    ``raybench.selection`` chose, when ``rows`` hold its selected rows) as ``"selection"``. Returns what
    summary.json holds.

    Never replaces a summary by one that lacks some of its ensembles, or by an empty one (``StoreError``, the
    old files left as they were): a reduce of an interrupted import, or of a folder that lost a manifest, must
    not erase results. ``skipped`` (from ``reduce_run``) says in the error why ensembles are missing.
    """
    why = f" ({'; '.join(skipped)})" if skipped else ""
    if not rows:
        raise StoreError(f"nothing to summarize in {store.uri}: no complete ensemble{why}; summary files left as "
                         "they were")
    lost = _summary_groups(store) - {(r["forget_set"], r["method"], r["params"]) for r in rows}
    if lost:
        names = ", ".join(f"{m} {p} on forget set {fs}" for fs, m, p in sorted(lost)[:5])
        more = f" and {len(lost) - 5} more" if len(lost) > 5 else ""
        raise StoreError(f"not overwriting {store.path('summary.csv')}: it has results this reduce could not "
                         f"compute, {names}{more}{why or ' (their units are incomplete or missing)'}; finish them "
                         "with `raybench run` (or the import), or delete summary.csv to summarize without them")
    settings = {json.dumps(r["bootstrap"], sort_keys=True): r["bootstrap"] for r in rows if r.get("bootstrap")}
    if len(settings) > 1:
        raise StoreError(f"rows of several interval settings ({', '.join(sorted(settings))}) cannot share one summary")
    store.write_bytes(store.path("summary.csv"), summary_csv(rows).encode())
    info = store.run_info()
    klom_versions = sorted({r["klom_version"] for r in rows})
    if len(klom_versions) != 1:
        raise StoreError(f"rows of several KLOM definitions ({', '.join(klom_versions)}) cannot share one summary")
    summary = {"run": info["run"], "identity": info["identity"], "klom_version": klom_versions[0],
               "versions": summary_versions(u.meta for u in store.completed_units().values()),
               "metrics": metrics_record([r for r in rows if not r.get("selection")])}  # the full ensembles
    for direction in DIRECTIONS[1:]:
        if klom_versions[0] == klom_version_of(direction):
            summary["kl_direction"] = direction
    if settings:  # once for the summary (rows with an interval name them too, as reduce_run gave them)
        summary["bootstrap"] = next(iter(settings.values()))
    if selection is not None:
        summary["selection"] = selection
    summary["rows"] = rows
    store.write_bytes(store.path("summary.json"), json.dumps(summary, indent=2).encode())
    return summary


def read_summary(store: RunStore) -> dict:
    """summary.json as ``write_summary`` wrote it, for ``raybench report``; refuses anything else in one line."""
    store.require_folder()
    path = store.path("summary.json")
    if not store.exists(path):
        raise StoreError(f"{store.uri} has no summary.json: run `raybench reduce {store.uri}` first")
    summary = store.read_record(path, "summary", {"run": str, "klom_version": str, "rows": list})
    for k, row in enumerate(summary["rows"]):  # columns added later are absent from older summaries
        missing = [c for c in BASE_COLUMNS if c not in row] if isinstance(row, dict) else BASE_COLUMNS
        if missing:
            raise StoreError(f"{path} is not a valid summary: row {k} has no {missing[0]!r}; rerun "
                             f"`raybench reduce {store.uri}`")
    return summary
