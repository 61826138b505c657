"""Checkpoints over Orbax: a pytree of arrays plus a JSON `meta` dict per step (design.md "Runs").

Layout: `<directory>/<step>/state` (the arrays, Orbax's standard format) and `<directory>/<step>/meta`
(JSON: data pipeline position, PRNG key data, config snapshot, metrics). Orbax writes a step into a
temporary directory and renames it when complete, so a crash mid-save leaves only a temporary
directory that `all_steps` ignores, and the previous steps intact. A step that exists but cannot be
read (deleted or truncated files) is skipped by `restore(None, ...)` with a warning.

Multi-process: every process constructs the Checkpointer on the same directory and calls `save`,
`wait` and `restore` with the same arguments (Orbax writes each process's shards and the primary
process writes the metadata). On a pod that directory is a gs:// URI every host shares (issue 32):
Orbax and TensorStore get the URI itself (`paths.absolute` leaves it as it is), and the meta is
read through `cqr_jax.paths`.

NNX: `nnx_state_dict` turns modules (model, optimizer) into a pure dict of arrays to save;
`nnx_abstract_state_dict` builds the restore target from a constructor under `nnx.eval_shape` and
the mesh, with concrete NamedShardings; `nnx_load_state_dict` writes a restored dict back.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from typing import Any, Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from cqr_jax import distributed, paths

log = logging.getLogger(__name__)


def _jsonable(meta: Mapping[str, Any]) -> dict:
  """Round-trips meta through JSON (numpy scalars and arrays become lists), naming a bad key."""
  def default(o):
    if isinstance(o, (np.generic, np.ndarray, jax.Array)):
      return np.asarray(o).tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")
  out = {}
  for k, v in dict(meta).items():
    try:
      out[str(k)] = json.loads(json.dumps(v, default=default))
    except (TypeError, ValueError) as e:
      raise TypeError(f"checkpoint meta[{k!r}] is not JSON serialisable: {e}") from e
  return out


class Checkpointer:
  """Orbax CheckpointManager with skip-corrupt restore.

  Args:
    directory: run checkpoint folder (created): a local path or a URI such as gs://b/run/ckpt.
    max_to_keep: keep the newest k steps (None = all).
    save_every: `save` writes only when step % save_every == 0, unless force=True.
    async_save: write in a background thread; `wait()` blocks until written.
  """

  def __init__(self, directory: str | os.PathLike, max_to_keep: int | None = 3,
               save_every: int = 1, async_save: bool = True):
    if save_every < 1:
      raise ValueError(f"Checkpointer: save_every must be >= 1, got {save_every}")
    self.directory = paths.absolute(directory)
    self.save_every = save_every
    self._corrupt: set[int] = set()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True)
    self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                       item_names=("state", "meta"))

  # ---------------------------------------------------------------------------------- saving
  def should_save(self, step: int) -> bool:
    return step % self.save_every == 0

  def save(self, step: int, state: Any, meta: Mapping[str, Any] | None = None,
           force: bool = False) -> bool:
    """Saves `state` (a pytree of arrays) and `meta` (JSON) at `step` if due; returns whether it
    started a save. Asynchronous by default: call `wait()` before reading the files."""
    step = int(step)
    if not (force or self.should_save(step)):
      return False
    meta = _jsonable(meta or {})
    if step in self._mngr.all_steps():
      if step not in self._corrupt:
        warnings.warn(f"checkpoint step {step} already exists in {self.directory}; not saved")
        return False
      warnings.warn(f"replacing unreadable checkpoint step {step} in {self.directory}")
      self._mngr.delete(step)
      self._corrupt.discard(step)
    return bool(self._mngr.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(meta)), force=True))

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  # --------------------------------------------------------------------------------- queries
  def all_steps(self) -> list[int]:
    self._mngr.reload()
    return sorted(int(s) for s in self._mngr.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def meta(self, step: int) -> dict:
    """A step's JSON meta without reading its arrays ({} when unreadable)."""
    try:
      text = paths.read_text(os.path.join(self.directory, str(int(step)), "meta", "metadata"))
      return dict(json.loads(text) or {})
    except (OSError, ValueError):
      return {}

  def _agreed_steps(self) -> list[int]:
    """The steps process 0 lists, on every process (a collective: all processes call it).

    Every process lists (and reloads Orbax's cache) before any can go on, so no process acts on a
    listing taken after another began deleting (tests/test_paths.py's two-process checkpoint).
    """
    return [int(s) for s in distributed.broadcast_from_main(self.all_steps())]

  def keep_only(self, step: int) -> None:
    """Deletes every step but `step` (a finished stage: nothing left to resume)."""
    self.wait()
    for s in self._agreed_steps():
      if s != int(step):
        self._mngr.delete(s)

  # ------------------------------------------------------------------------------- restoring
  def _restore_one(self, step: int, abstract_state: Any, partial: bool = False):
    if partial:  # only the subtree `abstract_state` names (e.g. params without optimizer state)
      state_args = ocp.args.PyTreeRestore(
          item=abstract_state, partial_restore=True,
          restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))
    elif abstract_state is None:
      state_args = ocp.args.StandardRestore()
    else:
      state_args = ocp.args.StandardRestore(abstract_state)
    out = self._mngr.restore(step, args=ocp.args.Composite(state=state_args,
                                                           meta=ocp.args.JsonRestore()))
    return out["state"], dict(out["meta"] or {})

  def restore(self, step: int | None = None, abstract_state: Any = None, partial: bool = False):
    """Restores (step, state, meta) into the shapes, dtypes and shardings of `abstract_state`
    (a pytree of jax.ShapeDtypeStruct with concrete shardings; None restores as saved; a callable
    step -> such a pytree builds the target per step). `partial`: `abstract_state` is a subtree
    of what was saved (dicts with fewer keys), and only it is read.

    step=None takes the newest readable step, skipping unreadable ones with a warning, and
    returns None when the directory holds no checkpoint. A given step that does not exist raises
    FileNotFoundError listing the steps that do.
    """
    steps = self._agreed_steps()
    target = abstract_state if callable(abstract_state) else lambda _: abstract_state
    if step is not None:
      if int(step) not in steps:
        raise FileNotFoundError(f"no checkpoint at step {step} in {self.directory}; "
                                f"available steps: {steps or 'none'}")
      state, meta = self._restore_one(int(step), target(int(step)), partial)
      return int(step), state, meta
    if not steps:
      return None
    errors = []
    for s in reversed(steps):
      try:
        state, meta = self._restore_one(s, target(s), partial)
        ok, err = True, None
      except Exception as e:  # noqa: BLE001 - any read failure means "skip this step"
        ok, err = False, e
      if jax.process_count() > 1:  # every process must agree on the step it resumes from
        from jax.experimental import multihost_utils
        ok = bool(np.all(multihost_utils.process_allgather(np.array(ok))))
      if ok:
        if errors:
          log.info("restored checkpoint step %d from %s (newer unreadable: %s)", s,
                   self.directory, "; ".join(errors))
        return s, state, meta
      self._corrupt.add(s)
      reason = unreadable_reason(err, os.path.join(self.directory, str(s)))
      errors.append(f"step {s}: {reason}")
      warnings.warn(f"checkpoint step {s} is unreadable: {reason}; trying the previous step")
    raise CheckpointError(f"{self.directory}: no readable checkpoint ({'; '.join(errors)}): "
                          "delete the folder to start the stage again, or restore it from a copy")


class CheckpointError(RuntimeError):
  """No readable checkpoint step; the message names the folder and each step's reason."""


def unreadable_reason(err: BaseException | None, step_dir: str) -> str:
  """One line: the file that could not be read and why (not TensorStore's spec dump)."""
  import re
  if err is None:
    return f"{step_dir}: failed on another process"
  for part in ("state", "meta"):  # a half-copied step folder
    if paths.isdir(step_dir) and not paths.isdir(os.path.join(step_dir, part)):
      return f"{os.path.join(step_dir, part)}: missing"
  msg = str(err).split(" [tensorstore_spec", 1)[0]
  files = re.findall(r'(?:local )?file "([^"]+)"', msg)
  why = msg.rsplit(": ", 1)[-1].strip()
  where = files[-1] if files else step_dir
  if not files:
    why = f"{type(err).__name__}: {why}"
  if isinstance(err, FileNotFoundError) and getattr(err, "filename", None):
    where, why = err.filename, "missing"
  return f"{where}: {' '.join(why.split())[:200] or type(err).__name__}"


# ------------------------------------------------------------------------------------- PRNG keys

def key_to_json(key: jax.Array) -> dict:
  """PRNG key -> {"impl": name or None for a raw uint32 key, "data": nested list of uint32}."""
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    return {"impl": str(jax.random.key_impl(key)), "data": np.asarray(jax.random.key_data(key))
            .tolist()}
  return {"impl": None, "data": np.asarray(key).tolist()}


def key_from_json(d: Mapping[str, Any]) -> jax.Array:
  data = np.asarray(d["data"], np.uint32)
  if d.get("impl") is None:
    return jax.numpy.asarray(data)
  return jax.random.wrap_key_data(data, impl=d["impl"])


# ---------------------------------------------------------------------------------------- NNX

def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs with the shapes, dtypes and shardings of a tree of concrete arrays."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                     sharding=getattr(x, "sharding", None)), tree)


def nnx_state_dict(**nodes: Any) -> dict:
  """{name: pure dict of nnx.state(node)}, e.g. nnx_state_dict(model=m, optimizer=opt)."""
  return {name: nnx.to_pure_dict(nnx.state(node)) for name, node in nodes.items()}


def _concrete_sharding(x: Any, mesh: jax.sharding.Mesh) -> Any:
  sharding = getattr(x, "sharding", None)
  if isinstance(sharding, jax.sharding.NamedSharding):
    sharding = jax.sharding.NamedSharding(mesh, sharding.spec)
  elif sharding is None:
    sharding = jax.sharding.NamedSharding(mesh, jax.P())
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def nnx_abstract_state_dict(make_nodes: Callable[[], Mapping[str, Any]],
                            mesh: jax.sharding.Mesh) -> dict:
  """Restore target for `nnx_state_dict`: `make_nodes()` returns {name: module} (e.g. model and
  its optimizer), traced in ONE `nnx.eval_shape` under `mesh` (no allocation); abstract shardings
  become NamedSharding(mesh, spec) (Orbax rejects abstract meshes); unannotated ones replicate."""
  with jax.set_mesh(mesh):
    nodes = nnx.as_abstract(nnx.eval_shape(lambda: dict(make_nodes())))
    pure = {name: nnx.to_pure_dict(nnx.state(node)) for name, node in nodes.items()}
  return jax.tree.map(lambda x: _concrete_sharding(x, mesh), pure)


def nnx_load_state_dict(state_dict: Mapping[str, Any], **nodes: Any) -> None:
  """Writes a (restored) `nnx_state_dict` back into the given modules, in place."""
  for name, node in nodes.items():
    if name not in state_dict:
      raise KeyError(f"checkpoint state has no entry {name!r}; it has {sorted(state_dict)}")
    target = nnx.state(node)
    nnx.replace_by_pure_dict(target, state_dict[name])
    nnx.update(node, target)
