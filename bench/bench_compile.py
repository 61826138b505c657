"""XLA:CPU's LLVM optimisation level for the heavy programs: compile time and run time.

The library compiles its updates, log-prob passes and sampler with `xla_backend_optimization_level`
1 on CPU (cqr_jax/compile_options.py) instead of XLA's default 3. This measures, in one process on
SmolLM2-135M at the CPU presets' shapes, each program at both levels: the first call (trace +
compile + one run), then the median of `--rounds` steady calls, alternating between the levels.

    python bench/bench_compile.py --out bench/results/compile.md
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

os.environ.pop("XLA_FLAGS", None)  # XLA's defaults apart from the level under test

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cqr_jax import compile_options, sampler as sampler_lib  # noqa: E402
from cqr_jax import config as cfglib  # noqa: E402
from train import common, steps  # noqa: E402

LEVELS = (3, 1)  # 3: XLA's default


def grpo_program(cfg, model, top_layers: int, groups: int, n: int, lc: int, lp: int = 512):
  """(callable, description): the GRPO update (KL term on, so with its reference log-probs)."""
  graphdef, params, rest = steps.split_model(model)
  c = cfglib.configlib.merge(cfg, {"grpo": {"train_top_layers": top_layers}})
  tx = common.stage_optimizer(c, "grpo")
  update = steps.make_grpo_update(graphdef, rest, tx, c.grpo.loss, temperature=0.7,
                                  micro_batch=groups * n, top_layers=top_layers)
  rng = np.random.default_rng(0)
  batch = {"prompt": jnp.asarray(rng.integers(100, 40000, (groups, lp)), jnp.int32),
           "prompt_mask": jnp.ones((groups, lp), jnp.int32),
           "completion": jnp.asarray(rng.integers(100, 40000, (groups, n, lc)), jnp.int32),
           "completion_mask": jnp.ones((groups, n, lc), jnp.int32),
           "adv": jnp.asarray(rng.normal(size=(groups, n)), jnp.float32),
           "ref_logp": jnp.full((groups, n, lc), -2.0, jnp.float32)}
  box = [steps.init_state(jax.tree.map(jnp.copy, params), tx)]

  def call():
    box[0], m = update(box[0], batch)
    jax.block_until_ready(m)
  return call, (f"GRPO update, top {top_layers} blocks, {groups} prompts of {lp} x {n} "
                f"completions of {lc}")


def sft_program(cfg, model, rows: int, length: int, response: int):
  graphdef, params, rest = steps.split_model(model)
  tx = common.stage_optimizer(cfg, "sft")
  update = steps.make_sft_update(graphdef, rest, tx, micro_batch=rows, response_len=response)
  rng = np.random.default_rng(0)
  loss_mask = np.zeros((rows, length), np.int32)
  loss_mask[:, -response:] = 1
  batch = {"tokens": jnp.asarray(rng.integers(100, 40000, (rows, length)), jnp.int32),
           "mask": jnp.ones((rows, length), jnp.int32), "loss_mask": jnp.asarray(loss_mask)}
  box = [steps.init_state(jax.tree.map(jnp.copy, params), tx)]

  def call():
    box[0], m = update(box[0], batch)
    jax.block_until_ready(m)
  return call, f"SFT update, all blocks, {rows} rows of {length} ({response} response)"


def sampler_program(model, tokenizer, mcfg, prompts: int, prompt_len: int, new: int):
  s = sampler_lib.Sampler(sampler_lib.SamplerConfig(
      max_prompt_len=512, max_new_tokens=new, temperature=0.7, n=1,
      prompt_len_buckets=(256, 384, 512), ignore_eos=True), tokenizer,
      model_eos_ids=mcfg.eos_token_ids)
  ids = [list(map(int, r)) for r in
         np.random.default_rng(0).integers(100, 40000, (prompts, prompt_len))]
  key = [jax.random.key(0)]

  def call():
    key[0], k = jax.random.split(key[0])
    s.generate(model, ids, key=k)
  return call, f"sampler, {prompts} prompts of {prompt_len} tokens, {new} new"


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--rounds", type=int, default=3, help="steady calls per level, alternating")
  ap.add_argument("--programs", type=int, nargs="+", default=[0, 1, 2, 3],
                  help="0: tiny GRPO update, 1: cpu-default GRPO update, 2: SFT update, 3: sampler")
  ap.add_argument("--out", default=None)
  args = ap.parse_args()
  cfg = cfglib.resolve("cpu-default", None, ["run_dir=/tmp/bench_compile"])
  mesh = common.make_mesh(cfg)
  model, mcfg = common.load_policy(cfg, mesh)
  tokenizer = common.load_tokenizer_for(cfg.model.source)
  builders = [
      lambda: grpo_program(cfg, model, 2, 2, 2, 32),      # tiny preset
      lambda: grpo_program(cfg, model, 10, 4, 4, 48),     # cpu-default
      lambda: sft_program(cfg, model, 8, 512, 64),        # cpu-default
      lambda: sampler_program(model, tokenizer, mcfg, 4, 450, 32),
  ]
  rows = []
  for i in args.programs:
    calls, first = {}, {}
    for level in LEVELS:  # a fresh jit per level: the option is read when the jit is made
      compile_options.CPU_LLVM_OPT_LEVEL = level
      sampler_lib.jitted_program.cache_clear()
      calls[level], what = builders[i]()
      t0 = time.perf_counter()
      calls[level]()
      first[level] = time.perf_counter() - t0
    steady = {level: [] for level in LEVELS}
    for _ in range(args.rounds):  # round-robin: both levels see the same machine load
      for level in LEVELS:
        t0 = time.perf_counter()
        calls[level]()
        steady[level].append(time.perf_counter() - t0)
    (fd, f1), (sd, s1) = (first[3], first[1]), (np.median(steady[3]), np.median(steady[1]))
    print(f"{what}: first call {fd:.1f} / {f1:.1f} s, steady {steady[3]} / {steady[1]}",
          flush=True)
    rows.append(f"| {what} | {fd:.1f} | {f1:.1f} | {sd:.2f} | {s1:.2f} | {s1 / sd:.2f} |")
  cmd = shlex.join(["python", "bench/bench_compile.py", *sys.argv[1:]])
  text = "\n".join([
      "## Compile time: XLA:CPU LLVM level 1 (ours) vs 3 (XLA's default)", "",
      "SmolLM2-135M-Instruct (f32), the CPU presets' shapes; one process, for each program a "
      "fresh jit at level 3 then at level 1 (so level 1 reuses the first's Python tracing caches, "
      "~2 s): first call (trace + compile + one run), then the median of "
      f"{args.rounds} steady calls per level, alternating. x86_64, {os.cpu_count()} cores; jax {jax.__version__}.", "",
      f"Command: `{cmd}`", "",
      "| program | first call s, level 3 | first call s, level 1 | steady s, level 3 | "
      "steady s, level 1 | steady ratio 1 / 3 |",
      "|---|---:|---:|---:|---:|---:|", *rows, ""])
  print(text)
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      f.write(text)


if __name__ == "__main__":
  main()
