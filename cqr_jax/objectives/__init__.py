"""Training objectives: GRPO (method.md 4.6-4.7), SFT (method.md 3.3-3.4), tempered log-probs."""

from cqr_jax.objectives.grpo import (AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES, GRPOLossConfig,
                                     accumulation_scale, aggregation_count, combine_microbatches,
                                     finalize_metrics, group_advantages, grpo_loss, merge_metrics,
                                     reduce_metrics)
from cqr_jax.objectives.logprobs import logprobs_and_entropy, token_logprobs
from cqr_jax.objectives.sft import SFTBatch, sft_loss, sft_targets

__all__ = [
    "AGGREGATIONS", "KL_ESTIMATORS", "POLICY_LOSSES", "GRPOLossConfig", "accumulation_scale",
    "aggregation_count", "combine_microbatches", "finalize_metrics", "group_advantages",
    "grpo_loss", "merge_metrics", "reduce_metrics", "logprobs_and_entropy", "token_logprobs",
    "SFTBatch", "sft_loss", "sft_targets",
]
