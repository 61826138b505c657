"""Batches on a mesh whose devices interleave the processes (issue 32, part 1).

A TPU slice's mesh follows the chips' topology, so along the batch axis the owning process can go
0,1,2,3,0,1,2,3,... (v4-32 / v5p-32). Here 2 processes x 4 CPU devices build a (data, fsdp) =
(2, 4) mesh from `distributed.interleaved` (owners 0,1,0,1,... along the batch): a process's rows
are not one block, which `distributed.process_slice` refuses and `rollout_batch.place` must not
need. The placed batches must equal the host batches, GRPO's host-side rank split must give the
single-process ranks, and an SFT and a GRPO update (with the reference pass) must equal the same
updates in this process on 8 devices in their natural order.

Run as a script (`python tests/train/test_device_order.py OUT_DIR`) this file is a pod worker.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np
import pytest

if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

MICRO = 4
pytestmark = pytest.mark.slow  # ~110 s on 2 cores: two pod processes and the reference


class HashRanker:
  """A deterministic stand-in for the retriever: a rank from the text and qid."""

  def ranks(self, texts, qids):
    import zlib
    return np.array([0 if t is None else zlib.crc32(f"{q}:{t}".encode()) % 7
                     for t, q in zip(texts, qids)], np.int32)


def _run(interleave: bool) -> tuple[dict, dict[str, np.ndarray]]:
  import jax
  import jax.numpy as jnp

  from cqr_jax import distributed, schedules, sharding
  from cqr_jax.objectives import grpo as grpo_obj
  from tests.train.test_multihost import LR, TEMPERATURE, _model_config, grpo_batch, sft_batch
  from train import grpo, rollout_batch, steps

  jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
  devices = distributed.interleaved() if interleave else jax.devices()
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=4, tensor=1), devices=devices)
  spec = jax.P(("data", "fsdp"), None)
  log = {"process_count": jax.process_count(),
         "owners": [d.process_index for d in mesh.devices.reshape(-1)]}
  try:
    distributed.process_slice(8, mesh, spec)
    log["process_slice_refuses"] = False
  except ValueError:
    log["process_slice_refuses"] = True

  probe = sft_batch(7)
  placed = {k: rollout_batch.place(v, mesh) for k, v in probe.items()}
  log["place_equal"] = all(np.array_equal(distributed.allgather(placed[k]), probe[k])
                           for k in probe)
  log["local_rows"] = sorted(int(s.index[0].start or 0)
                             for s in placed["tokens"].addressable_shards)
  prefix = np.arange(5, dtype=np.int32)
  log["replicated_equal"] = bool(np.array_equal(
      distributed.allgather(rollout_batch.place_replicated(prefix, mesh)), prefix))
  texts = [f"rewrite {i}" if i % 3 else None for i in range(12)]
  log["ranks"] = grpo.host_ranks(HashRanker(), texts, [f"q{i % 4}" for i in range(12)]).tolist()

  model = sharding.create_model(_model_config(), mesh, seed=0)
  graphdef, params, rest = steps.split_model(model)
  tx = schedules.sft_optimizer(lr=LR, total_steps=1, warmup_ratio=0.0)
  sft_update = steps.make_sft_update(graphdef, rest, tx, micro_batch=MICRO, mesh=mesh)
  state, m = sft_update(steps.init_state(params, tx),
                        {k: rollout_batch.place(v, mesh) for k, v in sft_batch(0).items()})
  log["sft_loss"] = float(m["loss"])

  ref_params = jax.tree.map(jnp.copy, state.params)
  gtx = schedules.grpo_optimizer(lr=LR, warmup_steps=1)
  update = steps.make_grpo_update(graphdef, rest, gtx, grpo_obj.GRPOLossConfig(),
                                  temperature=TEMPERATURE, micro_batch=MICRO, mesh=mesh)
  ref_logprobs = steps.make_logprob_fn(graphdef, rest, temperature=TEMPERATURE,
                                       micro_batch=MICRO, mesh=mesh)
  roll, rewards = grpo_batch(100)
  adv = np.asarray(grpo_obj.group_advantages(jnp.asarray(rewards), 4), np.float32)
  batch = rollout_batch.grpo_batch(roll, mesh, MICRO)
  batch = dataclasses.replace(batch, ref_logp=ref_logprobs(ref_params, batch),
                              adv=rollout_batch.place_replicated(adv, mesh))
  state, m = update(steps.init_state(state.params, gtx), batch)
  log["grpo_loss"], log["grpo_grad_norm"] = float(m["loss"]), float(m["grad_norm"])
  final = distributed.allgather(state.params)
  return log, {jax.tree_util.keystr(p): np.asarray(v)
               for p, v in jax.tree_util.tree_flatten_with_path(final)[0]}


def _worker(out_dir: str) -> None:
  from cqr_jax import distributed
  distributed.initialize()
  with distributed.fail_fast():
    import jax
    log, params = _run(interleave=True)
    with open(os.path.join(out_dir, f"log_{jax.process_index()}.json"), "w") as f:
      json.dump(log, f)
    if distributed.is_main():
      np.savez(os.path.join(out_dir, "params.npz"), **params)
    distributed.sync("written")


def test_interleaved_mesh_places_and_trains_like_one_process(tmp_path):
  """Tolerances as tests/train/test_multihost.py (same model, learning rate and batches)."""
  from concurrent.futures import ThreadPoolExecutor

  from tests.multiprocess import run_processes

  argv = [sys.executable, os.path.abspath(__file__), str(tmp_path)]
  with ThreadPoolExecutor(1) as pool:
    pod_run = pool.submit(run_processes, argv, num_processes=2, local_devices=4, timeout_s=600)
    one, one_params = _run(interleave=False)
    pod_run.result()
  pod = [json.loads((tmp_path / f"log_{i}.json").read_text()) for i in range(2)]
  with np.load(tmp_path / "params.npz") as z:
    pod_params = {k: z[k] for k in z.files}

  assert pod[0]["owners"] == [0, 1] * 4  # the batch axis alternates between the processes
  assert all(lg["process_slice_refuses"] for lg in pod) and not one["process_slice_refuses"]
  # Rows 8 / 8 devices = 1 per device: each process holds every other row.
  assert pod[0]["local_rows"] == [0, 2, 4, 6] and pod[1]["local_rows"] == [1, 3, 5, 7]
  for lg in pod + [one]:
    assert lg["place_equal"] and lg["replicated_equal"]
    assert lg["ranks"] == one["ranks"]
  for key in ("sft_loss", "grpo_loss", "grpo_grad_norm"):
    assert pod[0][key] == pod[1][key], key
    np.testing.assert_allclose(pod[0][key], one[key], rtol=1e-5, err_msg=key)
  assert sorted(pod_params) == sorted(one_params)
  for k in one_params:
    np.testing.assert_allclose(pod_params[k], one_params[k], rtol=1e-5, atol=1e-6, err_msg=k)


if __name__ == "__main__":
  _worker(sys.argv[1])
