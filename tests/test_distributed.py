"""cqr_jax.distributed: 2 processes x 4 CPU devices agree with 1 process x 8 devices.

Run as a script (`python tests/test_distributed.py OUT_DIR`) this file is the worker that
`run_processes` starts; under pytest it is the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

B, D, H = 16, 6, 3  # global batch, features, hidden


def _worker(out_dir: str) -> None:
  """Initialize, feed this process's rows, run sharded jit + shard_map psum, gather, broadcast."""
  from cqr_jax import distributed

  distributed.initialize()
  import jax
  import jax.numpy as jnp
  from jax.sharding import AxisType, NamedSharding
  P = jax.P

  pid = jax.process_index()
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
  batch_spec = P(("data", "fsdp"))
  x_bd = np.arange(B * D, dtype=np.float32).reshape(B, D) / (B * D)  # [B, D]
  ids_b = np.arange(B, dtype=np.int32) * 7  # [B]
  rows = distributed.process_slice(B)
  rows_from_mesh = distributed.process_slice(B, mesh, P(("data", "fsdp"), None))
  assert rows == rows_from_mesh, (rows, rows_from_mesh)
  batch = distributed.global_batch_from_local({"x": x_bd[rows], "ids": ids_b[rows]}, mesh,
                                              batch_spec)
  assert batch["x"].shape == (B, D) and batch["ids"].shape == (B,)

  w_dh = jax.device_put(np.linspace(-1, 1, D * H, dtype=np.float32).reshape(D, H),
                        NamedSharding(mesh, P()))

  def loss_fn(w_dh, x_bd):
    return jnp.mean(jnp.tanh(x_bd @ w_dh) ** 2)

  loss, grad_dh = jax.jit(jax.value_and_grad(loss_fn))(w_dh, batch["x"])

  @jax.jit
  def total(x_bd):
    def local_sum(x):
      return jax.lax.psum(jnp.sum(x, keepdims=True), ("data", "fsdp"))
    return jax.shard_map(local_sum, mesh=mesh, in_specs=batch_spec, out_specs=P())(x_bd)

  gathered = distributed.allgather(batch)  # global arrays come back whole
  local_gathered = distributed.allgather(ids_b[rows])  # process-local rows, in process order
  stacked = distributed.allgather(np.array([pid], np.int32), tiled=False)
  shared = distributed.broadcast_from_main({"run": f"run-from-{pid}", "shape": (B, D)})

  written = distributed.main_only(
      lambda: open(os.path.join(out_dir, "main.txt"), "w").write("main"))()
  distributed.sync("after-write")
  # A replicated-over-processes batch axis: each process feeds the rows its devices hold.
  mesh2 = jax.make_mesh((4, 2), ("fsdp", "tensor"), axis_types=(AxisType.Auto,) * 2)
  rows_fsdp = distributed.process_slice(B, mesh2, P("fsdp"))
  rows_tensor = distributed.process_slice(B, mesh2, P("tensor"))
  # A mesh that interleaves the processes along the batch axis, as a TPU slice's topology order
  # does (issue 32): owners 0,1,0,1,... with 2 processes. The global batch placed whole by every
  # process, and each process's own rows (not one block) placed from process-local data.
  from cqr_jax import sharding
  mesh_i = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2,
                         devices=distributed.interleaved())
  spec_i = P(("data", "fsdp"))
  rows_i = distributed.process_rows(B, mesh_i, spec_i)
  whole = sharding.shard_batch({"x": x_bd, "ids": ids_b}, mesh_i)
  own = distributed.global_batch_from_local({"x": x_bd[rows_i], "ids": ids_b[rows_i]}, mesh_i,
                                            spec_i)
  try:
    distributed.process_slice(B, mesh_i, spec_i)
    slice_refuses = False
  except ValueError:
    slice_refuses = True

  def laid_out(tree, full):  # global value and every local shard as the sharding says
    return all(a.shape == f.shape and np.array_equal(distributed.allgather(a), f)
               and all(np.array_equal(np.asarray(sh.data), f[sh.index])
                       for sh in a.addressable_shards)
               for a, f in zip(jax.tree.leaves(tree), jax.tree.leaves(full)))
  result = {
      "process_count": jax.process_count(),
      "device_count": jax.device_count(),
      "local_device_count": jax.local_device_count(),
      "is_main": distributed.is_main(),
      "rows": [rows.start, rows.stop],
      "loss": float(loss),
      "grad": np.asarray(jax.device_get(distributed.allgather(grad_dh))).tolist(),
      "total": float(np.asarray(distributed.allgather(total(batch["x"]))).ravel()[0]),
      "gathered_x_ok": bool(np.array_equal(gathered["x"], x_bd)),
      "gathered_ids_ok": bool(np.array_equal(gathered["ids"], ids_b)),
      "local_gathered_ok": bool(np.array_equal(local_gathered, ids_b)),
      "stacked": np.asarray(stacked).ravel().tolist(),
      "shared": shared,
      "wrote": written is not None,
      "main_file_seen": os.path.exists(os.path.join(out_dir, "main.txt")),
      "rows_fsdp": [rows_fsdp.start, rows_fsdp.stop],
      "rows_tensor": [rows_tensor.start, rows_tensor.stop],
      "owners_interleaved": [d.process_index for d in mesh_i.devices.reshape(-1)],
      "rows_interleaved": rows_i.tolist(),
      "shard_batch_ok": laid_out(whole, {"x": x_bd, "ids": ids_b}),
      "from_local_ok": laid_out(own, {"x": x_bd, "ids": ids_b}),
      "slice_refuses": slice_refuses,
  }
  with open(os.path.join(out_dir, f"proc{pid}.json"), "w") as f:
    json.dump(result, f)
  distributed.shutdown()


if __name__ == "__main__":
  from cqr_jax.distributed import fail_fast

  with fail_fast():
    _worker(sys.argv[1])
  sys.exit(0)


from tests.multiprocess import MultiprocessError, run_processes  # noqa: E402


def _run(tmp_path, num_processes, local_devices):
  out = tmp_path / f"{num_processes}x{local_devices}"
  out.mkdir()
  run_processes([sys.executable, os.path.abspath(__file__), str(out)],
                num_processes=num_processes, local_devices=local_devices, timeout_s=300)
  return [json.loads((out / f"proc{i}.json").read_text()) for i in range(num_processes)]


def test_two_processes_match_one_process(tmp_path):
  one = _run(tmp_path, 1, 8)[0]
  two = _run(tmp_path, 2, 4)
  assert one["process_count"] == 1 and one["device_count"] == 8
  assert one["rows"] == [0, B] and one["stacked"] == [0]
  assert one["rows_interleaved"] == list(range(B)) and not one["slice_refuses"]
  assert one["shard_batch_ok"] and one["from_local_ok"]
  for pid, r in enumerate(two):
    assert r["process_count"] == 2 and r["device_count"] == 8 and r["local_device_count"] == 4
    assert r["is_main"] == (pid == 0) and r["wrote"] == (pid == 0) and r["main_file_seen"]
    assert r["rows"] == [pid * B // 2, (pid + 1) * B // 2]
    assert r["stacked"] == [0, 1]
    assert r["shared"] == {"run": "run-from-0", "shape": [B, D]}
    assert r["gathered_x_ok"] and r["gathered_ids_ok"] and r["local_gathered_ok"]
    # mesh (fsdp 4, tensor 2): process p holds fsdp rows 2p, 2p+1 and both tensor columns.
    assert r["rows_fsdp"] == [pid * B // 2, (pid + 1) * B // 2]
    assert r["rows_tensor"] == [0, B]
    # interleaved mesh: 2 rows a device, the owners alternate, so each process holds every
    # other pair of rows; both placements give the global batch.
    assert r["owners_interleaved"] == [0, 1] * 4
    assert r["rows_interleaved"] == [i for i in range(B) if (i // 2) % 2 == pid]
    assert r["shard_batch_ok"] and r["from_local_ok"] and r["slice_refuses"]
    # Same math, reductions split differently across processes: f32 round-off only.
    np.testing.assert_allclose(r["loss"], one["loss"], rtol=1e-6)
    np.testing.assert_allclose(r["grad"], one["grad"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(r["total"], one["total"], rtol=1e-6)
  assert two[0]["grad"] == two[1]["grad"] and two[0]["loss"] == two[1]["loss"]
  assert one["shared"] == two[0]["shared"]


@pytest.mark.parametrize("fail,code,text", [("sys.exit(3)", 3, ""),
                                             ("raise RuntimeError('boom')", 1, "boom")])
def test_failing_process_fails_fast_instead_of_hanging(tmp_path, fail, code, text):
  """Process 1 dies while process 0 waits in a barrier: the group stops in seconds."""
  script = tmp_path / "fail.py"
  script.write_text("import sys\n"
                    "from cqr_jax import distributed\n"
                    "distributed.initialize()\n"
                    "import jax\n"
                    "with distributed.fail_fast():\n"
                    f"  if jax.process_index() == 1: {fail}\n"
                    "  distributed.sync('never-reached-by-1')\n")
  with pytest.raises(MultiprocessError) as e:
    run_processes([sys.executable, str(script)], num_processes=2, local_devices=1,
                  timeout_s=300)
  assert f"process 1 (returncode {code})" in str(e.value) and text in str(e.value)
  assert "timed out" not in str(e.value)


def test_timeout_kills_the_group(tmp_path):
  script = tmp_path / "sleep.py"
  script.write_text("import time\ntime.sleep(60)\n")
  with pytest.raises(MultiprocessError, match="timed out"):
    run_processes([sys.executable, str(script)], num_processes=2, timeout_s=1)


def test_initialize_without_cluster_is_single_process():
  env = {k: v for k, v in os.environ.items() if not k.startswith("CQR_")}
  env.pop("XLA_FLAGS", None)
  env["JAX_PLATFORMS"] = "cpu"
  out = subprocess.run(
      [sys.executable, "-c",
       "from cqr_jax import distributed as d; d.initialize(local_devices=3); import jax; "
       "print(jax.process_count(), jax.device_count(), d.is_main())"],
      env=env, capture_output=True, text=True, timeout=300, check=True)
  assert out.stdout.split() == ["1", "3", "True"]


def test_single_process_helpers():
  import jax
  from cqr_jax import distributed

  distributed.initialize(num_processes=1)  # no-op, backend already running
  assert distributed.is_main()
  assert distributed.process_slice(8) == slice(0, 8)
  assert distributed.broadcast_from_main({"a": (1, 2), 3: "x"}) == {"a": [1, 2], "3": "x"}
  with pytest.raises(TypeError, match="JSON-able"):
    distributed.broadcast_from_main({"a": object()})
  assert distributed.main_only(lambda x: x + 1)(1) == 2
  distributed.sync("single")
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"), devices=jax.devices()[:8])
  assert distributed.process_slice(8, mesh, jax.P("data")) == slice(0, 8)
  batch = distributed.global_batch_from_local(
      {"a": np.ones((8, 2)), "b": {"c": np.zeros(8)}}, mesh,
      {"a": jax.P(("data", "fsdp")), "b": jax.P("data")})
  assert batch["a"].shape == (8, 2) and batch["b"]["c"].sharding.spec == jax.P("data")
  assert distributed.process_rows(8, mesh, jax.P("data")).tolist() == list(range(8))
  with pytest.raises(RuntimeError, match="single process: errors propagate"):
    with distributed.fail_fast():
      raise RuntimeError("single process: errors propagate")
  with pytest.raises(ValueError, match="process_id must be in"):
    distributed.initialize("127.0.0.1:1", num_processes=2, process_id=2)
  with pytest.raises(ValueError, match="num_processes missing"):
    distributed.initialize("127.0.0.1:1", process_id=0)


def test_bad_environment_names_the_variable(monkeypatch):
  from cqr_jax import distributed

  monkeypatch.setenv("CQR_NUM_PROCESSES", "two")
  with pytest.raises(ValueError, match="CQR_NUM_PROCESSES"):
    distributed.initialize()
