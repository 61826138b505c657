"""Checkpointer: sharded save/restore on 8 fake devices, retention, meta, corrupt and partial
checkpoints, and the NNX helpers. Restores must be bit-exact."""

import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from cqr_jax import checkpoint as ck

P = jax.P


def _mesh():
  return jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=jax.devices()[:8])


def _state(mesh, seed=0):
  k = jax.random.key(seed)
  w = jax.device_put(jax.random.normal(k, (8, 16)), jax.NamedSharding(mesh, P(None, "fsdp")))
  b = jax.device_put(jnp.arange(16, dtype=jnp.bfloat16), jax.NamedSharding(mesh, P("fsdp")))
  return {"params": {"w": w, "b": b}, "step": jnp.asarray(seed, jnp.int32)}


def _assert_tree_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_save_restore_sharded_retention_and_meta(tmp_path):
  mesh = _mesh()
  key = jax.random.key(7)
  with ck.Checkpointer(tmp_path / "ckpt", max_to_keep=2, save_every=2) as c:
    assert c.restore(None, None) is None and c.latest_step() is None
    for step in range(5):
      saved = c.save(step, _state(mesh, step), {"data_pos": step * 3, "key": ck.key_to_json(key),
                                                "loss": np.float32(0.5)})
      assert saved == (step % 2 == 0)
    assert c.save(5, _state(mesh, 5), {}, force=True)
    c.wait()
    assert c.all_steps() == [4, 5] and c.latest_step() == 5

    # Restore into other shardings (w replicated over fsdp, sharded over data).
    target = ck.abstract_like(_state(mesh))
    target["params"]["w"] = jax.ShapeDtypeStruct((8, 16), jnp.float32,
                                                 sharding=jax.NamedSharding(mesh, P("data")))
    step, state, meta = c.restore(4, target)
  assert step == 4
  _assert_tree_equal(state, _state(mesh, 4))
  assert state["params"]["w"].sharding.spec == P("data")
  assert state["params"]["b"].dtype == jnp.bfloat16
  assert meta["data_pos"] == 12 and meta["loss"] == 0.5
  k2 = ck.key_from_json(meta["key"])
  np.testing.assert_array_equal(jax.random.key_data(k2), jax.random.key_data(key))
  assert ck.key_from_json(ck.key_to_json(jax.random.PRNGKey(3))).dtype == jnp.uint32

  c2 = ck.Checkpointer(tmp_path / "ckpt")  # a new process resuming
  step, state, _ = c2.restore(None, ck.abstract_like(_state(mesh)))
  assert step == 5
  _assert_tree_equal(state, _state(mesh, 5))
  c2.close()


def test_missing_step_and_bad_meta_are_named(tmp_path):
  mesh = _mesh()
  with ck.Checkpointer(tmp_path, async_save=False) as c:
    c.save(3, _state(mesh), {})
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at step 7 .* available steps: \[3\]"):
      c.restore(7)
    with pytest.raises(TypeError, match=r"meta\['cfg'\] is not JSON serialisable"):
      c.save(4, _state(mesh), {"cfg": object()})
    with pytest.warns(UserWarning, match="step 3 already exists"):
      assert not c.save(3, _state(mesh), {})


def test_partial_restore_reads_only_the_named_subtree(tmp_path):
  """`partial=True`: a target naming part of the saved tree (the params, not the step or an
  optimizer state) restores that part, bit-exact and into the target's shardings; a corrupt
  newest step is still skipped."""
  mesh = _mesh()
  with ck.Checkpointer(tmp_path) as c:
    for s in (1, 2):
      state = _state(mesh, s)
      state["opt"] = {"mu": jnp.full((8, 16), float(s)), "count": jnp.asarray(s)}
      c.save(s, state, {"s": s})
    c.wait()
  target = {"params": ck.abstract_like(_state(mesh)["params"])}
  target["params"]["w"] = jax.ShapeDtypeStruct((8, 16), jnp.float32,
                                               sharding=jax.NamedSharding(mesh, P("data")))
  c = ck.Checkpointer(tmp_path)
  step, state, meta = c.restore(None, target, partial=True)
  assert (step, meta["s"]) == (2, 2) and set(state) == {"params"}
  _assert_tree_equal(state["params"], _state(mesh, 2)["params"])
  assert state["params"]["w"].sharding.spec == P("data")
  _damage(tmp_path / "2", "missing_state")
  with pytest.warns(UserWarning, match="step 2 .* unreadable"):
    step, state, _ = c.restore(None, target, partial=True)
  assert step == 1
  _assert_tree_equal(state["params"], _state(mesh, 1)["params"])
  c.close()


def _damage(step_dir: pathlib.Path, how: str):
  if how == "truncated":  # every array data file cut short, as a full disk or bad copy leaves it
    files = [f for f in (step_dir / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
    assert files
    for f in files:
      f.write_bytes(f.read_bytes()[:5])
  else:  # a half-copied step folder: the arrays are missing
    shutil.rmtree(step_dir / "state")


@pytest.mark.parametrize("how", ["truncated", "missing_state"])
def test_corrupt_latest_is_skipped_then_replaced(tmp_path, how):
  mesh = _mesh()
  abstract = ck.abstract_like(_state(mesh))
  with ck.Checkpointer(tmp_path, max_to_keep=3) as c:
    for s in (1, 2, 3):
      c.save(s, _state(mesh, s), {"s": s})
    c.wait()
  _damage(tmp_path / "3", how)
  c = ck.Checkpointer(tmp_path, max_to_keep=3)
  with pytest.warns(UserWarning, match="step 3 .* unreadable"):
    step, state, meta = c.restore(None, abstract)
  assert (step, meta["s"]) == (2, 2)
  _assert_tree_equal(state, _state(mesh, 2))
  with pytest.raises(Exception):
    c.restore(3, abstract)  # asked for explicitly: the error surfaces
  # Training resumes from 2 and reaches step 3 again: the unreadable step is replaced.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    assert c.save(3, _state(mesh, 33), {"s": 33})
  c.wait()
  step, state, meta = c.restore(None, abstract)
  assert (step, meta["s"]) == (3, 33)
  c.close()


_CRASH_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp
    from cqr_jax.checkpoint import Checkpointer
    c = Checkpointer(sys.argv[1])
    c.save(1, {"w": jnp.full((4, 8), 1.0)}, {"s": 1})
    c.wait()
    big = {"w": jnp.full((4, 8), 2.0), "big": jnp.ones((4096, 4096))}  # 64 MiB
    c.save(2, big, {"s": 2})
    os.kill(os.getpid(), signal.SIGKILL)  # die while the async write is in flight
""")


def test_crash_mid_save_leaves_previous_intact(tmp_path):
  d = tmp_path / "ckpt"
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
  r = subprocess.run([sys.executable, "-c", _CRASH_SCRIPT, str(d)], env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == -9, r.stderr[-2000:]
  c = ck.Checkpointer(d)
  assert c.all_steps() in ([1], [1, 2])
  if c.all_steps() == [1]:  # the usual case: only Orbax's temporary folder was left behind
    assert any("tmp" in p.name for p in d.iterdir()), list(d.iterdir())
  target = {"w": jax.ShapeDtypeStruct((4, 8), jnp.float32,
                                      sharding=jax.NamedSharding(_mesh(), P()))}
  step, state, meta = c.restore(1, target)
  assert step == 1 and meta == {"s": 1}
  np.testing.assert_array_equal(np.asarray(state["w"]), 1.0)
  # The resumed run saves step 2 again over the leftover temporary folder.
  assert c.save(2, {"w": jnp.full((4, 8), 3.0)}, {"s": 2}) or c.all_steps() == [1, 2]
  c.wait()
  assert c.restore(None, target)[0] == 2
  c.close()


class _Tiny(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "fsdp"))
    self.up = nnx.Linear(8, 16, kernel_init=init, rngs=rngs)
    self.down = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    return self.down(jax.nn.gelu(self.up(x)))


def _make(seed):
  model = _Tiny(nnx.Rngs(seed))
  return {"model": model, "optimizer": nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)}


def test_nnx_model_and_optimizer_roundtrip(tmp_path):
  mesh = _mesh()
  with jax.set_mesh(mesh):
    nodes = nnx.jit(lambda: _make(0))()

    @nnx.jit
    def train_step(model, optimizer, x):
      optimizer.update(model, nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model))

    train_step(nodes["model"], nodes["optimizer"], jnp.ones((4, 8)))
  saved = ck.nnx_state_dict(**nodes)
  with ck.Checkpointer(tmp_path) as c:
    c.save(1, saved, {})
    c.wait()
    abstract = ck.nnx_abstract_state_dict(lambda: _make(0), mesh)
    spec = abstract["model"]["up"]["kernel"].sharding
    assert isinstance(spec.mesh, jax.sharding.Mesh) and spec.spec == P(None, "fsdp")
    _, restored, _ = c.restore(None, abstract)
  with jax.set_mesh(mesh):
    fresh = nnx.jit(lambda: _make(1))()  # different init: everything must come from the checkpoint
  ck.nnx_load_state_dict(restored, **fresh)
  _assert_tree_equal(ck.nnx_state_dict(**fresh), saved)
  assert int(fresh["optimizer"].step[...]) == 1
  assert fresh["model"].up.kernel[...].sharding.spec == P(None, "fsdp")
  with pytest.raises(KeyError, match="no entry 'ema'"):
    ck.nnx_load_state_dict(restored, ema=fresh["model"])


_TWO_PROCESS_SCRIPT = textwrap.dedent("""
    import os, shutil, sys
    os.environ.pop("XLA_FLAGS", None)
    import jax
    jax.config.update("jax_num_cpu_devices", 4)
    directory, pid, port = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    import numpy as np
    from jax.experimental import multihost_utils
    from cqr_jax.checkpoint import Checkpointer, abstract_like
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    sh = jax.NamedSharding(mesh, jax.P("fsdp"))
    def state(v):
      full = np.arange(64, dtype=np.float32).reshape(16, 4) + v
      return {"w": jax.make_array_from_callback((16, 4), sh, lambda idx: full[idx])}, full
    c = Checkpointer(directory)
    for s in (1, 2, 3):
      c.save(s, state(s)[0], {"s": s})
    c.wait()
    assert c.all_steps() == [1, 2, 3], c.all_steps()
    if pid == 0:
      shutil.rmtree(os.path.join(directory, "3", "state"))
    multihost_utils.sync_global_devices("damaged")
    step, st, meta = c.restore(None, abstract_like(state(0)[0]))
    assert step == 2 and meta == {"s": 2}, (step, meta)
    got = multihost_utils.process_allgather(st["w"], tiled=True)
    np.testing.assert_array_equal(got, state(2)[1])
    assert st["w"].sharding.spec == jax.P("fsdp")
    c.close()
    print("OK", pid)
""")


def test_two_processes_save_and_restore(tmp_path):
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
  procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESS_SCRIPT, str(tmp_path), str(i),
                             str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=300))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, (out, err)) in enumerate(zip(procs, outs)):
    assert p.returncode == 0 and f"OK {i}" in out, err[-3000:]
