"""Stage 1b: SFT on the self-distilled set (method.md 3.3-3.4).

Each example is the chat-templated zero-shot prompt followed by `<think>..</think>\\n<rewrite>..
</rewrite>` and EOS; the loss covers the response and EOS only. AdamW (0.9, 0.95), weight decay
0.01, 10% linear warm-up then cosine to 0, clip 1.0; checkpoints every epoch and resume. The
tokens all examples start with (the template's instructions) run once per micro-batch
(`cqr_jax.shared_prefix.for_examples`). Examples over sft.max_len follow sft.overlong
(`encode_examples`: error, truncate_right or drop, as the official scripts per dataset,
method.md 3.4); the counts go to `<run>/sft/summary.json`.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np

from cqr_jax import config as cfglib
from cqr_jax import distributed, shared_prefix
from cqr_jax.parsing import canonical_response
from train import common, rollout_batch, sdpw, steps

log = logging.getLogger("cqr_jax")
USES_CONFIG = True


class EmptySFTSetError(RuntimeError):
  pass


class OverlongExampleError(ValueError):
  pass


OVERLONG = ("error", "truncate_right", "drop")
SUMMARY_FILE = "summary.json"


def add_args(p):
  common.stage_args(p)
  p.add_argument("--keep-optimizer", action="store_true",
                 help="keep the optimizer state in the final checkpoint (default: parameters "
                 "only; intermediate checkpoints keep it for a resume)")


def run(args) -> int:
  train_sft(common.config_from_args(args), keep_optimizer=args.keep_optimizer)
  return 0


def encode_example(rec: dict, tokenizer, max_len: int | None = None
                   ) -> tuple[list[int], list[int]] | None:
  """(token ids, loss mask) of prompt ++ response ++ EOS, or None when longer than max_len."""
  prompt = tokenizer.apply_chat_template([{"role": "user", "content": rec["prompt"]}],
                                         add_generation_prompt=True, tokenize=False)
  p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
  r_ids = tokenizer(canonical_response(rec["reasoning"], rec["rewrite"]),
                    add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
  ids = p_ids + r_ids
  if max_len is not None and len(ids) > max_len:
    return None
  return ids, [0] * len(p_ids) + [1] * len(r_ids)


def encode_examples(records: list[dict], tokenizer, max_len: int, overlong: str
                    ) -> tuple[list, dict]:
  """(examples, counts) with the examples over `max_len` handled by `overlong`: "error" raises
  OverlongExampleError naming how many, "truncate_right" keeps the first max_len tokens (the
  response's loss mask is cut with them, as verl's truncation="right"), "drop" leaves them out.
  counts: records, examples, overlong, truncated, dropped, longest (tokens before any cut)."""
  if overlong not in OVERLONG:
    raise ValueError(f"sft.overlong={overlong!r}: expected one of {OVERLONG}")
  full = [encode_example(r, tokenizer) for r in records]
  over = [len(ids) > max_len for ids, _ in full]
  counts = {"records": len(records), "overlong": int(sum(over)), "overlong_rule": overlong,
            "max_len": max_len, "longest": max((len(ids) for ids, _ in full), default=0),
            "truncated": 0, "dropped": 0}
  if counts["overlong"] and overlong == "error":
    raise OverlongExampleError(
        f"{counts['overlong']} of {len(records)} SFT examples are longer than sft.max_len="
        f"{max_len} tokens (longest {counts['longest']}): raise sft.max_len, or set sft.overlong "
        "to truncate_right or drop")
  examples = []
  for (ids, lm), too_long in zip(full, over):
    if too_long and overlong == "drop":
      continue
    examples.append((ids[:max_len], lm[:max_len]) if too_long else (ids, lm))
  counts["truncated" if overlong == "truncate_right" else "dropped"] = counts["overlong"]
  counts["examples"] = len(examples)
  return examples, counts


def prepare_examples(cfg: cfglib.RunConfig, records: list[dict], tokenizer, out: str) -> list:
  """`encode_examples` under sft.max_len and sft.overlong; the counts go to
  `<out>/summary.json` and the log."""
  s = cfg.sft
  examples, counts = encode_examples(records, tokenizer, s.max_len, s.overlong)
  common.save_json(os.path.join(out, SUMMARY_FILE), counts)
  if counts["overlong"]:
    log.warning("SFT: %d of %d example(s) longer than sft.max_len=%d (longest %d): %s",
                counts["overlong"], len(records), s.max_len, counts["longest"],
                "truncated on the right" if s.overlong == "truncate_right" else "dropped")
  if not examples:
    raise EmptySFTSetError(f"every SFT example is longer than sft.max_len={s.max_len} and "
                           "sft.overlong=drop: raise sft.max_len")
  return examples


def sft_batches(examples, batch_size: int, seed: int, epoch: int):
  """Shuffled (seed, epoch) full batches, the last partial one dropped (method.md 3.4)."""
  order = np.random.default_rng([seed, epoch]).permutation(len(examples))
  for b in range(len(examples) // batch_size):
    yield [examples[i] for i in order[b * batch_size:(b + 1) * batch_size]]


def train_sft(cfg: cfglib.RunConfig, model=None, mcfg=None, keep_optimizer: bool = False):
  """Returns the final TrainState, or None when the set is empty and sft.allow_empty is set.

  Checkpoints before the last step hold the optimizer state (a resume needs it); the final one
  holds the parameters only (unless `keep_optimizer`), and the earlier ones are then deleted."""
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
      distributed.sync("sft:skipped")  # GRPO reads it next (the pipeline: in this process)
      return None
    raise EmptySFTSetError(msg)
  mesh = common.make_mesh(cfg)
  tokenizer = common.load_tokenizer_for(cfg.model.source)
  examples = prepare_examples(cfg, records, tokenizer, out)  # before the model: fails fast
  if model is None:
    model, mcfg = common.load_policy(cfg, mesh)
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
  finished = common.finished_stage_params(cfg, "sft", ckpt, state.params, keep_optimizer)
  if finished is not None:
    import dataclasses
    return dataclasses.replace(state, params=finished[1])
  latest = ckpt.latest_step()
  if latest is not None:
    from train.grpo import _as_dict, _from_dict
    _, restored, _ = ckpt.restore(None, {"state": common.abstract_like(_as_dict(state))})
    state = _from_dict(restored["state"])
    log.info("resumed SFT at step %d", int(state.step))
  # Rows are left-padded, so every response ends at the last column: the LM head runs on the
  # last `response_len` positions only (the longest response + EOS), not on the prompts.
  response_len = max(1, max(sum(lm) for _, lm in examples))
  update = steps.make_sft_update(graphdef, rest, tx, micro_batch=micro, mesh=mesh,
                                 top_layers=s.train_top_layers, response_len=response_len)
  logger = MetricsLogger(out, resume_step=int(state.step) if int(state.step) else None)
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  from tqdm.auto import tqdm
  done = int(state.step)
  bar = tqdm(total=total, initial=done, desc="sft", disable=not common.is_main())
  # One padded length for the whole run: one compiled update. The examples' common prefix
  # (`cqr_jax.shared_prefix.for_examples`) runs once per micro-batch; the rows hold what follows it.
  length = rollout_batch.bucket_length(max(len(ids) for ids, _ in examples), 16)
  shared = shared_prefix.for_examples(examples, cfg.model.shared_prefix_min)
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
      final = step == total
      payload = {"params": state.params, "step": state.step}
      if keep_optimizer or not final:
        payload["opt_state"] = state.opt_state
      ckpt.save(int(state.step), {"state": payload},
                meta={"epoch": epoch, "metrics": m, "final": final,
                      "optimizer": "opt_state" in payload}, force=final)
  bar.close()
  ckpt.wait()
  if total and not keep_optimizer:
    ckpt.keep_only(total)
  logger.close()
  return state
