"""One GRPO step, ours vs TRL's GRPOTrainer, interleaved in one run (issue 6 "Benchmark").

SmolLM2-135M-Instruct (the shipped GGUF; TRL loads the same weights from the plain HF folder that
`materialize_hf_folder(weights=True)` writes), 8 prompts x 8 samples of the embedded benchmark's
train split (the same turns, in the same order, on both sides; the packaged rewrite prompt under
the model's chat template), up to 128 new tokens at T 0.7 / top-p 1 / no top-k, BM25 rank reward
over the embedded corpus (method.md 4.1; both sides call the same reward code), KL coef 0.001 (so
the reference pass runs), entropy bonus 0.001, one optimizer step per batch.

Ours is the step of `train.grpo.train_grpo` (preset cpu-default with the settings above), built
from the same library pieces (Sampler -> rollout_batch -> reference log-probs dispatched while the
host parses and ranks -> advantages -> `make_grpo_update`) so that it can be stepped one batch at
a time and interleaved with TRL: TRL's `train()` runs warm-up + R steps and a callback runs one
of ours after each of TRL's. `--check-train-grpo K` also runs `train_grpo(max_steps=K)` itself at
the end and reports its time split, to show the mirror is faithful.

TRL's split comes from wrapping its methods: generation (`_generate`), reward
(`_calculate_rewards`), no-grad log-prob passes (reference model), and the rest of the step
(training forward + backward + optimizer). TRL runs with its own defaults except for the settings
above (bf16 autocast and gradient checkpointing on; on a CPU without AVX-512 BF16 pass
`--trl-bf16 0`: bf16 autocast is the slow path there). Ours runs micro-batches of 8 completions,
i.e. one prompt and its 8 samples (rollout_batch.grpo_batch), in f32 (`--compute-dtype`).

    python bench/bench_grpo_step.py --out bench/results/grpo_step.md
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import platform
import shlex
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from cqr_jax import config as cfglib  # noqa: E402
from cqr_jax import rewards as rewards_lib  # noqa: E402
from cqr_jax import schedules  # noqa: E402
from cqr_jax.metrics_log import Timer  # noqa: E402
from cqr_jax.objectives.grpo import group_advantages  # noqa: E402
from cqr_jax.parsing import canonical_response, parse_response  # noqa: E402
from cqr_jax.prompts import PromptBuilder  # noqa: E402
from train import common, rollout_batch, steps  # noqa: E402
from train.rewriting import make_sampler  # noqa: E402

PHASES = ("rollout", "reward", "reference", "update")


def bench_config(args, run_dir: str) -> cfglib.RunConfig:
  return cfglib.resolve("cpu-default", None, [
      f"run_dir={run_dir}", f"grpo.batch_prompts={args.prompts}", f"grpo.n={args.n}",
      f"rollout.max_new_tokens={args.max_new}", "rollout.temperature=0.7", "rollout.top_p=1.0",
      "rollout.top_k=0", "grpo.loss.kl_coef=0.001", "grpo.loss.entropy_coef=0.001",
      f"grpo.micro_batch={args.micro_batch}", "grpo.save_every=100000", "grpo.log_samples=0",
      "grpo.warmup_steps=0", f"model.remat={args.remat}",
      f"model.compute_dtype={args.compute_dtype}",
      # the whole model trains, on the full embedded benchmark's turns (cpu-default's GRPO
      # trains its top 10 blocks on 4 fixed prompts of the small corpus)
      "grpo.train_top_layers=0", "grpo.turns=all", "grpo.max_turns=0", "grpo.lr=1e-5",
      "data.size=default", "data.max_train_turns=400"] + list(args.set))


class RankReward:
  """The reward of method.md 4.1 on texts (shared by both sides); times parsing and ranking."""

  def __init__(self, cfg: cfglib.RunConfig, ds):
    self.cfg, self.ranker = cfg, common.build_ranker(cfg, ds, cfg.retrieval.reward_max_words)
    self.golds = {t.qid: len(t.gold_ids) for t in ds.turns}
    self.parse_s = self.rank_s = 0.0

  def __call__(self, texts, qids, step: int = 0):
    t0 = time.perf_counter()
    parsed = [parse_response(t) for t in texts]
    ok = np.array([p.format_ok for p in parsed])
    t1 = time.perf_counter()
    ranks = self.ranker.ranks([p.rewrite if p.format_ok else None for p in parsed], qids)
    reward = rewards_lib.compute_rewards(ok, ranks, self.cfg.grpo.reward, step=step,
                                         total_steps=1000,
                                         num_golds=[self.golds[q] for q in qids])
    t2 = time.perf_counter()
    self.parse_s += t1 - t0
    self.rank_s += t2 - t1
    return reward, ok, ranks


class OursStep:
  """`train_grpo`'s loop body (train/grpo.py) over explicit state, one call per batch."""

  def __init__(self, cfg: cfglib.RunConfig, ds, reward: RankReward):
    g, ro = cfg.grpo, cfg.rollout
    self.cfg, self.reward = cfg, reward
    self.mesh = mesh = common.make_mesh(cfg)
    self.tokenizer = common.load_tokenizer_for(cfg.model.source)
    model, mcfg = common.load_policy(cfg, mesh)
    self.graphdef, params, self.rest = steps.split_model(model)
    self.ref_params = jax.tree.map(jnp.copy, params)
    tx = schedules.grpo_optimizer(lr=g.lr, warmup_steps=g.warmup_steps, b1=g.b1, b2=g.b2,
                                  weight_decay=g.weight_decay, clip_norm=g.clip_norm)
    self.state = steps.init_state(params, tx)
    self.prompts = PromptBuilder()
    # train_grpo's sampler (the preset's prompt buckets included)
    self.sampler = make_sampler(cfg, self.tokenizer, mesh, mcfg, n=g.n,
                                temperature=ro.temperature, max_new_tokens=ro.max_new_tokens)
    self.update = steps.make_grpo_update(self.graphdef, self.rest, tx, g.loss,
                                         temperature=ro.temperature, micro_batch=g.micro_batch)
    self.ref_logprobs = steps.make_logprob_fn(self.graphdef, self.rest,
                                              temperature=ro.temperature,
                                              micro_batch=g.micro_batch)
    self.key = jax.random.key(g.seed)

  def __call__(self, turns, step: int) -> dict:
    g, mesh, timer = self.cfg.grpo, self.mesh, Timer()
    self.reward.parse_s = self.reward.rank_s = 0.0
    self.key, sample_key = jax.random.split(self.key)
    with timer("rollout"):
      policy = nnx.merge(self.graphdef, self.state.params, self.rest)
      prompt_ids = [self.prompts.token_ids(t, self.tokenizer) for t in turns]
      roll = self.sampler.generate(policy, prompt_ids, key=sample_key, n=g.n)
    batch = rollout_batch.grpo_batch(roll, mesh, g.micro_batch, pack_rows=g.pack_rows,
                                     shared_prefix_min=self.cfg.model.shared_prefix_min)
    with timer("reference"):
      ref_lp = self.ref_logprobs(self.ref_params, batch)
    with timer("reward"):
      qids = [turns[i].qid for i in roll.prompt_index]
      reward, ok, ranks = self.reward(roll.texts, qids, step)
    with timer("reference"):
      ref_lp = jax.block_until_ready(ref_lp)
    adv = np.asarray(group_advantages(jnp.asarray(reward), g.n))
    with timer("update"):
      batch = dataclasses.replace(batch, ref_logp=ref_lp, adv=rollout_batch.place_replicated(
          adv.astype(np.float32), mesh))
      self.state, um = self.update(self.state, batch)
      um = jax.device_get(um)
    split = timer.split()
    lengths = roll.completion_lengths
    prefix = 0 if batch.prefix is None else int(batch.prefix.shape[0])
    return {**split, "tokens": float(np.sum(lengths)), "response_len": float(np.mean(lengths)),
            "prompt_len": float(np.mean([len(p) for p in prompt_ids])),
            "seq_len": int(prefix + batch.prompt_width + batch.unpack.shape[-1]),
            "prefix_len": prefix, "packed_rows": batch.rows,
            "time/parse": self.reward.parse_s, "time/rank": self.reward.rank_s,
            "reward_mean": float(np.mean(reward)), "format_pass": float(np.mean(ok)),
            "gen_steps": self.sampler.last_timing.get("steps", 0.0),
            "gen_rows_end": self.sampler.last_timing.get("decode_rows_end", 0.0)}


def full_reward_seconds(reward: RankReward, turns, n: int, repeats: int = 5) -> float:
  """Median seconds of the reward on a batch where every response passes the format check (each
  rewrite = the turn's context + question, ~100+ words): the worst case, every row is searched.
  The untrained model rarely passes the format, so a measured step can understate the reward."""
  texts, qids = [], []
  for t in turns:
    ctx = " ".join(f"{q} {a or ''}" for q, a in t.context)
    for _ in range(n):
      texts.append(canonical_response("the user asks about the topic", f"{ctx} {t.question}"))
      qids.append(t.qid)
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    reward(texts, qids)
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts))


# ---------------------------------------------------------------------------------------- TRL

class TRLTimes:
  """Wraps TRL methods to time them; `step()` returns the split of the last step."""

  def __init__(self):
    self.acc: dict[str, float] = {}
    self.lengths: list[int] = []
    self.prompt_lengths: list[int] = []

  def wrap(self, obj, name: str, phase, post=None):
    fn = getattr(obj, name)

    @functools.wraps(fn)
    def timed(*a, **kw):
      t0 = time.perf_counter()
      out = fn(*a, **kw)
      ph = phase() if callable(phase) else phase
      self.acc[ph] = self.acc.get(ph, 0.0) + time.perf_counter() - t0
      if post is not None:
        post(out)
      return out

    setattr(obj, name, timed)

  def take(self) -> dict:
    out, self.acc = self.acc, {}
    lengths, self.lengths = self.lengths, []
    plens, self.prompt_lengths = self.prompt_lengths, []
    return {**out, "tokens": float(sum(lengths)),
            "response_len": float(np.mean(lengths)) if lengths else 0.0,
            "prompt_len": float(np.mean(plens)) if plens else 0.0}


def build_trl(args, hf_dir: str, rows: list[dict], reward: RankReward, out_dir: str, times,
              on_step):
  import torch
  from datasets import Dataset
  from transformers import AutoTokenizer, TrainerCallback
  from trl import GRPOConfig, GRPOTrainer

  torch.manual_seed(0)
  tok = AutoTokenizer.from_pretrained(hf_dir)

  def rank_reward(prompts, completions, qid, **kw):
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    r, _, _ = reward(texts, list(qid))
    return [float(x) for x in r]

  trl_cfg = GRPOConfig(
      output_dir=out_dir, use_cpu=True, report_to="none", save_strategy="no",
      logging_steps=1000, max_steps=args.rounds + 1, seed=0, data_seed=0,
      per_device_train_batch_size=args.trl_micro_batch,
      gradient_accumulation_steps=args.prompts * args.n // args.trl_micro_batch,
      num_generations=args.n, max_completion_length=args.max_new, temperature=0.7, top_p=1.0,
      top_k=0, beta=0.001, entropy_coef=0.001, loss_type="bnpo", learning_rate=2e-6,
      shuffle_dataset=False, gradient_checkpointing=bool(args.trl_grad_ckpt),
      bf16=bool(args.trl_bf16),
      model_init_kwargs={"dtype": torch.float32}, dataloader_num_workers=0,
      disable_tqdm=True)
  trainer = GRPOTrainer(model=hf_dir, reward_funcs=rank_reward, args=trl_cfg,
                        train_dataset=Dataset.from_list(rows), processing_class=tok)

  def record_lengths(out):
    prompt_ids, completion_ids = out[0], out[1]
    times.lengths.extend(len(c) for c in completion_ids)
    times.prompt_lengths.extend(len(p) for p in prompt_ids)

  times.wrap(trainer, "_generate", "rollout", record_lengths)
  times.wrap(trainer, "_calculate_rewards", "reward")
  times.wrap(trainer, "_get_per_token_logps_and_entropies",
             lambda: "reference" if not torch.is_grad_enabled() else "update_logp")

  class Interleave(TrainerCallback):
    def on_step_begin(self, a, state, control, **kw):
      times.t0 = time.perf_counter()

    def on_step_end(self, a, state, control, **kw):
      times.total = time.perf_counter() - times.t0
      on_step(state.global_step - 1)

  trainer.add_callback(Interleave())
  return trainer


def trl_split(raw: dict, total: float) -> dict:
  """TRL's step in our phases: update = everything outside generation, reward and ref pass."""
  out = {f"time/{k}": raw.get(k, 0.0) for k in ("rollout", "reward", "reference")}
  out["time/update"] = total - sum(out.values())
  out["time/total"] = total
  return {**out, **{k: v for k, v in raw.items() if k in ("tokens", "response_len",
                                                            "prompt_len")}}


# ------------------------------------------------------------------------------------ report

def fmt_row(name: str, m: dict) -> str:
  tot = m["time/total"]
  cells = [f"{m.get(f'time/{p}', 0.0):.2f} ({m.get(f'time/{p}', 0.0) / tot:.0%})" for p in PHASES]
  tps = m["tokens"] / max(m["time/rollout"], 1e-9)
  return (f"| {name} | {tot:.2f} | " + " | ".join(cells) +
          f" | {m['tokens'] / tot:.0f} | {tps:.0f} | {m['response_len']:.1f} |")


def median_of(ms: list[dict]) -> dict:
  keys = [k for k in ms[0] if isinstance(ms[0][k], (int, float))]
  return {k: float(np.median([m[k] for m in ms])) for k in keys}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--prompts", type=int, default=8)
  ap.add_argument("--n", type=int, default=8)
  ap.add_argument("--max-new", type=int, default=128)
  ap.add_argument("--compute-dtype", default="float32", help="ours: model.compute_dtype")
  ap.add_argument("--micro-batch", type=int, default=8,
                  help="ours: completions per micro-batch (whole groups of n)")
  ap.add_argument("--remat", default="none",
                  help="ours: model.remat ('none', 'full' or a jax.checkpoint_policies name)")
  ap.add_argument("--trl-micro-batch", type=int, default=8, help="TRL per_device_train_batch_size")
  ap.add_argument("--trl-grad-ckpt", type=int, default=1,
                  help="TRL gradient checkpointing (its default: 1)")
  ap.add_argument("--trl-bf16", type=int, default=1, help="TRL bf16 autocast (its default: 1)")
  ap.add_argument("--rounds", type=int, default=2, help="timed steps per side after a warm-up")
  ap.add_argument("--skip-trl", action="store_true", help="ours only (no interleaving)")
  ap.add_argument("--check-train-grpo", type=int, default=0,
                  help="also run train_grpo(max_steps=K) and report its steps 2..K")
  ap.add_argument("--set", nargs="*", default=[], help="extra config overrides for ours")
  ap.add_argument("--out", default=None, help="write a markdown section here")
  args = ap.parse_args(argv)

  common.setup_logging()
  tmp = tempfile.mkdtemp(prefix="bench_grpo_")
  cfg = bench_config(args, os.path.join(tmp, "run"))
  ds = common.load_split(cfg, cfg.data.train_split)
  n_steps = args.rounds + 1
  turns = list(ds.turns)[:args.prompts * n_steps]
  if len(turns) < args.prompts * n_steps:
    raise SystemExit(f"only {len(turns)} train turns; need {args.prompts * n_steps}")
  batches = [turns[i * args.prompts:(i + 1) * args.prompts] for i in range(n_steps)]
  reward = RankReward(cfg, ds)
  t0 = time.perf_counter()
  ours = OursStep(cfg, ds, reward)
  load_s = time.perf_counter() - t0
  ours_ms: list[dict] = []
  compile_events: list[float] = []  # jax's compile events: trace, lowering, XLA compile
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, secs, **_: compile_events.append(secs)
      if event.startswith("/jax/core/compile/") else None)

  def ours_step(i: int):
    compile_events.clear()
    t = time.perf_counter()
    m = ours(batches[i], i)
    m["wall"] = time.perf_counter() - t
    # The update and reference pass compile once a run (a fixed row count, grpo.pack_rows); a
    # timed step compiles again only for a new prompt bucket or shared-prefix length.
    m["time/compile"] = sum(compile_events)
    ours_ms.append(m)
    print(f"ours step {i}: " + ", ".join(f"{k}={v:.2f}" for k, v in m.items()
                                         if k.startswith("time/")), flush=True)

  trl_ms: list[dict] = []
  trl_note = ""
  if args.skip_trl:
    for i in range(n_steps):
      ours_step(i)
  else:
    import torch
    import trl
    from cqr_jax.models.gguf import materialize_hf_folder
    hf_dir = materialize_hf_folder(common.resolve_source(cfg.model.source)[1], weights=True)
    pb = PromptBuilder()
    rows = [{"prompt": pb.messages(t, ours.tokenizer), "qid": t.qid}
            for b in batches for t in b]
    times = TRLTimes()

    def after_trl_step(i: int):
      m = trl_split(times.take(), times.total)
      trl_ms.append(m)
      print(f"TRL step {i}: " + ", ".join(f"{k}={v:.2f}" for k, v in m.items()
                                          if k.startswith("time/")), flush=True)
      ours_step(i)

    trainer = build_trl(args, hf_dir, rows, reward, os.path.join(tmp, "trl"), times,
                        after_trl_step)
    trainer.train()
    trl_note = (f"trl {trl.__version__}, torch {torch.__version__} ({torch.get_num_threads()} "
                f"threads), bf16 autocast {'on' if args.trl_bf16 else 'off'}, gradient "
                f"checkpointing {'on' if args.trl_grad_ckpt else 'off'}, micro-batch "
                f"{args.trl_micro_batch} x {args.prompts * args.n // args.trl_micro_batch} "
                f"accumulation, loss_type bnpo")

  check_ms: list[dict] = []
  if args.check_train_grpo:
    from train.grpo import train_grpo
    ccfg = bench_config(args, os.path.join(tmp, "check"))
    _, hist = train_grpo(ccfg, init="initial", max_steps=args.check_train_grpo)
    check_ms = [{**h, "tokens": h["tokens_per_s"] * h["time/rollout"]} for h in hist]

  worst = full_reward_seconds(reward, batches[0], args.n)
  report(args, argv, ours_ms, trl_ms, check_ms, trl_note, load_s, worst)


def report(args, argv, ours_ms, trl_ms, check_ms, trl_note, load_s, worst_reward_s):
  warm_o, timed_o = ours_ms[0], ours_ms[1:]
  med_o = median_of(timed_o)
  lines = [
      "## One GRPO step: ours vs TRL GRPOTrainer",
      "",
      f"SmolLM2-135M-Instruct, {args.prompts} prompts x {args.n} samples of the embedded "
      f"benchmark's train turns (same turns in the same order on both sides), up to "
      f"{args.max_new} new tokens at T 0.7 / top-p 1, BM25 (Lucene-like, k1 0.9 b 0.4) rank "
      f"reward over the embedded corpus (the same reward code on both sides), KL coef 0.001 "
      f"(reference pass included), entropy 0.001, one AdamW step. Ours: preset cpu-default "
      f"({args.compute_dtype} compute / f32 master weights) with remat {args.remat} and "
      f"micro-batch {args.micro_batch}. "
      f"Steps interleaved one-for-one in one process; median of {len(timed_o)} timed steps after "
      f"a warm-up step. {platform.machine()}, {os.cpu_count()} cores shared with other jobs "
      f"(compare ratios); jax {jax.__version__}." + (f" TRL: {trl_note}." if trl_note else ""),
      "",
      "Command: `python bench/bench_grpo_step.py " + shlex.join(argv) + "`",
      "",
      "| side | step s | rollout s | reward s | reference s | update s | step tokens/s | "
      "rollout tokens/s | mean response len |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
      fmt_row("ours (median)", med_o),
  ]
  if trl_ms:
    med_t = median_of(trl_ms[1:] or trl_ms)
    lines.append(fmt_row("TRL GRPOTrainer (median)", med_t))
  if check_ms and len(check_ms) > 1:
    lines.append(fmt_row("ours via train_grpo() (median of steps 2..)", median_of(check_ms[1:])))
  lines += ["", "Per step (ours / TRL):", ""]
  for i, m in enumerate(ours_ms):
    t = f"; TRL {trl_ms[i]['time/total']:.1f} s (response {trl_ms[i]['response_len']:.0f})" \
        if i < len(trl_ms) else ""
    lines.append(f"- step {i}{' (warm-up)' if i == 0 else ''}: ours {m['time/total']:.1f} s "
                 f"(of which jax compiling {m['time/compile']:.1f} s; response "
                 f"{m['response_len']:.0f}, {m['gen_steps']:.0f} decode steps, the last at "
                 f"{m['gen_rows_end']:.0f} of {args.prompts * args.n} rows){t}")
  lines.append("")
  reward_share = med_o["time/reward"] / med_o["time/total"]
  lines.append(f"- Reward (parse {med_o['time/parse'] * 1e3:.0f} ms + BM25 rank "
               f"{med_o['time/rank'] * 1e3:.0f} ms) share of our step: **{reward_share:.1%}** "
               f"(goal < 10%); format pass rate {med_o['format_pass']:.0%}. With every response "
               f"well-formed (all {args.prompts * args.n} searched, long rewrites): "
               f"{worst_reward_s * 1e3:.0f} ms = {worst_reward_s / med_o['time/total']:.1%} of our "
               f"step")
  if trl_ms:
    ratios = [t["time/total"] / o["time/total"] for o, t in zip(ours_ms[1:], trl_ms[1:])]
    lines.append(f"- TRL step / our step: **{np.median(ratios):.1f}x** (per timed pair: "
                 + ", ".join(f"{r:.1f}x" for r in ratios) + "; goal >= 5x)")
    pairs = list(zip(ours_ms[1:], trl_ms[1:]))
    clean = [t["time/total"] / o["time/total"] for o, t in pairs if o["time/compile"] == 0]
    if clean:
      lines.append(f"- Our timed steps that compiled nothing (a run's steady state, once its "
                   f"few shapes are compiled): {np.median(clean):.1f}x "
                   f"({len(clean)} of {len(pairs)} pairs)")
    # Compiling overlaps the micro-batches still running (dispatch is asynchronous), so
    # subtracting its seconds overstates the gain: an upper bound, not a measurement.
    steady = [t["time/total"] / (o["time/total"] - o["time/compile"]) for o, t in pairs]
    lines.append(f"- The same less the seconds jax spent compiling in our timed steps (an upper "
                 f"bound: compiling overlaps running micro-batches): {np.median(steady):.1f}x")
    med_t = median_of(trl_ms[1:] or trl_ms)
    for p in ("rollout", "reference", "update"):
      lines.append(f"- {p}: TRL / ours {med_t[f'time/{p}'] / med_o[f'time/{p}']:.1f}x")
  lines.append(f"- Warm-up step (ours, includes compiling the sampler, reference pass and "
               f"update): {warm_o['time/total']:.1f} s (rollout {warm_o['time/rollout']:.1f}, "
               f"reference {warm_o['time/reference']:.1f}, update {warm_o['time/update']:.1f}); "
               f"ours setup (model load, BM25 index) {load_s:.1f} s.")
  lines.append(f"- Mean prompt length ours {med_o['prompt_len']:.0f} tokens"
               + (f", TRL {median_of(trl_ms)['prompt_len']:.0f}" if trl_ms else "")
               + f"; ours' padded training sequence {med_o['seq_len']:.0f} tokens, of which "
               f"the first {med_o['prefix_len']:.0f} (the prompts' common prefix) run once a "
               f"step in the reference pass and update; the rest of each prompt and its "
               f"completions packed in {med_o['packed_rows']:.0f} rows of {args.max_new} slots "
               f"(median) for {args.prompts} prompts x {args.n} completions.")
  lines.append(f"- Host memory: GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')} "
               f"(cqr_jax.host_memory; both sides).")
  text = "\n".join(lines) + "\n"
  print(text)
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      f.write(text)


if __name__ == "__main__":
  from cqr_jax.host_memory import ensure_huge_pages
  ensure_huge_pages()  # both sides run in this process with the same allocator settings
  main(sys.argv[1:])
