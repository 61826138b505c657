"""An evaluation's sampling, split order and rollout prompt buckets against shortest prompt first
with `eval.prompt_buckets` (cpu-default: 384/512 against 256/336/512).

Samples the whole test split once each way with the initial policy, as `train/evaluate.py` does
(32 prompts a call, the last call padded), and reports the seconds of the first pass (compiling
each new program) and of a second pass (compiled), side by side in one process.

    python bench/bench_eval_buckets.py --out bench/results/eval_buckets.md
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _pass(model, sampler, prompts, tok, turns, batch: int) -> tuple[float, list[int]]:
  import jax
  t0, widths = time.perf_counter(), []
  for b in range(0, len(turns), batch):
    ids = [prompts.token_ids(t, tok) for t in turns[b:b + batch]]
    sampler.generate(model, ids, key=jax.random.key(b))
    widths.append(sampler.prepare(ids)[0].shape[1])
  return time.perf_counter() - t0, widths


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--preset", default="cpu-default")
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  from cqr_jax import config as cfglib
  from train import common, evaluate, rewriting
  cfg = cfglib.resolve(args.preset)
  e = cfg.eval
  mesh = common.make_mesh(cfg)
  ds = common.load_split(cfg, cfg.data.test_split)
  tok = common.load_tokenizer_for(cfg.model.source)
  prompts = common.prompt_builder(cfg, tokenizer=tok)
  model, mcfg = common.load_policy(cfg, mesh)
  longest = rewriting.inference_prompt_len(cfg, prompts, tok, ds.turns)
  order = evaluate.length_order(ds.turns, prompts, tok)
  ways = {"split order, rollout.prompt_buckets": (list(ds.turns), ()),
          "shortest first, eval.prompt_buckets": ([ds.turns[i] for i in order],
                                                  e.prompt_buckets)}
  rows = []
  for name, (turns, buckets) in ways.items():
    sampler = rewriting.make_sampler(cfg, tok, mesh, mcfg, n=1, temperature=e.temperature,
                                     max_new_tokens=e.max_new_tokens, max_prompt_len=longest,
                                     batch_prompts=e.batch_prompts, prompt_buckets=buckets)
    first, widths = _pass(model, sampler, prompts, tok, turns, e.batch_prompts)
    second, _ = _pass(model, sampler, prompts, tok, turns, e.batch_prompts)
    rows.append((name, widths, first, second))
    print(name, widths, f"{first:.1f} s, {second:.1f} s", flush=True)
  base = rows[0][3]
  lines = [
      "# An evaluation's sampling: shortest prompt first with eval.prompt_buckets", "",
      f"Preset `{args.preset}`, {len(ds.turns)} test turns, {e.batch_prompts} prompts a call, "
      f"{e.max_new_tokens} new tokens, the initial policy; both ways in one process.  ",
      f"Command: `python bench/bench_eval_buckets.py --preset {args.preset}"
      f"{' --out ' + args.out if args.out else ''}`  ",
      f"Machine: {platform.machine()}, {os.cpu_count()} cores", "",
      "| order, buckets | padded prompt widths | first pass (compiling), s | compiled pass, s "
      "| compiled, vs split order |", "|---|---|---|---|---|"]
  for name, widths, first, second in rows:
    lines.append(f"| {name} | {', '.join(map(str, widths))} | {first:.1f} | {second:.1f} | "
                 f"{base / second:.2f}x |")
  text = "\n".join(lines) + "\n"
  print(text)
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      f.write(text)


if __name__ == "__main__":
  main()
