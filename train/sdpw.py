"""Stage 1a: self-driven policy warm-up data (method.md 3.1-3.2).

The initial model samples reasoned rewrites for every training turn with the few-shot prompt
(method.md 2.5); a sample is kept when it passes the format check and its rewrite puts a gold
passage at rank <= `sdpw.rank_threshold` (the paper: rank 1). Kept samples are written with the
ZERO-shot prompt that SFT trains on (method.md 3.3). Resumable: finished turns are recorded as
they complete and skipped on restart.
"""

from __future__ import annotations

import json
import logging
import os
import re

import jax

from cqr_jax import config as cfglib
from train import common, rewriting

log = logging.getLogger("cqr_jax")
USES_CONFIG = True
DATA_FILE, DONE_FILE, SUMMARY_FILE = "sft_data.jsonl", "done.jsonl", "summary.json"


def add_args(p):
  common.stage_args(p)


def run(args) -> int:
  run_sdpw(common.config_from_args(args))
  return 0


def _read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  out = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if line:
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line from a crash: that batch is redone
          break
  return out


def run_sdpw(cfg: cfglib.RunConfig, model=None, mcfg=None) -> dict:
  from cqr_jax.prompts import PromptBuilder
  s = cfg.sdpw
  common.write_config(cfg)
  out = common.stage_dir(cfg, "sdpw")
  data_path, done_path = os.path.join(out, DATA_FILE), os.path.join(out, DONE_FILE)
  ds = common.load_split(cfg, cfg.data.train_split)
  done = {d["qid"]: d for d in _read_jsonl(done_path)}
  todo = [t for t in ds.turns if t.qid not in done]
  log.info("SDPW: %d training turns, %d already done, %d to sample", len(ds.turns), len(done),
           len(todo))
  if todo:
    mesh = common.make_mesh(cfg)
    tokenizer = common.load_tokenizer_for(cfg.model.source)
    if model is None:
      model, mcfg = common.load_policy(cfg, mesh)
    ranker = common.build_ranker(cfg, ds, cfg.retrieval.reward_max_words)
    few_shot, zero_shot = PromptBuilder(few_shot=s.few_shot), PromptBuilder()
    sampler = rewriting.make_sampler(cfg, tokenizer, mesh, mcfg, n=s.samples_per_turn,
                                     temperature=s.temperature, max_new_tokens=s.max_new_tokens)
    key = jax.random.key(s.seed)
    with open(data_path, "a", encoding="utf-8") as fdata, \
         open(done_path, "a", encoding="utf-8") as fdone:
      for _, rewrites, _ in rewriting.rewrite_batches(
          model, sampler, tokenizer, few_shot, todo, key=key, n=s.samples_per_turn,
          batch_prompts=s.batch_prompts, temperature=s.temperature, desc="sdpw",
          response_prefix=s.response_prefix):
        _filter_and_write(rewrites, todo, ranker, zero_shot, s.rank_threshold, fdata, fdone,
                          s.lenient_candidates)
  summary = summarize(_read_jsonl(done_path), len(ds.turns))
  common.save_json(os.path.join(out, SUMMARY_FILE), summary)
  log.info("SDPW kept %d of %d sampled (%s)", summary["kept"], summary["sampled"],
           summary["dropped"])
  return summary


_SENTENCE = re.compile(r"[^\n.?!]+[.?!]?")
_TAG = re.compile(r"</?(think|rewrite)>")


def lenient_candidates(text: str, max_candidates: int = 8) -> list[str]:
  """Sentences of a response that failed the format check, as candidate rewrites (tags removed,
  at least 3 words, first occurrence kept, at most `max_candidates`)."""
  out = []
  for m in _SENTENCE.finditer(_TAG.sub(" ", text)):
    c = " ".join(m.group(0).split()).strip(" \"'")
    if len(c.split()) >= 3 and c not in out:
      out.append(c)
    if len(out) == max_candidates:
      break
  return out


def _think_of(text: str, rewrite: str, max_words: int = 60) -> str:
  """The reasoning kept for a lenient sample: the response without tags and without the sentence
  chosen as the rewrite, at most `max_words` words."""
  words = _TAG.sub(" ", text).replace(rewrite, " ").split()
  return " " + " ".join(words[:max_words]) + " "


def _filter_and_write(rewrites, turns, ranker, zero_shot, threshold, fdata, fdone,
                      lenient: bool = False):
  # (turn, sample, candidate text, is_lenient) for every query to rank
  queries = []
  for r in rewrites:
    if r.parsed.format_ok:
      queries.append((r, r.parsed.rewrite, False))
    elif lenient:
      queries += [(r, c, True) for c in lenient_candidates(r.text)]
  rk = ranker.ranks([q[1] for q in queries],
                    [turns[q[0].turn_index].qid for q in queries]) if queries else []
  best: dict[tuple[int, int], tuple] = {}  # (turn, sample) -> (rank, text, lenient)
  for (r, text, len_), x in zip(queries, rk):
    key, x = (r.turn_index, r.sample), int(x)
    cur = best.get(key)
    if cur is None or (x > 0 and (cur[0] < 1 or x < cur[0])):
      best[key] = (x, text, len_)
  by_turn: dict[int, list] = {}
  for r in rewrites:
    by_turn.setdefault(r.turn_index, []).append(r)
  for ti, rs in sorted(by_turn.items()):
    turn, kept, reasons = turns[ti], None, []
    for r in rs:
      got = best.get((ti, r.sample))
      if got is None:
        reasons.append("format")
        continue
      rank, text, len_ = got
      if rank < 1:
        reasons.append("not_found")
      elif rank > threshold:
        reasons.append("rank_above_threshold")
      elif kept is None or rank < kept[1]:
        kept = (r, rank, text, len_)
    if kept is not None:
      r, rank, text, len_ = kept
      think = _think_of(r.text, text) if len_ else r.parsed.think
      rewrite = f" {text} " if len_ else text
      fdata.write(json.dumps({
          "qid": turn.qid, "prompt": zero_shot.text(turn), "reasoning": think,
          "rewrite": rewrite, "rank": rank, "lenient": len_, "turn": turn.to_json()}) + "\n")
    fdone.write(json.dumps({"qid": turn.qid, "kept": kept is not None, "samples": len(rs),
                            "reasons": reasons}) + "\n")
  fdata.flush()
  fdone.flush()
  os.fsync(fdata.fileno())


def summarize(done: list[dict], num_turns: int) -> dict:
  dropped: dict[str, int] = {}
  for d in done:
    for r in d["reasons"]:
      dropped[r] = dropped.get(r, 0) + 1
  kept = sum(d["kept"] for d in done)
  sampled = sum(d["samples"] for d in done)
  return {"turns": num_turns, "turns_done": len(done), "sampled": sampled, "kept": kept,
          "kept_fraction": kept / max(len(done), 1), "dropped": dropped}


def read_sft_data(cfg: cfglib.RunConfig) -> list[dict]:
  path = os.path.join(common.stage_dir(cfg, "sdpw", create=False), DATA_FILE)
  common.require(os.path.join(common.stage_dir(cfg, "sdpw", create=False), SUMMARY_FILE),
                 "sdpw", "the self-distilled SFT set")
  seen, out = set(), []
  for r in _read_jsonl(path):  # a crash between the two appends can repeat a turn: keep one
    if r["qid"] not in seen:
      seen.add(r["qid"])
      out.append(r)
  return out
