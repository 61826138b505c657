"""Rotary position embeddings (RoPE), with Llama-3's frequency rescaling ("llama3" rope type).

Numerics follow transformers' `_compute_default_rope_parameters` / `_compute_llama3_parameters`:
inverse frequencies in float32, cos/sin of (position * inv_freq) duplicated over both halves,
and the "rotate half" (non-interleaved) pairing of dimensions i and i + Dh/2.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def inv_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> np.ndarray:
  """[Dh/2] float32 inverse frequencies, rescaled as Llama-3.x does when `scaling` is given.

  Llama-3 scaling: wavelengths longer than original_len / low_freq_factor are divided by
  `factor`; shorter than original_len / high_freq_factor are kept; in between they are
  interpolated with smooth = (original_len / wavelen - low) / (high - low).
  """
  exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
  # theta ** e correctly rounded to float32 (torch's float32 pow agrees to within 1 ulp)
  inv = (np.float32(1.0) / (np.float64(theta) ** exponent.astype(np.float64)).astype(np.float32))
  if scaling is None:
    return inv
  factor = scaling["factor"]
  low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
  old_len = scaling["original_max_position_embeddings"]
  low_wavelen, high_wavelen = old_len / low, old_len / high
  wavelen = (np.float32(2 * math.pi) / inv).astype(np.float32)
  scaled = np.where(wavelen > low_wavelen, inv / np.float32(factor), inv).astype(np.float32)
  smooth = ((old_len / wavelen - low) / (high - low)).astype(np.float32)
  smoothed = ((1 - smooth) * scaled / np.float32(factor) + smooth * scaled).astype(np.float32)
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions_bt: jnp.ndarray, inv_freq_h: np.ndarray):
  """cos, sin tables [B, T, Dh] (float32) for integer positions [B, T]."""
  freqs_bth = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq_h)[None, None]
  emb_btd = jnp.concatenate([freqs_bth, freqs_bth], axis=-1)
  return jnp.cos(emb_btd), jnp.sin(emb_btd)


def apply_rope(x_btnd: jnp.ndarray, cos_btd: jnp.ndarray, sin_btd: jnp.ndarray) -> jnp.ndarray:
  """x * cos + rotate_half(x) * sin over the last axis; x is [B, T, heads, Dh]."""
  half = x_btnd.shape[-1] // 2
  x1, x2 = x_btnd[..., :half], x_btnd[..., half:]
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  cos, sin = cos_btd[:, :, None, :], sin_btd[:, :, None, :]
  return (x_btnd * cos + rotated * sin).astype(x_btnd.dtype)
