"""Sampler decode step: scanned blocks vs unrolled blocks, SmolLM2-135M-Instruct (the shipped GGUF).

16 random prompts of 230 tokens (bucket 256), T 0.7, EOS ignored, generation bucket 64. Per decode
step = (wall of 48 new tokens - wall of 8 new tokens) / 40, both after a compile call (first).

  python bench/bench_decode_layers.py            # scan_layers on (the run default)
  python bench/bench_decode_layers.py model.scan_layers=false
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from cqr_jax import config as cfglib  # noqa: E402
from cqr_jax.sampler import Sampler, SamplerConfig  # noqa: E402
from train import common  # noqa: E402


def main(overrides):
  cfg = cfglib.resolve("tiny", None, ["mesh.fsdp=1", *overrides])
  mesh = common.make_mesh(cfg)
  model, _ = common.load_policy(cfg, mesh)
  tok = common.load_tokenizer_for(cfg.model.source)
  prompts = [list(map(int, row)) for row in np.random.default_rng(0).integers(100, 40000, (16, 230))]
  sampler = Sampler(SamplerConfig(max_prompt_len=512, max_new_tokens=48, temperature=0.7, n=1,
                                  prompt_len_buckets=(256, 384, 512), gen_len_buckets=(64,),
                                  ignore_eos=True), tok, mesh=mesh, model_eos_ids=())

  def run(new):
    t0 = time.perf_counter()
    sampler.generate(model, prompts, key=jax.random.key(0), max_new_tokens=new)
    return time.perf_counter() - t0

  first = run(48)
  t48, t8 = run(48), run(8)
  print(f"{' '.join(overrides) or 'scan_layers=true'}: first call {first:.1f} s, 48 tokens "
        f"{t48:.2f} s, 8 tokens {t8:.2f} s, per decode step {(t48 - t8) / 40:.3f} s")


if __name__ == "__main__":
  main(sys.argv[1:])
