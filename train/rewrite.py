"""`cqr-jax rewrite`: rewrite one conversation with a model and show the retrieval result."""

from __future__ import annotations

import json

import jax

from train import common, rewriting

USES_CONFIG = True
EXAMPLE = [["Tell me about the Eiffel Tower.", "It is a wrought-iron tower in Paris."],
           ["Who designed it?", None]]


def add_args(p):
  common.stage_args(p)
  p.add_argument("--conversation", default=None,
                 help='JSON list of [question, answer] pairs; the last question is rewritten '
                 '(default: a built-in example)')
  p.add_argument("--greedy", action="store_true")


def run(args) -> int:
  from cqr_jax.data.types import Turn
  from cqr_jax.prompts import PromptBuilder
  cfg = common.config_from_args(args)
  conv = json.loads(args.conversation) if args.conversation else EXAMPLE
  turn = Turn(conv_id="cli", turn_id=len(conv), qid="cli", question=conv[-1][0],
              context=tuple((q, a) for q, a in conv[:-1]))
  mesh = common.make_mesh(cfg)
  tokenizer = common.load_tokenizer_for(cfg.model.source)
  model, mcfg = common.load_policy(cfg, mesh)
  temperature = 0.0 if args.greedy else cfg.eval.temperature
  sampler = rewriting.make_sampler(cfg, tokenizer, mesh, mcfg, n=1, temperature=temperature,
                                   max_new_tokens=min(cfg.eval.max_new_tokens, 256))
  _, rw, timing = next(rewriting.rewrite_batches(
      model, sampler, tokenizer, PromptBuilder(), [turn], key=jax.random.key(cfg.seed), n=1,
      batch_prompts=1, temperature=temperature, desc="rewrite"))
  r = rw[0]
  print("--- prompt ---\n" + PromptBuilder().text(turn))
  print("--- model output ---\n" + r.text)
  print(f"--- parsed --- format ok: {r.parsed.format_ok}; rewrite: {r.parsed.rewrite!r}")
  print(f"({r.num_tokens} tokens in {timing['seconds']:.1f} s)")
  return 0
