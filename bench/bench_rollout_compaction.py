"""GRPO rollouts with and without shedding finished rows (`DecodePolicy.compact_min_rows`).

The GRPO benchmark's rollout (bench_grpo_step.py: SmolLM2-135M-Instruct, cpu-default preset,
8 prompts x 8 samples of the embedded benchmark's train turns, up to 128 new tokens at T 0.7,
real EOS), the same sampler with the decode loop shedding finished rows (64 -> 48, 32, 24, 16
rows) and without, on the same batches and keys, calls interleaved one-for-one. Reports each
call's seconds (the first per setting compiles), the rows at the end, and how many of the 64
completions came out token-identical.

    python bench/bench_rollout_compaction.py --batches 3 --out bench/results/rollout_compaction.md
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shlex
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench_grpo_step import bench_config  # noqa: E402
from cqr_jax import decode_policy  # noqa: E402
from cqr_jax.prompts import PromptBuilder  # noqa: E402
from train import common  # noqa: E402
from train.rewriting import make_sampler  # noqa: E402


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batches", type=int, default=3, help="batches per setting (the first compiles)")
  ap.add_argument("--prompts", type=int, default=8)
  ap.add_argument("--n", type=int, default=8)
  ap.add_argument("--max-new", type=int, default=128)
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  common.setup_logging()
  cfg = bench_config(argparse.Namespace(prompts=args.prompts, n=args.n, max_new=args.max_new,
                                        micro_batch=args.n, remat="none",
                                        compute_dtype="float32", set=[]),
                     os.path.join(tempfile.mkdtemp(prefix="bench_compact_"), "run"))
  ds = common.load_split(cfg, cfg.data.train_split)
  turns = list(ds.turns)
  mesh = common.make_mesh(cfg)
  tok = common.load_tokenizer_for(cfg.model.source)
  model, mcfg = common.load_policy(cfg, mesh)
  prompts = PromptBuilder()
  samplers = {}
  for name, compact in (("all rows to the end", False), ("shedding finished rows", True)):
    s = make_sampler(cfg, tok, mesh, mcfg, n=args.n, temperature=0.7,
                     max_new_tokens=args.max_new)
    cpu = decode_policy.CPU
    s.policy = dataclasses.replace(cpu, compact_min_rows=cpu.compact_min_rows if compact else 0)
    samplers[name] = s
  key = jax.random.key(cfg.grpo.seed)
  rows: list[dict] = []
  for b in range(args.batches):
    ids = [prompts.token_ids(t, tok) for t in turns[b * args.prompts:(b + 1) * args.prompts]]
    outs = {}
    for name, s in samplers.items():
      t0 = time.perf_counter()
      outs[name] = r = s.generate(model, ids, key=jax.random.fold_in(key, b), n=args.n)
      secs = time.perf_counter() - t0
      rows.append({"batch": b, "setting": name, "s": secs, "steps": s.last_timing["steps"],
                   "rows_end": s.last_timing["decode_rows_end"],
                   "mean_len": float(r.completion_lengths.mean()),
                   "compiled": bool(s.last_timing["compiled"])})
      print(rows[-1], flush=True)
    a, c = outs.values()
    same = int(sum(a.completion_tokens(i) == c.completion_tokens(i)
                   for i in range(len(a.finish_reasons))))
    rows[-1]["identical"] = same

  steady = {name: [r["s"] for r in rows if r["setting"] == name and not r["compiled"]]
            for name in samplers}
  lines = [
      "## GRPO rollouts: shedding finished rows in the decode loop vs running every row to the end",
      "",
      f"SmolLM2-135M-Instruct (cpu-default preset, f32), {args.prompts} prompts x {args.n} "
      f"samples of the embedded benchmark's train turns per batch, up to {args.max_new} new "
      f"tokens at T 0.7 with the model's EOS, the GRPO benchmark's sampler (shared prefix, "
      f"prompt buckets); the two settings on the same batches and keys, calls interleaved. "
      f"{platform.machine()}, {os.cpu_count()} cores shared with other jobs; jax "
      f"{jax.__version__}.",
      "",
      "Command: `python bench/bench_rollout_compaction.py " + shlex.join(argv or sys.argv[1:])
      + "`",
      "",
      "| batch | setting | s | compiled | decode steps | rows at the end | mean response | "
      "token-identical completions |",
      "|---|---|---:|---|---:|---:|---:|---:|",
  ]
  for r in rows:
    ident = f"{r['identical']} of {args.prompts * args.n}" if "identical" in r else ""
    lines.append(f"| {r['batch']} | {r['setting']} | {r['s']:.2f} | "
                 f"{'yes' if r['compiled'] else 'no'} | {r['steps']:.0f} | {r['rows_end']:.0f} | "
                 f"{r['mean_len']:.1f} | {ident} |")
  full, comp = (steady[n] for n in samplers)
  if full and comp:
    lines += ["", f"- Calls that compiled nothing, median: all rows {np.median(full):.2f} s, "
                  f"shedding {np.median(comp):.2f} s: **{np.median(full) / np.median(comp):.2f}x**"]
  text = "\n".join(lines) + "\n"
  print(text)
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      f.write(text)


if __name__ == "__main__":
  from cqr_jax.host_memory import ensure_huge_pages
  ensure_huge_pages()
  main(sys.argv[1:])
