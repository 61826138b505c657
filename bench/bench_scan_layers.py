"""Blocks as one lax.scan vs unrolled (ModelConfig.scan_layers): compile time, steady time, peak RSS.

SmolLM2-135M (the shipped GGUF, f32 weights, bf16 compute, remat full), each variant in its own
process (so peak RSS is its own) with the persistent XLA cache off:
- update: one GRPO update (forward + backward + AdamW) on 8 x 320 tokens, micro-batch 4, LM head
  on the last 64 columns; first call (compile + run) and the best of two further calls;
- sampler: 16 prompts of 180 tokens, 48 new tokens (EOS ignored), first and second call.

    python bench/bench_scan_layers.py --out bench/results/scan_layers.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

CHILD_ENV = {"CQR_JAX_XLA_CACHE": "off", "TOKENIZERS_PARALLELISM": "false"}


def child(what: str, scan: bool) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from cqr_jax.models import gguf
  from cqr_jax.testing import smollm2_gguf_path
  model, _ = gguf.load_gguf(smollm2_gguf_path(), param_dtype="float32",
                            compute_dtype="bfloat16", remat="full", scan_layers=scan)
  rs = np.random.RandomState(0)
  times = []
  if what == "update":
    from cqr_jax import schedules
    from cqr_jax.objectives.grpo import GRPOLossConfig
    from train import steps
    b, length, resp = 8, 320, 64
    graphdef, params, rest = steps.split_model(model)
    tx = schedules.grpo_optimizer(lr=1e-5, warmup_steps=0, b1=0.9, b2=0.999, weight_decay=0.01,
                                  clip_norm=1.0)
    state = steps.init_state(params, tx)
    update = steps.make_grpo_update(graphdef, rest, tx, GRPOLossConfig(), temperature=0.7,
                                    micro_batch=4, response_len=resp)
    for _ in range(3):
      batch = {"tokens": jnp.asarray(rs.randint(10, 40000, (b, length)), jnp.int32),
               "mask": jnp.ones((b, length), jnp.int32),
               "loss_mask": jnp.asarray(np.arange(length)[None].repeat(b, 0) >= length - resp),
               "ref_logp": jnp.full((b, length - 1), -3.0),
               "adv": jnp.asarray(rs.randn(b), jnp.float32)}
      t0 = time.perf_counter()
      state, m = update(state, batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
  else:
    from cqr_jax.sampler import Sampler, SamplerConfig
    sampler = Sampler(SamplerConfig(max_prompt_len=256, max_new_tokens=48, n=1,
                                    ignore_eos=True))
    prompts = [list(rs.randint(10, 40000, size=180)) for _ in range(16)]
    for i in range(2):
      t0 = time.perf_counter()
      sampler.generate(model, prompts, key=jax.random.key(i))
      times.append(time.perf_counter() - t0)
  return {"first_s": times[0], "steady_s": min(times[1:]),
          "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--child", nargs=2, metavar=("WHAT", "SCAN"), help=argparse.SUPPRESS)
  ap.add_argument("--out", default=None, help="write a markdown section here")
  args = ap.parse_args()
  if args.child:
    print("RESULT " + json.dumps(child(args.child[0], args.child[1] == "1")), flush=True)
    return
  rows = []
  for what in ("update", "sampler"):
    for scan in (True, False):
      proc = subprocess.run([sys.executable, __file__, "--child", what, str(int(scan))],
                            env={**os.environ, **CHILD_ENV}, capture_output=True, text=True,
                            check=True)
      res = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[7:])
      rows.append((what, "scan" if scan else "unrolled", res))
      print(what, rows[-1][1], res, flush=True)
  lines = ["# Blocks as one lax.scan vs unrolled (scan_layers)", "",
           f"SmolLM2-135M, bf16 compute, remat full; {platform.machine()}, {os.cpu_count()} cores; "
           "each variant in its own process, XLA cache off.", "",
           "Command: `python bench/bench_scan_layers.py --out bench/results/scan_layers.md`", "",
           "| program | layers | first call (s) | steady call (s) | compile ~ first - steady (s) "
           "| peak RSS (GB) |", "|---|---|---:|---:|---:|---:|"]
  for what, name, r in rows:
    lines.append(f"| {what} | {name} | {r['first_s']:.1f} | {r['steady_s']:.1f} | "
                 f"{r['first_s'] - r['steady_s']:.1f} | {r['peak_rss_gb']:.1f} |")
  text = "\n".join(lines) + "\n"
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()
