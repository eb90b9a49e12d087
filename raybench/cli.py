"""The ``raybench`` command line (click).

Bad input exits with code 2 and a one-line message (click's convention for usage errors), never a traceback:
a researcher scripting many runs must be able to tell "you asked for something wrong" from "it crashed".
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click
import numpy as np

from raybench.metrics import DIRECTIONS, KLOM_VERSION, VARIANTS, klom_details, summarize
from raybench.metrics.selection import RULE_TEXT, RULES

EXIT_BAD_INPUT = 2
SELECT_HELP = ("Also choose each method's params and epoch by RULE on a tuning half of the models and oracles, "
               "and score the choice on the other half: extra summary rows with selection = RULE (half the "
               "ensembles, so not comparable with the full rows); RULE minimises "
               + "; ".join(f"{name}: the {text}" for name, text in RULE_TEXT.items()) + ".")
MAX_BINS = 10_000
"""KLOM histogram bins at most: the kernel holds (samples x bins) floats per chunk, and published KLOM uses 20."""


class BadInput(click.ClickException):
    """Bad input: exit code 2 and one line ``Error: ...`` (click's own usage errors also print the usage)."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))  # one line, whatever the message held


class _OneLineErrors(click.Group):
    """Every usage error of a subcommand, click's own (a bad option value) or ours (``click.UsageError``), exits
    with code 2 and a single line instead of the usage block; click's own point at the command's ``--help``."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except click.UsageError as err:
            # click's own parse errors (subclasses) get a pointer to the options; ours say what to change
            parse_error = type(err) is not click.UsageError and err.ctx is not None
            where = f" (see '{err.ctx.command_path} --help')" if parse_error else ""
            raise BadInput(f"{err.format_message()}{where}") from err


def _progress(message: str) -> None:
    click.echo(f"[raybench] {message}", err=True)


def _parse_params(items: tuple[str, ...]) -> dict:
    """``--param finetune.lr=0.01,0.05`` -> {"finetune": {"lr": [0.01, 0.05]}} (a list is a sweep)."""
    params: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        method, dot, name = key.rpartition(".")  # the last dot: plugin names (pkg.mod:fn) contain dots
        if not sep or not dot or not method or not name:
            raise click.BadParameter(f"{item!r}: expected METHOD.NAME=VALUE[,VALUE…]", param_hint="--param")
        values = [_parse_value(v) for v in raw.split(",")]
        params.setdefault(method, {})[name] = values if len(values) > 1 or name == "epochs" else values[0]
    return params


def _parse_value(text: str) -> object:
    text = text.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _load_matrix(path: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise click.BadParameter(f"cannot read {path} as a .npy array: {err}") from err


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """raybench: does an unlearning method make models indistinguishable from retrained ones? (KLOM)"""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.command("klom")
@click.argument("unlearned", type=click.Path(exists=True, dir_okay=False))
@click.argument("oracle", type=click.Path(exists=True, dir_okay=False))
@click.option("--variant", type=click.Choice(VARIANTS), default="easydub", show_default=True)
@click.option("--bins", type=int, default=20, show_default=True, help=f"Histogram bins, 1..{MAX_BINS}.")
@click.option("--out", type=click.Path(dir_okay=False), help="Also write the per-sample KLOM here (.npy).")
def klom_command(unlearned: str, oracle: str, variant: str, bins: int, out: str | None) -> None:
    """KLOM of two margin matrices (.npy, shape models x samples): per-sample values and their summary."""
    if not 1 <= bins <= MAX_BINS:
        raise click.UsageError(f"--bins must be in 1..{MAX_BINS}, got {bins}")
    u, o = _load_matrix(unlearned), _load_matrix(oracle)
    try:
        result = klom_details(u, o, variant=variant, bins=bins)
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    if out:
        np.save(Path(out), result.values)
    row = {
        "n_unlearned": result.n_unlearned, "n_oracle": result.n_oracle, "n_samples": int(result.values.size),
        **summarize(result.values, prefix="klom_"), "klom_degenerate": result.n_degenerate,
        "klom_version": KLOM_VERSION, "variant": variant,
    }
    click.echo(json.dumps(row, indent=2))


def _config_options(fn):
    options = [
        click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Run config (TOML)."),
        click.option("--methods", help="'all' or comma-separated method names (see `raybench methods`)."),
        click.option("--dataset", help="Data set (default: digits, embedded, no download)."),
        click.option("--data-root", type=click.Path(file_okay=False),
                     help="Folder of downloadable data sets, e.g. cifar10 (default: $RAYBENCH_DATA, else "
                          "~/.cache/raybench/data)."),
        click.option("--source",
                     help="Where originals and oracles come from: 'trained' (default: trained here), or a published "
                          "source, 'easydub' or 'klom-models', optionally with ':FOLDER_OR_REPO' (a folder in its hub "
                          "layout or a hub repo id); then only the methods run, on its models."),
        click.option("--easydub-source", help="Same as --source easydub:FOLDER_OR_REPO."),
        click.option("--arch", help="Model architecture (default: the data set's)."),
        click.option("--n-models", type=int, help="Originals and oracles per forget set (default 100)."),
        click.option("--n-oracles", type=int, help="Oracles per forget set that score the methods (default N)."),
        click.option("--forget-sets", help="Comma-separated built-in ids or .npy/.txt files (default 1,2,3); with "
                     "--scores also mem_low, mem_mid, mem_high, mem_mix (groups by memorisation)."),
        click.option("--scores", help="A subset run folder (`raybench subsets`): its memorisation scores define the "
                     "mem_* forget sets, and its datamodel feeds methods that need one."),
        click.option("--mem-size", type=int, help="Samples per difficulty group (default 50; mem_mix holds three)."),
        click.option("--param", "params", multiple=True,
                     help="Method parameter METHOD.NAME=VALUE; several values (comma-separated) sweep."),
        click.option("--block-size", type=int, help="Models per Ray call, trained stacked (default 50)."),
        click.option("--out", help="Run folder: a path or a pyarrow URI (s3://, gs://). Default runs/<id>."),
        click.option("--address", help="Join this Ray cluster (default: RAY_ADDRESS, else a local Ray)."),
        click.option("--num-cpus", type=int, help="CPUs of the local Ray."),
        click.option("--num-gpus", type=int, help="GPUs of the local Ray."),
        click.option("--floor/--no-floor", default=None,
                     help="Train N more oracles per forget set with their own seeds and score them as method "
                          "oracle_floor, the noise floor at this N (default: on; costs one oracle ensemble)."),
        click.option("--select", type=click.Choice(list(RULES)), help=f"{SELECT_HELP} Config key: select."),
        click.option("--train-path",
                     help="How a block of models trains: 'stacked' (one batched step for all), 'per_model' (one "
                          "after the other) or 'auto' (default: stacked on the CPU; on a GPU whichever a short timing "
                          "of both finds faster). Speed only: the models are the same up to float rounding."),
        click.option("--compile/--no-compile", default=None,
                     help="torch.compile the training step (default off; compiled once per worker and shape)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@main.command("run")
@_config_options
@click.pass_context
def run_command(ctx: click.Context, config_path: str | None, params: tuple[str, ...], **options: object) -> None:
    """Train originals and oracles, unlearn, store margins as Parquet, and print the KLOM summary.

    With --source easydub or klom-models (or source in the config), a published source's originals and oracles
    are imported instead of trained, and only the methods run. Rerunning with the same --out resumes: finished units
    are never recomputed.
    """
    _run_step(ctx, config_path, params, options, "all")


@main.command("train")
@_config_options
@click.pass_context
def train_command(ctx: click.Context, config_path: str | None, params: tuple[str, ...], **options: object) -> None:
    """Only the training half of `raybench run`: originals, oracles (and matching oracles), then the summary of
    do_nothing. `raybench unlearn` with the same options runs the methods on them later."""
    _run_step(ctx, config_path, params, options, "train")


@main.command("unlearn")
@_config_options
@click.pass_context
def unlearn_command(ctx: click.Context, config_path: str | None, params: tuple[str, ...], **options: object) -> None:
    """Only the unlearning half of `raybench run`: the methods on originals that `raybench train` (or an earlier
    run) already stored in --out, then the summary. Add methods or sweep parameters without retraining."""
    _run_step(ctx, config_path, params, options, "unlearn")


def _run_step(ctx: click.Context, config_path: str | None, params: tuple[str, ...], options: dict,
              step: str) -> None:
    from raybench.config import ConfigError
    from raybench.engine import EngineError
    from raybench.pipeline import load_config, run
    from raybench.report import summary_table
    from raybench.store import StoreError

    verbose = ctx.find_root().params.get("verbose", 0) > 0
    easydub = options.pop("easydub_source", None)
    if easydub:
        if options.get("source"):
            raise click.UsageError("give --source or --easydub-source, not both")
        options["source"] = f"easydub:{easydub}"
    try:
        cli_params = _parse_params(params)
        config = load_config(config_path, params=cli_params or None, **options)
        result = run(config, step=step, verbose=verbose, progress=_progress)
    except (ConfigError, StoreError) as err:
        raise click.UsageError(str(err)) from err
    except EngineError as err:
        click.echo(f"Error: {err}", err=True)
        sys.exit(1)
    report = result.report
    click.echo(summary_table(result.summary["rows"]))
    share = f", {100 * report.model_share():.0f}% of worker time in model work" if report.units_run else ""
    click.echo(f"\nrun {report.run_id}: {report.units_run} units run, {report.units_skipped} already complete, "
               f"{report.wall_s:.1f} s{share}; results in {result.store.uri}/summary.csv")


@main.command("subsets")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="Run config (TOML); its [subsets] table gives n_models and fraction.")
@click.option("--dataset", help="Data set (default: digits).")
@click.option("--data-root", type=click.Path(file_okay=False), help="Folder of downloadable data sets.")
@click.option("--arch", help="Model architecture (default: the data set's).")
@click.option("--n-models", type=int, help="Subset models K (default 100).")
@click.option("--fraction", type=float, help="Share of the train set each model trains on, 0 < α < 1 (default 0.5).")
@click.option("--block-size", type=int, help="Models per Ray call, trained stacked (default 50).")
@click.option("--seed", type=int, help="Base seed (default 0).")
@click.option("--out", help="Subset run folder (default runs/<dataset>-subsets-<id>).")
@click.option("--address", help="Join this Ray cluster (default: RAY_ADDRESS, else a local Ray).")
@click.option("--num-cpus", type=int, help="CPUs of the local Ray.")
@click.option("--num-gpus", type=int, help="GPUs of the local Ray.")
@click.pass_context
def subsets_command(ctx: click.Context, config_path: str | None, n_models: int | None, fraction: float | None,
                    **options: object) -> None:
    """Train K models, each on a random fraction of the train set (masks from their seeds, stored with the run),
    then write every train sample's memorisation (memorization.parquet) and a linear datamodel of the logits
    (datamodel.npz, subsets.json). Resumable like `raybench run`; `raybench run --scores OUT` uses it."""
    from raybench.config import ConfigError, build_config, load_toml
    from raybench.engine import EngineError
    from raybench.pipeline import subsets
    from raybench.store import StoreError
    from raybench.subsets import memorization_report, summary_lines

    verbose = ctx.find_root().params.get("verbose", 0) > 0
    try:
        table = dict(load_toml(config_path).get("subsets", {})) if config_path else {}
        if not isinstance(table, dict):
            raise ConfigError("subsets must be a table ([subsets] n_models = K, fraction = A)")
        table.update({k: v for k, v in (("n_models", n_models), ("fraction", fraction)) if v is not None})
        config = build_config(config_path, subsets=table, **options)
        result = subsets(config, verbose=verbose, progress=_progress)
        summary, png = memorization_report(result.store.uri)
    except (ConfigError, StoreError) as err:
        raise click.UsageError(str(err)) from err
    except EngineError as err:
        click.echo(f"Error: {err}", err=True)
        sys.exit(1)
    for line in summary_lines(summary):
        click.echo(line)
    report = result.report
    click.echo(f"\nsubset run {report.run_id}: {report.units_run} units run, {report.units_skipped} already complete, "
               f"{report.wall_s:.1f} s; {result.store.uri}/memorization.parquet, histogram {png}")


@main.command("memorization")
@click.argument("out")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def memorization_command(out: str, as_json: bool) -> None:
    """Summarise a subset run's memorisation (quantiles, highly memorised samples, the datamodel's held-out
    correlation) and write its histogram, plots/memorization.png, into the folder."""
    from raybench.store import StoreError
    from raybench.subsets import memorization_report, summary_lines

    try:
        summary, png = memorization_report(out)
    except StoreError as err:
        raise click.UsageError(str(err)) from err
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True))
        return
    for line in summary_lines(summary):
        click.echo(line)
    click.echo(f"histogram: {png}")


@main.command("reduce")
@click.argument("out")
@click.option("--kl-direction", type=click.Choice(DIRECTIONS), default=DIRECTIONS[0], show_default=True,
              help="KL(unlearned ‖ oracle), the published KLOM; or oracle-unlearned, what DUB's run.py prints "
                   "(rows then carry klom_version '…+oracle-unlearned').")
@click.option("--n-boot", type=click.IntRange(0, 100_000), default=None,
              help="Half-sample replicates of the P95 / mean intervals (default 200; 0: no interval, faster).")
@click.option("--select", type=click.Choice(list(RULES)), help=SELECT_HELP)
def reduce_command(out: str, kl_direction: str, n_boot: int | None, select: str | None) -> None:
    """Recompute summary.csv / summary.json (and report.html) of a run folder from its Parquet margins alone."""
    from raybench.pipeline import summarize
    from raybench.report import summary_table
    from raybench.store import RunStore, StoreError

    try:
        summary, _ = summarize(RunStore(out), direction=kl_direction, n_boot=n_boot, select=select)
    except StoreError as err:
        raise click.UsageError(str(err)) from err
    click.echo(summary_table(summary["rows"]))


@main.command("report")
@click.argument("out")
def report_command(out: str) -> None:
    """Print a run folder's summary table and rewrite its report.html and plots, from summary.json (nothing
    is recomputed)."""
    from raybench.reduce import read_summary
    from raybench.report import summary_table, write_report
    from raybench.store import RunStore, StoreError

    try:
        store = RunStore(out)
        summary = read_summary(store)
        page = write_report(store, summary)
    except StoreError as err:
        raise click.UsageError(str(err)) from err
    click.echo(summary_table(summary["rows"]))
    click.echo(f"\nrun {summary['run']} · KLOM {summary['klom_version']} · {page}")


def _import_options(fn):
    options = [
        click.option("--forget-sets", required=True, help="Comma-separated forget-set ids of the source, e.g. 2,5 "
                     "('' for originals alone)."),
        click.option("--n-models", type=int, default=100, show_default=True,
                     help="Originals to import (the source's model ids 0..N-1)."),
        click.option("--n-oracles", type=int, help="Oracles per forget set that score them (ids 0..K-1; default N)."),
        click.option("--out", required=True, help="Run folder to write: a path or a pyarrow URI (s3://, gs://)."),
        click.option("--matching-oracles", type=int, default=0, show_default=True,
                     help="Also import oracles K..K+M-1 of every forget set, with their state dicts: the targets of "
                          "oracle matching (a later `raybench run` on this folder reuses them)."),
        click.option("--checkpoints", is_flag=True,
                     help="Also store the originals' published state dicts, stacked per block (what unlearning "
                          "starts from)."),
        click.option("--data-root", type=click.Path(file_okay=False),
                     help="CIFAR-10 folder (as `raybench run --data-root`): with --checkpoints, first check that "
                          "published state dicts reproduce the published margins on these images (without it the "
                          "check is not done); where the source publishes logits, also the top-1 margins."),
        click.option("--block-size", type=int, default=50, show_default=True,
                     help="Models per stored unit; `raybench run` on the same folder must use the same."),
        click.option("--chunk-size", type=int, default=8192, show_default=True, help="Samples per Parquet row."),
        click.option("--cache-dir", type=click.Path(file_okay=False), help="Hugging Face cache for downloads."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@main.command("import")
@click.argument("source", type=click.Choice(["easydub", "klom-models"]))
@click.option("--from", "location", default="", help="A local folder in the source's hub layout, or a hub repo id "
              "(default: the source's own repo); only the needed files are downloaded.")
@click.option("--floor/--no-floor", default=True, show_default=True,
              help="Also import N more oracles per forget set (after the scoring and matching oracles, never shared "
                   "with them) as method 'oracle_floor': the oracle-vs-oracle noise floor.")
@click.option("--variant", type=click.Choice(["CIFAR10", "CIFAR10_augmented", "LIVING17"]),
              help="klom-models only: which full_models folder holds the originals (default CIFAR10; the other two "
                   "have no published oracles: give --forget-sets '' to import their originals alone).")
@_import_options
def import_command(source: str, location: str, floor: bool, variant: str | None, **options: object) -> None:
    """Write a published source's originals and oracles into a run folder, ready for `raybench reduce` (scores
    do_nothing as the publisher's evaluation does) or `raybench run --source SOURCE:FROM` (runs the methods)."""
    _import(source, location, floor, variant=variant, **options)


@main.command("import-easydub")
@click.option("--source", "location", required=True,
              help="A local folder in the EasyDUB hub layout, or a hub repo id (e.g. easydub/EasyDUB-dataset): "
                   "only the needed files are downloaded.")
@click.option("--oracle-floor", "floor", is_flag=True,
              help="Also import oracles K+M..K+M+N-1 (after the scoring and matching oracles, never shared with "
                   "them) as method 'oracle_floor': the oracle-vs-oracle noise floor.")
@_import_options
def import_easydub_command(location: str, floor: bool, **options: object) -> None:
    """`raybench import easydub --from SOURCE`, under its first name (the floor off unless --oracle-floor)."""
    _import("easydub", location, floor, **options)


def _import(source: str, location: str, floor: bool, *, forget_sets: str, n_models: int, n_oracles: int | None,
            out: str, matching_oracles: int, checkpoints: bool, data_root: str | None, block_size: int,
            chunk_size: int, cache_dir: str | None, variant: str | None = None) -> None:
    from raybench.config import ConfigError
    from raybench.data import load_dataset
    from raybench.pipeline import import_source
    from raybench.store import StoreError

    ids = [s.strip() for s in forget_sets.split(",") if s.strip()]
    try:
        images = load_dataset("cifar10", data_root) if data_root else None
    except ValueError as err:  # CIFAR-10 missing and offline, corrupted files (as `raybench run`)
        raise click.UsageError(str(err)) from err
    try:
        report = import_source(source, location, ids, n_models, out, n_oracles=n_oracles,
                               matching_oracles=matching_oracles, floor=floor, checkpoints=checkpoints,
                               block_size=block_size, chunk_size=chunk_size, images=images, cache_dir=cache_dir,
                               variant=variant)
    except (ConfigError, StoreError) as err:
        raise click.UsageError(str(err)) from err
    sizes = ", ".join(f"{fs} ({n})" for fs, n in report.forget_set_sizes.items())
    click.echo(f"run {report.run_id} in {report.out}: {len(report.units_written)} units written, "
               f"{len(report.units_skipped)} already there; {n_models} models, {report.n_train} train / "
               f"{report.n_val} val samples; forget sets {sizes}")
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"next: raybench reduce {report.out}")


@main.command("score")
@click.option("--unlearned", "folder", required=True,
              help="Folder of .npy margins (models × samples): retain.npy (train ids outside the forget set, "
                   "ascending), forget.npy (the forget set's order), val.npy (data-set order); optionally "
                   "retain_top1.npy, forget_top1.npy, val_top1.npy for accuracy.")
@click.option("--against", required=True, help="Run folder whose oracles score them (trained or imported).")
@click.option("--forget-set", required=True, help="Forget-set id of that run (forget_sets/<id>.json).")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="CSV to write, in summary.csv's format.")
@click.option("--method", default="external", show_default=True, help="Method name in the rows.")
@click.option("--params", default="{}", show_default=True, help="Method parameters in the rows (a JSON object).")
@click.option("--epoch", type=click.IntRange(min=0), help="Epoch in the rows (default: empty, unknown).")
def score_command(folder: str, against: str, forget_set: str, out: str, method: str, params: str,
                  epoch: int | None) -> None:
    """Score margins computed elsewhere against a run's oracles of one forget set: the summary rows a run
    would have for them (KLOM and accuracy per split), written to --out and printed."""
    import os

    from raybench.reduce import summary_csv
    from raybench.report import summary_table
    from raybench.score import score_folder
    from raybench.sources.base import SourceError
    from raybench.store import StoreError

    try:
        rows = score_folder(folder, against, forget_set, method=method, params=params, epoch=epoch)
    except (SourceError, StoreError) as err:
        raise click.UsageError(str(err)) from err
    path = Path(out)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:  # a complete file or none: a half-written CSV would read as a shorter result
        tmp.write_text(summary_csv(rows), newline="")
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise click.UsageError(f"cannot write {out}: {err}") from err
    click.echo(summary_table([{**r, "epoch": "-" if r["epoch"] is None else r["epoch"]} for r in rows]))
    click.echo(f"\nscored against run {rows[0]['run']} (forget set {forget_set}); rows in {out}")


@main.command("compare")
@click.argument("out")
@click.argument("a")
@click.argument("b")
@click.option("--params-a", help="Row A's parameters as a JSON object, where its method was swept.")
@click.option("--params-b", help="Row B's parameters as a JSON object.")
@click.option("--n-boot", type=click.IntRange(1, 1_000_000), default=2000, show_default=True,
              help="Paired-bootstrap replicates of the mean difference.")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True)
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Also write the results here (CSV).")
def compare_command(out: str, a: str, b: str, params_a: str | None, params_b: str | None, n_boot: int, seed: int,
                    csv_path: str | None) -> None:
    """Compare rows A and B (METHOD[@EPOCH]) of a run folder sample by sample, per forget set and split: mean
    per-sample KLOM of each, the mean difference A - B with its paired-bootstrap 95% interval, and the Wilcoxon
    signed-rank p-value (docs/metrics.md#comparing-two-methods)."""
    import csv

    from raybench.compare import COMPARE_COLUMNS, compare, parse_row
    from raybench.store import RunStore, StoreError

    try:
        results = compare(RunStore(out), parse_row(a, params_a), parse_row(b, params_b), n_boot=n_boot, seed=seed)
    except StoreError as err:
        raise click.UsageError(str(err)) from err
    click.echo(f"{'forget':>6} {'split':<7} {'mean A':>8} {'mean B':>8} {'A - B':>8} {'95% interval':>20} "
               f"{'A lower':>8} {'Wilcoxon p':>11}")
    for r in results:
        p = "-" if r["wilcoxon_p"] is None else f"{r['wilcoxon_p']:.3g}"
        click.echo(f"{r['forget_set']:>6} {r['split']:<7} {r['mean_a']:8.3f} {r['mean_b']:8.3f} {r['mean_diff']:8.3f} "
                   f"{'[' + format(r['diff_ci_low'], '.3f') + ', ' + format(r['diff_ci_high'], '.3f') + ']':>20} "
                   f"{r['share_a_lower']:8.2f} {p:>11}")
    if csv_path:
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COMPARE_COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(results)


@main.command("convergence")
@click.argument("out")
@click.option("--n", "sizes", metavar="N1,N2,…",
              help="Ensemble sizes to draw (default 10, 25, 50, 100, 250, … below the run's N); the run's N, where "
                   "the one draw is every model, is always added.")
@click.option("--draws", type=click.IntRange(1, 1000), default=10, show_default=True,
              help="Draws of models per size below the run's N.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the draws.")
def convergence_command(out: str, sizes: str | None, draws: int, seed: int) -> None:
    """P95 KLOM per split at growing N, subsampling the models of every ensemble of a run folder's summary and
    its oracles: writes convergence.csv, convergence.json (every draw) and plots/convergence.png."""
    import time

    from raybench.convergence import ConvergenceError, convergence, write_convergence
    from raybench.store import RunStore, StoreError

    grid = None
    if sizes is not None:
        try:
            grid = [int(v) for v in sizes.split(",")]
        except ValueError:
            raise click.UsageError(f"--n must be comma-separated integers like 10,25,50, got {sizes!r}") from None
    t0 = time.perf_counter()
    try:
        store = RunStore(out)
        store.require_folder()
        result = convergence(store, grid=grid, draws=draws, seed=seed)
        paths = write_convergence(store, result)
    except (StoreError, ConvergenceError) as err:
        raise click.UsageError(str(err)) from err
    by_key: dict[tuple, dict[int, float]] = {}
    for r in result.rows:
        key = (r["forget_set"], r["method"], r["params"], r["epoch"], r["split"])
        by_key.setdefault(key, {})[r["n_models"]] = r["klom_p95"]
    ns = result.record["grid"]
    click.echo(f"{'forget':>6} {'method':<16} {'params':<24} {'ep':>3} {'split':<6} "
               + " ".join(f"{'N=' + str(n):>8}" for n in ns))
    for (fs, method, params, epoch, split), values in by_key.items():
        short = ",".join(f"{k}={v}" for k, v in json.loads(params).items()) or "-"
        short = short if len(short) <= 24 else short[:23] + "…"
        click.echo(f"{fs:>6} {method:<16} {short:<24} {epoch:>3} {split:<6} "
                   + " ".join(f"{values[n]:>8.3f}" for n in ns))
    click.echo(f"\nP95 KLOM, mean over {draws} draws below N = {ns[-1]} (seed {seed}); "
               f"{time.perf_counter() - t0:.1f} s; written: {', '.join(paths)}")


@main.command("methods")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON list: name, version, description, defaults, default_epochs and each parameter's "
                   "type and range.")
def methods_command(as_json: bool) -> None:
    """List the registered unlearning methods, one per line: name, version, description."""
    from raybench.methods import available_methods

    methods = available_methods().values()
    if as_json:
        click.echo(json.dumps([{
            "name": m.name, "version": m.version, "description": m.description, "defaults": m.defaults,
            "default_epochs": list(m.default_epochs),
            "params": {k: (c.to_dict() if (c := m.spec_of(k)) else None) for k in m.defaults},
        } for m in methods], indent=2))
        return
    for method in methods:
        click.echo(f"{method.name:<18} v{method.version:<3} {method.description}")


if __name__ == "__main__":
    main()
