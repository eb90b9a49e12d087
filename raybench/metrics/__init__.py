"""Per-sample metrics (KLOM and the metrics beyond it) and their summaries."""

from raybench.metrics.bootstrap import (
    BootstrapDraws,
    BootstrapResult,
    bootstrap_draws,
    bootstrap_interval,
    klom_bootstrap,
    klom_replicates,
)
from raybench.metrics.epsilon import (
    challenge_score,
    epsilon_points,
    forget_score,
    forget_score_from_epsilons,
    per_example_epsilon,
)
from raybench.metrics.iam import IamResult, iam_chunk, iam_moments, iam_scores, iam_signal, iam_split
from raybench.metrics.klom import DIRECTIONS, KLOM_VERSION, VARIANTS, KlomResult, klom, klom_details
from raybench.metrics.mia import SvcMiaResult, svc_mia_efficacy, ulira_auc, ulira_split
from raybench.metrics.summary import PERCENTILES, STAT_NAMES, summarize
from raybench.metrics.tow import TowResult, top1_accuracy, top1_correct, tug_of_war

__all__ = [
    "DIRECTIONS", "KLOM_VERSION", "VARIANTS", "KlomResult", "klom", "klom_details",
    "PERCENTILES", "STAT_NAMES", "summarize",
    "BootstrapDraws", "BootstrapResult", "bootstrap_draws", "bootstrap_interval", "klom_bootstrap", "klom_replicates",
    "challenge_score", "epsilon_points", "forget_score", "forget_score_from_epsilons", "per_example_epsilon",
    "IamResult", "iam_chunk", "iam_moments", "iam_scores", "iam_signal", "iam_split",
    "SvcMiaResult", "svc_mia_efficacy", "ulira_auc", "ulira_split",
    "TowResult", "top1_accuracy", "top1_correct", "tug_of_war",
]
