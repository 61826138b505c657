"""SwiGLU feed-forward block shared by Qwen2 and Llama: down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import jax
from flax import nnx

from cqr_jax.models.layers import Linear


class MLP(nnx.Module):
  """gate/up kernels [D, F] ("embed", "mlp"), down kernel [F, D] ("mlp", "embed")."""

  def __init__(self, kernels: dict[str, jax.Array]):
    """kernels: initial "gate_proj" [D, F], "up_proj" [D, F], "down_proj" [F, D]."""
    self.gate_proj = Linear(kernels["gate_proj"], ("embed", "mlp"), bias=False)
    self.up_proj = Linear(kernels["up_proj"], ("embed", "mlp"), bias=False)
    self.down_proj = Linear(kernels["down_proj"], ("mlp", "embed"), bias=False)

  def __call__(self, x_btd: jax.Array, compute_dtype) -> jax.Array:
    h_btf = jax.nn.silu(self.gate_proj(x_btd, compute_dtype)) * self.up_proj(x_btd, compute_dtype)
    return self.down_proj(h_btf, compute_dtype)
