"""raybench: a Ray-distributed benchmark runner for machine unlearning, scored with KLOM."""

__version__ = "0.1.0"

# score's module imports its dependencies inside the function (``import raybench`` stays cheap); importing it here
# keeps ``raybench.score`` the function, where a later ``import raybench.score`` would rebind it to the module
from raybench.score import score  # noqa: E402

__all__ = ["__version__", "score"]
