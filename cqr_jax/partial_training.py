"""Training the top N decoder blocks only: a compute knob for small runs (not in the paper).

With `top_layers = N > 0` the last N blocks and the final norm train; the embeddings (and the LM
head, tied or not) and the lower blocks stay fixed. The frozen leaves go through
`jax.lax.stop_gradient` before the forward pass, so the backward pass (and its rematerialised
forward) covers the top N blocks alone: on SmolLM2-135M with 6 of 30 blocks a step costs about
(24 + 4 x 6) / (4 x 30) = 40% of full training. The optimizer gives frozen leaves no state and no
update (weight decay included). `top_layers = 0` trains everything (the paper).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

TRAIN, FROZEN = "train", "frozen"


def _key_name(k) -> Any:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return getattr(k, attr)
  return k


def _layer_index(path) -> int | None:
  names = [_key_name(k) for k in path]
  if "layers" in names:
    i = names.index("layers")
    if i + 1 < len(names):
      return int(names[i + 1])
  return None


def labels(params, top_layers: int):
  """A pytree like `params` of "train" / "frozen" (all "train" when top_layers <= 0)."""
  if top_layers <= 0:
    return jax.tree.map(lambda _: TRAIN, params)
  paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  indices = {i for i in map(_layer_index, paths) if i is not None}
  if not indices:
    raise ValueError("partial training: the parameter tree has no `layers.<i>` blocks")
  num_layers = max(indices) + 1
  if top_layers > num_layers:
    raise ValueError(f"train_top_layers={top_layers} exceeds the model's {num_layers} blocks")
  first = num_layers - top_layers

  def label(path, _):
    i = _layer_index(path)
    if i is not None:
      return TRAIN if i >= first else FROZEN
    return TRAIN if "final_norm" in [_key_name(k) for k in path] else FROZEN

  return jax.tree_util.tree_map_with_path(label, params)


def stop_frozen(params, param_labels):
  """params with `stop_gradient` on the leaves labelled frozen."""
  return jax.tree.map(lambda p, lab: p if lab == TRAIN else jax.lax.stop_gradient(p),
                      params, param_labels)


def mask_optimizer(tx: optax.GradientTransformation, top_layers: int
                   ) -> optax.GradientTransformation:
  """`tx` on the trainable leaves, zero updates (and no optimizer state) on the frozen ones."""
  if top_layers <= 0:
    return tx
  return optax.multi_transform({TRAIN: tx, FROZEN: optax.set_to_zero()},
                               lambda params: labels(params, top_layers))
