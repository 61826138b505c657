"""The GRPO reference pass and update alone at the GRPO benchmark's packed shapes, on synthetic
tokens, for A/B runs of two revisions of the code (this script measures whichever is checked out).

SmolLM2-135M-Instruct (the shipped GGUF, f32), 8 prompts x 8 completions: prompts of a 144-token
common prefix plus 40-150 tokens, left-padded in the 320-token bucket; completions of 15-89 tokens,
a fifth of them the full 128 (as the benchmark's rollouts end). `rollout_batch.grpo_batch` packs
them as the GRPO stage does (micro-batch 8, `--pack-rows` rows a stream, shared prefix run once a
step); then, per round, the
reference pass and one update (KL 0.001, entropy 0.001, AdamW). Round 0 includes compiling.

    python bench/bench_packed_update.py --rounds 2        # at each revision, one after the other
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from cqr_jax import host_memory  # noqa: F401  (glibc huge pages, as the trainer)
from cqr_jax.config import GRPOSection
from cqr_jax.models.gguf import load_gguf
from cqr_jax.objectives.grpo import GRPOLossConfig
from cqr_jax.schedules import grpo_optimizer
from cqr_jax.testing import smollm2_gguf_path
from train import rollout_batch, steps

PROMPTS, N, NEW, BUCKET, PREFIX = 8, 8, 128, 320, 144


def rollouts(rng, vocab: int):
  """Rollout-shaped arrays (what `grpo_batch` reads) with the benchmark's lengths."""
  head = rng.integers(2, vocab, PREFIX)
  ids = np.zeros((PROMPTS * N, BUCKET), np.int32)
  mask = np.zeros((PROMPTS * N, BUCKET), bool)
  for i in range(PROMPTS):
    row = np.concatenate([head, rng.integers(2, vocab, rng.integers(40, 150))])
    ids[i * N:(i + 1) * N, BUCKET - len(row):] = row
    mask[i * N:(i + 1) * N, BUCKET - len(row):] = True
  lengths = np.where(rng.random(PROMPTS * N) < 0.2, NEW, rng.integers(15, 90, PROMPTS * N))
  return types.SimpleNamespace(
      prompt_ids=ids, prompt_mask=mask, n=N, finish_reasons=["stop"] * (PROMPTS * N),
      completion_ids=rng.integers(2, vocab, (PROMPTS * N, NEW)).astype(np.int32),
      completion_mask=np.arange(NEW)[None] < lengths[:, None])


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--pack-rows", type=int, default=GRPOSection().pack_rows)
  args = ap.parse_args()
  rng = np.random.default_rng(args.seed)
  model, _ = load_gguf(smollm2_gguf_path(), param_dtype="float32", compute_dtype="float32",
                       remat="none")
  roll = rollouts(rng, model.config.vocab_size)
  batch = rollout_batch.grpo_batch(roll, None, N, pack_rows=args.pack_rows, shared_prefix_min=64)
  print(f"{batch.num_calls} calls of {batch.tokens.shape[1]} x {batch.tokens.shape[2]} rows "
        f"({batch.rows} rows of {NEW}); prompt tokens after the "
        f"prefix {(roll.prompt_mask.sum(1)[::N] - PREFIX).tolist()}", flush=True)
  graphdef, params, rest = steps.split_model(model)
  reference = steps.make_logprob_fn(graphdef, rest, temperature=0.7, micro_batch=N)
  tx = grpo_optimizer(1e-6, 0)
  update = steps.make_grpo_update(graphdef, rest, tx, GRPOLossConfig(), temperature=0.7,
                                  micro_batch=N)
  state = steps.init_state(params, tx)
  for r in range(args.rounds):
    t = time.perf_counter()
    ref = jax.block_until_ready(reference(state.params, batch))
    t_ref = time.perf_counter() - t
    adv = jnp.asarray(rng.normal(size=PROMPTS * N).astype(np.float32))
    t = time.perf_counter()
    state, metrics = update(state, dataclasses.replace(batch, ref_logp=ref, adv=adv))
    jax.block_until_ready(state)
    t_up = time.perf_counter() - t
    print(f"round {r}: reference {t_ref:.2f} s, update {t_up:.2f} s, loss "
          f"{float(metrics['loss']):.6f}", flush=True)


if __name__ == "__main__":
  main()
