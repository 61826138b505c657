"""SwiGLU feed-forward block shared by Qwen2 and Llama: down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import jax
from flax import nnx

from cqr_jax.models.layers import Linear


class MLP(nnx.Module):
  """gate/up kernels [D, F] ("embed", "mlp"), down kernel [F, D] ("mlp", "embed")."""

  def __init__(self, dim: int, hidden: int, *, dtype, rngs: nnx.Rngs):
    self.gate_proj = Linear(dim, hidden, ("embed", "mlp"), bias=False, dtype=dtype, rngs=rngs)
    self.up_proj = Linear(dim, hidden, ("embed", "mlp"), bias=False, dtype=dtype, rngs=rngs)
    self.down_proj = Linear(hidden, dim, ("mlp", "embed"), bias=False, dtype=dtype, rngs=rngs)

  def __call__(self, x_btd: jax.Array, compute_dtype) -> jax.Array:
    h_btf = jax.nn.silu(self.gate_proj(x_btd, compute_dtype)) * self.up_proj(x_btd, compute_dtype)
    return self.down_proj(h_btf, compute_dtype)
