"""The `cqr-jax` command: help on every stage, config presets, YAML and --set overrides."""

import subprocess
import sys

import pytest

from cqr_jax import config as cfglib
from cqr_jax import configlib
from train import cli


def test_every_stage_has_help(capsys):
  for stage in cli.STAGES:
    with pytest.raises(SystemExit) as e:
      cli.main([stage, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"cqr-jax {stage}" in out
  assert cli.main(["--help"]) == 0
  assert "pipeline" in capsys.readouterr().out


def test_console_script_runs():
  out = subprocess.run([sys.executable, "-m", "train.cli", "grpo", "--help"], capture_output=True,
                       text=True, check=True).stdout
  assert "grpo.loss.kl_estimator" in out and "--preset" in out


def test_defaults_are_the_papers():
  c = cfglib.RunConfig()
  assert (c.grpo.batch_prompts, c.grpo.n, c.grpo.lr, c.grpo.warmup_steps) == (128, 8, 1e-6, 100)
  assert (c.grpo.loss.clip_eps, c.grpo.loss.kl_coef, c.grpo.loss.kl_estimator) == (0.2, 1e-3, "k3")
  assert (c.rollout.temperature, c.rollout.max_prompt_len, c.rollout.max_new_tokens) == (
      0.7, 1536, 1024)
  assert (c.sft.lr, c.sft.epochs, c.sft.b2, c.sft.warmup_ratio) == (1e-5, 2, 0.95, 0.1)
  assert (c.retrieval.top_k, c.retrieval.reward_max_words, c.retrieval.eval_max_words) == (
      100, 1024, 512)


def test_presets_yaml_and_overrides(tmp_path):
  y = tmp_path / "c.yaml"
  y.write_text("grpo:\n  n: 16\n  loss:\n    aggregation: drgrpo\nretrieval:\n  k1: 0.82\n")
  c = cfglib.resolve("qwen2.5-3b-qrecc-bm25", str(y), ["grpo.lr=2e-6", "eval.seeds=1,2,3"])
  assert c.model.source == "models/Qwen2.5-3B-Instruct"
  assert (c.retrieval.k1, c.retrieval.b) == (0.82, 0.68)
  assert c.grpo.n == 16 and c.grpo.lr == 2e-6 and c.grpo.epochs == 9
  assert c.grpo.loss.aggregation == "drgrpo"
  assert c.eval.seeds == (1, 2, 3)
  configlib.dump_yaml(c, tmp_path / "out.yaml")
  again = configlib.merge(cfglib.RunConfig(), configlib.load_yaml(tmp_path / "out.yaml"))
  assert again == c


@pytest.mark.parametrize("override, message", [
    (["grpo.nn=3"], "unknown config field 'grpo.nn'"),
    (["grpo.n=three"], "grpo.n: expected an int"),
    (["grpo.loss.kl_estimator=k9"], "k9"),
    (["grpo"], "section.field=value"),
])
def test_bad_overrides_name_the_field(override, message):
  with pytest.raises((configlib.ConfigError, KeyError, ValueError)) as e:
    cfglib.resolve("tiny", None, override)
  assert message in str(e.value)


def test_unknown_preset_lists_the_known_ones():
  with pytest.raises(configlib.ConfigError, match="cpu-default"):
    cfglib.resolve("nope")
