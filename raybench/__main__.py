"""``python -m raybench …``: the CLI, for job entrypoints and environments without the console script."""

from raybench.cli import main

main()
