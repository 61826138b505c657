"""Evaluation (method.md 5): rewrite a split with a checkpoint, retrieve, score.

Writes, per system: the rewrites (JSONL), a TREC run (score = 200 - rank, as the paper's
scripts), and a metrics table. Unparsable outputs are reported both ways: dropped from the average
(the paper's pytrec_eval protocol, method.md 5.4) and scored as misses (0). Baselines in the same
table: the raw question, all previous questions + the question, and any rewrite the data provides.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Sequence

import jax
import numpy as np

from cqr_jax import config as cfglib
from cqr_jax.data.trec import read_run, write_run
from train import common, rewriting

log = logging.getLogger("cqr_jax")
USES_CONFIG = True
METRICS = ("recip_rank", "mrr_cut_3", "ndcg_cut_3", "recall_10", "recall_100")  # pytrec names


def add_args(p):
  common.stage_args(p)
  p.add_argument("--stage", default="auto", choices=["auto", "grpo", "sft", "initial"],
                 help="whose policy to evaluate (auto: the latest trained stage of the run)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--name", default=None, help="row name / output sub-folder")


def run(args) -> int:
  cfg = common.config_from_args(args)
  mesh = common.make_mesh(cfg)
  stage = args.stage
  if stage == "auto":
    stage = next((s for s in ("grpo", "sft") if os.path.isdir(common.ckpt_dir(cfg, s))),
                 "initial")
  model, mcfg = load_stage_model(cfg, stage, mesh, args.step)
  out = os.path.join(common.stage_dir(cfg, "eval"), args.name or stage)
  rows = evaluate_policy(cfg, model, mcfg, mesh, args.name or stage, out)
  if cfg.eval.baselines:
    rows += evaluate_baselines(cfg, out)
  write_table(rows, out)
  print(markdown_table(rows))
  return 0


def load_stage_model(cfg: cfglib.RunConfig, stage: str, mesh, step: int | None = None):
  """(model, ModelConfig): the initial policy, or a stage's checkpointed one."""
  if stage == "initial":
    return common.load_policy(cfg, mesh)
  _, model, mcfg = common.load_stage_policy(cfg, stage, mesh, step)
  return model, mcfg


def score_run(run_path: str, qrels, qids: Sequence[str]) -> dict[str, dict[str, float]]:
  """Metrics of a TREC run file: {"dropped": means over scored queries (the paper), "misses":
  means over every query with qrels, unscored ones counting 0}."""
  from retrieval import metrics as M
  run = read_run(run_path)
  wanted = [q for q in qids if q in qrels]
  sub_qrels = {q: qrels[q] for q in wanted}
  per_q = M.evaluate({q: d for q, d in run.items() if q in sub_qrels}, sub_qrels)
  out = {"dropped": {}, "misses": {}}
  for m in METRICS:
    vals = per_q[m]
    out["dropped"][m] = float(np.mean(list(vals.values()))) if vals else 0.0
    out["misses"][m] = float(np.sum(list(vals.values())) / max(len(wanted), 1))
  out["scored"] = len(per_q[METRICS[0]])
  out["queries"] = len(wanted)
  return out


def _retrieve_and_write(ranker, queries: dict[str, str], run_path: str, k: int) -> None:
  qids = list(queries)
  ranked = ranker.search_ranked([queries[q] for q in qids], k) if qids else []
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(run_path) or ".", exist_ok=True)
    write_run(run_path, dict(zip(qids, ranked)))


def evaluate_policy(cfg: cfglib.RunConfig, model, mcfg, mesh, name: str, out: str) -> list[dict]:
  """Rewrites the test split with `model` (sampled per seed, or greedy) and scores each run."""
  from cqr_jax.prompts import PromptBuilder
  e = cfg.eval
  os.makedirs(out, exist_ok=True)
  ds = common.load_split(cfg, cfg.data.test_split)
  ranker = common.build_ranker(cfg, ds, cfg.retrieval.eval_max_words)
  tokenizer = common.load_tokenizer_for(cfg.model.source)
  temperature = 0.0 if e.greedy else e.temperature
  sampler = rewriting.make_sampler(cfg, tokenizer, mesh, mcfg, n=1, temperature=temperature,
                                   max_new_tokens=e.max_new_tokens)
  prompts = PromptBuilder()
  seeds = (0,) if e.greedy else e.seeds
  per_seed = []
  for seed in seeds:
    tag = "greedy" if e.greedy else f"seed{seed}"
    rewrites = []
    for _, batch, _ in rewriting.rewrite_batches(
        model, sampler, tokenizer, prompts, ds.turns, key=jax.random.key(seed), n=1,
        batch_prompts=e.batch_prompts, temperature=temperature, desc=f"eval {name} {tag}"):
      rewrites += batch
    queries = {ds.turns[r.turn_index].qid: r.parsed.rewrite for r in rewrites
               if r.parsed.format_ok and r.parsed.rewrite is not None}
    run_path = os.path.join(out, f"run_{name}_{tag}.trec")
    _retrieve_and_write(ranker, queries, run_path, cfg.retrieval.top_k)
    if jax.process_index() == 0:
      with open(os.path.join(out, f"rewrites_{name}_{tag}.jsonl"), "w", encoding="utf-8") as f:
        for r in rewrites:
          t = ds.turns[r.turn_index]
          f.write(json.dumps({"qid": t.qid, "question": t.question, "output": r.text,
                              "format_ok": r.parsed.format_ok, "rewrite": r.parsed.rewrite,
                              "finish": r.finish_reason, "tokens": r.num_tokens}) + "\n")
    s = score_run(run_path, ds.qrels, [t.qid for t in ds.turns])
    s["format_pass"] = float(np.mean([r.parsed.format_ok for r in rewrites]))
    s["response_len"] = float(np.mean([r.num_tokens for r in rewrites]))
    s["run_file"] = os.path.basename(run_path)
    per_seed.append(s)
  return [_row(name, per_seed)]


def _row(name: str, per_seed: list[dict]) -> dict:
  row = {"system": name, "seeds": len(per_seed), "runs": [s["run_file"] for s in per_seed]}
  for mode, suffix in (("dropped", ""), ("misses", "|misses")):
    for m in METRICS:
      vals = [s[mode][m] for s in per_seed]
      row[m + suffix] = float(np.mean(vals))
      if len(vals) > 1:
        row[f"{m}_std{suffix}"] = float(np.std(vals, ddof=1))
  row["scored"] = float(np.mean([s["scored"] for s in per_seed]))
  row["queries"] = per_seed[0]["queries"]
  for k in ("format_pass", "response_len"):
    if k in per_seed[0]:
      row[k] = float(np.mean([s[k] for s in per_seed]))
  return row


def baseline_queries(turns) -> dict[str, dict[str, str]]:
  """{system: {qid: query}}: raw question, all previous questions + question, provided rewrites."""
  out: dict[str, dict[str, str]] = {"raw": {}, "all_questions": {}}
  for t in turns:
    out["raw"][t.qid] = t.question
    out["all_questions"][t.qid] = " ".join([q for q, _ in t.context] + [t.question])
    for name, text in (t.rewrites or {}).items():
      out.setdefault(f"rewrite:{name}", {})[t.qid] = text
  return out


def evaluate_baselines(cfg: cfglib.RunConfig, out: str) -> list[dict]:
  ds = common.load_split(cfg, cfg.data.test_split)
  ranker = common.build_ranker(cfg, ds, cfg.retrieval.eval_max_words)
  rows = []
  for name, queries in baseline_queries(ds.turns).items():
    run_path = os.path.join(out, f"run_{name.replace(':', '_')}.trec")
    _retrieve_and_write(ranker, queries, run_path, cfg.retrieval.top_k)
    s = score_run(run_path, ds.qrels, [t.qid for t in ds.turns])
    s["run_file"] = os.path.basename(run_path)
    rows.append(_row(f"baseline:{name}", [s]))
  return rows


def markdown_table(rows: list[dict]) -> str:
  head = ["system", "MRR", "MRR@3", "NDCG@3", "R@10", "R@100", "MRR (misses=0)", "format pass",
          "scored/queries"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    fp = f"{r['format_pass']:.3f}" if "format_pass" in r else "-"
    vals = [r["system"]] + [f"{r[m]:.3f}" for m in METRICS] + [
        f"{r['recip_rank|misses']:.3f}", fp, f"{r['scored']:.0f}/{r['queries']}"]
    lines.append("| " + " | ".join(vals) + " |")
  return "\n".join(lines)


def write_table(rows: list[dict], out: str) -> None:
  common.save_json(os.path.join(out, "metrics.json"), rows)
  if jax.process_index() == 0:
    with open(os.path.join(out, "metrics.md"), "w", encoding="utf-8") as f:
      f.write(markdown_table(rows) + "\n")
