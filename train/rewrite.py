"""`cqr-jax rewrite`: rewrite one conversation with a model and show the retrieval result.

With a run folder, the model is the run's latest trained stage (`--stage auto`: GRPO, else SFT,
else the initial model); the checkpoint used is printed."""

from __future__ import annotations

import json
import logging

import jax

from cqr_jax import paths
from train import common, rewriting

log = logging.getLogger("cqr_jax")
USES_CONFIG = True
EXAMPLE = [["Tell me about the Eiffel Tower.", "It is a wrought-iron tower in Paris."],
           ["Who designed it?", None]]


def add_args(p):
  common.stage_args(p)
  p.add_argument("--conversation", default=None,
                 help='JSON list of [question, answer] pairs; the last question is rewritten '
                 '(default: a built-in example)')
  p.add_argument("--stage", default="auto", choices=["auto", "grpo", "sft", "initial"],
                 help="whose policy (auto: the run's latest trained stage, else the initial "
                 "model)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--greedy", action="store_true")


def parse_conversation(text: str | None) -> list:
  """[[question, answer or null], ...] from --conversation; a ConfigError says what is wrong."""
  from cqr_jax.configlib import ConfigError
  if not text:
    return EXAMPLE
  try:
    conv = json.loads(text)
  except json.JSONDecodeError as e:
    raise ConfigError(f"--conversation: not JSON ({e.msg} at column {e.colno}); expected e.g. "
                      "'[[\"Who wrote Hamlet?\", \"Shakespeare.\"], [\"When?\", null]]'") from None
  ok = isinstance(conv, list) and conv and all(
      isinstance(t, list) and len(t) in (1, 2) and isinstance(t[0], str) and t[0].strip()
      for t in conv)
  if not ok:
    raise ConfigError("--conversation: expected a non-empty JSON list of [question, answer] "
                      "pairs (answer may be null), the last one the question to rewrite")
  return [[t[0], t[1] if len(t) > 1 else None] for t in conv]


def pick_stage(cfg, stage: str) -> str:
  if stage != "auto":
    return stage
  return next((s for s in ("grpo", "sft") if paths.isdir(common.ckpt_dir(cfg, s))), "initial")


def run(args) -> int:
  from cqr_jax.data.types import Turn
  from train import evaluate
  conv = parse_conversation(args.conversation)
  cfg = common.config_from_args(args)
  turn = Turn(conv_id="cli", turn_id=len(conv), qid="cli", question=conv[-1][0],
              context=tuple((q, a) for q, a in conv[:-1]))
  mesh = common.make_mesh(cfg)
  tokenizer = common.load_tokenizer_for(cfg.model.source)
  stage = pick_stage(cfg, args.stage)
  model, mcfg, ckpt = evaluate.load_stage_checkpoint(cfg, stage, mesh, args.step)
  prefix = cfg.sdpw.response_prefix if stage == "initial" else ""
  temperature = 0.0 if args.greedy else cfg.eval.temperature
  prompts = common.prompt_builder(cfg, tokenizer=tokenizer)
  sampler = rewriting.make_sampler(
      cfg, tokenizer, mesh, mcfg, n=1, temperature=temperature,
      max_new_tokens=min(cfg.eval.max_new_tokens, 256),
      max_prompt_len=rewriting.inference_prompt_len(cfg, prompts, tokenizer, [turn], prefix))
  _, rw, timing = next(rewriting.rewrite_batches(
      model, sampler, tokenizer, prompts, [turn], key=jax.random.key(cfg.seed), n=1,
      batch_prompts=1, temperature=temperature, desc="rewrite", response_prefix=prefix))
  r = rw[0]
  where = (f"{stage} step {ckpt['step']} ({ckpt['dir']})" if ckpt["step"] is not None
           else f"the initial model {cfg.model.source} (no trained stage in {cfg.run_dir})")
  print(f"--- model --- {where}")
  print("--- prompt ---\n" + prompts.text(turn))
  print("--- model output ---\n" + r.text)
  print(f"--- parsed --- format ok: {r.parsed.format_ok}; rewrite: {r.parsed.rewrite!r}")
  print(f"({r.num_tokens} tokens in {timing['seconds']:.1f} s)")
  return 0
