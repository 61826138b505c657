"""GRPO loss and gradient against an independent torch (float64) implementation of method.md 4.7.

Tolerance: JAX computes in float32, the reference in float64: rtol 2e-5, atol 1e-6 on the step
loss and on every gradient entry.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cqr_jax.objectives import grpo
from cqr_jax.objectives.grpo import GRPOLossConfig

RTOL, ATOL = 2e-5, 1e-6
B, G, T, N_MICRO = 4, 4, 12, 4  # 4 prompts x 4 samples, 4 micro-batches of 4 sequences


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  n = B * G
  lengths = rng.integers(3, T + 1, size=n)
  lengths[5] = 0  # a sequence with no valid token (padding row)
  mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
  logp = -rng.uniform(0.05, 4.0, size=(n, T))
  old = logp + rng.normal(0, 0.3, size=(n, T))  # many ratios outside [0.8, 1.2]
  old[:, 1] = logp[:, 1] - 1.3  # ratio 3.7 and 1.8: dual clip (c = 3 and 1.5) when A < 0
  old[:, 2] = logp[:, 2] - 0.6
  ref = logp + rng.normal(0, 0.5, size=(n, T))
  ref[0, :3] = logp[0, :3] + np.array([4.0, -15.0, 3.0])  # k3 clamp at 10 on both sides
  ent = rng.uniform(0.0, 3.0, size=(n, T))
  rewards = rng.choice([-0.1, 0.0, 0.5, 1.2, 2.0], size=n)
  rewards[4:8] = 1.0  # an all-equal group -> zero advantages
  return dict(logp=logp, old=old, ref=ref, ent=ent, rewards=rewards, mask=mask)


def _np_advantages(rewards, g, eps=1e-6):
  r = rewards.reshape(-1, g)
  if g == 1:
    return (r / (1.0 + eps)).reshape(-1)
  return ((r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + eps)).reshape(-1)


def _torch_step_loss(logp, old, ref, ent, adv, mask, cfg, n_micro):
  """The step loss the trainer minimises, written directly from method.md 4.7 (verl semantics)."""
  ratio = torch.exp(torch.clamp(logp - old, -20.0, 20.0))
  a = adv[:, None]
  hi = cfg.clip_eps if cfg.clip_eps_high is None else cfg.clip_eps_high
  if cfg.policy_loss == "pg":
    pg = -a * ratio
  else:
    pg = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - cfg.clip_eps, 1 + hi))
    if cfg.dual_clip is not None:
      pg = torch.where(a < 0, torch.minimum(pg, -a * cfg.dual_clip), pg)
  if cfg.kl_estimator == "k1":
    kl = logp - ref
  elif cfg.kl_estimator == "k2":
    kl = 0.5 * (logp - ref) ** 2
  else:
    d = ref - logp
    kl = torch.clamp(torch.exp(d) - d - 1, -10.0, 10.0)
  tok = pg - cfg.entropy_coef * ent + cfg.kl_coef * kl
  if cfg.aggregation == "token_mean":  # verl: micro-batch token mean / accumulation steps
    rows = torch.chunk(torch.arange(tok.shape[0]), n_micro)
    return sum((tok[r] * mask[r]).sum() / mask[r].sum() for r in rows) / n_micro
  if cfg.aggregation == "token_sum_global":
    return (tok * mask).sum() / mask.sum()
  lens = mask.sum(1)
  keep = lens > 0
  if cfg.aggregation == "seq_mean_token_mean":
    per_seq = (tok * mask).sum(1)[keep] / lens[keep]
  else:  # Dr.GRPO: token sum over a constant length
    norm = tok.shape[1] if cfg.norm_length is None else cfg.norm_length
    per_seq = (tok * mask).sum(1)[keep] / norm
  return per_seq.mean()


def _jax_micro(x, i):
  per = x.shape[0] // N_MICRO
  return x[i * per:(i + 1) * per]


def _jax_step_loss(logp, old, ref, ent, adv, mask, cfg):
  sums, counts = [], []
  for i in range(N_MICRO):
    m = lambda x: _jax_micro(x, i)  # noqa: E731
    s, c, _ = grpo.grpo_loss(m(logp), m(old), m(ref), m(ent), m(adv), m(mask), cfg)
    sums.append(s)
    counts.append(c)
  return grpo.combine_microbatches(jnp.stack(sums), jnp.stack(counts), cfg)


def _accumulated_grads(logp, ent, old, ref, adv, mask, cfg):
  """Gradient accumulation as the trainer does it: Σ_mb grad(loss_sum * accumulation_scale)."""
  total = sum(grpo.aggregation_count(_jax_micro(mask, i), cfg) for i in range(N_MICRO))
  g_logp, g_ent = [], []
  for i in range(N_MICRO):
    m = lambda x: _jax_micro(x, i)  # noqa: E731

    def obj(lp, en):
      s, c, _ = grpo.grpo_loss(lp, m(old), m(ref), en, m(adv), m(mask), cfg)
      return s * grpo.accumulation_scale(cfg, c, N_MICRO, total)

    gl, ge = jax.grad(obj, argnums=(0, 1))(m(logp), m(ent))
    g_logp.append(gl)
    g_ent.append(ge)
  return jnp.concatenate(g_logp), jnp.concatenate(g_ent)


def _check(cfg, seed=0):
  d = _inputs(seed)
  adv = _np_advantages(d["rewards"], G)
  j = {k: jnp.asarray(v, jnp.float32) for k, v in d.items()}
  j_adv = grpo.group_advantages(j["rewards"], G)
  np.testing.assert_allclose(np.asarray(j_adv), adv, rtol=1e-5, atol=1e-5)

  t = {k: torch.tensor(v, dtype=torch.float64) for k, v in d.items()}
  t_logp = t["logp"].clone().requires_grad_(True)
  t_ent = t["ent"].clone().requires_grad_(True)
  t_loss = _torch_step_loss(t_logp, t["old"], t["ref"], t_ent, torch.tensor(adv), t["mask"],
                            cfg, N_MICRO)
  t_loss.backward()

  args = (j["old"], j["ref"], j["ent"], j_adv, j["mask"])
  step = lambda lp, en: _jax_step_loss(lp, args[0], args[1], en, args[3], args[4], cfg)  # noqa
  loss, (g_logp, g_ent) = jax.value_and_grad(step, argnums=(0, 1))(j["logp"], j["ent"])
  np.testing.assert_allclose(float(loss), t_loss.item(), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(np.asarray(g_logp), t_logp.grad.numpy(), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(np.asarray(g_ent), t_ent.grad.numpy(), rtol=RTOL, atol=ATOL)

  a_logp, a_ent = _accumulated_grads(j["logp"], j["ent"], j["old"], j["ref"], j_adv, j["mask"],
                                     cfg)
  np.testing.assert_allclose(np.asarray(a_logp), t_logp.grad.numpy(), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(np.asarray(a_ent), t_ent.grad.numpy(), rtol=RTOL, atol=ATOL)
  assert np.abs(t_logp.grad.numpy()).max() > 0


@pytest.mark.parametrize("kl", ["k1", "k2", "k3"])
@pytest.mark.parametrize("agg", ["token_mean", "token_sum_global", "seq_mean_token_mean",
                                 "seq_mean_token_sum_norm"])
def test_loss_and_grad_match_reference(agg, kl):
  # Large coefficients so that the KL and entropy terms weigh in the comparison.
  _check(GRPOLossConfig(aggregation=agg, kl_estimator=kl, kl_coef=0.3, entropy_coef=0.05))


@pytest.mark.parametrize("cfg", [
    GRPOLossConfig(),  # the paper's defaults
    GRPOLossConfig(dual_clip=3.0, kl_coef=0.1),
    GRPOLossConfig(dual_clip=1.5, clip_eps_high=0.28, aggregation="token_sum_global"),
    GRPOLossConfig(aggregation="seq_mean_token_sum_norm", norm_length=20, kl_estimator="k2"),
    GRPOLossConfig(policy_loss="pg", kl_coef=0.0, entropy_coef=0.0),
], ids=["paper", "dual3", "dual1.5_high", "drgrpo_L20", "pg"])
def test_variants_match_reference(cfg):
  _check(cfg, seed=1)


def test_dual_clip_is_active_in_the_test_data():
  d = _inputs(1)
  adv = _np_advantages(d["rewards"], G)
  ratio = np.exp(d["logp"] - d["old"])
  assert np.sum((adv[:, None] < 0) & (ratio > 3.0) & (d["mask"] > 0)) > 0


def test_advantages_match_numpy():
  rng = np.random.default_rng(3)
  for g in (1, 2, 5, 8):
    r = rng.normal(size=6 * g).astype(np.float32)
    np.testing.assert_allclose(np.asarray(grpo.group_advantages(r, g)), _np_advantages(r, g),
                               rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(grpo.group_advantages(np.full(8, 2.0), 4)), 0.0)
  r = np.array([1.0, 2.0, 3.0, 4.0])
  np.testing.assert_allclose(np.asarray(grpo.group_advantages(r, 2, scale_by_std=False)),
                             [-0.5, 0.5, -0.5, 0.5])
  with pytest.raises(ValueError, match="divisible by group_size=3"):
    grpo.group_advantages(np.zeros(8), 3)


@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_all_equal_groups_get_exactly_zero_advantage(n):
  """Every value the rank reward can take (ranks 1..100, not found, format failure), as a group
  of n equal rewards: A = 0 exactly (method.md 4.6), with and without the std scaling."""
  from cqr_jax.rewards import RewardConfig, compute_rewards
  ranks = np.array(list(range(1, 101)) + [-1, 1])
  fmt = np.array([True] * 101 + [False])
  values = np.asarray(compute_rewards(fmt, ranks, RewardConfig()), np.float32)
  assert len(set(values.tolist())) == 102 - 1  # rank 100 and not found are both 0.0
  r = np.repeat(values, n)
  for scale in (True, False):
    np.testing.assert_array_equal(np.asarray(grpo.group_advantages(r, n, scale_by_std=scale)),
                                  0.0)


def test_metrics_match_numpy_and_merge():
  cfg = GRPOLossConfig()
  d = _inputs(2)
  j = {k: jnp.asarray(v, jnp.float32) for k, v in d.items()}
  adv = grpo.group_advantages(j["rewards"], G)
  _, count, raw = grpo.grpo_loss(j["logp"], j["old"], j["ref"], j["ent"], adv, j["mask"], cfg)
  whole = grpo.finalize_metrics(raw)
  parts = [grpo.grpo_loss(*(_jax_micro(x, i) for x in (j["logp"], j["old"], j["ref"], j["ent"],
                                                        adv, j["mask"])), cfg)[2]
           for i in range(N_MICRO)]
  merged = grpo.reduce_metrics(parts)
  for k in whole:
    np.testing.assert_allclose(float(merged[k]), float(whole[k]), rtol=1e-5, err_msg=k)

  m = d["mask"] > 0
  a = np.asarray(adv)[:, None] * np.ones_like(d["logp"])
  ratio = np.exp(d["logp"] - d["old"])
  clipped = -a * np.clip(ratio, 0.8, 1.2) > -a * ratio
  dd = d["ref"] - d["logp"]
  k3 = np.clip(np.exp(dd) - dd - 1, -10, 10)
  assert float(count) == m.sum() == float(whole["token_count"])
  assert float(whole["seq_count"]) == (m.sum(1) > 0).sum()
  np.testing.assert_allclose(float(whole["clipfrac"]), clipped[m].mean(), rtol=1e-6)
  assert 0.1 < float(whole["clipfrac"]) < 0.9
  np.testing.assert_allclose(float(whole["kl"]), k3[m].mean(), rtol=1e-5)
  np.testing.assert_allclose(float(whole["entropy"]), d["ent"][m].mean(), rtol=1e-5)
  np.testing.assert_allclose(float(whole["ratio_mean"]), ratio[m].mean(), rtol=1e-5)
  np.testing.assert_allclose(float(whole["ratio_max"]), ratio[m].max(), rtol=1e-5)
  np.testing.assert_allclose(float(whole["ratio_min"]), ratio[m].min(), rtol=1e-5)


def test_on_policy_gradient_is_token_mean_policy_gradient():
  """ρ ≡ 1 (the paper's single update): d loss / d logp = −A/N on valid tokens (no KL, no ent)."""
  cfg = GRPOLossConfig(kl_coef=0.0, entropy_coef=0.0, aggregation="token_sum_global")
  d = _inputs(4)
  lp, mask = jnp.asarray(d["logp"], jnp.float32), jnp.asarray(d["mask"])
  adv = grpo.group_advantages(jnp.asarray(d["rewards"]), G)

  def f(x):
    s, c, _ = grpo.grpo_loss(x, jax.lax.stop_gradient(x), None, None, adv, mask, cfg)
    return s / c

  g = np.asarray(jax.grad(f)(lp))
  np.testing.assert_allclose(g, -np.asarray(adv)[:, None] * d["mask"] / d["mask"].sum(),
                             rtol=1e-5, atol=1e-8)


def test_jit_and_large_kl_gradients_stay_finite():
  cfg = GRPOLossConfig()
  lp = jnp.full((2, 3), -1.0)
  ref = jnp.array([[-200.0, 150.0, -1.0], [0.0, -1.0, -1.0]])  # exp(d) would overflow f32
  f = jax.jit(lambda x: grpo.grpo_loss(x, x, ref, jnp.zeros_like(x), jnp.ones(2), jnp.ones_like(x),
                                       cfg)[0])
  assert np.isfinite(np.asarray(jax.grad(f)(lp))).all()


def test_bad_config_and_shapes_are_named():
  with pytest.raises(KeyError, match="unknown KL estimator 'k4'.*k3"):
    GRPOLossConfig(kl_estimator="k4")
  with pytest.raises(KeyError, match="unknown loss aggregation"):
    GRPOLossConfig(aggregation="seq_sum")
  with pytest.raises(ValueError, match="dual_clip must be > 1"):
    GRPOLossConfig(dual_clip=0.5)
  assert grpo.KL_ESTIMATORS.get("low_var_kl") is grpo.kl_k3
  assert dataclasses.replace(GRPOLossConfig(), aggregation="drgrpo").aggregation == "drgrpo"
  x = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="mask_bt"):
    grpo.grpo_loss(x, x, x, x, jnp.zeros(3), x)
  with pytest.raises(ValueError, match="needs ref_logp_bt"):
    grpo.grpo_loss(x, x, None, x, jnp.zeros(2), x)
