"""Stage 1a: self-driven policy warm-up data (method.md 3.1-3.2).

The initial model samples reasoned rewrites for every training turn with the few-shot prompt
(method.md 2.5); a sample is kept when it has the think and rewrite blocks (`sdpw.keep_rule`:
anywhere, as the official filter, or in the strict format) and its rewrite puts a gold passage at
rank <= `sdpw.rank_threshold` (the paper: rank 1). Kept samples are written with the
ZERO-shot prompt that SFT trains on (method.md 3.3). Resumable: finished turns are recorded as
they complete and skipped on restart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re

import jax

from cqr_jax import config as cfglib
from cqr_jax import distributed, paths
from cqr_jax.parsing import passes, retrieval_query
from train import common, rewriting

log = logging.getLogger("cqr_jax")
USES_CONFIG = True
DATA_FILE, DONE_FILE, SUMMARY_FILE = "sft_data.jsonl", "done.jsonl", "summary.json"
STATE_FILE = "random_state.json"


def add_args(p):
  common.stage_args(p)


def run(args) -> int:
  run_sdpw(common.config_from_args(args))
  return 0


def _read_jsonl(path: str, torn: list | None = None) -> list[dict]:
  """The records of a JSONL file up to its first unreadable line (a torn write from a crash);
  `torn` (a list) gets that line's number appended."""
  if not paths.exists(path):
    return []
  out = []
  with paths.open_file(path) as f:
    for lineno, line in enumerate(f, 1):
      line = line.strip()
      if line:
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line from a crash: that batch is redone
          if torn is not None:
            torn.append(lineno)
          break
  return out


def _write_jsonl_atomic(path: str, records: list[dict]) -> None:
  paths.write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def repair(out: str) -> dict[str, dict]:
  """{qid: done record} of the committed turns. A turn is committed by its line in done.jsonl
  (written after its batch's kept samples); a torn line, and kept samples of uncommitted or
  repeated turns, are removed and both files rewritten atomically (one warning line)."""
  data_path, done_path = os.path.join(out, DATA_FILE), os.path.join(out, DONE_FILE)
  torn: list[int] = []
  done_list = _read_jsonl(done_path, torn)
  done = {d["qid"]: d for d in done_list}
  data_all = _read_jsonl(data_path, torn)
  seen, data = set(), []
  for r in data_all:
    if r["qid"] in done and r["qid"] not in seen:
      seen.add(r["qid"])
      data.append(r)
  if torn or len(data) != len(data_all) or len(done) != len(done_list):
    if common.is_main():
      log.warning("%s: repaired after an interrupted write (%d torn line(s), %d uncommitted or "
                  "repeated sample(s) removed); their batch is sampled again", out, len(torn),
                  len(data_all) - len(data))
      _write_jsonl_atomic(data_path, data)
      _write_jsonl_atomic(done_path, list(done.values()))
  return done


def _random_state(out: str, s, key, num_turns: int) -> None:
  """Records how SDPW's randomness is laid out (batch b of the training turns samples with
  fold_in(key, b)), and refuses a resume under a different layout."""
  from cqr_jax.checkpoint import key_to_json
  from train.runfolder import RunFolderError
  path = os.path.join(out, STATE_FILE)
  state = {"seed": s.seed, "key": key_to_json(key), "batch_prompts": s.batch_prompts,
           "turns": num_turns, "batch_key": "fold_in(key, b) for turns[b*batch_prompts:]"}
  if paths.exists(path):
    old = common.load_json(path)
    if {k: old.get(k) for k in state} != state:
      raise RunFolderError(f"{path}: recorded random state {old} differs from this run's: the "
                           "finished batches were sampled differently; use a new --run-dir")
  else:
    common.save_json(path, state)


def run_sdpw(cfg: cfglib.RunConfig, model=None, mcfg=None) -> dict:
  s = cfg.sdpw
  common.write_config(cfg)
  out = common.stage_dir(cfg, "sdpw")
  data_path, done_path = os.path.join(out, DATA_FILE), os.path.join(out, DONE_FILE)
  ds = common.load_split(cfg, cfg.data.train_split)
  turns = list(ds.turns)[:s.max_turns or None]  # sdpw.max_turns: the SFT set's source
  key = jax.random.key(s.seed)

  def repair_and_record() -> dict[str, dict]:
    done = repair(out)
    _random_state(out, s, key, len(turns))
    return done

  # Process 0 repairs and records; the others then read what it wrote (design.md "Mesh").
  done = common.main_first(repair_and_record, "sdpw:repair")
  todo = [t for t in turns if t.qid not in done]
  log.info("SDPW: %d training turns, %d already done, %d to sample", len(turns), len(done),
           len(todo))
  if todo:
    # Batches are fixed slices of the whole split (batch b: fold_in(key, b)), so a resumed run
    # draws exactly what an uninterrupted one would (rewriting.rewrite_batches' `start`).
    first = next(i for i, t in enumerate(turns) if t.qid not in done)
    start = first - first % s.batch_prompts
    mesh = common.make_mesh(cfg)
    tokenizer = common.load_tokenizer_for(cfg.model.source)
    if model is None:
      model, mcfg = common.load_policy(cfg, mesh)
    ranker = common.build_ranker(cfg, ds, cfg.retrieval.reward_max_words)
    few_shot = common.prompt_builder(cfg, s.few_shot, tokenizer)
    zero_shot = common.prompt_builder(cfg, False, tokenizer)
    sampler = rewriting.make_sampler(
        cfg, tokenizer, mesh, mcfg, n=s.samples_per_turn, temperature=s.temperature,
        max_new_tokens=s.max_new_tokens, max_prompt_len=rewriting.inference_prompt_len(
            cfg, few_shot, tokenizer, turns, s.response_prefix),
        batch_prompts=min(s.batch_prompts, len(turns)))
    with common.open_append(data_path) as fdata, common.open_append(done_path) as fdone:
      for end, rewrites, _ in rewriting.rewrite_batches(
          model, sampler, tokenizer, few_shot, turns, key=key, n=s.samples_per_turn,
          batch_prompts=s.batch_prompts, temperature=s.temperature, desc="sdpw",
          start=start, response_prefix=s.response_prefix):
        rewrites = [r for r in rewrites if turns[r.turn_index].qid not in done]
        _filter_and_write(rewrites, turns, ranker, zero_shot, s.rank_threshold, fdata, fdone,
                          s.lenient_candidates, s.keep_rule,
                          batch=(end - 1) // s.batch_prompts, query_form=cfg.retrieval.query)
  distributed.sync("sdpw:written")  # process 0's appends, read back by every process
  summary = summarize(_read_jsonl(done_path), len(turns))
  common.save_json(os.path.join(out, SUMMARY_FILE), summary)
  distributed.sync("sdpw:summary")
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


_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)


def _think_of(text: str, rewrite: str, max_words: int = 60) -> str:
  """The reasoning kept for a lenient sample: its closed think block if it has one (e.g. an
  empty one forced by the response prefix), else the response without tags and without the
  sentence chosen as the rewrite; at most `max_words` words."""
  closed = _THINK.search(text)
  words = (closed.group(1) if closed else _TAG.sub(" ", text).replace(rewrite, " ")).split()
  return " " + " ".join(words[:max_words]) + " " if words else " "


def _filter_and_write(rewrites, turns, ranker, zero_shot, threshold, fdata, fdone,
                      lenient: bool = False, keep_rule: str = "format", batch: int | None = None,
                      query_form: str = "rewrite"):
  """Ranks a batch's samples and appends its kept samples, then its done records (the commit),
  each in one write and fsync; a crash in between is undone by `repair`."""
  # (turn, sample, candidate text, is_lenient) for every query to rank; sdpw.keep_rule decides
  # which samples count as formatted (cqr_jax.parsing.passes)
  queries = []
  for r in rewrites:
    if passes(r.parsed, keep_rule):
      queries.append((r, r.parsed.rewrite, False))
    elif lenient:
      queries += [(r, c, True) for c in lenient_candidates(r.text)]
  rk = ranker.ranks([retrieval_query(turns[q[0].turn_index].question, q[1], query_form)
                     for q in queries],
                    [turns[q[0].turn_index].qid for q in queries]) if queries else []
  best: dict[tuple[int, int], tuple] = {}  # (turn, sample) -> (rank, text, lenient)
  for (r, text, len_), x in zip(queries, rk):
    key, x = (r.turn_index, r.sample), int(x)
    cur = best.get(key)
    if cur is None or (x > 0 and (cur[0] < 1 or x < cur[0])):
      best[key] = (x, text, len_)
  by_turn: dict[int, list] = {}
  data_lines, done_lines = [], []
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
      data_lines.append(json.dumps({
          "qid": turn.qid, "prompt": zero_shot.text(turn), "reasoning": think,
          "rewrite": rewrite, "rank": rank, "lenient": len_, "turn": turn.to_json()}) + "\n")
    rec = {"qid": turn.qid, "kept": kept is not None, "samples": len(rs), "reasons": reasons}
    if batch is not None:  # where the samples came from: a resumed run must draw the same
      rec["batch"] = batch
      rec["digest"] = hashlib.sha1("\0".join(r.text for r in rs).encode()).hexdigest()[:12]
    done_lines.append(json.dumps(rec) + "\n")
  from train.runfolder import fault
  for f, lines, point in ((fdata, data_lines, "sdpw_data"), (fdone, done_lines, "sdpw_done")):
    if f is None:  # not process 0: it alone writes
      continue
    text = "".join(lines)
    fault(point, batch, f, text)
    f.write(text)
    paths.fsync(f)


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
