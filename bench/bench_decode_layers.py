"""Sampler decode step: blocks as one lax.scan vs unrolled, SmolLM2-135M-Instruct (shipped GGUF).

16 random prompts of 230 tokens (bucket 256), T 0.7, EOS ignored, generation bucket 64, n = 1 and
4 (batch 16 and 64), f32 or bf16 compute. Per decode step = (wall of 48 new tokens - wall of 8
new tokens) / 40, each the median of `--iters` calls after a compile call; the two layer loops
alternate call by call (`DecodePolicy.scan_layers`; the CPU default is unrolled).

  python bench/bench_decode_layers.py [--dtype bfloat16] [--iters 3]
"""

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from cqr_jax import config as cfglib  # noqa: E402
from cqr_jax import decode_policy  # noqa: E402
from cqr_jax.sampler import Sampler, SamplerConfig  # noqa: E402
from train import common  # noqa: E402


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--iters", type=int, default=3)
  args = ap.parse_args(argv)
  cfg = cfglib.resolve("tiny", None, ["mesh.fsdp=1"])
  mesh = common.make_mesh(cfg)
  model, _ = common.load_policy(cfg, mesh)
  tok = common.load_tokenizer_for(cfg.model.source)
  prompts = [list(map(int, row)) for row in np.random.default_rng(0).integers(100, 40000, (16, 230))]
  for n in (1, 4):
    samplers = {scan: Sampler(SamplerConfig(
        max_prompt_len=512, max_new_tokens=48, temperature=0.7, n=n, compute_dtype=args.dtype,
        prompt_len_buckets=(256, 384, 512), gen_len_buckets=(64,), ignore_eos=True),
        tok, mesh=mesh, model_eos_ids=(),
        policy=dataclasses.replace(decode_policy.for_backend(jax.default_backend()),
                                   scan_layers=scan)) for scan in (True, False)}

    def run(scan, new):
      t0 = time.perf_counter()
      samplers[scan].generate(model, prompts, key=jax.random.key(0), max_new_tokens=new)
      return time.perf_counter() - t0

    first = {scan: run(scan, 48) for scan in samplers}
    times = {(scan, new): [] for scan in samplers for new in (48, 8)}
    for _ in range(args.iters):
      for scan in samplers:
        for new in (48, 8):
          times[scan, new].append(run(scan, new))
    for scan in samplers:
      step = (np.median(times[scan, 48]) - np.median(times[scan, 8])) / 40
      print(f"batch {16 * n} {args.dtype} {'scan    ' if scan else 'unrolled'}: first call "
            f"{first[scan]:.1f} s, per decode step {step * 1e3:.1f} ms")


if __name__ == "__main__":
  main()
