"""raybench: a Ray-distributed benchmark runner for machine unlearning, scored with KLOM."""

__version__ = "0.1.0"
