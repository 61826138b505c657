"""Stage 2: retrieval-guided GRPO (method.md 4).

One step (design.md "One GRPO step"): a batch of turns -> prompts -> n rollouts each (the sampler)
-> the reference log-prob pass is dispatched to the device while the host parses the responses,
ranks the rewrites against the TRAIN qrels and computes rewards -> group advantages -> one AdamW
update over micro-batches (each prompt's forward shared by its samples: rollout_batch.grpo_batch)
-> metrics, checkpoint every N steps. Resumable from the latest good
checkpoint (params, optimizer, step, PRNG key, data position).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cqr_jax import config as cfglib
from cqr_jax import paths
from cqr_jax.parsing import parse_response, retrieval_query
from cqr_jax.sampler import Rollouts
from train import common, rollout_batch, steps
from train.rewriting import make_sampler

log = logging.getLogger("cqr_jax")
USES_CONFIG = True


class NonFiniteLossError(RuntimeError):
  pass


def add_args(p):
  common.stage_args(p)
  p.add_argument("--init", choices=["auto", "sft", "initial"], default="auto",
                 help="policy to start from: the SFT stage's checkpoint (auto: if present) or "
                 "the initial model (the paper's RL-only ablation)")
  p.add_argument("--keep-optimizer", action="store_true",
                 help="keep the optimizer state in the final checkpoint (default: parameters "
                 "only)")


def run(args) -> int:
  cfg = common.config_from_args(args)
  train_grpo(cfg, init=args.init, keep_optimizer=args.keep_optimizer)
  return 0


def sample_in_calls(sampler, policy, prompt_ids, key, n: int, per_call: int):
  """The step's rollouts, sampled `per_call` prompts at a time (0: in one call with `key`;
  call c draws with fold_in(key, c)), concatenated in prompt order."""
  if not per_call or per_call >= len(prompt_ids):
    return sampler.generate(policy, prompt_ids, key=key, n=n)
  parts = [sampler.generate(policy, prompt_ids[i:i + per_call],
                            key=jax.random.fold_in(key, c), n=n)
           for c, i in enumerate(range(0, len(prompt_ids), per_call))]
  return Rollouts.concat(parts, sampler.pad_id)


def rollout_prompts(cfg: cfglib.RunConfig) -> int:
  """Prompts rolled out a step: grpo.rollout_prompts (dynamic sampling) or grpo.batch_prompts."""
  g = cfg.grpo
  if g.rollout_prompts and g.rollout_prompts < g.batch_prompts:
    raise ValueError(f"grpo.rollout_prompts={g.rollout_prompts} must be 0 or at least "
                     f"grpo.batch_prompts={g.batch_prompts}")
  return max(g.rollout_prompts, g.batch_prompts)


def total_steps(cfg: cfglib.RunConfig, num_turns: int) -> int:
  g = cfg.grpo
  if g.steps:
    return g.steps
  return max(num_turns // rollout_prompts(cfg), 1) * g.epochs


def sft_params_or_none(cfg: cfglib.RunConfig, params, init: str):
  """Latest SFT params from `<run>/sft/ckpt`, or None to start from the initial model."""
  if init == "initial":
    return None
  try:
    step, sft = common.restore_stage_params(cfg, "sft", params)
  except common.MissingStageError:
    sdpw_done = paths.exists(os.path.join(common.stage_dir(cfg, "sdpw", create=False),
                                          "summary.json"))
    skipped = paths.exists(os.path.join(common.stage_dir(cfg, "sft", create=False),
                                        "skipped.json"))
    if init == "sft" or (sdpw_done and not skipped):
      raise common.MissingStageError(
          f"{common.ckpt_dir(cfg, 'sft')}: no SFT checkpoint, though SDPW has run: run "
          "`cqr-jax sft --run-dir <this run>` first, or pass --init initial for the RL-only "
          "ablation") from None
    log.warning("GRPO starts from the initial model (%s): the RL-only ablation",
                "sft.allow_empty skipped SFT" if skipped else "no SDPW or SFT output in the run")
    _record_init(cfg, {"init": "initial", "source": cfg.model.source})
    return None
  log.info("GRPO starts from the SFT checkpoint (step %d)", step)
  _record_init(cfg, {"init": "sft", "step": step, "dir": common.ckpt_dir(cfg, "sft")})
  return sft


def _record_init(cfg: cfglib.RunConfig, what: dict) -> None:
  """`<run>/grpo/init.json`: which policy GRPO started from (the checkpoint and its step)."""
  common.save_json(os.path.join(common.stage_dir(cfg, "grpo"), "init.json"), what)


def train_grpo(cfg: cfglib.RunConfig, *, init: str = "auto", max_steps: int | None = None,
               keep_optimizer: bool = False):
  """Runs (or resumes) GRPO; returns the final TrainState and the list of step metrics.

  The final step's checkpoint holds the parameters only (unless `keep_optimizer`) and replaces
  the earlier ones; the others keep the optimizer state for a resume."""
  from cqr_jax.checkpoint import Checkpointer
  from cqr_jax.data import TurnBatches
  from cqr_jax.metrics_log import CollapseMonitor, MetricsLogger, Timer
  from cqr_jax.objectives.grpo import group_advantages

  g, ro = cfg.grpo, cfg.rollout
  per_call = ro.prompts_per_call
  if per_call < 0 or (per_call and rollout_prompts(cfg) % per_call):
    raise ValueError(f"rollout.prompts_per_call={ro.prompts_per_call} must be 0 or divide the "
                     f"prompts rolled out a step ({rollout_prompts(cfg)}): one sampler program")
  if (g.batch_prompts * g.n) % g.micro_batch:
    raise ValueError(f"grpo.batch_prompts * grpo.n = {g.batch_prompts * g.n} must be a multiple "
                     f"of grpo.micro_batch = {g.micro_batch}")
  common.write_config(cfg)
  finished = common.finished_stage(cfg, "grpo", keep_optimizer)  # before the model is loaded
  if finished is not None:  # (no optimizer state: nothing is left to train)
    return steps.TrainState(finished[1], None, jnp.asarray(finished[0], jnp.int32)), []
  out = common.stage_dir(cfg, "grpo")
  mesh = common.make_mesh(cfg)
  ds = common.load_split(cfg, cfg.data.train_split)
  tokenizer = common.load_tokenizer_for(cfg.model.source)
  prompts = common.prompt_builder(cfg, tokenizer=tokenizer)
  turns = training_turns(cfg, ds.turns, prompts, tokenizer)
  model, mcfg = common.load_policy(cfg, mesh)
  graphdef, initial, rest = steps.split_model(model)
  sft = sft_params_or_none(cfg, initial, init)
  params = initial if sft is None else sft
  # The frozen reference (method.md 4.5); with loss.kl_coef 0 there is no KL term, so neither a
  # reference copy nor its log-prob pass (as TRL with beta 0).
  use_ref = g.loss.kl_coef != 0
  ref_params = None
  if use_ref:
    ref_params = reference_params(cfg, initial, sft, init)
    if ref_params is params:  # the update donates the policy's arrays: the reference keeps a copy
      ref_params = jax.tree.map(jnp.copy, params)
  n_steps = max_steps or total_steps(cfg, len(turns))
  tx = common.stage_optimizer(cfg, "grpo")
  state = steps.init_state(params, tx)
  ranker = common.build_ranker(cfg, ds, cfg.retrieval.reward_max_words)
  batches = TurnBatches(turns, rollout_prompts(cfg), seed=g.seed, drop_last=True)
  key = jax.random.key(g.seed)
  ckpt = Checkpointer(os.path.join(out, "ckpt"), max_to_keep=g.keep_checkpoints,
                      save_every=g.save_every)
  full = total_steps(cfg, len(turns))  # the stage's last step (max_steps may stop earlier)
  latest = ckpt.latest_step()
  if latest is not None:
    step0, restored, meta = ckpt.restore(None, {"state": common.abstract_like(_as_dict(state))})
    state = _from_dict(restored["state"])
    batches.set_state(meta["data"])
    key = jax.random.wrap_key_data(jnp.asarray(meta["key"], jnp.uint32))
    log.info("resumed GRPO from step %d", step0)
  sampler = make_sampler(cfg, tokenizer, mesh, mcfg, n=g.n, temperature=ro.temperature,
                         max_new_tokens=ro.max_new_tokens)
  update = steps.make_grpo_update(graphdef, rest, tx, g.loss, temperature=ro.temperature,
                                  micro_batch=g.micro_batch, mesh=mesh,
                                  top_layers=g.train_top_layers)
  ref_logprobs = steps.make_logprob_fn(graphdef, rest, temperature=ro.temperature,
                                       micro_batch=g.micro_batch, mesh=mesh)
  logger = MetricsLogger(out, resume_step=int(state.step) if int(state.step) else None)
  monitor = CollapseMonitor()
  history, bad_in_row = [], 0
  start = int(state.step)
  from tqdm.auto import tqdm
  bar = tqdm(range(start, n_steps), desc="grpo", initial=start, total=n_steps,
             disable=not common.is_main())
  for step in bar:
    timer = Timer()
    turns = next(batches)
    key, sample_key = jax.random.split(key)
    with timer("rollout"):
      policy = nnx.merge(graphdef, state.params, rest)
      prompt_ids = [prompts.token_ids(t, tokenizer) for t in turns]
      roll = sample_in_calls(sampler, policy, prompt_ids, sample_key, g.n,
                             ro.prompts_per_call)
    qids = [turns[i].qid for i in roll.prompt_index]
    scored, train_roll = None, roll
    if len(turns) > g.batch_prompts:  # dynamic sampling: the rewards pick the groups to train
      with timer("reward"):
        scored = score_rollouts(ranker, roll, qids, turns, g.reward, step, n_steps,
                                cfg.retrieval.query)
      keep = select_groups(scored[2], g.n, g.batch_prompts)
      train_roll = roll.take(keep)
    # Each prompt's samples in groups that share one prompt forward in the update.
    batch = rollout_batch.grpo_batch(train_roll, mesh, g.micro_batch, pack_rows=g.pack_rows,
                                     shared_prefix_min=cfg.model.shared_prefix_min)
    with timer("reference"):  # async dispatch: runs while the host computes the rewards
      ref_lp = ref_logprobs(ref_params, batch) if use_ref else None
    if scored is None:
      with timer("reward"):
        scored = score_rollouts(ranker, roll, qids, turns, g.reward, step, n_steps,
                                cfg.retrieval.query)
      keep = np.arange(roll.num_prompts)
    ok, ranks, reward = scored
    with timer("reference"):
      ref_lp = jax.block_until_ready(ref_lp)
    if use_ref:
      batch = dataclasses.replace(batch, ref_logp=ref_lp)
    trained = reward.reshape(-1, g.n)[keep].reshape(-1)
    adv = np.asarray(group_advantages(jnp.asarray(trained), g.n))  # after the device is free
    with timer("update"):
      batch = dataclasses.replace(batch, adv=rollout_batch.place_replicated(
          adv.astype(np.float32), mesh))
      state, um = update(state, batch)
      um = jax.device_get(um)
    finite = bool(um["finite"])
    bad_in_row = 0 if finite else bad_in_row + 1
    m = step_metrics(step + 1, reward, ok, ranks, roll, um, timer)
    m["groups_flat"] = flat_fraction(reward, g.n)
    m["trained_groups_flat"] = flat_fraction(trained, g.n)
    history.append(m)
    logger.log(step + 1, m)
    if common.is_main() and g.log_samples:
      write_samples(out, step + 1, [{"qid": qids[i], "text": roll.texts[i],
                                     "reward": float(reward[i]), "rank": int(ranks[i])}
                                    for i in range(min(g.log_samples, len(qids)))])
    monitor.update(step + 1, m["format_pass"], m["reward_mean"])
    bar.set_postfix(reward=f"{m['reward_mean']:.3f}", fmt=f"{m['format_pass']:.2f}",
                    mrr=f"{m['batch_mrr']:.3f}")
    if not finite:
      log.warning("step %d: non-finite loss or gradient (loss=%s); update skipped (%d in a row)",
                  step + 1, um["loss"], bad_in_row)
      if bad_in_row >= g.max_nonfinite:
        ckpt.wait()
        raise NonFiniteLossError(
            f"{bad_in_row} non-finite losses in a row at step {step + 1}; stopping. The last good "
            f"checkpoint is step {ckpt.latest_step()} under {ckpt.directory}")
      continue
    final = int(state.step) == full
    payload = _as_dict(state)
    if final and not keep_optimizer:  # nothing left to resume: parameters only
      payload = {k: v for k, v in payload.items() if k != "opt_state"}
    ckpt.save(int(state.step), {"state": payload},
              meta={"data": batches.get_state(), "key": np.asarray(
                  jax.random.key_data(key)).tolist(), "metrics": m, "final": final,
                    "optimizer": "opt_state" in payload},
              force=(step + 1 == n_steps))
  ckpt.wait()
  if int(state.step) == full and not keep_optimizer:
    ckpt.keep_only(full)
  logger.close()
  return state, history


def reference_params(cfg: cfglib.RunConfig, initial, sft, init: str):
  """The KL reference's params (grpo.reference, method.md 4.5): "sft" = the SFT checkpoint (read
  here when the policy starts from the initial model), or the initial model when there is none
  (the RL-only ablation); "init" = the initial model."""
  ref = cfg.grpo.reference
  if ref not in ("sft", "init"):
    raise ValueError(f"grpo.reference={ref!r}: expected 'sft' or 'init'")
  if ref == "sft" and sft is None and init == "initial":
    try:
      sft = common.restore_stage_params(cfg, "sft", initial)[1]
    except common.MissingStageError:
      pass
  if ref == "sft" and sft is None:
    log.warning("no SFT checkpoint: the KL reference is the initial model (the paper's RL-only "
                "ablation)")
  use_sft = ref == "sft" and sft is not None
  log.info("GRPO KL reference: the %s model", "SFT" if use_sft else "initial")
  return sft if use_sft else initial


def fitting_turns(turns: list, prompts, tokenizer, max_len: int) -> list:
  """The turns whose templated prompt has at most `max_len` tokens (rollout.max_prompt_len);
  the others are dropped and counted, as verl's filter_overlong_prompts does (method.md 4.4)."""
  lengths = [len(prompts.token_ids(t, tokenizer)) for t in turns]
  kept = [t for t, n in zip(turns, lengths) if n <= max_len]
  if len(kept) < len(turns):
    log.warning("GRPO: dropped %d of %d training prompts longer than rollout.max_prompt_len=%d "
                "tokens (longest %d)", len(turns) - len(kept), len(turns), max_len, max(lengths))
  return kept


def training_turns(cfg: cfglib.RunConfig, turns: list, prompts=None, tokenizer=None) -> list:
  """The turns GRPO samples from: `grpo.turns` ("all" | "sdpw_kept"), those whose prompt fits
  (`fitting_turns`, given the prompt builder and tokenizer), then `grpo.max_turns`."""
  g = cfg.grpo
  if g.turns == "sdpw_kept":
    from train import sdpw
    kept = {r["qid"] for r in sdpw.read_sft_data(cfg)}
    turns = [t for t in turns if t.qid in kept]
  elif g.turns != "all":
    raise ValueError(f"grpo.turns={g.turns!r}: expected 'all' or 'sdpw_kept'")
  if prompts is not None:
    turns = fitting_turns(turns, prompts, tokenizer, cfg.rollout.max_prompt_len)
  turns = turns[:g.max_turns] if g.max_turns else turns
  if len(turns) < rollout_prompts(cfg):
    raise ValueError(f"GRPO needs at least {rollout_prompts(cfg)} training turns (grpo."
                     f"batch_prompts={g.batch_prompts}, rollout_prompts={g.rollout_prompts}), "
                     f"got {len(turns)} (grpo.turns={g.turns!r}, grpo.max_turns={g.max_turns}, "
                     f"data.max_train_turns={cfg.data.max_train_turns})")
  return turns


def score_rollouts(ranker, roll, qids, turns, reward_cfg, step: int, n_steps: int,
                   query_form: str = "rewrite"):
  """(format ok [N], gold ranks [N], rewards [N]) of a step's rollouts (method.md 4.1): only
  responses that pass the format check are sent to the retriever (as retrieval.query forms
  them), ranked against the TRAIN qrels; on several hosts each ranks its own slice of the
  rollouts, then the ranks are gathered."""
  from cqr_jax import rewards as rewards_lib
  parsed = [parse_response(t) for t in roll.texts]
  ok = np.array([p.format_ok for p in parsed])
  texts = [retrieval_query(turns[i].question, p.rewrite, query_form) if p.format_ok else None
           for p, i in zip(parsed, roll.prompt_index)]
  ranks = host_ranks(ranker, texts, qids)
  reward = rewards_lib.compute_rewards(ok, ranks, reward_cfg, step=step, total_steps=n_steps,
                                       num_golds=[len(turns[i].gold_ids)
                                                  for i in roll.prompt_index])
  return ok, ranks, reward


def select_groups(reward: np.ndarray, n: int, k: int) -> np.ndarray:
  """Dynamic sampling (DAPO; grpo.rollout_prompts): the first k prompts, in rollout order, whose
  n rewards are not all equal, then flat ones (advantage 0) if fewer than k differ."""
  flat = np.ptp(reward.reshape(-1, n), axis=1) == 0
  order = np.concatenate([np.flatnonzero(~flat), np.flatnonzero(flat)])
  return np.sort(order[:k])


def flat_fraction(reward: np.ndarray, n: int) -> float:
  """Fraction of groups whose n rewards are all equal (no policy gradient)."""
  return float(np.mean(np.ptp(reward.reshape(-1, n), axis=1) == 0))


def host_ranks(ranker, texts, qids) -> np.ndarray:
  """Gold ranks of every rollout; with several processes each ranks its own rows. The split is
  of host work only (`process_slice` without a mesh: block p to process p, gathered back in
  process order), tied to no device, so it holds for any device order (issue 32). A searcher
  whose corpus spans the processes' devices (dense over the mesh: `collective`) is instead
  given every rollout on every process."""
  if jax.process_count() == 1 or _collective(ranker):
    return ranker.ranks(texts, qids)
  from cqr_jax import distributed
  rows = distributed.process_slice(len(texts))
  mine = ranker.ranks(texts[rows], qids[rows]).astype(np.int32)
  return np.asarray(distributed.allgather(mine, tiled=True)).reshape(-1)


def _collective(ranker) -> bool:
  """Whether a ranker's searcher (or one of its per-domain searchers) spans processes."""
  many = getattr(ranker, "searchers", None)
  searchers = many.values() if many else [getattr(ranker, "searcher", None)]
  return any(getattr(s, "collective", False) for s in searchers)


def _as_dict(state: steps.TrainState) -> dict:
  return {"params": state.params, "opt_state": state.opt_state, "step": state.step}


def _from_dict(d: dict) -> steps.TrainState:
  return steps.TrainState(params=d["params"], opt_state=d["opt_state"], step=d["step"])


RANK_BINS = (("rank_1", 1, 1), ("rank_2_3", 2, 3), ("rank_4_10", 4, 10),
             ("rank_11_100", 11, 100))


def step_metrics(step, reward, ok, ranks, roll, um, timer) -> dict:
  """The per-step numbers of issue 6: reward, format pass, rank histogram, batch MRR, loss terms,
  response length, tokens/s and the time split."""
  found = ranks > 0
  m = {"step": step, "reward_mean": float(np.mean(reward)), "reward_std": float(np.std(reward)),
       "format_pass": float(np.mean(ok)),
       "batch_mrr": float(np.mean(np.where(found, 1.0 / np.maximum(ranks, 1), 0.0))),
       "not_found": float(np.mean(~found))}
  for name, lo, hi in RANK_BINS:
    m[name] = float(np.mean((ranks >= lo) & (ranks <= hi)))
  lengths = roll.completion_lengths
  m["response_len"] = float(np.mean(lengths))
  m["truncated"] = float(np.mean([r == "length" for r in roll.finish_reasons]))
  for k in ("loss", "grad_norm", "kl", "entropy", "clipfrac", "pg_loss", "ratio_mean"):
    if k in um:
      m[k] = float(um[k])
  split = timer.split()
  m.update(split)
  m["tokens_per_s"] = float(np.sum(lengths)) / max(split.get("time/rollout", 0.0), 1e-9)
  return m


def write_samples(out: str, step: int, samples: list[dict]) -> None:
  d = os.path.join(out, "samples")
  paths.makedirs(d)
  paths.append_text(os.path.join(d, "samples.jsonl"),
                    "".join(json.dumps({"step": step, **s}) + "\n" for s in samples))
