"""`cqr-jax pipeline`: the whole method on one run folder (the README's main job).

zero-shot evaluation -> SDPW -> SFT -> GRPO -> evaluation (SFT and GRPO) -> HF export -> report
(before/after table, metrics JSON + markdown, rewrites, a PNG of reward / format pass / batch MRR
over GRPO steps). Each phase is also its own subcommand reading this folder.
"""

from __future__ import annotations

import logging
import os
import time

from cqr_jax import config as cfglib
from cqr_jax import paths
from train import common

log = logging.getLogger("cqr_jax")
USES_CONFIG = True


def add_args(p):
  common.stage_args(p)
  p.add_argument("--skip-export", action="store_true", help="stop before the HF export")
  p.add_argument("--keep-optimizer", action="store_true",
                 help="GRPO keeps its optimizer state and every kept checkpoint (grpo."
                 "keep_checkpoints), e.g. to evaluate them for a learning curve")


def run(args) -> int:
  cfg = common.config_from_args(args)
  run_pipeline(cfg, export=not args.skip_export, keep_optimizer=args.keep_optimizer)
  return 0


_COMPILE_S = [0.0]  # seconds of jax compile events (tracing, lowering, XLA) in this process


def _count_compiles() -> None:
  """Adds jax's compile-event durations to _COMPILE_S (registered once per process)."""
  import jax
  if getattr(_count_compiles, "done", False):
    return
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, secs, **_: _COMPILE_S.__setitem__(0, _COMPILE_S[0] + secs)
      if event.startswith("/jax/core/compile/") else None)
  _count_compiles.done = True


class Eta:
  """Estimates a phase's wall time from the generation throughput measured so far."""

  def __init__(self):
    self.tok_per_s = None

  def observe(self, tokens: float, seconds: float):
    if seconds > 0 and tokens > 0:
      self.tok_per_s = tokens / seconds

  def say(self, phase: str, gen_tokens: float, extra_s: float = 0.0):
    if self.tok_per_s:
      est = gen_tokens / self.tok_per_s + extra_s
      log.info("== %s: estimated %.0f s (%.0f tokens to generate at %.0f tok/s)", phase, est,
               gen_tokens, self.tok_per_s)
    else:
      log.info("== %s: starting (no throughput measured yet for an estimate)", phase)


def run_pipeline(cfg: cfglib.RunConfig, export: bool = True, keep_optimizer: bool = False) -> dict:
  from train import evaluate, grpo, sdpw, sft
  t_start = time.time()
  common.write_config(cfg)
  mesh = common.make_mesh(cfg)
  eta = Eta()
  timings, compiling = {}, {}
  _count_compiles()
  test_turns = len(common.load_split(cfg, cfg.data.test_split).turns)
  train_turns = len(common.load_split(cfg, cfg.data.train_split).turns)
  e = cfg.eval
  nseeds = 1 if e.greedy else len(e.seeds)

  def phase(name, fn, gen_tokens):
    eta.say(name, gen_tokens)
    t0, c0 = time.time(), _COMPILE_S[0]
    out = fn()
    timings[name], compiling[name] = time.time() - t0, _COMPILE_S[0] - c0
    log.info("== %s done in %.0f s (%.0f s of it compiling)", name, timings[name],
             compiling[name])
    return out

  rows = []
  eval_dir = common.stage_dir(cfg, "eval")

  def eval_stage(stage, name):
    model, mcfg, ckpt = evaluate.load_stage_checkpoint(cfg, stage, mesh)
    t0 = time.time()
    # The zero-shot row starts its responses as SDPW does (not 0 by construction).
    prefix = cfg.sdpw.response_prefix if stage == "initial" else ""
    r = evaluate.evaluate_policy(cfg, model, mcfg, mesh, name, os.path.join(eval_dir, name),
                                 prefix, checkpoint=ckpt)
    eta.observe(r[0]["response_len"] * test_turns * nseeds, time.time() - t0)
    return r

  rows += phase("zero-shot evaluation", lambda: eval_stage("initial", "zero_shot"),
                test_turns * e.max_new_tokens * nseeds)
  rows += evaluate.evaluate_baselines(cfg, os.path.join(eval_dir, "baselines"))
  s = cfg.sdpw
  summary = phase("self-distillation (SDPW)", lambda: sdpw.run_sdpw(cfg),
                  min(train_turns, s.max_turns or train_turns) * s.samples_per_turn
                  * s.max_new_tokens)
  sft_state = phase("SFT", lambda: sft.train_sft(cfg), 0)
  if sft_state is not None:
    rows += phase("SFT evaluation", lambda: eval_stage("sft", "sft"),
                  test_turns * e.max_new_tokens * nseeds)
  g = cfg.grpo
  _, history = phase("GRPO", lambda: grpo.train_grpo(cfg, keep_optimizer=keep_optimizer),
                     g.steps * g.batch_prompts * g.n * cfg.rollout.max_new_tokens)
  rows += phase("GRPO evaluation", lambda: eval_stage("grpo", "grpo"),
                test_turns * e.max_new_tokens * nseeds)
  export_dir = None
  if export:
    from train import export as export_mod
    export_dir = phase("HF export", lambda: export_mod.export_stage(
        cfg, "grpo", None, common.stage_dir(cfg, "export", create=False), overwrite=True,
        table=evaluate.markdown_table(evaluate.add_bootstrap(rows, cfg))), 0)
  timings["total"] = time.time() - t_start
  rows = evaluate.add_bootstrap(rows, cfg)
  report = write_report(cfg, rows, history, summary, timings, export_dir, compiling)
  print(evaluate.markdown_table(rows))
  log.info("pipeline finished in %.0f s; report in %s", timings["total"], report)
  return {"rows": rows, "timings": timings, "report": report}


def write_report(cfg, rows, history, summary, timings, export_dir, compiling=None) -> str:
  from cqr_jax.metrics_log import plot_curves
  from train import evaluate
  out = common.stage_dir(cfg, "report")
  common.save_json(os.path.join(out, "metrics.json"), {
      "rows": rows, "sdpw": summary, "timings_s": timings, "compile_s": compiling or {},
      "export": export_dir,
      "grpo_steps": len(history), "config": cfg.name})
  if common.is_main():
    paths.write_text(os.path.join(out, "metrics.md"), "".join([
        f"# cqr-jax pipeline report: {cfg.name}\n\n", evaluate.markdown_table(rows) + "\n\n",
        (f"SDPW: kept {summary['kept']} of {summary['sampled']} samples "
         f"({summary['dropped']}).\n\n"),
        "Wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) + "\n\n",
        "Of which compiling (s): " + ", ".join(f"{k} {v:.0f}" for k, v in
                                               (compiling or {}).items()) + "\n"]))
    rw = os.path.join(out, "rewrites")
    paths.makedirs(rw)
    eval_dir = common.stage_dir(cfg, "eval", create=False)
    for f in paths.files_under(eval_dir):
      if f.endswith((".jsonl", ".trec")):
        paths.copy(f, os.path.join(rw, os.path.basename(f)))
    plot_curves(os.path.join(common.stage_dir(cfg, "grpo", create=False), "metrics.jsonl"),
                os.path.join(out, "grpo_curves.png"), ["reward_mean", "format_pass", "batch_mrr"])
  return out
