"""Evaluation (method.md 5): rewrite a split with a checkpoint, retrieve, score.

Writes, per system: the rewrites (JSONL), a TREC run (score = 200 - rank, as the paper's
scripts), and a metrics table. An output that does not parse (`eval.score_rule`: think and
rewrite blocks anywhere, as the official scripts, or the strict format) falls back to the raw
question (`eval.fallback`), as a deployed rewriter would; the paper's two conventions stay as
columns (scored queries only, method.md 5.4; unparsed outputs as misses). Every row gets a paired
bootstrap 95% interval of its MRR minus the raw question's. Baselines in the same table: the raw
question; the previous, the first, or all previous questions + the question; and any rewrite the
data provides.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Sequence

import jax
import numpy as np

from cqr_jax import config as cfglib
from cqr_jax import distributed, paths
from cqr_jax.data.trec import read_run, write_run
from cqr_jax.parsing import passes, retrieval_query
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
  p.add_argument("--overwrite", action="store_true",
                 help="replace an earlier evaluation in <run>/eval/<name>")


def run(args) -> int:
  cfg = common.config_from_args(args)
  mesh = common.make_mesh(cfg)
  stage = args.stage
  if stage == "auto":
    stage = next((s for s in ("grpo", "sft") if paths.isdir(common.ckpt_dir(cfg, s))),
                 "initial")
  from train import runfolder
  out = os.path.join(common.stage_dir(cfg, "eval", create=False), args.name or stage)
  runfolder.guard_output(out, args.overwrite, f"an evaluation of {stage}",
                         ", or --name NEW for a new row")
  model, mcfg, ckpt = load_stage_checkpoint(cfg, stage, mesh, args.step)
  prefix = cfg.sdpw.response_prefix if stage == "initial" else ""
  rows = evaluate_policy(cfg, model, mcfg, mesh, args.name or stage, out, prefix,
                         checkpoint=ckpt)
  if cfg.eval.baselines:
    rows += evaluate_baselines(cfg, out)
  write_table(add_bootstrap(rows, cfg), out)
  print(markdown_table(rows))
  return 0


def load_stage_model(cfg: cfglib.RunConfig, stage: str, mesh, step: int | None = None):
  """(model, ModelConfig): the initial policy, or a stage's checkpointed one."""
  model, mcfg, _ = load_stage_checkpoint(cfg, stage, mesh, step)
  return model, mcfg


def load_stage_checkpoint(cfg: cfglib.RunConfig, stage: str, mesh, step: int | None = None):
  """(model, ModelConfig, {"stage", "step", "dir"}): which checkpoint was used, for the
  outputs (an unreadable newer step is skipped with a warning naming it)."""
  if stage == "initial":
    model, mcfg = common.load_policy(cfg, mesh)
    return model, mcfg, {"stage": "initial", "step": None, "source": cfg.model.source}
  got, model, mcfg = common.load_stage_policy(cfg, stage, mesh, step)
  log.info("evaluating %s checkpoint step %d (%s)", stage, got, common.ckpt_dir(cfg, stage))
  return model, mcfg, {"stage": stage, "step": got, "dir": common.ckpt_dir(cfg, stage)}


def per_query_metrics(run_path: str, qrels, qids: Sequence[str],
                      relevance_level: int = 1) -> dict[str, np.ndarray]:
  """{metric: [Q] values} of a TREC run over `qids` (in order; all must have qrels): a query
  without a run entry scores 0."""
  from retrieval import metrics as M
  run = read_run(run_path)
  sub = {q: qrels[q] for q in qids}
  per_q = M.evaluate({q: d for q, d in run.items() if q in sub}, sub, METRICS,
                     misses_as_zero=True, relevance_level=relevance_level)
  return {m: np.array([per_q[m][q] for q in qids], np.float64) for m in METRICS}


def summarize_run(per_q: dict[str, np.ndarray], parsed: np.ndarray) -> dict:
  """The three ways of counting (metric keys suffixed ``""``, ``|scored``, ``|misses``):
  every query with the run as written (with the fallback for unparsed outputs, this is the
  rewriter as it would be used); only queries whose output parsed (the paper's pytrec_eval
  averages, method.md 5.4); and those with unparsed outputs counted as misses (0)."""
  out = {"queries": int(len(parsed)), "scored": int(parsed.sum())}
  for m, v in per_q.items():
    out[m] = float(v.mean()) if len(v) else 0.0
    out[m + "|scored"] = float(v[parsed].mean()) if parsed.any() else 0.0
    out[m + "|misses"] = float(v[parsed].sum() / max(len(v), 1))
  return out


def _retrieve_and_write(ranker, queries: dict[str, str], run_path: str, k: int) -> None:
  qids = list(queries)
  ranked = ranker.search_ranked([queries[q] for q in qids], k, qids=qids) if qids else []
  if jax.process_index() == 0:
    paths.makedirs(os.path.dirname(run_path) or ".")
    write_run(run_path, dict(zip(qids, ranked)))
  distributed.sync("eval:run")  # every process reads the run file back


def policy_queries(turns, rewrites, fallback: str, rule: str = "format",
                   query_form: str = "rewrite") -> tuple[dict[str, str], np.ndarray]:
  """({qid: query} sent to the retriever, [Q] parsed flags) for one sample per turn: the parsed
  rewrite (an output that passes eval.score_rule: cqr_jax.parsing.passes) as retrieval.query
  forms it, else the raw question (fallback "question") or nothing (fallback "none")."""
  if fallback not in ("question", "none"):
    raise ValueError(f"eval.fallback={fallback!r}: expected 'question' or 'none'")
  by_turn = {r.turn_index: r for r in rewrites}
  queries, parsed = {}, np.zeros(len(turns), bool)
  for i, t in enumerate(turns):
    r = by_turn.get(i)
    if r is not None and passes(r.parsed, rule):
      queries[t.qid], parsed[i] = retrieval_query(t.question, r.parsed.rewrite, query_form), True
    elif fallback == "question":
      queries[t.qid] = t.question
  return queries, parsed


def evaluate_policy(cfg: cfglib.RunConfig, model, mcfg, mesh, name: str, out: str,
                    response_prefix: str = "", checkpoint: dict | None = None) -> list[dict]:
  """Rewrites the test split with `model` (sampled per seed, or greedy) and scores each run.

  `response_prefix` starts every response (the zero-shot row uses SDPW's, so the untrained
  model is judged with the same help the warm-up gives it)."""
  e = cfg.eval
  if jax.process_index() == 0:
    paths.makedirs(out)
  ds = common.load_split(cfg, cfg.data.test_split)
  ranker = common.build_ranker(cfg, ds, cfg.retrieval.eval_max_words)
  tokenizer = common.load_tokenizer_for(cfg.model.source)
  temperature = 0.0 if e.greedy else e.temperature
  prompts = common.prompt_builder(cfg, tokenizer=tokenizer)
  sampler = rewriting.make_sampler(
      cfg, tokenizer, mesh, mcfg, n=1, temperature=temperature, max_new_tokens=e.max_new_tokens,
      max_prompt_len=rewriting.inference_prompt_len(cfg, prompts, tokenizer, ds.turns,
                                                    response_prefix),
      batch_prompts=min(e.batch_prompts, len(ds.turns)), prompt_buckets=e.prompt_buckets)
  order = length_order(ds.turns, prompts, tokenizer)
  by_length = [ds.turns[i] for i in order]
  seeds = (0,) if e.greedy else e.seeds
  qids = [t.qid for t in ds.turns]
  per_seed = []
  for seed in seeds:
    tag = "greedy" if e.greedy else f"seed{seed}"
    rewrites = []
    for _, batch, _ in rewriting.rewrite_batches(
        model, sampler, tokenizer, prompts, by_length, key=jax.random.key(seed), n=1,
        batch_prompts=e.batch_prompts, temperature=temperature, desc=f"eval {name} {tag}",
        response_prefix=response_prefix):
      rewrites += [dataclasses.replace(r, turn_index=int(order[r.turn_index])) for r in batch]
    rewrites.sort(key=lambda r: (r.turn_index, r.sample))
    queries, parsed = policy_queries(ds.turns, rewrites, e.fallback, e.score_rule,
                                     cfg.retrieval.query)
    run_path = os.path.join(out, f"run_{name}_{tag}.trec")
    _retrieve_and_write(ranker, queries, run_path, cfg.retrieval.top_k)
    if jax.process_index() == 0:
      with paths.open_file(os.path.join(out, f"rewrites_{name}_{tag}.jsonl"), "w") as f:
        for r in rewrites:
          t = ds.turns[r.turn_index]
          f.write(json.dumps({"qid": t.qid, "question": t.question, "output": r.text,
                              "format_ok": r.parsed.format_ok, "rewrite": r.parsed.rewrite,
                              "scored": bool(parsed[r.turn_index]),
                              "query": queries.get(t.qid), "finish": r.finish_reason,
                              "tokens": r.num_tokens}) + "\n")
    per_q = per_query_metrics(run_path, ds.qrels, qids, e.relevance_level)
    s = summarize_run(per_q, parsed)
    s["per_query"] = per_q["recip_rank"]
    s["format_pass"] = float(np.mean([r.parsed.format_ok for r in rewrites]))
    s["response_len"] = float(np.mean([r.num_tokens for r in rewrites]))
    s["run_file"] = os.path.basename(run_path)
    per_seed.append(s)
  row = _row(name, per_seed, cfg)
  if checkpoint is not None:
    row["checkpoint"] = checkpoint
  return [row]


def length_order(turns, prompts, tokenizer) -> np.ndarray:
  """Turn indices, shortest prompt first (stable): each batch then pads to a tight bucket
  (eval.prompt_buckets)."""
  return np.argsort([len(prompts.token_ids(t, tokenizer)) for t in turns], kind="stable")


def _row(name: str, per_seed: list[dict], cfg: cfglib.RunConfig) -> dict:
  row = {"system": name, "seeds": len(per_seed), "runs": [s["run_file"] for s in per_seed],
         "fallback": cfg.eval.fallback, "relevance_level": cfg.eval.relevance_level}
  for suffix in ("", "|scored", "|misses"):
    for m in METRICS:
      vals = [s[m + suffix] for s in per_seed]
      row[m + suffix] = float(np.mean(vals))
      if len(vals) > 1:
        row[f"{m}_std{suffix}"] = float(np.std(vals, ddof=1))
  row["scored"] = float(np.mean([s["scored"] for s in per_seed]))
  row["queries"] = per_seed[0]["queries"]
  # Per-query MRR averaged over the seeds: the unit of the paired bootstrap.
  row["per_query_mrr"] = np.mean([s["per_query"] for s in per_seed], axis=0).tolist()
  for k in ("format_pass", "response_len"):
    if k in per_seed[0]:
      row[k] = float(np.mean([s[k] for s in per_seed]))
  return row


def add_bootstrap(rows: list[dict], cfg: cfglib.RunConfig, against: str = "baseline:raw"
                  ) -> list[dict]:
  """Adds each row's paired bootstrap interval of its MRR minus `against`'s (per query, the
  same queries; eval.bootstrap_samples resamples, eval.bootstrap_seed): keys mrr_delta,
  mrr_delta_lo, mrr_delta_hi."""
  from retrieval.metrics import paired_bootstrap
  base = next((r for r in rows if r["system"] == against), None)
  if base is None:
    return rows
  for r in rows:
    if len(r["per_query_mrr"]) != len(base["per_query_mrr"]):
      raise ValueError(f"{r['system']} was scored on {len(r['per_query_mrr'])} queries and "
                       f"{against} on {len(base['per_query_mrr'])}: rerun both on one split")
    b = paired_bootstrap(r["per_query_mrr"], base["per_query_mrr"], cfg.eval.bootstrap_samples,
                         cfg.eval.bootstrap_seed)
    r["mrr_delta"], r["mrr_delta_lo"], r["mrr_delta_hi"] = b["delta"], b["lo"], b["hi"]
  return rows


def baseline_queries(turns) -> dict[str, dict[str, str]]:
  """{system: {qid: query}}: the raw question; the previous question, the conversation's first
  question, or all previous questions before it; and any rewrite the data provides."""
  out: dict[str, dict[str, str]] = {"raw": {}, "previous_question": {}, "first_question": {},
                                    "all_questions": {}}
  for t in turns:
    past = [q for q, _ in t.context]
    out["raw"][t.qid] = t.question
    out["previous_question"][t.qid] = " ".join(past[-1:] + [t.question])
    out["first_question"][t.qid] = " ".join(past[:1] + [t.question])
    out["all_questions"][t.qid] = " ".join(past + [t.question])
    for name, text in (t.rewrites or {}).items():
      out.setdefault(f"rewrite:{name}", {})[t.qid] = text
  return out


def evaluate_baselines(cfg: cfglib.RunConfig, out: str) -> list[dict]:
  ds = common.load_split(cfg, cfg.data.test_split)
  ranker = common.build_ranker(cfg, ds, cfg.retrieval.eval_max_words)
  qids = [t.qid for t in ds.turns]
  rows = []
  for name, queries in baseline_queries(ds.turns).items():
    run_path = os.path.join(out, f"run_{name.replace(':', '_')}.trec")
    _retrieve_and_write(ranker, queries, run_path, cfg.retrieval.top_k)
    per_q = per_query_metrics(run_path, ds.qrels, qids, cfg.eval.relevance_level)
    s = summarize_run(per_q, np.array([q in queries for q in qids]))
    s["per_query"] = per_q["recip_rank"]
    s["run_file"] = os.path.basename(run_path)
    rows.append(_row(f"baseline:{name}", [s], cfg))
  return rows


def markdown_table(rows: list[dict]) -> str:
  """One line per system: the rewriter as used (fallback for unparsed outputs), its paired
  bootstrap 95% interval against the raw question, then the paper's two conventions."""
  head = ["system", "MRR", "Δ MRR vs raw [95% CI]", "NDCG@3", "R@10", "R@100",
          "MRR (scored only)", "MRR (misses = 0)", "format pass", "scored"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    fp = f"{r['format_pass']:.3f}" if "format_pass" in r else "-"
    ci = (f"{r['mrr_delta']:+.3f} [{r['mrr_delta_lo']:+.3f}, {r['mrr_delta_hi']:+.3f}]"
          if "mrr_delta" in r else "-")
    vals = [r["system"], f"{r['recip_rank']:.3f}", ci] + [
        f"{r[m]:.3f}" for m in ("ndcg_cut_3", "recall_10", "recall_100")] + [
        f"{r['recip_rank|scored']:.3f}", f"{r['recip_rank|misses']:.3f}", fp,
        f"{r['scored']:.0f}/{r['queries']}"]
    lines.append("| " + " | ".join(vals) + " |")
  return "\n".join(lines)


def write_table(rows: list[dict], out: str) -> None:
  common.save_json(os.path.join(out, "metrics.json"), rows)
  if jax.process_index() == 0:
    paths.write_text(os.path.join(out, "metrics.md"), markdown_table(rows) + "\n")
