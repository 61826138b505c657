"""Stage 1b: SFT on the self-distilled set (method.md 3.3-3.4).

Each example is the chat-templated zero-shot prompt followed by `<think>..</think>\\n<rewrite>..
</rewrite>` and EOS; the loss covers the response and EOS only. AdamW (0.9, 0.95), weight decay
0.01, 10% linear warm-up then cosine to 0, clip 1.0; checkpoints every epoch and resume. The
tokens all examples start with (the template's instructions) run once per micro-batch
(`shared_prefix_len`).
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np

from cqr_jax import config as cfglib
from cqr_jax.parsing import canonical_response
from train import common, rollout_batch, sdpw, steps

log = logging.getLogger("cqr_jax")
USES_CONFIG = True


class EmptySFTSetError(RuntimeError):
  pass


def add_args(p):
  common.stage_args(p)


def run(args) -> int:
  train_sft(common.config_from_args(args))
  return 0


def encode_example(rec: dict, tokenizer, max_len: int) -> tuple[list[int], list[int]] | None:
  """(token ids, loss mask) of prompt ++ response ++ EOS, or None when longer than max_len."""
  prompt = tokenizer.apply_chat_template([{"role": "user", "content": rec["prompt"]}],
                                         add_generation_prompt=True, tokenize=False)
  p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
  r_ids = tokenizer(canonical_response(rec["reasoning"], rec["rewrite"]),
                    add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
  ids = p_ids + r_ids
  if len(ids) > max_len:
    return None
  return ids, [0] * len(p_ids) + [1] * len(r_ids)


def sft_batches(examples, batch_size: int, seed: int, epoch: int):
  """Shuffled (seed, epoch) full batches, the last partial one dropped (method.md 3.4)."""
  order = np.random.default_rng([seed, epoch]).permutation(len(examples))
  for b in range(len(examples) // batch_size):
    yield [examples[i] for i in order[b * batch_size:(b + 1) * batch_size]]


def shared_prefix_len(examples, min_tokens: int) -> int:
  """S, the tokens that every example starts with and that the update runs once per micro-batch
  instead of once per row (steps.make_sft_update's "prefix"; the template's instructions): their
  common prefix, cut before the input of every example's first loss target (a row's first token
  predicts nothing), rounded down to a multiple of 16 so runs compile few shapes. 0 when that
  is under `min_tokens`, when `min_tokens` <= 0 or for a single example."""
  from cqr_jax.sampler import SHARED_PREFIX_MULTIPLE
  if min_tokens <= 0 or len(examples) < 2:
    return 0
  cap = min(lm.index(1) for _, lm in examples) - 1
  first = np.asarray(examples[0][0][:cap])
  common = len(first)
  for ids, _ in examples[1:]:
    n = min(common, len(ids))
    same = np.asarray(ids[:n]) == first[:n]
    common = n if same.all() else int(np.argmin(same))
  s = common // SHARED_PREFIX_MULTIPLE * SHARED_PREFIX_MULTIPLE
  return s if s >= min_tokens else 0


def train_sft(cfg: cfglib.RunConfig, model=None, mcfg=None):
  """Returns the final TrainState, or None when the set is empty and sft.allow_empty is set."""
  from cqr_jax.checkpoint import Checkpointer
  from cqr_jax.metrics_log import MetricsLogger
  s = cfg.sft
  common.write_config(cfg)
  out = common.stage_dir(cfg, "sft")
  records = sdpw.read_sft_data(cfg)
  if not records:
    msg = ("the self-distilled SFT set has zero kept samples: raise sdpw.samples_per_turn or "
           "sdpw.rank_threshold, or set sft.allow_empty=true to continue with GRPO from the "
           "initial model (the paper's RL-only ablation)")
    if s.allow_empty:
      log.warning(msg)
      common.save_json(os.path.join(out, "skipped.json"), {"reason": "empty SFT set"})
      return None
    raise EmptySFTSetError(msg)
  mesh = common.make_mesh(cfg)
  tokenizer = common.load_tokenizer_for(cfg.model.source)
  if model is None:
    model, mcfg = common.load_policy(cfg, mesh)
  examples = [e for e in (encode_example(r, tokenizer, s.max_len) for r in records) if e]
  if len(examples) < len(records):
    log.warning("SFT: %d example(s) longer than sft.max_len=%d dropped",
                len(records) - len(examples), s.max_len)
  batch_size = min(s.batch_size, len(examples))
  micro = min(s.micro_batch, batch_size)
  batch_size -= batch_size % micro
  steps_per_epoch = len(examples) // batch_size
  total = steps_per_epoch * s.epochs
  graphdef, params, rest = steps.split_model(model)
  tx = common.stage_optimizer(cfg, "sft", total)
  state = steps.init_state(params, tx)
  ckpt = Checkpointer(os.path.join(out, "ckpt"), max_to_keep=2,
                      save_every=s.save_every or steps_per_epoch)
  if ckpt.latest_step() is not None:
    from train.grpo import _as_dict, _from_dict
    _, restored, _ = ckpt.restore(None, {"state": common.abstract_like(_as_dict(state))})
    state = _from_dict(restored["state"])
    log.info("resumed SFT at step %d", int(state.step))
  # Rows are left-padded, so every response ends at the last column: the LM head runs on the
  # last `response_len` positions only (the longest response + EOS), not on the prompts.
  response_len = max(sum(lm) for _, lm in examples)
  update = steps.make_sft_update(graphdef, rest, tx, micro_batch=micro, mesh=mesh,
                                 top_layers=s.train_top_layers, response_len=response_len)
  logger = MetricsLogger(out, resume_step=int(state.step) if int(state.step) else None)
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  from tqdm.auto import tqdm
  done = int(state.step)
  bar = tqdm(total=total, initial=done, desc="sft", disable=not common.is_main())
  # One padded length for the whole run: one compiled update. The examples' common prefix
  # (`shared_prefix_len`) runs once per micro-batch; the rows hold what follows it.
  length = rollout_batch.bucket_length(max(len(ids) for ids, _ in examples), 16)
  shared = shared_prefix_len(examples, s.shared_prefix_min)
  prefix = None
  if shared:
    log.info("SFT: the %d examples share a %d-token prefix, run once per micro-batch",
             len(examples), shared)
    prefix = rollout_batch.place_replicated(np.asarray(examples[0][0][:shared], np.int32), mesh)
  step = 0
  for epoch in range(s.epochs):
    for batch in sft_batches(examples, batch_size, s.seed, epoch):
      step += 1
      if step <= done:
        continue
      tokens = rollout_batch.pad_left([ids[shared:] for ids, _ in batch], length - shared, pad)
      mask = rollout_batch.pad_left([[1] * (len(ids) - shared) for ids, _ in batch],
                                    length - shared, 0)
      lmask = rollout_batch.pad_left([lm[shared:] for _, lm in batch], length - shared, 0)
      b = {k: rollout_batch.place(v, mesh) for k, v in
           (("tokens", tokens), ("mask", mask.astype(bool)), ("loss_mask", lmask.astype(bool)))}
      if prefix is not None:
        b["prefix"] = prefix
      state, m = update(state, b)
      m = {k: float(v) for k, v in jax.device_get(m).items()}
      m["epoch"] = epoch
      logger.log(step, m)
      bar.update(1)
      bar.set_postfix(loss=f"{m['loss']:.4f}")
      ckpt.save(int(state.step), {"state": {"params": state.params, "opt_state": state.opt_state,
                                            "step": state.step}},
                meta={"epoch": epoch, "metrics": m}, force=(step == total))
  bar.close()
  ckpt.wait()
  logger.close()
  return state
