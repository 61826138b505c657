"""Multi-host training (issue 9): 2 processes x 4 CPU devices == 1 process x 8 devices.

The same worker runs twice through `tests/multiprocess.py`: once as a simulated 2-host pod
(jax.distributed over CPU collectives, 4 fake devices per process) and once as one process with 8
devices, on the same (data, fsdp, tensor) = (2, 2, 2) mesh. It drives the real jitted steps on a
tiny Qwen2-shaped model: SFT updates, then GRPO updates with the reference log-prob pass, an Orbax
save and a restore into a fresh target mid-run, and more GRPO updates from the restored state.
Every batch goes through `rollout_batch.place`, which in the pod feeds each process's own rows.

Run as a script (`python tests/train/test_multihost.py OUT_DIR CKPT_DIR`) this file is the worker;
under pytest it is the test.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

if __name__ == "__main__":  # the worker runs from a bare interpreter: make the repo importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

SFT_STEPS, GRPO_STEPS_BEFORE_SAVE, GRPO_STEPS_AFTER_RESTORE = 2, 2, 2
B_SFT, L_SFT = 8, 16            # SFT batch rows, padded length
B_GRPO, P_LEN, G_LEN = 16, 6, 10  # rollouts, prompt and response lengths
MICRO = 4
TEMPERATURE = 0.7


def _model_config():
  from cqr_jax.models.config import ModelConfig
  return ModelConfig(family="qwen2", vocab_size=97, hidden_size=32, intermediate_size=64,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True,
                     tie_word_embeddings=False, bos_token_id=None, eos_token_id=1)


def sft_batch(seed: int) -> dict[str, np.ndarray]:
  """Right-padded prompt ++ response rows; loss on the response (method.md 3.3)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(2, 97, (B_SFT, L_SFT)).astype(np.int32)
  mask = np.zeros((B_SFT, L_SFT), bool)
  loss = np.zeros((B_SFT, L_SFT), bool)
  for i in range(B_SFT):
    n, p = int(rng.integers(6, L_SFT + 1)), int(rng.integers(2, 5))
    mask[i, :n] = True
    loss[i, p:n] = True
  return {"tokens": tokens, "mask": mask, "loss_mask": loss}


def grpo_batch(seed: int) -> dict[str, np.ndarray]:
  """Left-padded prompts ++ responses (train/rollout_batch.assemble's layout) and advantages."""
  rng = np.random.default_rng(seed)
  plen, glen = rng.integers(2, P_LEN + 1, B_GRPO), rng.integers(1, G_LEN + 1, B_GRPO)
  tokens = rng.integers(2, 97, (B_GRPO, P_LEN + G_LEN)).astype(np.int32)
  mask = np.zeros(tokens.shape, bool)
  loss = np.zeros(tokens.shape, bool)
  for i in range(B_GRPO):
    mask[i, P_LEN - plen[i]:P_LEN + glen[i]] = True
    loss[i, P_LEN:P_LEN + glen[i]] = True
  rewards = rng.uniform(-1.0, 1.0, B_GRPO).astype(np.float32)
  return {"tokens": tokens, "mask": mask, "loss_mask": loss, "rewards": rewards}


def _worker(out_dir: str, ckpt_dir: str) -> None:
  from cqr_jax import distributed
  distributed.initialize()
  with distributed.fail_fast():
    _train(out_dir, ckpt_dir)


def _train(out_dir: str, ckpt_dir: str) -> None:
  import jax
  import jax.numpy as jnp

  from cqr_jax import distributed, schedules, sharding
  from cqr_jax.checkpoint import Checkpointer, abstract_like
  from cqr_jax.objectives import grpo as grpo_obj
  from train import rollout_batch, steps

  jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
  assert jax.device_count() == 8, jax.devices()
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  place = lambda b: {k: rollout_batch.place(v, mesh) for k, v in b.items()}  # noqa: E731
  log = {"process_index": jax.process_index(), "process_count": jax.process_count()}
  import time
  t0 = time.perf_counter()
  log["t"] = {}
  tick = lambda name: log["t"].__setitem__(name, round(time.perf_counter() - t0, 2))  # noqa

  # place(): each process feeds its own rows, and the global array is the host batch.
  probe = sft_batch(123)
  placed = place(probe)
  log["place_roundtrip"] = all(
      np.array_equal(np.asarray(distributed.allgather(placed[k])), probe[k]) for k in probe)
  log["place_local_rows"] = sorted(
      {int(s.index[0].start or 0) for s in placed["tokens"].addressable_shards})

  tick("place")
  cfg = _model_config()
  model = sharding.create_model(cfg, mesh, seed=0)
  graphdef, params, rest = steps.split_model(model)

  tick("model")
  # --- SFT (method.md 3.3-3.4), the real optimizer with clipping and schedule.
  tx = schedules.sft_optimizer(lr=3e-3, total_steps=SFT_STEPS, warmup_ratio=0.0)
  state = steps.init_state(params, tx)
  sft_update = steps.make_sft_update(graphdef, rest, tx, micro_batch=MICRO)
  log["sft_loss"] = []
  for i in range(SFT_STEPS):
    state, m = sft_update(state, place(sft_batch(i)))
    log["sft_loss"].append(float(m["loss"]))

  tick("sft")
  # --- GRPO (method.md 4.5-4.8): frozen reference = the SFT policy.
  ref_params = jax.tree.map(jnp.copy, state.params)
  gtx = schedules.grpo_optimizer(lr=3e-3, warmup_steps=1)
  state = steps.init_state(state.params, gtx)
  loss_cfg = grpo_obj.GRPOLossConfig()
  update = steps.make_grpo_update(graphdef, rest, gtx, loss_cfg, temperature=TEMPERATURE,
                                  micro_batch=MICRO)
  ref_logprobs = steps.make_logprob_fn(graphdef, rest, temperature=TEMPERATURE,
                                       micro_batch=MICRO)
  log["grpo_loss"], log["grpo_grad_norm"] = [], []

  def grpo_step(state, seed):
    host = grpo_batch(seed)
    adv = np.asarray(grpo_obj.group_advantages(jnp.asarray(host.pop("rewards")), 4), np.float32)
    batch = place(host)
    batch["ref_logp"] = ref_logprobs(ref_params, batch["tokens"], batch["mask"])
    batch["adv"] = rollout_batch.place(adv, mesh)
    state, m = update(state, batch)
    log["grpo_loss"].append(float(m["loss"]))
    log["grpo_grad_norm"].append(float(m["grad_norm"]))
    return state

  for i in range(GRPO_STEPS_BEFORE_SAVE):
    state = grpo_step(state, 100 + i)

  tick("grpo1")
  # --- Checkpoint from all processes, restore into a fresh abstract target.
  as_dict = lambda s: {"params": s.params, "opt_state": s.opt_state, "step": s.step}  # noqa
  saved_host = distributed.allgather(as_dict(state))
  ckpt = Checkpointer(ckpt_dir, max_to_keep=2)
  ckpt.save(int(state.step), {"state": as_dict(state)}, meta={"losses": log["grpo_loss"]})
  ckpt.wait()
  target = {"state": abstract_like(as_dict(state))}
  del state  # from here on, only the restored copy is trained
  step, restored, meta = ckpt.restore(None, target)
  ckpt.close()
  r = restored["state"]
  log["restored_step"] = step
  log["restored_meta_ok"] = meta["losses"] == log["grpo_loss"]
  log["restored_equal"] = all(
      np.array_equal(a, b) for a, b in zip(jax.tree.leaves(saved_host),
                                           jax.tree.leaves(distributed.allgather(r))))
  log["restored_sharding_ok"] = all(
      a.sharding == b.sharding for a, b in zip(jax.tree.leaves(r), jax.tree.leaves(target)))
  tick("ckpt")
  state = steps.TrainState(params=r["params"], opt_state=r["opt_state"], step=r["step"])
  for i in range(GRPO_STEPS_AFTER_RESTORE):
    state = grpo_step(state, 200 + i)
  log["final_step"] = int(state.step)

  tick("grpo2")
  final = distributed.allgather(state.params)
  leaves = jax.tree_util.tree_flatten_with_path(final)[0]
  pid = jax.process_index()
  with open(os.path.join(out_dir, f"log_{pid}.json"), "w") as f:
    json.dump(log, f)
  if distributed.is_main():
    np.savez(os.path.join(out_dir, "params.npz"),
             **{jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves})
  distributed.sync("written")


# ------------------------------------------------------------------------------------ the test

def _run(tmp_path, name: str, num_processes: int, local_devices: int):
  from tests.multiprocess import run_processes
  out, ckpt = tmp_path / name, tmp_path / f"{name}_ckpt"
  out.mkdir()
  run_processes([sys.executable, os.path.abspath(__file__), str(out), str(ckpt)],
                num_processes=num_processes, local_devices=local_devices, timeout_s=150)
  logs = [json.loads((out / f"log_{i}.json").read_text()) for i in range(num_processes)]
  with np.load(out / "params.npz") as z:
    params = {k: z[k] for k in z.files}
  return logs, params


def test_two_processes_train_like_one(tmp_path):
  """SFT + GRPO + save/restore + GRPO on a 2-process pod == the same on 1 process x 8 devices.

  Tolerance: losses rtol 1e-5, parameters rtol 1e-5 / atol 1e-6 (f32; gloo's cross-process
  all-reduce may sum in another order than the in-process one; nothing else differs).
  """
  pod, pod_params = _run(tmp_path, "pod", num_processes=2, local_devices=4)
  one, one_params = _run(tmp_path, "one", num_processes=1, local_devices=8)

  assert [lg["process_count"] for lg in pod] == [2, 2] and one[0]["process_count"] == 1
  for lg in pod + one:
    assert lg["place_roundtrip"], "rollout_batch.place lost or reordered rows"
    assert lg["restored_step"] == GRPO_STEPS_BEFORE_SAVE
    assert lg["restored_equal"] and lg["restored_meta_ok"] and lg["restored_sharding_ok"]
    assert lg["final_step"] == GRPO_STEPS_BEFORE_SAVE + GRPO_STEPS_AFTER_RESTORE
  # Each process's devices hold only its own half of the batch rows.
  assert pod[0]["place_local_rows"] == [0, 2] and pod[1]["place_local_rows"] == [4, 6]
  assert one[0]["place_local_rows"] == [0, 2, 4, 6]
  # Both processes saw the same (replicated) metrics.
  for key in ("sft_loss", "grpo_loss", "grpo_grad_norm"):
    assert pod[0][key] == pod[1][key]
    np.testing.assert_allclose(pod[0][key], one[0][key], rtol=1e-5, err_msg=key)
  assert all(np.isfinite(pod[0]["grpo_loss"])) and len(pod[0]["grpo_loss"]) == 4
  assert sorted(pod_params) == sorted(one_params) and pod_params
  for k in one_params:
    np.testing.assert_allclose(pod_params[k], one_params[k], rtol=1e-5, atol=1e-6, err_msg=k)


if __name__ == "__main__":
  _worker(sys.argv[1], sys.argv[2])
