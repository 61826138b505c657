"""The GRPO objective: group advantages (method.md 4.6) and the clipped surrogate with a KL penalty
to the reference policy and an entropy bonus (method.md 4.7). Pure jnp, jit-friendly.

Per valid response token t of sequence i (ρ = exp(logπ_θ − logπ_old)):
  l_t = max(−A_i ρ, −A_i clip(ρ, 1−ε, 1+ε_high))  − ent_coef · H_t  + kl_coef · KL_t
and the loss is an aggregation of l_t over the micro-batch (`GRPOLossConfig.aggregation`).

Micro-batching contract. `grpo_loss` returns `(loss_sum, count, metrics)` for one micro-batch; how
the trainer turns micro-batches into the loss of one optimizer step depends on the aggregation:

  aggregation               loss_sum / count per micro-batch          step loss
  token_mean (paper, verl)  Σ_tokens l_t  /  #valid tokens            mean over micro-batches of
                                                                      loss_sum / count
    with seq_weight_b w     Σ_seqs w_i Σ_t l_t  /  #valid tokens      Σ loss_sum
    (w_i = 1 / (tokens of i's block · #blocks), `token_mean_weights`: the mean over blocks of
    token_mean_seqs consecutive sequences, in prompt-major rollout order, of each block's mean)
  token_sum_global          Σ_tokens l_t  /  #valid tokens            Σ loss_sum / Σ count
  seq_mean_token_mean       Σ_seqs mean_t(l_t)  /  #non-empty seqs    Σ loss_sum / Σ count
  seq_mean_token_sum_norm   Σ_seqs Σ_t l_t / L  /  #non-empty seqs    Σ loss_sum / Σ count
  (Dr.GRPO; L = cfg.norm_length, default the padded length T)

`combine_microbatches` computes the step loss from the lists of sums and counts. For gradient
accumulation, differentiate `loss_sum * accumulation_scale(cfg, count, num_microbatches, total)`
per micro-batch and add the gradients: the sum equals the gradient of the step loss exactly.
`total` is `Σ aggregation_count(mask)` over the step's micro-batches (known before the update;
unused by token_mean).

token_mean is verl's loss (method.md 4.7): the token mean of each GPU's micro-batch of 8
sequences, divided by the accumulation steps, gradients averaged over the GPUs, i.e. the mean
over the step's 8-sequence blocks of each block's token mean. With token_mean_seqs = 8 the trainer
(train/steps.py) fixes the blocks by rollout order (verl's per-GPU micro-batches are consecutive
slices of the batch) and passes seq_weight_b, so the loss is the same on any mesh and for any
compute micro-batch (`grpo.micro_batch`, which only sets how many sequences one forward runs over
the whole mesh). token_mean_seqs = 0 is the older rule, the token mean of each compute
micro-batch (one update call of packed streams): it depends on the mesh, on micro_batch and on
grpo.pack_rows.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from cqr_jax.objectives.registry import Registry

KL_ESTIMATORS: Registry = Registry("KL estimator")
POLICY_LOSSES: Registry = Registry("policy loss")
AGGREGATIONS: Registry = Registry("loss aggregation")

# Aggregations whose step loss is Σ sums / Σ counts over micro-batches (all but token_mean).
_GLOBAL = ("token_sum_global", "seq_mean_token_mean", "seq_mean_token_sum_norm")


@dataclasses.dataclass(frozen=True)
class GRPOLossConfig:
  """Loss settings; defaults are the paper's (method.md 4.4, 4.7).

  clip_eps / clip_eps_high: ρ is clipped to [1 − clip_eps, 1 + clip_eps_high] (None = clip_eps).
  dual_clip: c > 1 bounds the loss of negative-advantage tokens at −A·c (None = off, the paper).
  kl_estimator: "k3" (= verl low_var_kl, clamped to [−10, 10]), "k1" (= kl) or "k2" (= mse).
  log_ratio_clamp: logπ_θ − logπ_old is clamped to ±this before exp (verl uses 20).
  norm_length: the constant L of seq_mean_token_sum_norm (None = the padded length T; set it to
    the maximum response length when batches are length-bucketed, so L stays constant).
  token_mean_seqs: token_mean's block, K consecutive sequences (verl's micro-batch per GPU, 8);
    0 = each compute micro-batch is a block (module docstring).
  """

  policy_loss: str = "ppo_clip"
  clip_eps: float = 0.2
  clip_eps_high: float | None = None
  dual_clip: float | None = None
  kl_coef: float = 0.001
  kl_estimator: str = "k3"
  entropy_coef: float = 0.001
  aggregation: str = "token_mean"
  norm_length: int | None = None
  log_ratio_clamp: float = 20.0
  token_mean_seqs: int = 8

  def __post_init__(self):
    POLICY_LOSSES.canonical(self.policy_loss)
    KL_ESTIMATORS.canonical(self.kl_estimator)
    AGGREGATIONS.canonical(self.aggregation)
    if self.clip_eps <= 0 or (self.clip_eps_high is not None and self.clip_eps_high <= 0):
      raise ValueError(f"GRPOLossConfig.clip_eps must be > 0, got {self.clip_eps}, "
                       f"clip_eps_high={self.clip_eps_high}")
    if self.dual_clip is not None and self.dual_clip <= 1.0:
      raise ValueError(f"GRPOLossConfig.dual_clip must be > 1 (or None), got {self.dual_clip}")
    if self.norm_length is not None and self.norm_length <= 0:
      raise ValueError(f"GRPOLossConfig.norm_length must be > 0, got {self.norm_length}")
    if self.token_mean_seqs < 0:
      raise ValueError(f"GRPOLossConfig.token_mean_seqs must be >= 0, got {self.token_mean_seqs}")

  @property
  def blocks(self) -> bool:
    """Whether the trainer weights sequences by `token_mean_weights` (token_mean over fixed
    blocks of token_mean_seqs sequences) rather than taking each micro-batch's token mean."""
    return AGGREGATIONS.canonical(self.aggregation) == "token_mean" and self.token_mean_seqs > 0


# ----------------------------------------------------------------------------------- advantages

def group_advantages(rewards_n: jax.Array, group_size: int, eps: float = 1e-6,
                     scale_by_std: bool = True) -> jax.Array:
  """A = (r − group mean) / (group std with N−1 + eps) (method.md 4.6).

  rewards_n: [B*G], prompt-major (sample i*G + j belongs to prompt i). A group of size 1 uses
  mean 0 and std 1, as verl does; an all-equal group gets A = 0. `scale_by_std=False` drops the
  division (Dr.GRPO).
  """
  rewards_n = jnp.asarray(rewards_n, jnp.float32)
  if rewards_n.ndim != 1 or rewards_n.shape[0] % group_size:
    raise ValueError(f"rewards_n must be 1-D with a length divisible by group_size={group_size}, "
                     f"got shape {rewards_n.shape}")
  r_bg = rewards_n.reshape(-1, group_size)  # [B, G]
  if group_size == 1:
    return (r_bg / (1.0 + eps) if scale_by_std else r_bg).reshape(-1)
  # Centre on each group's first reward before the mean: the shift is exact, so an all-equal
  # group is exactly 0 here (a float32 mean of 16 copies of 16/9 is off by one ulp, and the
  # division by (std + eps) would blow that up into a sizeable advantage).
  d_bg = r_bg - r_bg[:, :1]
  d_bg = d_bg - d_bg.mean(axis=1, keepdims=True)
  d_bg = jnp.where(jnp.all(r_bg == r_bg[:, :1], axis=1, keepdims=True), 0.0, d_bg)
  if scale_by_std:
    sd_b1 = jnp.sqrt(jnp.sum(d_bg * d_bg, axis=1, keepdims=True) / (group_size - 1))
    d_bg = d_bg / (sd_b1 + eps)
  return d_bg.reshape(-1)


# ------------------------------------------------------------------------------- KL estimators
# Each maps (logp_bt, ref_logp_bt) to a per-token estimate of KL(π_θ || π_ref).

@KL_ESTIMATORS.register("k1", "kl")
def kl_k1(logp_bt, ref_logp_bt):
  return logp_bt - ref_logp_bt


@KL_ESTIMATORS.register("k2", "mse")
def kl_k2(logp_bt, ref_logp_bt):
  return 0.5 * jnp.square(logp_bt - ref_logp_bt)


@KL_ESTIMATORS.register("k3", "low_var_kl")
def kl_k3(logp_bt, ref_logp_bt):
  """exp(d) − d − 1 with d = logπ_ref − logπ_θ, clamped to [−10, 10] (method.md 4.7).

  d itself is clamped to ±20 first: that changes no value (the result is clamped anyway) but keeps
  the gradient finite where exp(d) would overflow.
  """
  d_bt = jnp.clip(ref_logp_bt - logp_bt, -20.0, 20.0)
  return jnp.clip(jnp.exp(d_bt) - d_bt - 1.0, -10.0, 10.0)


# ------------------------------------------------------------------------------- policy losses
# Each maps (log_ratio_bt, adv_b1, cfg) to (loss_bt, clipped_bt, dual_clipped_bt).

@POLICY_LOSSES.register("ppo_clip", "vanilla")
def ppo_clip(log_ratio_bt, adv_b1, cfg: GRPOLossConfig):
  """PPO clipped surrogate (method.md 4.7), with optional clip-higher and dual clip."""
  ratio_bt = jnp.exp(log_ratio_bt)
  hi = cfg.clip_eps if cfg.clip_eps_high is None else cfg.clip_eps_high
  l1_bt = -adv_b1 * ratio_bt
  l2_bt = -adv_b1 * jnp.clip(ratio_bt, 1.0 - cfg.clip_eps, 1.0 + hi)
  loss_bt = jnp.maximum(l1_bt, l2_bt)
  clipped_bt = l2_bt > l1_bt
  dual_bt = jnp.zeros_like(clipped_bt)
  if cfg.dual_clip is not None:
    l3_bt = -adv_b1 * cfg.dual_clip
    neg_b1 = adv_b1 < 0
    dual_bt = neg_b1 & (l3_bt < loss_bt)
    loss_bt = jnp.where(neg_b1, jnp.minimum(loss_bt, l3_bt), loss_bt)
  return loss_bt, clipped_bt, dual_bt


@POLICY_LOSSES.register("pg")
def plain_pg(log_ratio_bt, adv_b1, cfg: GRPOLossConfig):
  """Unclipped importance-weighted policy gradient, −A·ρ."""
  del cfg
  loss_bt = -adv_b1 * jnp.exp(log_ratio_bt)
  no_bt = jnp.zeros(loss_bt.shape, bool)
  return loss_bt, no_bt, no_bt


# -------------------------------------------------------------------------------- aggregations
# Each maps (loss_bt, mask_bt float, cfg) to (loss_sum, count); see the module docstring.

def _seq_count(mask_bt):
  return jnp.sum((mask_bt.sum(axis=1) > 0).astype(jnp.float32))


@AGGREGATIONS.register("token_mean")
def agg_token_mean(loss_bt, mask_bt, cfg):
  del cfg
  return jnp.sum(loss_bt * mask_bt), jnp.sum(mask_bt)


@AGGREGATIONS.register("token_sum_global")
def agg_token_sum_global(loss_bt, mask_bt, cfg):
  del cfg
  return jnp.sum(loss_bt * mask_bt), jnp.sum(mask_bt)


@AGGREGATIONS.register("seq_mean_token_mean")
def agg_seq_mean_token_mean(loss_bt, mask_bt, cfg):
  del cfg
  len_b = mask_bt.sum(axis=1)
  per_seq_b = jnp.sum(loss_bt * mask_bt, axis=1) / jnp.maximum(len_b, 1.0)
  return jnp.sum(per_seq_b), _seq_count(mask_bt)


@AGGREGATIONS.register("seq_mean_token_sum_norm", "drgrpo")
def agg_seq_mean_token_sum_norm(loss_bt, mask_bt, cfg):
  norm = float(loss_bt.shape[1] if cfg.norm_length is None else cfg.norm_length)
  return jnp.sum(loss_bt * mask_bt) / norm, _seq_count(mask_bt)


def aggregation_count(mask_bt: jax.Array, cfg: GRPOLossConfig) -> jax.Array:
  """The `count` that `grpo_loss` returns for this mask (sum it over micro-batches for `total`)."""
  mask_bt = jnp.asarray(mask_bt, jnp.float32)
  if AGGREGATIONS.canonical(cfg.aggregation) in ("token_mean", "token_sum_global"):
    return jnp.sum(mask_bt)
  return _seq_count(mask_bt)


def token_mean_weights(mask_nt: jax.Array, block: int) -> jax.Array:
  """[N] weight of each sequence of a step (prompt-major rollout order) in the token mean over
  blocks of `block` consecutive sequences: 1 / (valid tokens of its block · number of blocks).
  The last block may be shorter; a block without tokens counts in the number of blocks (as an
  empty verl micro-batch does) and weighs nothing."""
  len_n = jnp.sum(jnp.asarray(mask_nt, jnp.float32), axis=-1)
  n = len_n.shape[0]
  num = -(-n // block)
  block_n = jnp.arange(n) // block
  tokens_k = jax.ops.segment_sum(len_n, block_n, num_segments=num)
  return 1.0 / (jnp.maximum(tokens_k, 1.0)[block_n] * num)


def accumulation_scale(cfg: GRPOLossConfig, count, num_microbatches: int, total_count=None):
  """Factor on a micro-batch's loss_sum so that summed gradients equal the step loss's gradient."""
  if AGGREGATIONS.canonical(cfg.aggregation) == "token_mean":
    return 1.0 / (jnp.maximum(count, 1.0) * num_microbatches)
  if total_count is None:
    raise ValueError(f"aggregation {cfg.aggregation!r} needs total_count (sum of "
                     "aggregation_count over the step's micro-batches)")
  return 1.0 / jnp.maximum(total_count, 1.0)


def combine_microbatches(sums: Sequence, counts: Sequence, cfg: GRPOLossConfig):
  """The step loss from per-micro-batch (loss_sum, count) pairs (module docstring table)."""
  sums, counts = jnp.asarray(sums, jnp.float32), jnp.asarray(counts, jnp.float32)
  if AGGREGATIONS.canonical(cfg.aggregation) == "token_mean":
    return jnp.mean(sums / jnp.maximum(counts, 1.0))
  return jnp.sum(sums) / jnp.maximum(jnp.sum(counts), 1.0)


# ------------------------------------------------------------------------------------ the loss

def grpo_loss(logp_bt, old_logp_bt, ref_logp_bt, entropy_bt, adv_b, mask_bt,
              cfg: GRPOLossConfig = GRPOLossConfig(), seq_weight_b=None):
  """Loss = L_pg − entropy_coef·L_ent + kl_coef·L_kl for one micro-batch (method.md 4.7).

  Args:
    logp_bt: [B, T] log π_θ of the sampled tokens (logits / rollout temperature, method.md 4.5).
    old_logp_bt: [B, T] log π_old (the rollout policy; equals logp_bt for the paper's one update).
    ref_logp_bt: [B, T] log π_ref, or None when kl_coef == 0.
    entropy_bt: [B, T] entropy of the tempered π_θ, or None when entropy_coef == 0.
    adv_b: [B] sequence advantages (`group_advantages`), broadcast to every token.
    mask_bt: [B, T] 1 for response tokens up to and including the first EOS.
    seq_weight_b: [B] `token_mean_weights` of these sequences (token_mean only): loss_sum is
      then Σ_b w_b Σ_t l_bt, this micro-batch's share of the step loss (accumulate the
      gradients with factor 1). None: the micro-batch is one block (verl's loss on one GPU's
      micro-batch; accumulate with `accumulation_scale`).
  Returns:
    (loss_sum, count, metrics): combine micro-batches as the module docstring says. metrics holds
    sums, counts, maxima and minima only; `finalize_metrics` turns (merged) metrics into means.
  """
  f32 = jnp.float32
  logp_bt, old_logp_bt = logp_bt.astype(f32), old_logp_bt.astype(f32)
  mask_bt = jnp.asarray(mask_bt).astype(f32)
  adv_b1 = jnp.asarray(adv_b, f32)[:, None]
  if adv_b1.shape[0] != logp_bt.shape[0] or mask_bt.shape != logp_bt.shape:
    raise ValueError(f"grpo_loss: logp_bt {logp_bt.shape}, mask_bt {mask_bt.shape} and adv_b "
                     f"{jnp.shape(adv_b)} disagree")

  log_ratio_bt = jnp.clip(logp_bt - old_logp_bt, -cfg.log_ratio_clamp, cfg.log_ratio_clamp)
  pg_bt, clipped_bt, dual_bt = POLICY_LOSSES.get(cfg.policy_loss)(log_ratio_bt, adv_b1, cfg)
  loss_bt = pg_bt
  zeros_bt = jnp.zeros_like(logp_bt)
  ent_bt = zeros_bt if entropy_bt is None else entropy_bt.astype(f32)
  if cfg.entropy_coef:
    if entropy_bt is None:
      raise ValueError("grpo_loss: entropy_coef != 0 needs entropy_bt")
    loss_bt = loss_bt - cfg.entropy_coef * ent_bt
  kl_bt = zeros_bt
  if ref_logp_bt is not None:
    kl_bt = KL_ESTIMATORS.get(cfg.kl_estimator)(logp_bt, ref_logp_bt.astype(f32))
  if cfg.kl_coef:
    if ref_logp_bt is None:
      raise ValueError("grpo_loss: kl_coef != 0 needs ref_logp_bt")
    loss_bt = loss_bt + cfg.kl_coef * kl_bt
  if seq_weight_b is not None:
    if AGGREGATIONS.canonical(cfg.aggregation) != "token_mean":
      raise ValueError(f"grpo_loss: seq_weight_b is for token_mean, not {cfg.aggregation!r}")
    w_b1 = jnp.asarray(seq_weight_b, f32)[:, None]
    loss_sum, count = jnp.sum(loss_bt * mask_bt * w_b1), jnp.sum(mask_bt)
  else:
    loss_sum, count = AGGREGATIONS.get(cfg.aggregation)(loss_bt, mask_bt, cfg)

  sg = jax.lax.stop_gradient
  ratio_bt = jnp.exp(sg(log_ratio_bt))
  valid_bt = mask_bt > 0
  msum = lambda x: jnp.sum(sg(x).astype(f32) * mask_bt)  # noqa: E731
  metrics = {
      "token_count": jnp.sum(mask_bt),
      "seq_count": _seq_count(mask_bt),
      "pg_loss_sum": msum(pg_bt),
      "kl_sum": msum(kl_bt),
      "entropy_sum": msum(ent_bt),
      "clipfrac_sum": msum(clipped_bt),
      "dual_clipfrac_sum": msum(dual_bt),
      "ratio_sum": msum(ratio_bt),
      "ratio_max": jnp.max(jnp.where(valid_bt, ratio_bt, -jnp.inf)),
      "ratio_min": jnp.min(jnp.where(valid_bt, ratio_bt, jnp.inf)),
  }
  return loss_sum, count, metrics


def merge_metrics(a: dict, b: dict) -> dict:
  """Merges two raw metric dicts (sums and counts add, *_max / *_min take the max / min)."""
  out = {}
  for k in a:
    if k.endswith("_max"):
      out[k] = jnp.maximum(a[k], b[k])
    elif k.endswith("_min"):
      out[k] = jnp.minimum(a[k], b[k])
    else:
      out[k] = a[k] + b[k]
  return out


def finalize_metrics(raw: dict) -> dict:
  """Token means from raw sums: pg_loss, kl, entropy, clipfrac, dual_clipfrac, ratio_mean."""
  n = jnp.maximum(raw["token_count"], 1.0)
  out = dict(raw)
  for k in ("pg_loss", "kl", "entropy", "clipfrac", "dual_clipfrac"):
    out[k] = raw[f"{k}_sum"] / n
  out["ratio_mean"] = raw["ratio_sum"] / n
  return out


def reduce_metrics(raws: Sequence[dict]) -> dict:
  """`finalize_metrics` of all micro-batches' raw metrics merged."""
  return finalize_metrics(functools.reduce(merge_metrics, raws))
