"""Device mesh, the one partition table, sharded model creation, and the constraints that keep
activations data parallel.

Mesh axes ("data", "fsdp", "tensor") use `AxisType.Auto`: classic GSPMD propagation, where only
parameters and inputs carry shardings and XLA infers every intermediate's layout (no
`out_sharding=` needed on matmuls, unlike JAX's default Explicit axes).

- Parameters: each carries logical axis names (cqr_jax/models/layers.py); `PARTITION_RULES` maps
  them to mesh axes: the model dimension over "fsdp" (ZeRO-3 style; gathered per layer by XLA),
  the heads / MLP / vocab dimensions over "tensor" (Megatron style). Parameters are replicated
  over "data". A dimension that does not divide by its mesh axes' size stays unsharded.
- Batches (and the KV cache) are sharded over ("data", "fsdp") on their leading axis: the
  table's "batch" entry.
- Inside a program, Auto propagation alone lets the parameters' fsdp sharding of D flow into the
  activations, so that every device computes whole batches (bench/results/memory_plan.md). The
  model, the sampler and the step functions therefore pin batch rows (`constrain_rows`: the
  residual stream between blocks, the LM head's input and logits, each micro-batch, the KV
  cache) to the mesh named by `activation_mesh` (or by `jax.set_mesh`). Without a mesh in that
  context, or on one device, it does nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from cqr_jax.models.config import ModelConfig

if TYPE_CHECKING:  # imported where used: the model imports this module
  from cqr_jax.models.decoder import Decoder

AXES = ("data", "fsdp", "tensor")

# THE partition table: logical axis -> mesh axis (or None = replicated). Parameters name theirs
# in cqr_jax/models/layers.py; "batch" is the rows of batches, caches and activations.
PARTITION_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),  # batch rows: data parallel over both axes
    "vocab": "tensor",     # embedding / lm_head rows
    "embed": "fsdp",       # model dimension D of every matrix
    "q_heads": "tensor",   # H * Dh (q projection out, o projection in)
    "kv_heads": "tensor",  # KVH * Dh (k/v projections out)
    "mlp": "tensor",       # intermediate F
    "norm": None,          # RMSNorm scales (small): replicated
}
BATCH_AXES = PARTITION_RULES["batch"]


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh shape; -1 (at most one axis) takes the remaining devices."""
  data: int = 1
  fsdp: int = -1
  tensor: int = 1

  def shape(self, num_devices: int) -> tuple[int, int, int]:
    dims = [self.data, self.fsdp, self.tensor]
    if dims.count(-1) > 1:
      raise ValueError(f"MeshConfig {self}: at most one axis may be -1")
    known = int(np.prod([d for d in dims if d != -1]))
    if -1 in dims:
      if num_devices % known:
        raise ValueError(f"MeshConfig {self}: {num_devices} devices are not divisible by {known}")
      dims[dims.index(-1)] = num_devices // known
    if int(np.prod(dims)) != num_devices:
      raise ValueError(f"MeshConfig {self}: data*fsdp*tensor = {int(np.prod(dims))}, "
                       f"expected the number of devices, {num_devices}")
    return tuple(dims)


def make_mesh(cfg: MeshConfig | None = None, devices=None) -> jax.sharding.Mesh:
  """A ("data", "fsdp", "tensor") mesh over `devices` (default: all), with Auto axis types."""
  cfg = cfg or MeshConfig()
  devices = list(jax.devices() if devices is None else devices)
  shape = cfg.shape(len(devices))
  return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=devices)


def logical_to_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh) -> P:
  """PartitionSpec for a parameter with these logical axes, via PARTITION_RULES."""
  spec = []
  for name, dim in zip(axes, shape):
    if name is not None and name not in PARTITION_RULES:
      raise KeyError(f"logical axis {name!r} has no entry in PARTITION_RULES "
                     f"(known: {sorted(PARTITION_RULES)})")
    mesh_axes = PARTITION_RULES.get(name) if name else None
    if mesh_axes is not None:
      size = int(np.prod([mesh.shape[a] for a in np.atleast_1d(mesh_axes)]))
      if size == 1 or dim % size:
        mesh_axes = None
    spec.append(mesh_axes)
  return P(*spec)


def state_shardings(state: nnx.State, mesh) -> nnx.State:
  """The same tree as `state` (concrete or abstract) with NamedShardings as leaves."""
  def one(var):
    axes = var.get_metadata().get("logical_axes")
    if axes is None:
      spec = P()
    else:
      spec = logical_to_spec(axes, var.shape, mesh)
    return var.replace(NamedSharding(mesh, spec))
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_model(config: ModelConfig, mesh=None, seed: int = 0) -> Decoder:
  """A randomly initialised Decoder whose parameters are created directly in their shardings
  (the init runs under jit with out_shardings: no full copy ever sits on one device)."""
  from cqr_jax.models.decoder import Decoder
  if mesh is None:
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
  graphdef, abstract = nnx.split(abstract_model(config, seed))
  shardings = state_shardings(abstract, mesh)

  def init():
    return nnx.state(Decoder(config, rngs=nnx.Rngs(seed)))

  with jax.set_mesh(mesh):
    state = jax.jit(init, out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def abstract_model(config: ModelConfig, seed: int = 0) -> Decoder:
  """The model with ShapeDtypeStruct leaves (no memory): for shapes, shardings, restores."""
  from cqr_jax.models.decoder import Decoder
  return nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(seed)))


def param_specs(model: nnx.Module) -> dict[str, P]:
  """{"layers.0.attn.q_proj.kernel": PartitionSpec, ...} of the model's actual arrays."""
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    arr = var[...]
    sh = getattr(arr, "sharding", None)
    out[".".join(map(str, path))] = sh.spec if isinstance(sh, NamedSharding) else P()
  return out


def data_parallel_size(mesh) -> int:
  """Devices a batch's leading axis is split over: data x fsdp (1 without a mesh)."""
  if mesh is None:
    return 1
  shape = dict(mesh.shape)
  return int(np.prod([shape.get(a, 1) for a in BATCH_AXES]))


def batch_sharding(mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) axis over ("data", "fsdp"), the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def put_global(x, sharding: NamedSharding) -> jax.Array:
  """The host array `x`, held whole and identical by every process, laid out as `sharding`.

  One process: a `device_put`. Several: each process hands its own devices the blocks they hold
  (`jax.make_array_from_callback`), which holds for any device order; a TPU slice's mesh can
  interleave the processes along the batch axis (0,1,2,3,0,1,2,3,... on v4-32 / v5p-32, issue 32),
  so a process's rows need not be one block.
  """
  x = np.asarray(x)
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def shard_batch(batch, mesh):
  """Places a pytree of host arrays, the global batch (the same on every process), with each
  leading axis over ("data", "fsdp") (`put_global`). A pipeline in which each process reads only
  its own rows uses `distributed.process_rows` and `distributed.global_batch_from_local`."""
  return jax.tree.map(lambda x: put_global(x, batch_sharding(mesh, np.ndim(x))), batch)


# ---------------------------------------------------------------------- constraints in programs
def activation_mesh(mesh):
  """Context in which `constrain_rows` pins to `mesh`: JAX's abstract-mesh context, which, unlike
  `jax.set_mesh` (which sets it too), may be entered while a function is traced. None: no
  constraints."""
  if mesh is None:
    return contextlib.nullcontext()
  return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def _constraint_mesh():
  """The mesh in context if it has this module's axes and more than one device, else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or not set(AXES) <= set(mesh.axis_names):
    return None
  return mesh


def constrain_rows(x, axis: int = 0):
  """`x` (an array or a pytree of them) with dimension `axis`, its batch rows, sharded as
  PARTITION_RULES["batch"] says on the context mesh (`activation_mesh`); the other dimensions
  are left to the partitioner (e.g. heads over "tensor").

  Without it, GSPMD may carry the parameters' fsdp sharding of D into the activations and
  gather the rows instead of the weights (FSDP's intent is the reverse: gather a layer's
  weights, keep the rows local). No-op without a mesh in context, on one device, or when the
  rows do not divide by the data-parallel size (e.g. a prefix run once for all rows)."""
  mesh = _constraint_mesh()
  if mesh is None:
    return x

  def one(a):
    axes = [None] * a.ndim
    axes[axis] = "batch"
    rows = logical_to_spec(tuple(axes), a.shape, mesh)[axis]
    if rows is None:
      return a
    spec = [P.UNCONSTRAINED] * a.ndim
    spec[axis] = rows
    return jax.lax.with_sharding_constraint(a, NamedSharding(mesh, P(*spec)))
  return jax.tree.map(one, x)

