"""Rewards from the gold passage's retrieval rank (method.md 4.1).

Rank convention: 1-based rank of the best gold in the retriever's top-k list; -1 (or any value
<= 0) means no gold in the top k, and ranks above `RewardConfig.top_k` count as not found too.
A response that fails the format check gets `format_penalty` whatever its rank (paper Eq. 2).

Reward kinds (`RewardConfig.kind`), for a well-formatted response with rank ξ:
  rirs          (19 − ξ)/9 for ξ ≤ 10; (100 − ξ)/90 for 10 < ξ ≤ 100; 0 if not found (paper Eq. 1)
  exponential   e^(1 − ξ); 0 if not found (paper App. D)
  reciprocal    1/ξ; 0 if not found (paper App. D)
  mrr           1/ξ within the top k (the evaluation's reciprocal rank)
  ndcg@3        1/log2(ξ + 1) for ξ ≤ 3 over the ideal DCG of min(num_golds, 3) golds
  recall@10     1/num_golds for ξ ≤ 10; recall@100 likewise for ξ ≤ 100
  curriculum    repo's cur_cal_reward: in the first `curriculum_fraction` of training,
                1 − (ξ−1)/99 for ξ ≤ 100; later 1 − (ξ−1)/99 for ξ ≤ 10 and 0 for 10 < ξ ≤ 100;
                `curriculum_not_found` (−0.2) if not found. Needs step and total_steps.
The metric rewards see only the best gold's rank, so with several golds they are lower bounds of
the true NDCG@3 / recall (exact with one gold).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cqr_jax.objectives.registry import Registry

REWARDS: Registry = Registry("reward kind")
_USES_GOLDS = ("ndcg@3", "recall@10", "recall@100")


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """Reward settings; defaults are the paper's (method.md 4.1)."""

  kind: str = "rirs"
  format_penalty: float = -0.1
  top_k: int = 100
  curriculum_fraction: float = 0.25
  curriculum_not_found: float = -0.2

  def __post_init__(self):
    REWARDS.canonical(self.kind)
    if self.top_k < 1:
      raise ValueError(f"RewardConfig.top_k must be >= 1, got {self.top_k}")


@REWARDS.register("rirs", "rank_incentive")
def _rirs(rank, found, **_):
  r = np.where(rank <= 10, (19.0 - rank) / 9.0, (100.0 - rank) / 90.0)
  return np.where(found, r, 0.0)


@REWARDS.register("exponential", "exp")
def _exponential(rank, found, **_):
  return np.where(found, np.exp(1.0 - np.where(found, rank, 1)), 0.0)


@REWARDS.register("reciprocal")
def _reciprocal(rank, found, **_):
  return np.where(found, 1.0 / np.maximum(rank, 1), 0.0)


@REWARDS.register("mrr")
def _mrr(rank, found, **_):
  return np.where(found, 1.0 / np.maximum(rank, 1), 0.0)


@REWARDS.register("ndcg@3", "ndcg3")
def _ndcg3(rank, found, num_golds, **_):
  idcg = np.array([np.sum(1.0 / np.log2(np.arange(2, min(int(g), 3) + 2))) for g in num_golds])
  return np.where(found & (rank <= 3), 1.0 / np.log2(np.maximum(rank, 1) + 1.0) / idcg, 0.0)


@REWARDS.register("recall@10", "r@10")
def _recall10(rank, found, num_golds, **_):
  return np.where(found & (rank <= 10), 1.0 / num_golds, 0.0)


@REWARDS.register("recall@100", "r@100")
def _recall100(rank, found, num_golds, **_):
  return np.where(found & (rank <= 100), 1.0 / num_golds, 0.0)


@REWARDS.register("curriculum")
def _curriculum(rank, found, step, total_steps, cfg, **_):
  if step is None or total_steps is None:
    raise ValueError("reward kind 'curriculum' needs step and total_steps")
  lin = 1.0 - (rank - 1.0) / 99.0
  if step < cfg.curriculum_fraction * total_steps:
    r = np.where(rank <= 100, lin, 0.0)
  else:
    r = np.where(rank <= 10, lin, 0.0)
  return np.where(found, r, cfg.curriculum_not_found)


def compute_rewards(format_ok, ranks, cfg: RewardConfig = RewardConfig(), step: int | None = None,
                    total_steps: int | None = None, num_golds=None) -> np.ndarray:
  """Scalar reward per response (method.md 4.1), float32 [N].

  format_ok: [N] bool, the format check of each response; ranks: [N] int (see module docstring);
  num_golds: [N] int or None (= 1 each), used by ndcg@3 and recall rewards.
  """
  format_ok = np.asarray(format_ok)
  ranks = np.asarray(ranks)
  if format_ok.shape != ranks.shape or ranks.ndim != 1:
    raise ValueError(f"compute_rewards: format_ok {format_ok.shape} and ranks {ranks.shape} must "
                     "be 1-D of the same length")
  if ranks.size and not np.issubdtype(ranks.dtype, np.integer):
    raise ValueError(f"compute_rewards: ranks must be integers, got dtype {ranks.dtype}")
  kind = REWARDS.canonical(cfg.kind)
  golds = np.ones(ranks.shape, np.int64)
  if num_golds is not None and kind in _USES_GOLDS:
    golds = np.asarray(num_golds)
    if golds.shape != ranks.shape or (golds.size and golds.min() < 1):
      raise ValueError(f"compute_rewards: num_golds must be [N] ints >= 1 for reward kind "
                       f"{kind!r}, got {golds.tolist()}")
  rank = ranks.astype(np.float64)
  found = (ranks >= 1) & (ranks <= cfg.top_k)
  r = REWARDS.get(kind)(rank=rank, found=found, num_golds=golds.astype(np.float64),
                            step=step, total_steps=total_steps, cfg=cfg)
  return np.where(format_ok.astype(bool), r, cfg.format_penalty).astype(np.float32)


def rank_summary(format_ok, ranks, top_k: int = 100) -> dict[str, float]:
  """Batch statistics for logging: format-pass rate, MRR (misses and format failures count 0),
  and a rank histogram (fractions of all responses)."""
  ok = np.asarray(format_ok, bool)
  ranks = np.asarray(ranks)
  found = ok & (ranks >= 1) & (ranks <= top_k)
  n = max(len(ranks), 1)
  frac = lambda m: float(np.sum(m) / n)  # noqa: E731
  return {
      "format_pass": frac(ok),
      "mrr": float(np.sum(np.where(found, 1.0 / np.maximum(ranks, 1), 0.0)) / n),
      "rank_1": frac(found & (ranks == 1)),
      "rank_2_3": frac(found & (ranks >= 2) & (ranks <= 3)),
      "rank_4_10": frac(found & (ranks >= 4) & (ranks <= 10)),
      "rank_11_100": frac(found & (ranks >= 11)),
      "not_found": frac(ok & ~found),
      "format_fail": frac(~ok),
  }
