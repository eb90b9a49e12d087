"""The ``raybench`` command line (click).

Bad input exits with code 2 and a one-line message (click's convention for usage errors), never a traceback:
a researcher scripting many runs must be able to tell "you asked for something wrong" from "it crashed".
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click
import numpy as np

from raybench.metrics import KLOM_VERSION, VARIANTS, klom_details, summarize


def _load_matrix(path: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise click.BadParameter(f"cannot read {path} as a .npy array: {err}") from err


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """raybench: does an unlearning method make models indistinguishable from retrained ones? (KLOM)"""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.command("klom")
@click.argument("unlearned", type=click.Path(exists=True, dir_okay=False))
@click.argument("oracle", type=click.Path(exists=True, dir_okay=False))
@click.option("--variant", type=click.Choice(VARIANTS), default="easydub", show_default=True)
@click.option("--bins", type=int, default=20, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), help="Also write the per-sample KLOM here (.npy).")
def klom_command(unlearned: str, oracle: str, variant: str, bins: int, out: str | None) -> None:
    """KLOM of two margin matrices (.npy, shape models x samples): per-sample values and their summary."""
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


if __name__ == "__main__":
    main()
