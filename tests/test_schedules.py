"""LR schedules (method.md 3.4, 4.8) and the optimizers against torch AdamW + clip_grad_norm_ +
LambdaLR (float64 reference; optax in float32: rtol 1e-5)."""

import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from cqr_jax import schedules


def test_grpo_schedule_values():
  s = schedules.grpo_schedule(1e-6, 100)
  for step, want in [(0, 0.0), (1, 1e-8), (50, 5e-7), (100, 1e-6), (101, 1e-6), (5000, 1e-6)]:
    assert float(s(step)) == pytest.approx(want, rel=1e-6, abs=1e-15)
  assert float(schedules.grpo_schedule(1e-6, 0)(0)) == pytest.approx(1e-6)


def test_sft_schedule_values():
  # Qwen/TopiOCQA (method.md 3.4): 184 steps, 18 warmup steps.
  assert schedules.sft_warmup_steps(184) == 18
  s = schedules.sft_schedule(1e-5, 184, 0.1)
  assert float(s(0)) == 0.0
  assert float(s(9)) == pytest.approx(0.5e-5, rel=1e-6)
  assert float(s(18)) == pytest.approx(1e-5, rel=1e-6)
  mid = 18 + (184 - 18) / 2
  assert float(s(mid)) == pytest.approx(0.5e-5, rel=1e-5)
  assert float(s(184)) == pytest.approx(0.0, abs=1e-12)
  assert float(s(100)) == pytest.approx(1e-5 * 0.5 * (1 + math.cos(math.pi * 82 / 166)), rel=1e-5)


def _torch_run(params0, grads, lr_lambda, lr, betas, wd, clip):
  p = torch.tensor(params0, dtype=torch.float64, requires_grad=True)
  opt = torch.optim.AdamW([p], lr=lr, betas=betas, weight_decay=wd, eps=1e-8)
  sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
  for g in grads:
    p.grad = torch.tensor(g, dtype=torch.float64)
    torch.nn.utils.clip_grad_norm_([p], clip)
    opt.step()
    sched.step()
  return p.detach().numpy()


def _optax_run(tx, params0, grads):
  p = jnp.asarray(params0, jnp.float32)
  state = tx.init(p)
  for g in grads:
    upd, state = tx.update(jnp.asarray(g, jnp.float32), state, p)
    p = optax.apply_updates(p, upd)
  return np.asarray(p)


@pytest.mark.parametrize("which", ["grpo", "sft"])
def test_optimizer_matches_torch(which):
  rng = np.random.default_rng(0)
  params0 = rng.normal(size=(7,))
  grads = [rng.normal(0, s, size=(7,)) for s in (0.1, 3.0, 0.5, 2.0, 0.2, 1.0, 4.0, 0.3)]
  if which == "grpo":
    tx = schedules.grpo_optimizer(lr=1e-2, warmup_steps=3)
    lam = lambda s: min(1.0, s / 3)  # noqa: E731
    want = _torch_run(params0, grads, lam, 1e-2, (0.9, 0.999), 0.01, 1.0)
  else:
    tx = schedules.sft_optimizer(lr=1e-2, total_steps=8, warmup_ratio=0.25)

    def lam(s):
      if s < 2:
        return s / 2
      return max(0.0, 0.5 * (1 + math.cos(math.pi * (s - 2) / 6)))
    want = _torch_run(params0, grads, lam, 1e-2, (0.9, 0.95), 0.01, 1.0)
  got = _optax_run(tx, params0, grads)
  assert not np.allclose(got, params0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_first_grpo_update_leaves_params_unchanged():
  tx = schedules.grpo_optimizer()
  p = {"w": jnp.ones((3,))}
  upd, _ = tx.update({"w": jnp.ones((3,))}, tx.init(p), p)
  assert float(jnp.abs(upd["w"]).max()) == 0.0
