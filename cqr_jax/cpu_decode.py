"""Decode-step strategies for XLA:CPU, which `cqr_jax.decode_policy` picks on the CPU backend.

A decode step is made of skinny products (a few rows against a whole weight or cache), where
XLA:CPU's defaults lose to two rewrites (bench/results/sampler.md):

- Attention as fused multiply-sums (`Reduce`): the step's small attention products, which
  XLA:CPU runs as many tiny batched matmuls, become broadcast multiplies and sums it fuses into
  one loop each, with the generation cache's keys stored slots-minor [R, KVH, Dh, G] so the sum
  over Dh runs across whole rows of slots. The prompt part's scores stay a matmul (its keys meet
  n * G queries).
- Weights first (`weights_first_model`): each projection and the LM head computed as W x^T over a
  copy of the kernels transposed once per call, the weight as the dot's left operand, which
  XLA:CPU streams faster at up to 32 rows (bench/results/history.md, session 13).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cqr_jax.models.layers import Linear


class Reduce:
  """The decode step's attention products as fused multiply-sums (see the module docstring);
  the generation cache's keys stored slots-minor [R, KVH, Dh, G]."""
  k_slots_last = True

  @staticmethod
  def gen_scores(q_rkgd, gen_k_rkds, dt):
    """Scores [R, KVH, G, S] of each row's grouped query against its own keys."""
    return jnp.sum(q_rkgd.astype(dt)[..., None] * gen_k_rkds[:, :, None], axis=-2)

  @staticmethod
  def prompt_values(p_bnkgp, v_bkpd, dt):
    """sum_p P[b, j, k, g, p] v[b, k, p] -> [B, n, KVH, G, Dh] float32."""
    del dt
    return jnp.sum(p_bnkgp[..., None] * v_bkpd.astype(jnp.float32)[:, None, :, None], axis=-2)

  @staticmethod
  def gen_values(p_rkgs, v_rksd, dt):
    """sum_s P[r, k, g, s] v[r, k, s] -> [R, KVH, G, Dh] float32."""
    del dt
    return jnp.sum(p_rkgs[..., None] * v_rksd.astype(jnp.float32)[:, :, None], axis=-2)


def weights_first_model(model: nnx.Module) -> nnx.Module:
  """A copy of `model` whose `Linear` kernels are materialised transposed, [out, in], and applied
  weights first, LM head included (`layers.mm_rows`). Trace it inside the jitted program: the
  transposes then run once per call. The barrier keeps XLA from folding a transpose back into
  the products."""
  graphdef, state = nnx.split(model)

  def transpose(path, x):
    if any(getattr(k, "key", getattr(k, "name", None)) == "kernel" for k in path):
      return jax.lax.optimization_barrier(x.T)
    return x

  copy = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(transpose, state))
  for _, module in copy.iter_modules():
    if isinstance(module, Linear):
      module.out_in = True
  copy.head_weights_first = True
  return copy
