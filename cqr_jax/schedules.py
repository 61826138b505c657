"""Optimizers and learning-rate schedules for SFT (method.md 3.4) and GRPO (method.md 4.8).

Both are `clip_by_global_norm` followed by AdamW (decoupled weight decay applied to every
parameter, scaled by the learning rate, as torch.optim.AdamW). optax counts updates from 0, so the
schedule's value at step s is the learning rate of the (s+1)-th update.
"""

from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp
import optax


def grpo_schedule(lr: float = 1e-6, warmup_steps: int = 100) -> optax.Schedule:
  """lr · min(1, step / warmup_steps), step from 0: the first update has lr 0 (method.md 4.8)."""
  if warmup_steps <= 0:
    return optax.constant_schedule(lr)

  def schedule(step):
    return lr * jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / warmup_steps)
  return schedule


def sft_warmup_steps(total_steps: int, warmup_ratio: float = 0.1) -> int:
  """int(total · ratio), as verl (e.g. 184 steps -> 18 warmup steps, method.md 3.4)."""
  return int(total_steps * warmup_ratio)


def sft_schedule(lr: float = 1e-5, total_steps: int = 1, warmup_ratio: float = 0.1
                 ) -> optax.Schedule:
  """Linear warmup over int(ratio · total) steps from 0, then cosine decay to 0 at total_steps."""
  if total_steps < 1:
    raise ValueError(f"sft_schedule: total_steps must be >= 1, got {total_steps}")
  warm = sft_warmup_steps(total_steps, warmup_ratio)

  def schedule(step):
    s = jnp.asarray(step, jnp.float32)
    up = s / max(1, warm)
    progress = (s - warm) / max(1, total_steps - warm)
    down = jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
    return lr * jnp.where(s < warm, up, down)
  return schedule


def _adamw(schedule: Callable, b1: float, b2: float, eps: float, weight_decay: float,
           clip_norm: float | None, wd_mask: Any) -> optax.GradientTransformation:
  parts = [] if clip_norm is None else [optax.clip_by_global_norm(clip_norm)]
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                           mask=wd_mask))
  return optax.chain(*parts)


def grpo_optimizer(lr: float = 1e-6, warmup_steps: int = 100, b1: float = 0.9, b2: float = 0.999,
                   weight_decay: float = 0.01, clip_norm: float | None = 1.0, eps: float = 1e-8,
                   wd_mask: Any = None) -> optax.GradientTransformation:
  """AdamW (0.9, 0.999), wd 0.01, clip 1.0, linear warmup then constant (method.md 4.8).

  clip_norm=None disables clipping; wd_mask (optax mask) limits weight decay (default: all)."""
  return _adamw(grpo_schedule(lr, warmup_steps), b1, b2, eps, weight_decay, clip_norm, wd_mask)


def sft_optimizer(lr: float = 1e-5, total_steps: int = 1, warmup_ratio: float = 0.1,
                  b1: float = 0.9, b2: float = 0.95, weight_decay: float = 0.01,
                  clip_norm: float | None = 1.0, eps: float = 1e-8,
                  wd_mask: Any = None) -> optax.GradientTransformation:
  """AdamW (0.9, 0.95), wd 0.01, clip 1.0, 10% warmup then cosine to 0 (method.md 3.4)."""
  return _adamw(sft_schedule(lr, total_steps, warmup_ratio), b1, b2, eps, weight_decay, clip_norm,
                wd_mask)
