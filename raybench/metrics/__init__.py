"""Per-sample metrics (KLOM) and their percentile summaries."""

from raybench.metrics.klom import KLOM_VERSION, VARIANTS, KlomResult, klom, klom_details
from raybench.metrics.summary import PERCENTILES, STAT_NAMES, summarize

__all__ = [
    "KLOM_VERSION", "VARIANTS", "KlomResult", "klom", "klom_details", "PERCENTILES", "STAT_NAMES", "summarize",
]
