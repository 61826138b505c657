"""docs/paper_presets.md is generated from the config code (train/preset_table.py) and current;
every paper preset has method.md's values; the CPU presets keep their strict rules."""

import dataclasses

import pytest

from cqr_jax import config as cfglib
from train import preset_table


def test_committed_table_is_current():
  with open(preset_table.OUT, encoding="utf-8") as f:
    assert f.read() == preset_table.render(), "run `python -m train.preset_table`"


def test_every_compared_row_matches_method_md():
  for ds in preset_table.DATASETS:
    rows = preset_table.table(ds)[2:]
    assert len(rows) == len(preset_table.ROWS)
    assert not [r for r in rows if "| NO |" in r]


@pytest.mark.parametrize("dataset,overlong", [("topiocqa", "error"), ("qrecc", "truncate_right")])
def test_paper_presets_follow_the_official_code(dataset, overlong):
  for name in preset_table.preset_names(dataset):
    c = cfglib.resolve(name)
    assert (c.sdpw.keep_rule, c.eval.score_rule, c.sft.overlong) == ("tags", "tags", overlong)
    assert (c.grpo.reference, c.grpo.loss.aggregation, c.grpo.loss.token_mean_seqs) == (
        "sft", "token_mean", 8)


@pytest.mark.parametrize("name", ["cpu-default", "tiny", "cpu-mtrag"])
def test_cpu_presets_keep_their_rules(name):
  c = cfglib.resolve(name)
  assert (c.sdpw.keep_rule, c.eval.score_rule, c.sft.overlong) == ("format", "format", "drop")
  assert c.grpo.loss.token_mean_seqs == 0  # the token mean of each update call
  assert dataclasses.asdict(c.grpo.loss)["aggregation"] == "token_mean"
