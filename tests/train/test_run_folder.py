"""Issue 36: the run folder is the truth. One test (or a few) per numbered point of the issue."""

import dataclasses
import json
import logging
import os
import warnings

import pytest

from cqr_jax import config as cfglib
from cqr_jax import configlib
from cqr_jax.data.types import DataError, Turn
from train import cli, common, runfolder, sdpw


def _run(tmp_path, name="run"):
  return str(tmp_path / name)


def _new_run(tmp_path, preset="tiny", *sets, outputs=("sdpw",)):
  """A run folder with a recorded config and (fake) outputs of `outputs`."""
  cfg = cfglib.resolve(preset, None, [f"run_dir={_run(tmp_path)}", *sets])
  runfolder.record(cfg)
  for s in outputs:
    os.makedirs(os.path.join(cfg.run_dir, s), exist_ok=True)
    common.save_json(os.path.join(cfg.run_dir, s, "summary.json"), {"turns": 8})
  return cfg


# ------------------------------------------------------------------ 1. the recorded config

def test_1_later_commands_load_the_recorded_config(tmp_path):
  cfg = _new_run(tmp_path, "tiny")
  again = runfolder.resolve(None, None, [], cfg.run_dir)  # no --preset: not cpu-default
  assert again == cfg and again.data.max_test_turns == 4


def test_1_a_changed_field_that_outputs_depend_on_is_refused(tmp_path):
  cfg = _new_run(tmp_path, "cpu-default")
  with pytest.raises(runfolder.RunFolderError, match=r"data\.max_train_turns=8 \(recorded 0"):
    runfolder.resolve("tiny", None, [], cfg.run_dir)
  # evaluation-only fields may differ; a stage section with no output yet is recorded
  ok = runfolder.resolve(None, None, ["eval.greedy=true", "grpo.steps=3"], cfg.run_dir)
  runfolder.record(ok)
  assert runfolder.load_recorded(cfg.run_dir).grpo.steps == 3
  with pytest.raises(runfolder.RunFolderError, match="sdpw.seed"):
    runfolder.resolve(None, None, ["sdpw.seed=5"], cfg.run_dir)


def test_1_evaluate_does_not_overwrite_without_flag(tmp_path, capsys):
  cfg = _new_run(tmp_path, "tiny", outputs=("sdpw", "eval/grpo"))
  assert cli.main(["evaluate", "--run-dir", cfg.run_dir, "--stage", "grpo"]) == 2
  err = capsys.readouterr().err
  assert "--overwrite" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------ 2. rewrite uses the run

def test_2_rewrite_uses_the_latest_trained_stage(tmp_path, monkeypatch, tiny_llama_dir):
  from train import evaluate
  cfg = _new_run(tmp_path, "tiny", f"model.source={tiny_llama_dir}", outputs=("sdpw",))
  os.makedirs(common.ckpt_dir(cfg, "sft"))
  seen = {}

  def fake(cfg, stage, mesh, step=None):
    seen["stage"] = stage
    raise common.MissingStageError("stop here")
  monkeypatch.setattr(evaluate, "load_stage_checkpoint", fake)
  assert cli.main(["rewrite", "--run-dir", cfg.run_dir]) == 2
  assert seen["stage"] == "sft"


# ------------------------------------------------------------------ 3. degenerate inputs

def _toy(monkeypatch, turns, qrels):
  from cqr_jax.data.collection import MemoryCollection
  from cqr_jax.data.dataset import Dataset
  from cqr_jax.data.types import Passage
  ds = Dataset(name="toy", split="test", turns=turns,
               collection=MemoryCollection([Passage("d1", "alder castle")]), qrels=qrels)
  monkeypatch.setattr("cqr_jax.data.load_dataset", lambda *a, **k: ds)
  return dataclasses.replace(cfglib.RunConfig(), data=cfglib.DataSection(dataset="toy"))


def test_3_empty_split_and_no_scored_turn_are_errors(monkeypatch):
  with pytest.raises(DataError, match="no scored turn"):
    common.load_split(_toy(monkeypatch, [], {}), "test")
  turn = Turn("c", 1, "q1", "Where is it?", gold_ids=("d1",))
  with pytest.raises(DataError, match="no scored turn"):
    common.load_split(_toy(monkeypatch, [turn], {"other": {"d1": 1}}), "test")


def _generic(root, splits=()):
  for d in [root] + [os.path.join(root, s) for s in splits]:
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "conversations.jsonl"), "w") as f:
      f.write(json.dumps({"conv_id": "c", "turns": [{"turn_id": 1, "qid": "q", "question": "x?"}]})
              + "\n")
    with open(os.path.join(d, "qrels.tsv"), "w") as f:
      f.write("q\t0\td1\t1\n")
  with open(os.path.join(root, "corpus.jsonl"), "w") as f:
    f.write(json.dumps({"id": "d1", "text": "x"}) + "\n")
  return root


def test_3_generic_folder_split_names(tmp_path):
  root = _generic(str(tmp_path / "flat"))
  cfg = cfglib.resolve(None, None, [f"data.dataset={root}"])
  with pytest.raises(DataError, match="would be the same turns"):
    common.load_split(cfg, "train")
  root = _generic(str(tmp_path / "two"), ["train", "test"])
  cfg = cfglib.resolve(None, None, [f"data.dataset={root}", "data.test_split=tset"])
  with pytest.raises(DataError, match=r"no split 'tset'.*\['test', 'train'\]"):
    common.load_split(cfg, "tset")
  cfg = cfglib.resolve(None, None, [f"data.dataset={root}", "data.test_split=train"])
  with pytest.raises(DataError, match="both 'train'"):
    common.load_split(cfg, "train")


def test_3_a_cap_on_the_data_is_logged(caplog, monkeypatch):
  # A fresh split cache (an earlier test may have loaded this split), and the handler on the
  # project's logger itself (the CLI's logging set-up stops it propagating to the root).
  monkeypatch.setattr(common, "_SPLITS", {})
  cfg = cfglib.resolve("tiny")
  lg = logging.getLogger("cqr_jax")
  lg.addHandler(caplog.handler)
  try:
    with caplog.at_level(logging.WARNING, logger="cqr_jax"):
      ds = common.load_split(cfg, cfg.data.test_split)
  finally:
    lg.removeHandler(caplog.handler)
  assert len(ds.turns) == 4
  assert "data.max_test_turns=4" in caplog.text


def test_3_integer_fields_refuse_fractions():
  with pytest.raises(configlib.ConfigError, match="grpo.steps: expected an integer, got 1.5"):
    cfglib.resolve(None, None, ["grpo.steps=1.5"])
  assert cfglib.resolve(None, None, ["grpo.steps=2.0"]).grpo.steps == 2


def test_3_grpo_after_sdpw_without_sft_is_refused(tmp_path):
  import jax.numpy as jnp
  from train import grpo
  cfg = _new_run(tmp_path, "tiny", outputs=("sdpw",))
  with pytest.raises(common.MissingStageError, match="--init initial"):
    grpo.sft_params_or_none(cfg, {"w": jnp.zeros(3)}, "auto")
  assert grpo.sft_params_or_none(cfg, {"w": jnp.zeros(3)}, "initial") is None


# ------------------------------------------------------------------ 4. checkpoints

def _two_steps(path):
  import jax.numpy as jnp
  from cqr_jax.checkpoint import Checkpointer
  c = Checkpointer(path)
  for s in (1, 2):
    c.save(s, {"w": jnp.full((4, 8), float(s))}, {"s": s})
  c.wait()
  return c


def _truncate(step_dir):
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    for fn in files:
      if os.path.basename(root) == "d":
        p = os.path.join(root, fn)
        data = open(p, "rb").read()
        open(p, "wb").write(data[:5])


def test_4_skipped_step_is_one_line_naming_the_file(tmp_path):
  from cqr_jax.checkpoint import Checkpointer, CheckpointError, abstract_like
  import jax.numpy as jnp
  d = str(tmp_path / "ckpt")
  _two_steps(d)
  _truncate(os.path.join(d, "2"))
  target = abstract_like({"w": jnp.zeros((4, 8))})
  with pytest.warns(UserWarning) as rec:
    step, _, _ = Checkpointer(d).restore(None, target)
  assert step == 1
  msg = str(rec[0].message)
  assert "\n" not in msg and os.path.join(d, "2", "state", "d") in msg
  assert "tensorstore_spec" not in msg and "not valid for value of size 5" in msg
  _truncate(os.path.join(d, "1"))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    with pytest.raises(CheckpointError) as e:
      Checkpointer(d).restore(None, target)
  assert "step 2:" in str(e.value) and "step 1:" in str(e.value)
  assert "tensorstore_spec" not in str(e.value) and len(str(e.value)) < 800


def test_4_evaluation_rows_record_the_checkpoint(monkeypatch, tmp_path):
  from train import evaluate
  monkeypatch.setattr(common, "load_stage_policy", lambda cfg, stage, mesh, step: (7, "m", "c"))
  cfg = cfglib.resolve("tiny", None, [f"run_dir={tmp_path}"])
  _, _, ck = evaluate.load_stage_checkpoint(cfg, "grpo", None)
  assert ck["step"] == 7 and ck["stage"] == "grpo"
  row = evaluate._row("grpo", [{"run_file": "r", "queries": 1, "scored": 1, "per_query": [1.0],
                                **{m + s: 1.0 for m in evaluate.METRICS
                                   for s in ("", "|scored", "|misses")}}], cfg)
  assert "checkpoint" not in row  # evaluate_policy adds it: checked on the source's contract
  import inspect
  assert "checkpoint" in inspect.signature(evaluate.evaluate_policy).parameters


# ------------------------------------------------------------------ 5. SDPW resume

def test_5_torn_write_is_repaired(tmp_path):
  out = str(tmp_path)
  with open(os.path.join(out, sdpw.DONE_FILE), "w") as f:
    f.write(json.dumps({"qid": "a", "kept": True, "samples": 1, "reasons": []}) + "\n")
    f.write('{"qid": "b", "ke')
  with open(os.path.join(out, sdpw.DATA_FILE), "w") as f:
    for q in ("a", "b"):  # b's sample was written, its commit torn
      f.write(json.dumps({"qid": q, "prompt": "p", "reasoning": "", "rewrite": "r"}) + "\n")
  done = sdpw.repair(out)
  assert list(done) == ["a"]
  assert [json.loads(x)["qid"] for x in open(os.path.join(out, sdpw.DATA_FILE))] == ["a"]
  lines = open(os.path.join(out, sdpw.DONE_FILE)).read().splitlines()
  assert [json.loads(x)["qid"] for x in lines] == ["a"]  # every line valid again


@pytest.mark.slow
def test_5_killed_sdpw_resumes_to_the_uninterrupted_result(tmp_path, tiny_llama_dir):
  """SIGKILL mid-write of batch 1's commit, and after batch 0's samples, then a rerun: the
  outputs equal an uninterrupted run's (same keys per absolute batch)."""
  import subprocess
  import sys
  sets = ["--set", f"model.source={tiny_llama_dir}", "--set", "model.compute_dtype=float32",
          "--set", "sdpw.batch_prompts=3", "--set", "sdpw.max_new_tokens=8",
          "--set", "rollout.compute_dtype=float32", "--set", "rollout.max_prompt_len=1024"]
  env = dict(os.environ, CQR_JAX_XLA_CACHE=str(tmp_path / "xla"))

  def run(name, fault=None):
    e = dict(env, CQR_JAX_FAULT=fault) if fault else env
    return subprocess.run([sys.executable, "-m", "train.cli", "sdpw", "--preset", "tiny",
                           "--run-dir", str(tmp_path / name), *sets], env=e,
                          capture_output=True, text=True, timeout=600)

  def outputs(name):
    d = tmp_path / name / "sdpw"
    return [open(d / f).read() for f in (sdpw.DATA_FILE, sdpw.DONE_FILE, sdpw.SUMMARY_FILE)]

  assert run("a").returncode == 0
  for i, fault in enumerate(("sdpw_done:1", "sdpw_data:0")):
    killed = run(f"k{i}", fault)
    assert killed.returncode == -9, killed.stderr[-2000:]
    again = run(f"k{i}")
    assert again.returncode == 0, again.stderr[-2000:]
    assert outputs(f"k{i}") == outputs("a")


# ------------------------------------------------------------------ 6. one line per error

def test_6_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
  argv = ["sdpw", "--run-dir", _run(tmp_path), "--set", "grpo.nn=3", "--print-config"]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "unknown config field 'grpo.nn'" in err
  with pytest.raises(configlib.ConfigError):
    cli.main(argv + ["--debug"])


def test_6_interrupt_says_how_to_resume(monkeypatch, capsys):
  from train import sdpw as mod

  def boom(args):
    raise KeyboardInterrupt
  monkeypatch.setattr(mod, "run", boom)
  assert cli.main(["sdpw"]) == 130
  assert "run the same command again to resume" in capsys.readouterr().err.lower()


def test_6_messages_name_the_file_and_the_input(tmp_path, capsys):
  root = _generic(str(tmp_path / "d"), ["train", "test"])
  with open(os.path.join(root, "train", "conversations.jsonl"), "wb") as f:
    f.write(b'{"conv_id": "c", "turns": []}\n\xff\xfe bad\n')
  assert cli.main(["sdpw", "--run-dir", _run(tmp_path), "--set", f"data.dataset={root}"]) == 2
  err = capsys.readouterr().err
  assert os.path.join(root, "train", "conversations.jsonl") in err and "UTF-8" in err
  assert cli.main(["rewrite", "--conversation", "not json"]) == 2
  assert "--conversation: not JSON" in capsys.readouterr().err
  assert cli.main(["sdpw", "--run-dir", "/proc/x36"]) == 2
  assert "--run-dir /proc/x36: cannot write" in capsys.readouterr().err


def test_6_the_one_line_error_is_also_in_the_run_log(tmp_path, capsys):
  root = _generic(str(tmp_path / "flat"))  # files only at the root: train and test the same
  run = _run(tmp_path)
  assert cli.main(["sdpw", "--preset", "tiny", "--run-dir", run,
                   "--set", f"data.dataset={root}"]) == 2
  err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("cqr-jax sdpw: error:")]
  assert len(err) == 1 and "only at the folder's root" in err[0]
  path = os.path.join(run, "logs", "sdpw.log")
  assert f"ERROR {err[0]}" in open(path).read()
  logging.getLogger("cqr_jax").info("a later line")  # the command is over: its log is closed
  assert "a later line" not in open(path).read()


def test_6_invalid_gguf_and_overlong_prompt_are_named(tmp_path):
  bad = tmp_path / "bad.gguf"
  bad.write_bytes(b"not a gguf")
  with pytest.raises(DataError, match=str(bad)):
    common.load_tokenizer_for(str(bad))
  from train import rewriting

  class Sampler:
    def generate(self, *a, **k):
      raise ValueError("prompts[1] has 9 tokens > max_prompt_len=4")

  class Prompts:
    def token_ids(self, t, tok):
      return [1]
  turns = [Turn("c", 1, "q1", "a?"), Turn("c", 2, "q2", "b?")]
  import jax
  with pytest.raises(ValueError, match="turn 'q2': prompts"):
    next(rewriting.rewrite_batches(None, Sampler(), None, Prompts(), turns,
                                   key=jax.random.key(0), n=1, batch_prompts=2, temperature=0.0))


# ------------------------------------------------------------------ 7. logging

def test_7_info_lines_survive_absl_and_go_to_the_run_log(tmp_path, capsys):
  root = logging.getLogger()
  absl_like = logging.StreamHandler()
  root.addHandler(absl_like)  # what importing absl/orbax does before us
  old = root.level
  root.setLevel(logging.WARNING)
  try:
    runfolder.setup_logging(str(tmp_path), "evaluate")
    logging.getLogger("cqr_jax").info("loaded step %d", 7)
  finally:
    root.removeHandler(absl_like)
    root.setLevel(old)
  assert "loaded step 7" in capsys.readouterr().err
  assert "loaded step 7" in open(tmp_path / "logs" / "evaluate.log").read()


def test_7_a_split_is_loaded_once_per_process():
  cfg = cfglib.resolve("tiny")
  assert common.load_split(cfg, "test") is common.load_split(cfg, "test")


# ------------------------------------------------------------------ 8. presentation

def test_8_print_config_and_help_show_the_values_with_descriptions(tmp_path, capsys):
  assert cli.main(["grpo", "--preset", "tiny", "--run-dir", _run(tmp_path),
                   "--print-config"]) == 0
  out = capsys.readouterr().out
  assert "grpo.steps = 2" in out and "# 0: derived from epochs" in out
  lines = [x for x in out.splitlines() if x.strip()]
  assert all("#" in x for x in lines), [x for x in lines if "#" not in x]
  with pytest.raises(SystemExit):
    cli.main(["sdpw", "--preset", "tiny", "--help"])
  assert "data.max_train_turns = 8" in capsys.readouterr().out


def test_8_model_card_has_prompt_usage_license_and_base_model(tiny_llama_dir, capsys):
  from train import export
  cfg = cfglib.resolve("tiny")
  card = export.model_card(cfg, "grpo", 2, None, repo=tiny_llama_dir)
  assert "license: apache-2.0" in card and "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
  assert "### Context Begin ###" in card and "Query: Who designed it?" in card
  snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
  exec(compile(snippet, "model_card_usage", "exec"), {})  # transformers only, runs as written
  assert capsys.readouterr().out.endswith("\n")  # it printed a rewrite (a random model's words)


@pytest.mark.slow
def test_8_final_checkpoint_is_parameters_only(tmp_path, tiny_llama_dir):
  from cqr_jax.checkpoint import Checkpointer
  from train import sft
  cfg = cfglib.resolve("tiny", None, [
      f"run_dir={tmp_path / 'run'}", f"model.source={tiny_llama_dir}",
      "model.compute_dtype=float32", "sft.epochs=2", "sft.batch_size=2", "sft.micro_batch=2",
      "sft.save_every=1", "sft.train_top_layers=0", "mesh.fsdp=1"])
  d = common.stage_dir(cfg, "sdpw")
  with open(os.path.join(d, sdpw.DATA_FILE), "w") as f:
    for i in range(4):
      f.write(json.dumps({"qid": f"q{i}", "prompt": f"Query: q{i}?\nRewrite:",
                          "reasoning": " r ", "rewrite": f"rewrite {i}"}) + "\n")
  common.save_json(os.path.join(d, sdpw.SUMMARY_FILE), sdpw.summarize([], 4))
  sft.train_sft(cfg)
  ck = Checkpointer(common.ckpt_dir(cfg, "sft"))
  assert ck.all_steps() == [4]  # the earlier (optimizer) checkpoints are gone
  assert ck.meta(4)["final"] and not ck.meta(4)["optimizer"]
  assert not os.path.exists(os.path.join(ck.directory, "4", "state", "opt_state"))
  _, state, _ = ck.restore(4)
  assert set(state["state"]) == {"params", "step"}
  assert sft.train_sft(cfg) is not None  # a rerun of a finished stage trains nothing


def test_8_rerun_of_finished_grpo_stops_before_loading_the_model(tmp_path, tiny_llama_dir,
                                                                 monkeypatch):
  import jax
  import numpy as np
  from flax import nnx
  from cqr_jax import sharding
  from cqr_jax.checkpoint import Checkpointer
  from train import grpo
  cfg = cfglib.resolve("tiny", None, [f"run_dir={tmp_path / 'run'}",
                                      f"model.source={tiny_llama_dir}", "mesh.fsdp=1"])
  model = sharding.create_model(common.policy_config(cfg), common.make_mesh(cfg), seed=0)
  params = nnx.split(model, nnx.Param, ...)[1]
  final = jax.tree.map(lambda x: x + 1, params)
  ck = Checkpointer(common.ckpt_dir(cfg, "grpo"), max_to_keep=None)
  ck.save(1, {"state": {"params": params}}, meta={"final": False}, force=True)
  ck.save(2, {"state": {"params": final}}, meta={"final": True}, force=True)
  ck.wait()

  def loaded(*a, **k):
    raise AssertionError("a finished GRPO stage loaded its model or data")
  for name in ("load_policy", "load_split", "load_tokenizer_for"):
    monkeypatch.setattr(common, name, loaded)
  runfolder.setup_logging(cfg.run_dir, "grpo")
  try:
    state, history = grpo.train_grpo(cfg)
  finally:
    runfolder.close_log_file()
  assert history == [] and int(state.step) == 2
  for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(final)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert Checkpointer(common.ckpt_dir(cfg, "grpo")).all_steps() == [2]  # step 1 removed
  assert "GRPO already finished (final checkpoint step 2" in open(
      os.path.join(cfg.run_dir, "logs", "grpo.log")).read()
