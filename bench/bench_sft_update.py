"""The SFT update on SmolLM2-135M under compute dtypes, remat policies, LM-head extents and a
common prefix run once.

One jitted `train.steps.make_sft_update` step (AdamW) on B rows of L tokens whose last R are the
response (left-padded layout, as train/sft.py builds them), for each setting in turn in one
process: first call (compile + step) and the best of `--steps` steady-state steps. Used to pick
the CPU presets' `model.compute_dtype` / `model.remat` (BENCHMARKS.md, "Choices measured").
A setting's optional fourth field S: the rows share their first S tokens, which run once per
micro-batch ("prefix", as train/sft.py passes it when `model.shared_prefix_min` allows).

    python bench/bench_sft_update.py --settings bfloat16:full:all,float32:dots_with_no_batch_dims_saveable:response
    python bench/bench_sft_update.py --length 464 --settings \
      float32:dots_with_no_batch_dims_saveable:response:0,float32:dots_with_no_batch_dims_saveable:response:144
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import optax

from cqr_jax.models.gguf import load_gguf
from cqr_jax.testing import smollm2_gguf_path
from train import steps


def run(setting: str, batch: dict, response: int, n_steps: int) -> tuple[float, float]:
  dtype, remat, head, *prefix = setting.split(":")
  s = int(prefix[0]) if prefix else 0
  if s:
    batch = {"tokens": batch["tokens"][:, s:], "mask": batch["mask"][:, s:],
             "loss_mask": batch["loss_mask"][:, s:], "prefix": batch["tokens"][0, :s]}
  model, _ = load_gguf(smollm2_gguf_path(), param_dtype="float32", compute_dtype=dtype,
                       remat=remat, scan_layers=True)
  graphdef, params, rest = steps.split_model(model)
  tx = optax.adamw(1e-5)
  state = steps.init_state(params, tx)
  update = steps.make_sft_update(graphdef, rest, tx, micro_batch=len(batch["tokens"]),
                                 response_len=response if head == "response" else None)
  t0 = time.perf_counter()
  state, m = update(state, batch)
  jax.block_until_ready(m)
  first = time.perf_counter() - t0
  best = float("inf")
  for _ in range(n_steps):
    t0 = time.perf_counter()
    state, m = update(state, batch)
    jax.block_until_ready(m)
    best = min(best, time.perf_counter() - t0)
  return first, best


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--settings", default="bfloat16:full:all,bfloat16:full:response,"
                 "float32:dots_with_no_batch_dims_saveable:response",
                 help="comma-separated dtype:remat:head[:S] (head = all | response; S: the "
                 "rows' common prefix run once, default 0)")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--length", type=int, default=352)
  p.add_argument("--response", type=int, default=64)
  p.add_argument("--steps", type=int, default=2)
  args = p.parse_args()
  rng = np.random.default_rng(0)
  b, length = args.batch, args.length
  loss_mask = np.zeros((b, length), bool)
  loss_mask[:, length - args.response:] = True
  tokens = rng.integers(0, 49152, (b, length)).astype(np.int32)
  tokens[:, :length - args.response - 1] = tokens[0, :length - args.response - 1]  # one prompt
  batch = {"tokens": tokens, "mask": np.ones((b, length), bool), "loss_mask": loss_mask}
  print(f"| setting (dtype:remat:LM head[:prefix]) | first call s | steady step s |  ({b} x {length}, "
        f"response {args.response}, jax {jax.__version__})")
  for setting in args.settings.split(","):
    first, best = run(setting, batch, args.response, args.steps)
    print(f"| {setting} | {first:.1f} | {best:.1f} |", flush=True)


if __name__ == "__main__":
  main()
