"""Stages refuse missing or empty inputs with messages that say what to run (issues 7 and 8),
and SDPW's filter/resume bookkeeping on real parses and real BM25 ranks."""

import dataclasses
import json
import os

import pytest

from cqr_jax import config as cfglib
from train import common, export, sdpw, sft
from train.rewriting import Rewrite
from cqr_jax.parsing import parse_response


def tiny_cfg(tmp_path, *sets):
  return cfglib.resolve("tiny", None, [f"run_dir={tmp_path / 'run'}", *sets])


def test_sft_without_sdpw_names_the_stage(tmp_path):
  with pytest.raises(common.MissingStageError, match="cqr-jax sdpw"):
    sft.train_sft(tiny_cfg(tmp_path))


def write_empty_sdpw(cfg):
  d = common.stage_dir(cfg, "sdpw")
  open(os.path.join(d, sdpw.DATA_FILE), "w").close()
  common.save_json(os.path.join(d, sdpw.SUMMARY_FILE), sdpw.summarize([], 0))


def test_empty_sft_set_is_a_clear_error(tmp_path):
  cfg = tiny_cfg(tmp_path)
  write_empty_sdpw(cfg)
  with pytest.raises(sft.EmptySFTSetError, match="samples_per_turn or sdpw.rank_threshold"):
    sft.train_sft(cfg)


def test_empty_sft_set_can_continue_rl_only(tmp_path):
  cfg = tiny_cfg(tmp_path, "sft.allow_empty=true")
  write_empty_sdpw(cfg)
  assert sft.train_sft(cfg) is None
  assert os.path.exists(os.path.join(cfg.run_dir, "sft", "skipped.json"))


def test_grpo_asked_for_sft_start_without_it_names_the_stage(tmp_path):
  import jax.numpy as jnp
  cfg = tiny_cfg(tmp_path)
  with pytest.raises(common.MissingStageError, match="cqr-jax sft"):
    common.restore_stage_params(cfg, "sft", {"w": jnp.zeros(3)})


def test_export_refuses_a_folder_without_config(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.yaml"):
    export.run_config(str(tmp_path))


def test_export_refuses_an_existing_output(tmp_path):
  cfg = tiny_cfg(tmp_path)
  out = tmp_path / "out"
  out.mkdir()
  with pytest.raises(FileExistsError, match="--overwrite"):
    export.export_stage(cfg, "grpo", None, str(out))


def test_sdpw_filter_keeps_rank_one_and_records_reasons(tmp_path):
  cfg = tiny_cfg(tmp_path)
  ds = common.load_split(cfg, "train")
  ranker = common.build_ranker(cfg, ds, 1024)
  from cqr_jax.prompts import PromptBuilder
  turns = [t for t in ds.turns if t.context][:3]
  oracle = turns[0].rewrites["oracle"]
  outs = [
      f"<think> resolve it </think>\n<rewrite> {oracle} </rewrite>",   # format ok, rank 1
      "no tags at all, just text",                                    # format fails
      "<think> x </think>\n<rewrite> zzzz qqqq </rewrite>",           # format ok, not found
  ]
  rws = [Rewrite(turn_index=i, sample=0, text=o, parsed=parse_response(o), finish_reason="eos",
                 num_tokens=10) for i, o in enumerate(outs)]
  with open(tmp_path / "data", "w") as fdata, open(tmp_path / "done", "w") as fdone:
    sdpw._filter_and_write(rws, turns, ranker, PromptBuilder(), 1, fdata, fdone)
  kept = [json.loads(x) for x in open(tmp_path / "data")]
  done = [json.loads(x) for x in open(tmp_path / "done")]
  assert [k["qid"] for k in kept] == [turns[0].qid]
  assert kept[0]["rank"] == 1 and kept[0]["rewrite"] == f" {oracle} "
  assert kept[0]["prompt"].endswith("Rewrite:") and "### Context Begin ###" in kept[0]["prompt"]
  assert [d["reasons"] for d in done] == [[], ["format"], ["not_found"]]


def test_sdpw_lenient_candidates_rescue_a_sentence():
  text = "<think> The user means Tove Zeliell. Who taught Tove Zeliell? more"
  cands = sdpw.lenient_candidates(text)
  assert "Who taught Tove Zeliell?" in cands
  assert all("<think>" not in c for c in cands)


def test_sdpw_resume_skips_finished_turns(tmp_path):
  """With every turn recorded as done, a rerun samples nothing (no model is even loaded)."""
  cfg = tiny_cfg(tmp_path)
  ds = common.load_split(cfg, "train")
  d = common.stage_dir(cfg, "sdpw")
  with open(os.path.join(d, sdpw.DONE_FILE), "w") as f:
    for t in ds.turns:
      f.write(json.dumps({"qid": t.qid, "kept": False, "samples": 1, "reasons": ["format"]}) + "\n")
    f.write('{"qid": "torn')  # a crash mid-line: ignored
  summary = sdpw.run_sdpw(cfg)
  assert summary["turns_done"] == len(ds.turns) and summary["dropped"] == {"format": len(ds.turns)}


def test_grpo_on_kept_turns_without_sdpw_names_the_stage(tmp_path):
  from train import grpo
  cfg = dataclasses.replace(tiny_cfg(tmp_path), grpo=cfglib.GRPOSection(turns="sdpw_kept"))
  with pytest.raises(common.MissingStageError, match="cqr-jax sdpw"):
    grpo.training_turns(cfg, [])
