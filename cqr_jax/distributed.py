"""Multi-controller plumbing: one process per host, every process runs the same program.

design.md "Mesh": each process feeds its own slice of the global batch, process 0 alone writes
files, and collectives (allgather, barrier, broadcast) keep the processes in step. Every helper
here is a cheap no-op when there is one process, so the same code runs on 1 CPU device, 8 fake CPU
devices, a TPU VM and a multi-host pod.

`initialize` resolves its settings in this order: arguments, then the environment variables
`CQR_COORDINATOR` (host:port), `CQR_NUM_PROCESSES`, `CQR_PROCESS_ID`, `CQR_LOCAL_DEVICES` (fake CPU
devices per process), then JAX's own cluster auto-detection (Cloud TPU, SLURM, Kubernetes, ...).
It must run before anything touches a JAX device.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
import traceback
from typing import Any, Callable, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

ENV_COORDINATOR = "CQR_COORDINATOR"
ENV_NUM_PROCESSES = "CQR_NUM_PROCESSES"
ENV_PROCESS_ID = "CQR_PROCESS_ID"
ENV_LOCAL_DEVICES = "CQR_LOCAL_DEVICES"

T = TypeVar("T")


def _env_int(name: str) -> int | None:
  raw = os.environ.get(name)
  if raw is None or raw == "":
    return None
  try:
    return int(raw)
  except ValueError:
    raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def initialize(coordinator: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None,
               local_devices: int | None = None,
               timeout_s: int = 300) -> None:
  """Joins this process to the others (jax.distributed.initialize), or does nothing for one.

  Args:
    coordinator: "host:port" of process 0's coordination service; None = env or auto-detect.
    num_processes: total processes; 1 (or no cluster found) means a plain single-process run.
    process_id: this process's index in [0, num_processes).
    local_devices: CPU only: number of fake CPU devices this process exposes
      (`jax_num_cpu_devices`), for simulating a pod on one machine. Ignored when None.
    timeout_s: how long to wait for all processes to join before failing.
  """
  coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
  num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
  process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
  local_devices = local_devices if local_devices is not None else _env_int(ENV_LOCAL_DEVICES)

  if local_devices is not None:
    if local_devices < 1:
      raise ValueError(f"local_devices must be >= 1, got {local_devices}")
    # Only takes effect before the CPU backend starts; harmless on TPU (CPU is not the default).
    jax.config.update("jax_num_cpu_devices", local_devices)

  if jax.distributed.is_initialized():
    return
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"num_processes must be >= 1, got {num_processes}")
  if num_processes == 1:
    return
  if coordinator is None and num_processes is None and process_id is None:
    # Nothing given: let JAX detect the cluster (on a Cloud TPU VM it reads the worker list
    # from the metadata server). No known cluster means a plain single-process run.
    try:
      jax.distributed.initialize(initialization_timeout=timeout_s)
    except ValueError as e:
      if "should be defined" not in str(e):
        raise
      log.info("no cluster environment detected; running as a single process")
    return
  missing = [n for n, v in (("coordinator", coordinator), ("num_processes", num_processes),
                            ("process_id", process_id)) if v is None]
  if missing and coordinator is not None:
    raise ValueError(f"distributed.initialize: coordinator={coordinator!r} given but "
                     f"{', '.join(missing)} missing (arguments or {ENV_NUM_PROCESSES}/"
                     f"{ENV_PROCESS_ID})")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
  # Partly given (e.g. num_processes only): JAX fills the rest from the cluster or complains.
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id, initialization_timeout=timeout_s)


def shutdown() -> None:
  """Leaves the distributed runtime (safe to call when it was never started)."""
  if jax.distributed.is_initialized():
    jax.distributed.shutdown()


@contextlib.contextmanager
def fail_fast():
  """Wrap a process's work: on any error, print it and exit at once with os._exit.

  A normal exit runs JAX's shutdown barrier, which waits (minutes) for every other process; a
  crashed process must not wait for peers that are themselves blocked in a collective. Exiting
  at once lets the launcher (gcloud ssh, tests/multiprocess.py) see the failure and stop the rest.
  SystemExit keeps its code; any other exception exits with 1. In a single-process run (the
  distributed runtime not started) errors propagate as usual.
  """
  try:
    yield
  except BaseException as e:  # noqa: BLE001 - we re-signal every failure as an exit code
    if not jax.distributed.is_initialized():
      raise
    if isinstance(e, SystemExit):
      code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
      if code == 0:
        raise
    else:
      code = 1
      traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def is_main() -> bool:
  """True on process 0, the one that writes logs, reports, checkpoints' metadata and exports."""
  return jax.process_index() == 0


def main_only(fn: Callable[..., T]) -> Callable[..., T | None]:
  """Decorator: runs `fn` on process 0 only; other processes get None without calling it.

  It does not synchronize; call `sync(name)` afterwards when others must see the result on disk.
  """

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    return fn(*args, **kwargs) if is_main() else None

  return wrapper


def process_slice(global_batch_size: int, mesh: Mesh | None = None,
                  spec: PartitionSpec | None = None) -> slice:
  """The rows of a global batch that this process feeds, as one block.

  Without a mesh the batch splits evenly in process order (process p gets block p): a division
  of host work (e.g. GRPO's gold ranks, gathered back in process order by `allgather`) that is
  tied to no device, so it holds for any mesh. With `mesh` and `spec` it is `process_rows` as a
  slice, and refuses when those rows are not one block, which a TPU slice's topology order need
  not give (issue 32): use `process_rows` then.
  """
  if global_batch_size < 1:
    raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
  if mesh is None:
    n, p = jax.process_count(), jax.process_index()
    if global_batch_size % n:
      raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                       f"{n} processes")
    per = global_batch_size // n
    return slice(p * per, (p + 1) * per)
  rows = process_rows(global_batch_size, mesh, spec)
  if not len(rows):
    raise ValueError("this process holds no device of the mesh, so no rows of the batch")
  if rows[-1] - rows[0] + 1 != len(rows):
    raise ValueError(f"this process's rows of the batch are not contiguous under spec {spec} "
                     f"(rows {rows.tolist()}): use distributed.process_rows")
  return slice(int(rows[0]), int(rows[-1]) + 1)


def process_rows(global_batch_size: int, mesh: Mesh, spec: PartitionSpec | None) -> np.ndarray:
  """The rows (increasing indices) of a global batch that this process's devices hold when the
  batch is laid out by `spec` (its first entry shards the rows; the rest is ignored) on `mesh`,
  for any device order: on a mesh that interleaves the processes along the batch axis, every
  other block. `global_batch_from_local` takes this process's rows in this order."""
  if global_batch_size < 1:
    raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
  batch_spec = PartitionSpec(spec[0]) if spec is not None and len(spec) else PartitionSpec()
  sharding = NamedSharding(mesh, batch_spec)
  index_map = sharding.addressable_devices_indices_map((global_batch_size,))
  blocks = {idx[0].indices(global_batch_size)[:2] for idx in index_map.values()}
  return np.array(sorted({r for a, b in blocks for r in range(a, b)}), np.int64)


def interleaved(devices: list | None = None, run: int = 1) -> list:
  """`devices` (default: all) reordered so that the processes take turns, `run` devices at a
  time: with 2 processes of 4 devices and run=1 the owners go 0,1,0,1,... A TPU slice's
  topology order does this (2x2 chips per host on v4-32 / v5p-32 give 0,1,2,3,0,1,2,3,... along
  a 16-device axis); on CPU it lets tests build such a mesh (issue 32)."""
  devices = list(jax.devices() if devices is None else devices)
  by_process: dict[int, list] = {}
  for d in devices:
    by_process.setdefault(d.process_index, []).append(d)
  groups = [[ds[i:i + run] for i in range(0, len(ds), run)] for _, ds in sorted(by_process.items())]
  out = []
  for k in range(max(len(g) for g in groups)):
    for g in groups:
      out += g[k] if k < len(g) else []
  return out


def _is_spec(x: Any) -> bool:
  return x is None or isinstance(x, PartitionSpec)


def global_batch_from_local(local_tree: Any, mesh: Mesh, spec: Any) -> Any:
  """Builds global jax.Arrays from each process's own rows (`make_array_from_process_local_data`),
  for a pipeline in which each process reads only the rows its devices hold (a batch that every
  process holds whole goes through `sharding.shard_batch`).

  Args:
    local_tree: pytree of numpy arrays holding this process's rows, `process_rows(B, mesh, s)`
      of the global batch in that (increasing) order: on a mesh that interleaves the processes
      along the batch axis these are not one block. The leading dim is the batch.
    mesh: the global mesh.
    spec: one PartitionSpec for every leaf, or a pytree of PartitionSpecs that is a prefix of
      `local_tree`.
  Returns:
    The same pytree of global arrays; the global shape is inferred from the sharding (each
    process holds its own, equally sized part).
  """

  def one(s, x):
    sharding = NamedSharding(mesh, s if s is not None else PartitionSpec())
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))

  if _is_spec(spec):
    return jax.tree.map(functools.partial(one, spec), local_tree)
  return jax.tree.map(lambda s, sub: jax.tree.map(functools.partial(one, s), sub), spec,
                      local_tree, is_leaf=_is_spec)


def allgather(tree: Any, tiled: bool = True) -> Any:
  """Every process gets the full value of every leaf, as numpy (multihost_utils.process_allgather).

  Arrays sharded across processes come back whole. Process-local leaves (numpy, or jax.Arrays
  on this process's devices only) are concatenated along axis 0 in process order (`tiled=True`)
  or stacked on a new leading process axis (`tiled=False`).
  """
  return multihost_utils.process_allgather(tree, tiled=tiled)


def sync(name: str) -> None:
  """Barrier: returns once every process has reached `sync(name)` with the same name."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def broadcast_from_main(obj: Any) -> Any:
  """Process 0's JSON-able object, on every process (e.g. a run name, a resolved config).

  The value goes through JSON on every process count, so the result is identical with 1 or N
  processes (tuples come back as lists, dict keys as strings).
  """
  try:
    payload = json.dumps(obj).encode("utf-8") if is_main() else b""
  except TypeError as e:
    raise TypeError(f"broadcast_from_main needs a JSON-able object: {e}") from None
  if jax.process_count() > 1:
    n = int(multihost_utils.broadcast_one_to_all(np.asarray(len(payload), np.int32)))
    buf = np.frombuffer(payload, np.uint8) if is_main() else np.zeros(n, np.uint8)
    payload = np.asarray(multihost_utils.broadcast_one_to_all(buf), np.uint8).tobytes()
  return json.loads(payload.decode("utf-8"))
