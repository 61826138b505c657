"""Small building blocks: parameters tagged with logical axes, the mixed-precision matmul,
linear / embedding / RMSNorm modules.

Every parameter carries `logical_axes` metadata (names such as "embed", "mlp", "vocab"); the one
partition table in `cqr_jax/sharding.py` maps those names to mesh axes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

INIT_STD = 0.02  # HF initializer_range for both families


def init_normal(key, shape, dtype) -> jax.Array:
  """N(0, INIT_STD^2) values (HF's initializer for both families)."""
  return (INIT_STD * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def dtype_of(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def param(value, axes: tuple[str | None, ...]) -> nnx.Param:
  """An `nnx.Param` tagged with one logical axis name per dimension."""
  assert len(axes) == value.ndim, (axes, value.shape)
  return nnx.Param(value, logical_axes=tuple(axes))


def mm(x: jax.Array, w: jax.Array, compute_dtype, dims: str = "...i,io->...o") -> jax.Array:
  """einsum with operands cast to `compute_dtype` and float32 accumulation/output.

  bf16 operands + `preferred_element_type=float32` is the fast path on AVX512-BF16 CPUs and TPUs;
  with float32 compute the operands are used as they are.
  """
  if compute_dtype == jnp.float32:
    return jnp.einsum(dims, x.astype(jnp.float32), w.astype(jnp.float32))
  return jnp.einsum(dims, x.astype(compute_dtype), w.astype(compute_dtype),
                    preferred_element_type=jnp.float32)


def mm_rows(x_bti: jax.Array, w: jax.Array, compute_dtype, *, w_out_in: bool = False,
            weights_first: bool = False) -> jax.Array:
  """x [..., I] @ w [I, O] (w [O, I] with `w_out_in`, e.g. the LM head's [V, D] table) as one 2-D
  matmul over the flattened leading dims -> float32 [..., O].

  The same product as the batched einsum, but its weight gradient is a plain x^T dy: XLA:CPU then
  stops transposing activations for it (the GRPO update benchmark, bench/results/update.md).
  `weights_first` (with `w_out_in`): computed as y^T = W x^T, the weight as the dot's left
  operand, the layout a CPU decode step streams its weights fastest in (cqr_jax/cpu_decode.py).
  """
  x_ni = x_bti.reshape(-1, x_bti.shape[-1])
  if weights_first:
    assert w_out_in, "weights_first needs an [out, in] weight"
    y_on = mm(w, x_ni, compute_dtype, "oi,ni->on")
    y_no = jax.lax.optimization_barrier(y_on).T  # barrier: XLA would swap the operands back
  else:
    y_no = mm(x_ni, w, compute_dtype, "ni,oi->no" if w_out_in else "ni,io->no")
  return y_no.reshape(*x_bti.shape[:-1], y_no.shape[-1])


class Linear(nnx.Module):
  """y = x @ kernel (+ bias); kernel [in, out] (HF stores the transpose, [out, in]).

  `out_in` (static): the kernel is held [out, in] and applied weights first (`mm_rows`); only a
  decode-time copy made by `cqr_jax.cpu_decode.weights_first_model` sets it."""

  def __init__(self, kernel_io: jax.Array, axes: tuple[str | None, str | None], *, bias: bool):
    self.kernel = param(kernel_io, axes)
    self.bias = param(jnp.zeros(kernel_io.shape[1:], kernel_io.dtype), (axes[1],)) if bias else None
    self.out_in = False

  def __call__(self, x_bti: jax.Array, compute_dtype) -> jax.Array:
    y_bto = mm_rows(x_bti, self.kernel[...], compute_dtype, w_out_in=self.out_in,
                    weights_first=self.out_in)
    if self.bias is not None:
      y_bto = y_bto + self.bias[...].astype(jnp.float32)
    return y_bto


class Embed(nnx.Module):
  """Token table [V, D]; also used (tied or as the separate lm_head) to produce logits."""

  def __init__(self, table_vd: jax.Array):
    self.embedding = param(table_vd, ("vocab", "embed"))

  def __call__(self, tokens_bt: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], tokens_bt, axis=0).astype(jnp.float32)


class RMSNorm(nnx.Module):
  """x / sqrt(mean(x^2) + eps) * scale, in float32 (as HF's Llama/Qwen2 RMSNorm)."""

  def __init__(self, dim: int, eps: float, *, dtype):
    self.scale = param(jnp.ones((dim,), dtype), ("norm",))
    self.eps = eps

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    x_btd = x_btd.astype(jnp.float32)
    var_bt1 = jnp.mean(jnp.square(x_btd), axis=-1, keepdims=True)
    return x_btd * jax.lax.rsqrt(var_bt1 + self.eps) * self.scale[...].astype(jnp.float32)
